"""Supervised fine-tuning: next-token loss on the trained tokens of ChatML conversations.

    torchrun --nproc-per-node N -m megatron_qwen.stages.sft configs/stage/sft.yaml \\
        training.init_from=CKPT data.paths=[PREFIX] [key=value ...]

Data: `tools/preprocess_data.py --chat` shards (see megatron_qwen.data.chat_datasets). The loss is the
mean over the tokens QwenLM finetune.py trains (assistant replies and the ChatML markers), nothing else.
"""

from __future__ import annotations

from functools import partial

from megatron_qwen.data.chat_datasets import build_sft_datasets, packed_rows
from megatron_qwen.evaluation.during_training import after_save_hook
from megatron_qwen.training.forward_backward import lm_loss, model_inputs
from megatron_qwen.training.loop import Model, Stage, run_stage, train


def build_datasets(cfg, tokenizer):
    """Train and valid splits of the chat shards in ``data.paths``."""
    return build_sft_datasets(cfg)


def sft_forward_step(data_iterator, model):
    """megatron-core forward_step_func: packed rows attend within each conversation (boundaries read from the
    position ids while they are still on the host), position ids restart."""
    batch = next(data_iterator)
    packed = packed_rows(batch["position_ids"], next(model.parameters()).device)
    batch = model_inputs(batch, model)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=packed)
    return output, partial(lm_loss, batch["loss_mask"])


STAGE = Stage(name="sft", build_datasets=build_datasets, forward_step=sft_forward_step,
              trains={"sft": Model(rope_at_positions=True)})

if __name__ == "__main__":
    run_stage(STAGE.name, lambda cfg: train(cfg, STAGE, after_save_hook(cfg)))
