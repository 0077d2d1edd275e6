"""Data tooling: Megatron indexed shards (indexed.py), corpus preprocessing (preprocess.py runs it, reading the
input with jsonl_input.py and rendering each mode's records with renderers.py) and the datasets."""
