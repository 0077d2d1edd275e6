"""Checkpoint conversion between Hugging Face Qwen checkpoints and megatron-core `dist_checkpointing`.

- `hf_to_mcore`: a transformers Qwen2 or Qwen v1 (remote code) checkpoint -> a megatron-core checkpoint
  that loads at any TP/PP/VPP layout, plus its `model_config.yaml`.
- `mcore_to_hf`: a megatron-core checkpoint saved at any layout -> safetensors + config.json in either
  Hugging Face layout; LoRA adapters in the checkpoint are merged into their projections.
- `megatron_qwen.convert.lora`: a checkpoint's LoRA adapters as a `peft` adapter (`mcore_to_peft`), and a `peft`
  adapter as an adapter-only checkpoint (`peft_to_mcore`).

Both directions stream: they hold one tensor (or one bounded block of rows of it) at a time, plus one
output shard when writing safetensors.
"""

from megatron_qwen.convert.to_hf import mcore_to_hf
from megatron_qwen.convert.to_mcore import hf_to_mcore
from megatron_qwen.errors import ConversionError

__all__ = ["ConversionError", "hf_to_mcore", "mcore_to_hf"]
