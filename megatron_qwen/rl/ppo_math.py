"""The arithmetic of PPO and GRPO on per-token tensors: KL estimators, GAE, whitening, group-relative
advantages, and the clipped policy and value losses.

Pure functions of [batch, tokens] tensors with a 0/1 ``mask`` of the response tokens that count; the
few that need statistics over the whole data-parallel batch take an optional process group. Each is
checked against hand-computed small cases in tests/test_ppo.py.
"""

from __future__ import annotations

import torch


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1",
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probabilities, 0 where `mask`
    (when given) is 0.

    ``k1`` = log p - log q (unbiased, can be negative); ``k3`` = exp(log q - log p) - (log q - log p) - 1
    (unbiased, never negative; Schulman's "Approximating KL divergence").
    """
    log_ratio = ref_logprobs - logprobs
    if mask is not None:
        # Masked before the exponential: outside the response log q is 0 and log p may be below -88.7, where
        # exp overflows fp32; a mask applied after it would still give inf * 0 = NaN in the loss and its gradient.
        log_ratio = torch.where(mask > 0, log_ratio, torch.zeros_like(log_ratio))
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"KL estimator {estimator!r} is not k1 or k3")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of x where mask is 1, over `group` too when given (an all-reduce)."""
    total = (x * mask).sum()
    if group is not None:
        total = total.clone()
        torch.distributed.all_reduce(total, group=group)
    return total


def masked_mean_and_var(x: torch.Tensor, mask: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) variance of x over the masked entries, over `group` too when given."""
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if group is not None:
        torch.distributed.all_reduce(stats, group=group)
    count = stats[2].clamp(min=1)
    mean = stats[0] / count
    var = (stats[1] / count - mean * mean).clamp(min=0)
    return mean.to(x.dtype), var.to(x.dtype)


def whiten(x: torch.Tensor, mask: torch.Tensor, group=None, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (of the whole DP batch with `group`); 0 where mask is 0."""
    mean, var = masked_mean_and_var(x, mask, group)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's masked (response) tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with V = 0 after the last masked token, ``A_t = delta_t +
    gamma * lam * A_{t+1}``; returns (advantages, returns = advantages + values), 0 outside the mask.
    Masked tokens must be contiguous in each row (a response).
    """
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        # Outside the response the recursion restarts: nothing flows from padding into the last token.
        next_value = torch.where(m > 0, values[:, t], torch.zeros_like(next_value))
        next_advantage = torch.where(m > 0, advantage, torch.zeros_like(next_advantage))
    return advantages, (advantages + values) * mask


def group_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each score minus its group's mean, over the group's standard deviation (groups of `group_size`
    consecutive rows: one prompt's samples). A group whose samples all scored alike gets exactly 0."""
    # In float64 the sum of a tied group's n copies of an fp32 score is exact, and so is its mean: in fp32 the
    # rounded mean leaves deviations of an ulp that the small std then scales up (0.32 with 16 samples of 10.3).
    groups = scores.double().view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1).to(scores.dtype)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token: ``-min(rho A, clip(rho, 1-c, 1+c) A)`` with ``rho = exp(logp - old)``.

    Returns (per-token loss, per-token 1.0 where the clipped term was taken (the clip fraction's numerator),
    per-token approximate KL ``(rho - 1) - log rho`` to the policy that sampled).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages
    loss = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).float()
    approx_kl = (ratio - 1) - log_ratio
    return loss, was_clipped, approx_kl.detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss per token: ``0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``.
    Returns (per-token loss, per-token 1.0 where the clipped term was the larger)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    # Inside the clip range the two terms differ only by rounding (old + (V - old) != V): that is not clipping.
    was_clipped = ((values - old_values).abs() > clip) & (clipped > unclipped)
    return 0.5 * torch.maximum(unclipped, clipped), was_clipped.float()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, group=None) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over the masked tokens (1: the critic explains the returns)."""
    _, var_returns = masked_mean_and_var(returns, mask, group)
    _, var_error = masked_mean_and_var(returns - values, mask, group)
    return 1 - var_error / var_returns.clamp(min=1e-12)
