"""Rollouts laid out for the training-layout forward, and the experience PPO learns from.

Each rollout (prompt + response) is one right-padded row: tokens, next-token labels, position ids from 0,
and ``mask`` 1 where the label is a response token (the actions). Causal attention needs no padding mask.
`per_token_rewards` puts the KL penalty on every action and the score on the last; advantages follow by
GAE (`rl.ppo_math`) or, for GRPO, from the scores of each prompt's group of samples. `shape_scores` applies
the unfinished-response rule and the running normalisation; `experience_reports` and `experience_metrics` give
the step's experience metrics (each named once, here) as means over the data-parallel batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megatron_qwen.rl.ppo_math import explained_variance, gae, group_advantages, kl_estimate, whiten
from megatron_qwen.rl.rewards import RunningMoments
from megatron_qwen.training.forward_backward import reduce_reports


@dataclass
class Rollouts:
    """One step's rollouts on this data-parallel rank: each prompt's samples next to each other."""

    prompts: list[list[int]]
    responses: list[list[int]]  # the new ids, the stop id included when reached
    finished: list[bool]  # stopped at a stop id, not cut by max_new_tokens
    sampler_logprobs: list[list[float]]  # the generation engine's log-probabilities of the new ids
    prompt_index: list[int]  # the prompt's index among the step's prompts (all ranks), for messages
    seconds: float = 0.0
    new_tokens: int = 0

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class Rows:
    """Rollouts as [n, length] tensors; `final` [n] is the index of each row's last token."""

    tokens: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor
    final: torch.Tensor
    extra: dict = field(default_factory=dict)  # experience fields of the same shape, added as they are computed

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def to(self, device: torch.device) -> Rows:
        """The rows on `device` (where the experience is computed and reduced over the data-parallel group)."""
        return Rows(*(t.to(device) for t in (self.tokens, self.labels, self.position_ids, self.mask, self.final)),
                    extra={k: v.to(device) for k, v in self.extra.items()})

    def micro_batches(self, size: int) -> list[dict]:
        """The rows in order, `size` per micro-batch, as the forward steps take them."""
        fields = {"tokens": self.tokens, "labels": self.labels, "position_ids": self.position_ids, "mask": self.mask,
                  **self.extra}
        return [dict({k: v[i:i + size] for k, v in fields.items()}, kind="rollout", weight=1.0)
                for i in range(0, len(self.tokens), size)]


def layout_rows(rollouts: Rollouts, multiple: int = 1, pad_id: int = 0) -> Rows:
    """Right-padded rows of prompt + response, the length a multiple of `multiple` (TP under SP)."""
    sequences = [p + r for p, r in zip(rollouts.prompts, rollouts.responses)]
    length = -(-max(len(s) for s in sequences) // multiple) * multiple
    n = len(sequences)
    tokens = torch.full((n, length), pad_id, dtype=torch.long)
    mask = torch.zeros(n, length)
    final = torch.zeros(n, dtype=torch.long)
    for i, (prompt, seq) in enumerate(zip(rollouts.prompts, sequences)):
        tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, len(prompt) - 1 : len(seq) - 1] = 1.0  # labels that are response tokens
        final[i] = len(seq) - 1
    labels = torch.cat([tokens[:, 1:], torch.full((n, 1), pad_id, dtype=torch.long)], dim=1)
    position_ids = torch.arange(length).unsqueeze(0).expand(n, length).contiguous()
    return Rows(tokens, labels, position_ids, mask, final)


def per_token_rewards(scores: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float, estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [n, s]: ``-kl_coef * KL`` on every action and the score added on the last one, the KL [n, s])."""
    kl = kl_estimate(old_logprobs, ref_logprobs, estimator, mask)
    rewards = -kl_coef * kl
    last = (mask.cumsum(dim=1) == mask.sum(dim=1, keepdim=True)) & (mask > 0)  # each row's last action
    rewards = rewards + last.float() * scores[:, None]
    return rewards, kl


def gae_advantages(rewards, values, mask, gamma: float, lam: float, dp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(whitened advantages over the whole data-parallel batch, returns) from GAE on the actions."""
    advantages, returns = gae(rewards, values * mask, mask, gamma, lam)
    return whiten(advantages, mask, dp_group), returns


