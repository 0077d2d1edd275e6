"""Data tooling: Megatron indexed shards (indexed.py), corpus preprocessing (preprocess.py) and datasets."""
