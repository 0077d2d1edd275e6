"""Per-token log-probabilities and entropy from vocabulary-parallel logits, as the training forward sees them.

The last pipeline stage's output layer leaves each tensor-parallel rank a slice of the vocabulary. These
functions never gather it: the log-probability goes through megatron-core's vocab-parallel cross entropy
(which also gives its gradient), the entropy through three small all-reduces. Logits are divided by the
sampling temperature and ids at or past `vocab_limit` (padding rows) are masked out, exactly as the
generation engine samples, so the sampler's and the trainer's log-probabilities describe one policy.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def _prepared(logits: torch.Tensor, vocab_limit: int, temperature: float) -> torch.Tensor:
    """fp32 logits / temperature with this rank's columns of ids >= vocab_limit at -inf (possibly `logits`
    itself: fp32, temperature 0 or 1, nothing masked)."""
    prepared = logits.float()
    if temperature not in (0.0, 1.0):
        prepared = prepared / temperature
    width = prepared.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * width
    if first + width > vocab_limit:
        ids = torch.arange(first, first + width, device=prepared.device)
        prepared = prepared.masked_fill(ids >= vocab_limit, float("-inf"))
    return prepared


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_limit: int,
                   temperature: float = 1.0) -> torch.Tensor:
    """log p(label) [b, s] from vocab-parallel logits [b, s, V / tp] (differentiable); `logits` is left as it was."""
    prepared = _prepared(logits, vocab_limit, temperature)
    if prepared is logits:
        # megatron-core's vocab-parallel cross entropy works in place on its input, and callers read the logits
        # again (the entropy): it gets a copy.
        prepared = prepared.clone()
    return -vocab_parallel_cross_entropy(prepared, labels)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, vocab_limit: int, temperature: float = 1.0) -> torch.Tensor:
    """Entropy [b, s] of softmax(logits / temperature) over the real vocabulary, from vocab-parallel logits."""
    logits = _prepared(logits, vocab_limit, temperature)
    group = parallel_state.get_tensor_model_parallel_group()
    peak = logits.max(dim=-1).values
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX, group=group)
    shifted = logits - peak.unsqueeze(-1)
    weights = shifted.exp()
    weighted = torch.where(weights > 0, weights * shifted, torch.zeros_like(shifted))
    sums = torch.stack([weights.sum(-1), weighted.sum(-1)])
    torch.distributed.all_reduce(sums, group=group)
    return sums[0].log() - sums[1] / sums[0]
