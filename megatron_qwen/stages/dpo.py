"""Direct preference optimisation: the policy (from the SFT model) learns from preference pairs against a frozen
reference (by default the same checkpoint), with no reward model and no sampling (Rafailov et al. 2023).

    torchrun --nproc-per-node N -m megatron_qwen.stages.dpo configs/stage/dpo.yaml \\
        training.init_from=SFT_CKPT data.paths=[PREFIX] [dpo.reference_from=CKPT] [key=value ...]

Data: `tools/preprocess_data.py --preference` shards, chosen and rejected side by side in each micro-batch (as
the reward stage). A response's log-probability is the sum over its tokens from where the two sides first
differ (`training.preference.response_start`). Each global batch the frozen reference's log-probabilities are
computed first (the skeleton's per-batch preparation), then the policy's loss: ``dpo.loss`` sigmoid (with
``dpo.label_smoothing``: cDPO) or ipo, at ``dpo.beta``, averaged over pairs. Logged with it: the chosen and
rejected rewards beta x log(pi / pi_ref), the reward accuracy (chosen above rejected) and the margin. A policy
that starts from its reference has loss ln 2 at the first step.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from megatron_qwen.config import Config, DPOConfig
from megatron_qwen.data.chat_datasets import build_preference_datasets
from megatron_qwen.evaluation.during_training import after_save_hook
from megatron_qwen.model.context_parallel import cp_size, sum_over_cp
from megatron_qwen.training.forward_backward import forward_collect, model_inputs
from megatron_qwen.training.loop import Model, Stage, Trainer, run_stage, train
from megatron_qwen.training.preference import dpo_losses, response_start

REPORT_KEYS = ("dpo_loss", "chosen_reward", "rejected_reward", "accuracy", "margin")
REFERENCE_KEY = "reference_logprobs"  # the micro-batch entry the preparation adds


class ResponseRows:
    """The sequences of a preference dataset (chosen at even items, rejected at odd) with next-token labels and a
    loss mask that selects the labels that are response tokens."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        item, other = self.pairs[i], self.pairs[i ^ 1]  # the other side of the same pair
        tokens = item["tokens"]
        length = int(np.argmax(item["loss_mask"])) + 1  # the preference rows mark their final token
        start = response_start(tokens[:length], other["tokens"][: int(np.argmax(other["loss_mask"])) + 1])
        labels = np.zeros_like(tokens)
        labels[:-1] = tokens[1:]
        loss_mask = np.zeros(len(tokens), dtype=np.float32)
        loss_mask[max(start - 1, 0) : length - 1] = 1.0  # position j predicts token j + 1
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}


def build_datasets(cfg, tokenizer):
    """Train and valid splits of the preference shards in ``data.paths``, with response masks."""
    train_pairs, valid_pairs = build_preference_datasets(cfg, "dpo.epochs")
    return ResponseRows(train_pairs), None if valid_pairs is None else ResponseRows(valid_pairs)


def sequence_logprobs(loss_mask: torch.Tensor, token_losses: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its response tokens, from the model's per-token losses [b, s] (with
    context parallelism, this rank's share of the tokens: summed over the CP group)."""
    return sum_over_cp(-(token_losses.float() * loss_mask.float()).sum(dim=-1))


def reference_step(data_iterator, model):
    """megatron-core forward_step_func collecting each sequence's response log-probability (frozen reference)."""
    batch = model_inputs(next(data_iterator), model)
    output = model(batch["tokens"], None, None, labels=batch["labels"])
    return output, lambda losses, non_loss_data=True: sequence_logprobs(batch["loss_mask"], losses).detach()


def add_reference_logprobs(trainer: Trainer, micro: list[dict]) -> None:
    """The skeleton's per-batch preparation: the frozen reference's log-probabilities, one per sequence, added to
    each micro-batch (on the last pipeline stage, the only one that computes the loss)."""
    t = trainer.cfg.training
    with trainer.frozen_model("reference") as reference:
        collected = forward_collect(reference.chunks, micro, reference_step, trainer.cfg.model.seq_length,
                                    t.micro_batch_size)
    for i, batch in enumerate(micro):
        batch[REFERENCE_KEY] = collected[i] if collected is not None else torch.zeros(t.micro_batch_size)


def dpo_loss(settings: DPOConfig, batch: dict, token_losses: torch.Tensor):
    """Sum of the pairs' losses in the micro-batch, the pair count and the [sum, count] reports. Every CP rank
    computes the same pair losses; the one it differentiates is multiplied by the CP size (see the reward stage's
    `pairwise_loss`)."""
    policy = sequence_logprobs(batch["loss_mask"], token_losses)
    reference = batch[REFERENCE_KEY].to(policy.device, torch.float32)
    losses, chosen, rejected = dpo_losses(policy[0::2], policy[1::2], reference[0::2], reference[1::2],
                                          settings.beta, settings.label_smoothing, settings.loss)
    pairs = torch.tensor(losses.numel(), dtype=torch.int, device=losses.device)
    count = pairs.float()
    margin = chosen - rejected
    report = {
        "dpo_loss": torch.stack([losses.sum().detach(), count]),
        "chosen_reward": torch.stack([chosen.sum(), count]),
        "rejected_reward": torch.stack([rejected.sum(), count]),
        "accuracy": torch.stack([(margin > 0).float().sum(), count]),
        "margin": torch.stack([margin.sum(), count]),
    }
    return losses.sum() * cp_size(), pairs, report


def dpo_forward_step(settings: DPOConfig, data_iterator, model):
    """megatron-core forward_step_func of the policy: one right-padded sequence per row, plain causal attention."""
    batch = model_inputs(next(data_iterator), model)
    output = model(batch["tokens"], None, None, labels=batch["labels"])
    return output, partial(dpo_loss, settings, batch)


def check_dpo(cfg: Config) -> list[str]:
    """The DPO settings' rules; each problem names the key and the fix."""
    d, problems = cfg.dpo, []
    if not cfg.training.init_from:
        problems.append("training.init_from is not set: DPO fine-tunes a model (the SFT checkpoint), which is also "
                        "the reference unless dpo.reference_from names another")
    if d.beta <= 0:
        problems.append(f"dpo.beta={d.beta} must be > 0 (the usual range is 0.01-0.5; the default is 0.1)")
    if not 0 <= d.label_smoothing < 0.5:
        problems.append(f"dpo.label_smoothing={d.label_smoothing} is the probability that a label is flipped: use "
                        "0 <= label_smoothing < 0.5 (0: plain DPO)")
    if d.loss == "ipo" and d.label_smoothing:
        problems.append(f"dpo.label_smoothing={d.label_smoothing} applies to the sigmoid loss only: set "
                        "dpo.label_smoothing=0 with dpo.loss=ipo, or dpo.loss=sigmoid")
    return problems


def dpo_stage(cfg: Config) -> Stage:
    """The DPO stage at `cfg`'s settings."""
    return Stage(
        name="dpo",
        build_datasets=build_datasets,
        forward_step=partial(dpo_forward_step, cfg.dpo),
        trains={"policy": Model()},
        frozen={"reference": Model(from_keys=("dpo.reference_from", "training.init_from"))},
        report_keys=REPORT_KEYS,
        prepare=add_reference_logprobs,
        check=check_dpo,
    )


def train_dpo(cfg: Config) -> int:
    """Run (or resume) a DPO job; returns the process exit code."""
    return train(cfg, dpo_stage(cfg), after_save_hook(cfg))


if __name__ == "__main__":
    run_stage("dpo", train_dpo)
