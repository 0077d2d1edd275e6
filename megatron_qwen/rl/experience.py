"""Rollouts laid out for the training-layout forward, and the experience PPO learns from.

Each rollout (prompt + response) is one right-padded row: tokens, next-token labels, position ids from 0,
and ``mask`` 1 where the label is a response token (the actions). Causal attention needs no padding mask.
`per_token_rewards` puts the KL penalty on every action and the score on the last; advantages follow by
GAE (`rl.ppo_math`) or, for GRPO, from the scores of each prompt's group of samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_qwen.rl.ppo_math import gae, group_advantages, kl_estimate, whiten


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
