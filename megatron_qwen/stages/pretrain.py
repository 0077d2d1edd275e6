"""Pretraining stage: next-token prediction on blended Megatron shards.

    torchrun --nproc-per-node N -m megatron_qwen.stages.pretrain CONFIG.yaml [key=value ...]
"""

from __future__ import annotations

from megatron_qwen.data.gpt import build_gpt_datasets
from megatron_qwen.evaluation.during_training import after_save_hook
from megatron_qwen.training.forward_backward import lm_forward_step
from megatron_qwen.training.loop import Model, Stage, run_stage, train


def build_datasets(cfg, tokenizer):
    """Train and valid splits of ``data.paths`` as megatron-core GPTDatasets."""
    train, valid, _ = build_gpt_datasets(cfg, tokenizer.eod_id, tokenizer.n_vocab)
    return train, valid


STAGE = Stage(name="pretrain", build_datasets=build_datasets, forward_step=lm_forward_step,
              trains={"pretrain": Model()})  # fresh weights, or training.init_from

if __name__ == "__main__":
    run_stage(STAGE.name, lambda cfg: train(cfg, STAGE, after_save_hook(cfg)))
