"""PPO's megatron-core forward steps: what each pass computes per micro-batch, on the last pipeline stage.

A micro-batch is a dict of [b, s] tensors (see `rl.experience`): ``tokens``, ``position_ids``, ``labels``
and ``mask`` (1 where the label is a response token), plus the experience fields a loss needs. Collecting
steps (old and reference log-probabilities, values, rewards) return per-token tensors; update steps return
megatron-core's (loss sum, token count, {report: [sum, count]}) so the loss is the per-token mean over the
whole data-parallel batch at every layout, as `training.forward_backward` does for the language-model loss.
With context parallelism each CP rank runs its share of every row (the per-token experience fields split as the
tokens are); collecting steps gather whole rows back, update steps sum their share's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from megatron_qwen.model.context_parallel import cp_rank, cp_size, gather_sequence, split_sequence
from megatron_qwen.rl.logprobs import token_entropy, token_logprobs
from megatron_qwen.rl.ppo_math import kl_estimate, policy_loss, value_loss
from megatron_qwen.training.forward_backward import model_inputs

# Each report is logged under its own name (its mean over the step's optimizer steps).
POLICY_REPORTS = ("policy_loss", "clip_fraction", "approx_kl", "policy_entropy", "ptx_loss")
VALUE_REPORTS = ("value_loss", "value_clip_fraction")


# The experience fields that hold one value per token ([b, s]): split over CP ranks as the tokens are.
ROLLOUT_TOKEN_KEYS = ("mask", "old_logprobs", "ref_logprobs", "advantages", "old_values", "returns")


def _forward(data_iterator, model):
    """The model's output on a micro-batch cut to this CP rank's share of every row (whole without CP)."""
    batch = next(data_iterator)
    size = cp_size()
    if size > 1:
        batch = {k: split_sequence(v, 1, cp_rank(), size) if k in ROLLOUT_TOKEN_KEYS else v for k, v in batch.items()}
    batch = model_inputs(batch, model)
    return model(batch["tokens"], batch["position_ids"], None), batch


def logprob_step(vocab_limit: int, temperature: float, data_iterator, model):
    """Collect log p(label) and the entropy at every response token (0 elsewhere)."""
    output, batch = _forward(data_iterator, model)

    def collect(logits, non_loss_data=True):
        mask = batch["mask"]
        return {  # whole rows, gathered from the CP ranks' shares
            "logprobs": gather_sequence(token_logprobs(logits, batch["labels"], vocab_limit, temperature).detach()
                                        * mask, dim=1),
            "entropy": gather_sequence(token_entropy(logits, vocab_limit, temperature) * mask, dim=1),
        }

    return output, collect


def scalar_step(data_iterator, model):
    """Collect a scalar-head model's value at every token (values; rewards read at one token later)."""
    output, _ = _forward(data_iterator, model)
    return output, lambda values, non_loss_data=True: gather_sequence(values.detach().float(), dim=1)


def _pair(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.stack([total.detach().float(), count.detach().float()])


def policy_update_step(vocab_limit: int, temperature: float, clip: float, grpo_kl_coef: float, data_iterator, model):
    """The policy's loss on a rollout micro-batch (clipped surrogate; with GRPO plus the k3 KL to the
    reference) or on a pretraining micro-batch (``kind`` "ptx": the LM loss). Each micro-batch's loss sum is
    multiplied by its ``weight`` so that rollout and pretraining terms keep their own per-token means."""
    output, batch = _forward(data_iterator, model)

    def loss(logits):
        zero = torch.zeros((), device=logits.device)
        if batch["kind"] == "ptx":
            mask = batch["loss_mask"]
            per_token = -token_logprobs(logits, batch["labels"], vocab_limit) * mask
            count = mask.sum()
            reports = {key: _pair(zero, zero) for key in POLICY_REPORTS}
            reports["ptx_loss"] = _pair(per_token.sum(), count)
            return per_token.sum() * batch["weight"], count.to(torch.int), reports
        mask = batch["mask"]
        logprobs = token_logprobs(logits, batch["labels"], vocab_limit, temperature)
        per_token, clipped, approx_kl = policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], clip)
        if grpo_kl_coef:
            per_token = per_token + grpo_kl_coef * kl_estimate(logprobs, batch["ref_logprobs"], "k3", mask)
        count = mask.sum()
        reports = {
            "policy_loss": _pair((per_token * mask).sum(), count),
            "clip_fraction": _pair((clipped * mask).sum(), count),
            "approx_kl": _pair((approx_kl * mask).sum(), count),
            "policy_entropy": _pair((token_entropy(logits, vocab_limit, temperature) * mask).sum(), count),
            "ptx_loss": _pair(zero, zero),
        }
        return (per_token * mask).sum() * batch["weight"], count.to(torch.int), reports

    return output, loss


def value_update_step(clip: float, data_iterator, model):
    """The value model's clipped loss on the response tokens of a rollout micro-batch."""
    output, batch = _forward(data_iterator, model)

    def loss(values):
        mask = batch["mask"]
        per_token, clipped = value_loss(values.float(), batch["old_values"], batch["returns"], clip)
        count = mask.sum()
        reports = {"value_loss": _pair((per_token * mask).sum(), count),
                   "value_clip_fraction": _pair((clipped * mask).sum(), count)}
        return (per_token * mask).sum(), count.to(torch.int), reports

    return output, loss


@dataclass(frozen=True)
class ForwardSteps:
    """The forward steps of one PPO run, with its constants bound."""

    logprobs: Callable  # collect: log-probabilities and entropy of the response tokens (policy, reference)
    scalar: Callable  # collect: a scalar head's value at every token (value model, reward model)
    policy: Callable  # update: the policy's loss (POLICY_REPORTS)
    value: Callable  # update: the value model's loss (VALUE_REPORTS)


def steps(vocab_limit: int, temperature: float, clip: float, value_clip: float, grpo_kl_coef: float) -> ForwardSteps:
    """The forward steps of one PPO run: `temperature` scales the logits as the sampler did, `clip` and
    `value_clip` bound the policy ratio and the value change, `grpo_kl_coef` weights GRPO's KL term (0: none)."""
    return ForwardSteps(
        logprobs=partial(logprob_step, vocab_limit, temperature),
        scalar=scalar_step,
        policy=partial(policy_update_step, vocab_limit, temperature, clip, grpo_kl_coef),
        value=partial(value_update_step, value_clip),
    )
