"""Choosing the next token: greedy, temperature, top-k and top-p (nucleus) sampling, and log-probabilities.

Pure functions of fp32 logits. Sampling draws by inverse CDF from one uniform number per row, taken from
a seeded generator for every row of the original batch at every step, so the tokens a row gets depend
only on the seed, its logits and its index: the same on every TP/PP layout, whichever rows have already
finished. With ``row_seeds`` each row draws from a generator of its own instead, so a row's tokens do not
depend on which other rows share its batch either (PPO splits its rollouts over data-parallel ranks). Logits
of ids at or past `vocab_limit` (the rows a model pads its vocabulary with) are masked out first, so such ids
are never drawn and take no probability mass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_qwen.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    """How to continue: ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` switch those filters off."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    row_seeds: tuple[int, ...] | None = None  # one seed per prompt, instead of `seed` for the batch
    # Each new id's log-probabilities (Generation.logprobs, sampling_logprobs); off, they are NaN and a greedy step
    # skips the softmax over the vocabulary (what a caller that keeps only the ids needs).
    logprobs: bool = True

    def check(self) -> None:
        """Raise UserError naming a value out of range."""
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens {self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            problems.append(f"--temperature {self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            problems.append(f"--top-k {self.top_k} must be >= 0 (0: no top-k filter)")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p {self.top_p} must be in (0, 1] (1: no nucleus filter)")
        if problems:
            raise UserError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class UniformDraws:
    """One uniform number per row and step: from one generator for the whole batch, or one per row."""

    def __init__(self, params: SamplingParams, rows: int):
        if params.row_seeds is not None:
            if len(params.row_seeds) != rows:
                raise ValueError(f"{len(params.row_seeds)} row seeds for {rows} prompts")
            self.generators = [torch.Generator().manual_seed(int(s)) for s in params.row_seeds]
        else:
            self.generators = [torch.Generator().manual_seed(params.seed)]
        self.rows = rows

    def next(self) -> torch.Tensor:
        """[rows] uniforms in [0, 1) for this step (every row draws, finished or not)."""
        if len(self.generators) == 1:
            return torch.rand(self.rows, generator=self.generators[0])
        return torch.cat([torch.rand(1, generator=g) for g in self.generators])


def mask_vocab(logits: torch.Tensor, vocab_limit: int) -> torch.Tensor:
    """fp32 logits with every id >= `vocab_limit` at -inf."""
    logits = logits.float()
    if vocab_limit < logits.shape[-1]:
        logits = logits.clone()
        logits[..., vocab_limit:] = float("-inf")
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits [b, v] with all but the top-k ids and all but the smallest set of ids whose probability reaches
    `top_p` (the most probable always kept) set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop an id when the ids before it already reach top_p.
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor) -> torch.Tensor:
    """Next ids [b] from masked fp32 logits [b, v]: the argmax when greedy, else an inverse-CDF draw with
    `uniforms` [b] in [0, 1) from the temperature-scaled, top-k/top-p filtered distribution."""
    if params.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits / params.temperature, params.top_k, params.top_p).softmax(-1)
    cdf = probs.cumsum(-1)
    ids = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1).to(cdf.dtype)).squeeze(-1)
    # Rounding can put the draw past the last id with mass; step back to it.
    last = (probs > 0).long().cumsum(-1).argmax(-1)
    return torch.minimum(ids, last)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(id) under softmax(logits / temperature) for masked fp32 logits [..., v] and ids [...]."""
    scaled = logits if temperature in (0.0, 1.0) else logits / temperature
    return scaled.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
