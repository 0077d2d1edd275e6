"""Qwen's rotary position embedding and its inference-only long-context tricks (Qwen technical report, released modeling_qwen.py).

Dynamic NTK raises the rotary base once a sequence is longer than the training context; LogN scales
queries beyond it. Both are no-ops in training and whenever the length is <= seq_length. The pure
functions below are the formulas; `QwenRotaryEmbedding` puts dynamic NTK into megatron-core's rotary.
"""

from __future__ import annotations

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
    unchanged. In eval mode with `use_dynamic_ntk`, a longer sequence gets inverse frequencies from
    the NTK-scaled base. `fixed_alpha` pins alpha (set at prefill, reused while decoding, as Qwen does).
    """

    def __init__(self, *args, seq_length: int, rotary_base: float, use_dynamic_ntk: bool, **kwargs):
        super().__init__(*args, rotary_base=rotary_base, **kwargs)
        self.qwen_seq_length = seq_length
        self.qwen_rotary_base = float(rotary_base)
        self.use_dynamic_ntk = use_dynamic_ntk
        self.fixed_alpha: int | None = None
        self._alpha = 1  # the alpha inv_freq was computed for

    def alpha_for(self, length: int) -> int:
        """The NTK alpha this module uses for a `length`-token sequence right now."""
        if self.training or not self.use_dynamic_ntk:
            return 1
        if self.fixed_alpha is not None:
            return self.fixed_alpha
        return ntk_alpha(length, self.qwen_seq_length)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        alpha = self.alpha_for(max_seq_len + offset)
        if alpha != self._alpha:
            dim = self.inv_freq.numel() * 2
            base = self.qwen_rotary_base if alpha == 1 else ntk_base(self.qwen_rotary_base, alpha, dim)
            self.inv_freq = inv_freq(base, dim).to(self.inv_freq.device)
            self._alpha = alpha
        # Not the parent's forward: it is lru-cached on the length alone, which would hide an alpha change.
        emb = self.get_emb(max_seq_len, offset)
        cp_group = cp_group if cp_group is not None else self.cp_group
        if cp_group is not None and cp_group.size() > 1 and not packed_seq:
            emb = get_pos_emb_on_this_cp_rank(emb, 0, cp_group)
        return emb
