"""Qwen's rotary position embedding, its inference-only long-context tricks (Qwen technical report,
released modeling_qwen.py) and YaRN scaling (Qwen2.5's 128K recipe).

Dynamic NTK raises the rotary base once a sequence is longer than the training context; LogN scales
queries beyond it. Both are no-ops in training and whenever the length is <= seq_length. YaRN
(`model.rope_scaling: yarn`) changes every forward, as in transformers: inverse frequencies blended between
interpolated and original ones, and cos/sin multiplied by an attention factor (applied by megatron-core's
attention from ``QwenTransformerConfig.yarn_rotary_scaling_factor``). The pure functions below are the
formulas; `QwenRotaryEmbedding` puts dynamic NTK and YaRN into megatron-core's rotary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_qwen.model.context_parallel import cp_rank, cp_size, split_sequence


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


@dataclasses.dataclass(frozen=True)
class YarnSettings:
    """YaRN as a Hugging Face config's ``rope_scaling`` gives it (``rope_type: yarn``)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True  # transformers' default: round the correction range outwards to whole dimensions


def yarn_settings(model_config) -> YarnSettings | None:
    """The YaRN settings of a `ModelConfig`, None without ``rope_scaling``."""
    m = model_config
    if m.rope_scaling != "yarn":
        return None
    return YarnSettings(m.rope_scaling_factor, m.rope_original_max_position_embeddings, m.yarn_beta_fast,
                        m.yarn_beta_slow)


def yarn_attention_factor(factor: float) -> float:
    """YaRN's scale of cos and sin: ``0.1 ln(factor) + 1`` (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def yarn_inv_freq(base: float, head_dim: int, yarn: YarnSettings) -> torch.Tensor:
    """YaRN's inverse frequencies, as transformers' ``_compute_yarn_parameters`` computes them: dimensions that
    turn fewer than `beta_slow` times over the original context are interpolated (divided by `factor`), those that
    turn more than `beta_fast` times keep their frequency, with a linear ramp between."""

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(base))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # weight of the original frequency
    original = inv_freq(base, head_dim)
    interpolated = 1.0 / (yarn.factor * (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)))
    return interpolated * (1 - extrapolation) + original * extrapolation


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """LogN query scale for 0-based absolute `positions`: ``log(p + 1) / log(S)`` where p + 1 > S, else 1."""
    pos = positions.to(torch.float64) + 1
    scale = torch.where(pos > seq_length, torch.log(pos) / math.log(seq_length), torch.ones_like(pos))
    return scale.to(torch.float32)


class QwenRotaryEmbedding(RotaryEmbedding):
    """megatron-core's rotate-half RoPE plus Qwen's dynamic NTK at inference, or YaRN's inverse frequencies
    (`yarn`; its attention factor is the attention's, see the module docstring).

    While training, or for sequences up to `seq_length`, this is megatron-core's RotaryEmbedding
    unchanged. In eval mode with `use_dynamic_ntk`, a longer sequence gets inverse frequencies from the
    NTK-scaled base. Callers that know better than the rotary length pin alpha with `pinned_alphas`: Qwen
    v1's generation computes each row's alpha from its real prompt length at prefill and keeps it while
    decoding (one alpha per row), and a forward pass padded for sequence parallelism takes alpha from the
    unpadded length (one alpha for every row).
    """

    def __init__(self, *args, seq_length: int, rotary_base: float, use_dynamic_ntk: bool,
                 yarn: YarnSettings | None = None, **kwargs):
        super().__init__(*args, rotary_base=rotary_base, **kwargs)
        self.qwen_seq_length = seq_length
        self.qwen_rotary_base = float(rotary_base)
        self.use_dynamic_ntk = use_dynamic_ntk
        self.pinned_alphas: tuple[int, ...] | None = None
        self._alpha = 1  # the alpha inv_freq was computed for
        self.yarn = yarn
        if yarn is not None:
            if use_dynamic_ntk:
                raise ValueError("YaRN and dynamic NTK both rescale RoPE; keep one of them")
            self.inv_freq = yarn_inv_freq(self.qwen_rotary_base, self.inv_freq.numel() * 2, yarn).to(
                self.inv_freq.device)

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
        if cp_group is not None and cp_group.size() > 1 and not packed_seq:
            emb = split_sequence(emb, 0, cp_group.rank(), cp_group.size())
        elif cp_group is None and cp_size() > 1 and not packed_seq:
            # The rows of this CP rank's two chunks (megatron-core's get_pos_emb_on_this_cp_rank, which pins
            # host memory and so needs CUDA): `max_seq_len` is the whole sequence's length. cp_size() rather than
            # the group kept at construction: it is 1 while `context_parallel_off` runs whole sequences.
            emb = split_sequence(emb, 0, cp_rank(), cp_size())
        return emb

    def angles(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Rotary angles [s, b, 1, d] of each token at its position id ([b, s]), with its row's alpha (unpinned:
        the alpha of a sequence as long as the rows, all context-parallel ranks' shares together)."""
        alphas = self.alphas_for(position_ids.shape[1] * cp_size())
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