def grpo_advantages(scores: torch.Tensor, mask: torch.Tensor, samples_per_prompt: int) -> torch.Tensor:
    """Each action's advantage: its rollout's score normalised within the prompt's group of samples."""
    return group_advantages(scores, samples_per_prompt)[:, None] * mask


def shape_scores(raw: torch.Tensor, finished: torch.Tensor, mask: torch.Tensor, p, moments: RunningMoments,
                 dp_group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(raw scores after the ``ppo.unfinished`` rule, scores normalised by the running moments when
    ``ppo.reward_norm``, the action mask without dropped rollouts, which rollouts count in the statistics)."""
    mask = mask.clone()
    if p.unfinished == "penalty":
        raw = torch.where(finished, raw, torch.full_like(raw, p.unfinished_penalty))
    elif p.unfinished == "drop":
        mask[~finished] = 0.0
    kept = finished | (p.unfinished != "drop")
    if not p.reward_norm:
        return raw, raw, mask, kept
    moments.update(raw[kept], dp_group)
    return raw, moments.normalise(raw), mask, kept


def sampler_rows(rollouts: Rollouts, length: int) -> torch.Tensor:
    """The engine's log-probabilities at the label positions of the response tokens ([n, length], host)."""
    sampler = torch.zeros(len(rollouts), length)
    for i, (prompt, response) in enumerate(zip(rollouts.prompts, rollouts.responses)):
        first = len(prompt) - 1  # the label position of the response's first token
        sampler[i, first:first + len(response)] = torch.tensor(rollouts.sampler_logprobs[i][:len(response)])
    return sampler


def experience_reports(rollouts: Rollouts, raw, scores, kept, finished, mask, old_logprobs, ref_logprobs, entropy,
                       values=None, returns=None, dp_group=None, last_stage: bool = True) -> dict:
    """This rank's [sum, count] of each experience metric (the ``*_sq_mean`` ones give the standard deviations)."""
    device = raw.device
    tokens, responses = mask.sum(), torch.tensor(float(len(rollouts)), device=device)
    kl = ((old_logprobs - ref_logprobs) * mask).sum()
    sampler = sampler_rows(rollouts, mask.shape[1]).to(device)
    reports = {
        "reward_mean": [raw[kept].sum(), kept.sum()], "reward_sq_mean": [(raw[kept] ** 2).sum(), kept.sum()],
        "reward_normalised_mean": [scores[kept].sum(), kept.sum()],
        "reward_normalised_sq_mean": [(scores[kept] ** 2).sum(), kept.sum()],
        "kl_to_reference": [kl, tokens], "kl_per_response": [kl, kept.sum()],
        "entropy": [(entropy * mask).sum(), tokens],  # the policy's, on the rollouts before this step's updates
        "response_length": [torch.tensor(float(sum(map(len, rollouts.responses))), device=device), responses],
        "finished_fraction": [finished.float().sum(), responses],
        "sampler_trainer_logprob_gap": [((sampler - old_logprobs).abs() * mask).sum(), tokens],
    }
    if values is not None:
        ev = explained_variance(values, returns, mask, dp_group)
        weight = 1.0 if last_stage else 0.0  # the value model's outputs exist on the last pipeline stage only
        reports["explained_variance"] = [ev * weight, ev.new_tensor(weight)]
    return reports


def experience_metrics(reports: dict, last_stage: bool, device) -> dict[str, float]:
    """The experience metrics over the data-parallel batch, the same on every rank (means; rewards' std too)."""
    keys = tuple(reports)
    item = {key: torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in reports[key]])
            for key in keys}
    means = {key: float(v) for key, v in reduce_reports([item] if last_stage else [], keys, device).items()}
    for name in ("reward", "reward_normalised"):
        square = means.pop(f"{name}_sq_mean")
        means[f"{name}_std"] = math.sqrt(max(square - means[f"{name}_mean"] ** 2, 0.0))
    return means
