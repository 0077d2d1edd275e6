"""Running checkpoints: full-vocabulary logits at any layout (`forward`) and generation."""
