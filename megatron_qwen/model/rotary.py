"""Qwen's rotary position embedding and its inference-only long-context tricks (Qwen technical report,
released modeling_qwen.py).

Dynamic NTK raises the rotary base once a sequence is longer than the training context; LogN scales
queries beyond it. Both are no-ops in training and whenever the length is <= seq_length. The pure
functions below are the formulas; `QwenRotaryEmbedding` puts dynamic NTK into megatron-core's rotary.
"""

from __future__ import annotations

import contextlib
import math

import torch
from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding


def ntk_alpha(length: int, seq_length: int) -> int:
    """Dynamic-NTK alpha for a sequence of `length` tokens: ``max(2**ceil(log2(L/S) + 1) - 1, 1)``.

    1 for L <= S, 3 for S < L <= 2S, 7 for 2S < L <= 4S, ...
    """
    context = math.log2(length / seq_length) + 1
    return max(2 ** math.ceil(context) - 1, 1)


def ntk_base(base: float, alpha: float, head_dim: int) -> float:
    """The rotary base under NTK scaling: ``base * alpha ** (d / (d - 2))``."""
    return base * alpha ** (head_dim / (head_dim - 2))


def inv_freq(base: float, head_dim: int) -> torch.Tensor:
    """Rotary inverse frequencies in fp32: ``1 / base ** (arange(0, d, 2) / d)``."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """LogN query scale for 0-based absolute `positions`: ``log(p + 1) / log(S)`` where p + 1 > S, else 1."""
    pos = positions.to(torch.float64) + 1
    scale = torch.where(pos > seq_length, torch.log(pos) / math.log(seq_length), torch.ones_like(pos))
    return scale.to(torch.float32)


class QwenRotaryEmbedding(RotaryEmbedding):
    """megatron-core's rotate-half RoPE plus Qwen's dynamic NTK at inference.

    While training, or for sequences up to `seq_length`, this is megatron-core's RotaryEmbedding
    unchanged. In eval mode with `use_dynamic_ntk`, a longer sequence gets inverse frequencies from the
    NTK-scaled base. Callers that know better than the rotary length pin alpha with `pinned_alphas`: Qwen
    v1's generation computes each row's alpha from its real prompt length at prefill and keeps it while
    decoding (one alpha per row), and a forward pass padded for sequence parallelism takes alpha from the
    unpadded length (one alpha for every row).
    """

    def __init__(self, *args, seq_length: int, rotary_base: float, use_dynamic_ntk: bool, **kwargs):
        super().__init__(*args, rotary_base=rotary_base, **kwargs)
        self.qwen_seq_length = seq_length
        self.qwen_rotary_base = float(rotary_base)
        self.use_dynamic_ntk = use_dynamic_ntk
        self.pinned_alphas: tuple[int, ...] | None = None
        self._alpha = 1  # the alpha inv_freq was computed for

    def alphas_for(self, length: int) -> tuple[int, ...]:
        """The NTK alpha(s) used now for a `length`-token sequence: one for all rows, or one per row."""
        if self.training or not self.use_dynamic_ntk:
            return (1,)
        if self.pinned_alphas is not None:
            return self.pinned_alphas
        return (ntk_alpha(length, self.qwen_seq_length),)

    def inv_freq_for(self, alpha: int) -> torch.Tensor:
        dim = self.inv_freq.numel() * 2
        base = self.qwen_rotary_base if alpha == 1 else ntk_base(self.qwen_rotary_base, alpha, dim)
        return inv_freq(base, dim).to(self.inv_freq.device)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        (alpha, *others) = self.alphas_for(max_seq_len + offset)
        if others:
            raise ValueError("per-row NTK alphas need per-token angles: build the model with rope_at_positions=True")
        if alpha != self._alpha:
            self.inv_freq = self.inv_freq_for(alpha)
            self._alpha = alpha
        # Not the parent's forward: it is lru-cached on the length alone, which would hide an alpha change.
        emb = self.get_emb(max_seq_len, offset)
        cp_group = cp_group if cp_group is not None else self.cp_group
        if cp_group is not None and cp_group.size() > 1 and not packed_seq:
            emb = get_pos_emb_on_this_cp_rank(emb, 0, cp_group)
        return emb

    def angles(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Rotary angles [s, b, 1, d] of each token at its position id ([b, s]), with its row's alpha (unpinned:
        the alpha of a sequence as long as the rows)."""
        alphas = self.alphas_for(position_ids.shape[1])
        inv = torch.stack([self.inv_freq_for(a) for a in alphas]) if alphas != (self._alpha,) else self.inv_freq[None]
        freqs = position_ids.t().unsqueeze(-1).to(inv.dtype) * inv  # [s, b, d/2], as megatron-core's outer product
        return torch.cat((freqs, freqs), dim=-1).unsqueeze(2)


@contextlib.contextmanager
def pinned_ntk_alphas(chunks: list, alphas: tuple[int, ...] | None):
    """Pin the dynamic-NTK alpha(s) of every model chunk's rotary for the block (None: leave them unpinned)."""
    rotaries = [getattr(chunk, "module", chunk).rotary_pos_emb for chunk in chunks]
    previous = [rotary.pinned_alphas for rotary in rotaries]
    for rotary in rotaries:
        rotary.pinned_alphas = alphas
    try:
        yield
    finally:
        for rotary, pins in zip(rotaries, previous):
            rotary.pinned_alphas = pins
