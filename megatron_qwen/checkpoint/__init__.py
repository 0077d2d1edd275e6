"""Checkpoints: what a checkpoint directory holds (`directory`), what loading one may unpickle (`safety`),
dist_checkpointing chunks read and written without process groups (`dcp_io`), and saving and loading models
and training checkpoints at any layout (`io`)."""
