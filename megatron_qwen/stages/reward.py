"""Reward model: preference-model pretraining (PMP) and fine-tuning on comparisons, one pairwise loss.

    torchrun --nproc-per-node N -m megatron_qwen.stages.reward configs/stage/reward_pmp.yaml \\
        training.init_from=LM_CKPT data.paths=[PREFIX] [key=value ...]
    torchrun --nproc-per-node N -m megatron_qwen.stages.reward configs/stage/reward.yaml \\
        training.init_from=PMP_CKPT data.paths=[PREFIX] [key=value ...]

Data: `tools/preprocess_data.py --preference` shards. Each micro-batch holds whole pairs (chosen, rejected
side by side); the reward is the head's output at each sequence's final <|im_end|>, and the loss is
``-log sigmoid(r_chosen - r_rejected)`` averaged over pairs. Accuracy (r_chosen > r_rejected) and the
mean margin are logged with it.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from megatron_qwen.data.chat_datasets import build_preference_datasets
from megatron_qwen.model.context_parallel import cp_size, sum_over_cp
from megatron_qwen.training.forward_backward import model_inputs
from megatron_qwen.training.loop import Model, Stage, run_stage, train

REPORT_KEYS = ("reward loss", "accuracy", "margin")


def build_datasets(cfg, tokenizer):
    """Train and valid splits of the preference shards in ``data.paths``."""
    return build_preference_datasets(cfg)


def pairwise_loss(read_at: torch.Tensor, rewards: torch.Tensor):
    """Sum of ``-log sigmoid(r_chosen - r_rejected)`` over the micro-batch's pairs and the pair count.

    `rewards` [b, s] per token, `read_at` [b, s] one-hot at each sequence's final token; rows 2k and
    2k+1 are the chosen and rejected sides of pair k. With context parallelism each rank holds a share of the
    tokens: the reward is summed over the CP group, every CP rank computes the same pair losses, and the loss
    it differentiates is multiplied by the CP size because megatron-core divides the gradients by the pair count
    summed over DP x CP (as its schedule does for losses that are not per-token).
    """
    reward = sum_over_cp((rewards.float() * read_at.float()).sum(dim=-1))
    margin = reward[0::2] - reward[1::2]
    loss_sum = -F.logsigmoid(margin).sum()
    pairs = torch.tensor(margin.numel(), dtype=torch.int, device=margin.device)
    count = pairs.float()
    report = {
        "reward loss": torch.stack([loss_sum.detach(), count]),
        "accuracy": torch.stack([(margin > 0).float().sum().detach(), count]),
        "margin": torch.stack([margin.sum().detach(), count]),
    }
    return loss_sum * cp_size(), pairs, report


def reward_forward_step(data_iterator, model):
    """megatron-core forward_step_func: one right-padded sequence per row, plain causal attention."""
    batch = model_inputs(next(data_iterator), model)
    output = model(batch["tokens"], None, None)
    return output, partial(pairwise_loss, batch["loss_mask"])


STAGE = Stage(
    name="reward",
    build_datasets=build_datasets,
    forward_step=reward_forward_step,
    trains={"reward": Model(head="scalar")},  # from training.init_from: a language model starts a fresh head
    report_keys=REPORT_KEYS,
)

if __name__ == "__main__":
    run_stage(STAGE.name, partial(train, stage=STAGE))
