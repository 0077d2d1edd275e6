"""Core attention through torch's scaled_dot_product_attention, with Qwen's LogN scaling.

A drop-in for megatron-core's DotProductAttention (same constructor and forward), except that the
(seq x seq) score matrix is never materialised in Python: SDPA picks the flash or memory-efficient
kernel on GPU where the shape allows.

Rows packed with several sequences (SFT) come with `PackedRows`, megatron-core's PackedSeqParams with the
sequence boundaries: each sequence attends causally within itself, through torch's variable-length flash
kernel on GPU (torch >= 2.11, whose varlen_attn takes a scale and a causal window), or one causal SDPA call
per sequence (CPU ranks, attention dropout, fp32). No dense (seq x seq) mask is built.

With context parallelism (``context_parallel_size`` > 1) each rank holds two chunks of every sequence; its
queries attend to the keys and values gathered from the whole CP group under a mask built from global positions
(`megatron_qwen.model.context_parallel`), which also keeps packed sequences apart.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule

from megatron_qwen.model import context_parallel as cp
from megatron_qwen.model.rotary import logn_scale
from megatron_qwen.model.window import layer_window, window_keep_mask
from megatron_qwen.packed_rows import PackedRows

try:  # torch's variable-length flash attention (CUDA, bf16/fp16, no dropout)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # older torch: every packed row takes the per-sequence path
    varlen_attn = None

# The keywords `SDPAttention` passes to varlen_attn. torch 2.10's varlen_attn has neither (it takes is_causal and
# always scales by 1/sqrt(head_dim)); they arrived in torch 2.11.
VARLEN_KEYWORDS = ("scale", "window_size")


@functools.lru_cache(maxsize=4)
def _takes_varlen_keywords(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read: do not guess
        return False
    return all(name in params for name in VARLEN_KEYWORDS)


def varlen_kernel(fn=None):
    """torch's varlen_attn (or `fn`) when it takes the keywords this module calls it with, else None, so that an
    older torch takes the per-sequence path instead of raising a TypeError at the first packed step."""
    fn = varlen_attn if fn is None else fn
    return fn if fn is not None and _takes_varlen_keywords(fn) else None


class SDPAttention(MegatronModule):
    """Causal self-attention core: [sq, b, np, hn] queries/keys/values -> [sq, b, np * hn] context.

    Queries may be fewer than keys (decoding with a KV cache); they are the last ``sq`` positions.
    In eval mode with ``config.use_logn_attn``, queries beyond ``config.qwen_seq_length`` are scaled
    by log(p + 1) / log(seq_length), as in the released modeling_qwen.py; with a window for this layer in
    ``config.attention_windows``, each query sees only its last `window` positions (megatron_qwen.model.window).
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.use_logn_attn = getattr(config, "use_logn_attn", False)
        self.qwen_seq_length = getattr(config, "qwen_seq_length", None)
        self.attention_window = layer_window(getattr(config, "attention_windows", ()), self.layer_number)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention takes no attention_bias")
        if packed_seq_params is not None and not isinstance(packed_seq_params, PackedRows):
            raise NotImplementedError("SDPAttention takes packed rows as PackedRows (sbhd), not the thd layout")
        sq, b, heads, hn = query.shape
        query_positions = None  # global positions of the queries, where they are not the last sq of the keys
        mask = None
        is_causal = False
        if self.config.context_parallel_size > 1:
            key, value, mask, query_positions = self._context_parallel(query, key, value, attention_mask,
                                                                       packed_seq_params)
            packed_seq_params = None  # the mask keeps the packed sequences apart
        sk = key.shape[0]
        if key.shape[2] != heads:  # grouped-query attention: share each K/V head across its queries
            key = key.repeat_interleave(heads // key.shape[2], dim=2)
            value = value.repeat_interleave(heads // value.shape[2], dim=2)

        if self.use_logn_attn and not self.training and sk > self.qwen_seq_length:
            positions = torch.arange(sk - sq, sk, device=query.device) if query_positions is None else query_positions
            query = query * logn_scale(positions, self.qwen_seq_length).to(query.dtype)[:, None, None, None]

        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # -> [b, np, s, hn]
        if query_positions is None:  # (the context-parallel branch has built its mask)
            if attention_mask is not None:
                mask = ~attention_mask  # megatron-core masks mark positions to drop; SDPA marks those to keep
            elif sq == sk:
                is_causal = True
            elif sq > 1:
                # Causal with queries aligned to the end of the keys (SDPA's is_causal aligns to the start).
                mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)

        if self.attention_window is not None and not self.training and sk > self.attention_window:
            if packed_seq_params is not None:
                raise ValueError("model.attention_windows takes unpacked rows; unset it or set sft.pack=false")
            if query_positions is None:
                positions, key_positions = torch.arange(sk - sq, sk, device=q.device), torch.arange(sk, device=q.device)
            else:  # context parallelism: the gathered keys come rank by rank, each rank's two chunks
                positions, key_positions = query_positions, cp.gathered_positions(sq, cp.cp_size(), q.device)
            keep = window_keep_mask(positions, key_positions, self.attention_window)
            if mask is not None and mask.dtype != torch.bool:  # context parallelism's additive mask
                mask = mask.masked_fill(~keep, float("-inf"))
            else:
                mask = keep if mask is None else mask & keep
            is_causal = False

        dropout_p = self.dropout_p if self.training else 0.0
        if packed_seq_params is not None and (mask is not None or sq != sk):
            raise ValueError("packed rows take neither an attention mask nor a KV cache")

        def attend() -> torch.Tensor:
            if packed_seq_params is not None:
                return self._packed(q, k, v, packed_seq_params, dropout_p)
            if mask is not None and mask.dim() == 3:  # a mask per row: torch's fused CPU kernel takes one [sq, sk]
                return torch.cat([F.scaled_dot_product_attention(
                    q[i:i + 1], k[i:i + 1], v[i:i + 1], attn_mask=mask[i], dropout_p=dropout_p, scale=self.softmax_scale
                ) for i in range(b)])
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.softmax_scale
            )

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)

    def _context_parallel(self, query, key, value, attention_mask, rows: PackedRows | None):
        """Keys and values of the whole sequence (gathered over the CP group, KV heads only), the additive mask of
        this rank's queries over them ([sq, sk], or [b, sq, sk] for packed rows) and the queries' global
        positions."""
        if attention_mask is not None:
            raise ValueError("context-parallel attention builds its mask from positions; it takes no attention_mask")
        if key.shape[0] != query.shape[0]:
            raise ValueError("context-parallel attention takes no KV cache: generate at parallel.cp=1")
        local, rows_in_batch = query.shape[0], query.shape[1]
        size, rank = cp.cp_size(), cp.cp_rank()
        key, value = cp.gather_kv(key), cp.gather_kv(value)
        mask = cp.attention_bias(local, rank, size, None if rows is None else rows.boundaries, rows_in_batch,
                                 query.dtype, query.device)
        return key, value, mask, cp.token_positions(local, rank, size, query.device)

    def _packed(self, q, k, v, rows: PackedRows, dropout_p: float) -> torch.Tensor:
        """[b, np, s, hn] context of rows packed with sequences that each attend causally within themselves."""
        b, heads, s, hn = q.shape
        kernel = varlen_kernel()
        if kernel is not None and q.is_cuda and dropout_p == 0.0 and q.dtype in (torch.bfloat16, torch.float16):
            flat = [t.transpose(1, 2).reshape(b * s, heads, hn) for t in (q, k, v)]  # [b*s, np, hn], rows in order
            out = kernel(*flat, rows.cu_seqlens_q, rows.cu_seqlens_kv, rows.max_seqlen_q, rows.max_seqlen_kv,
                              scale=self.softmax_scale, window_size=(-1, 0))  # (-1, 0): causal
            return out.view(b, s, heads, hn).transpose(1, 2)
        parts: list[list[torch.Tensor]] = [[] for _ in range(b)]
        for row, start, end in rows.segments(s):
            piece = (slice(row, row + 1), slice(None), slice(start, end))
            parts[row].append(F.scaled_dot_product_attention(
                q[piece], k[piece], v[piece], dropout_p=dropout_p, is_causal=True, scale=self.softmax_scale
            ))
        return torch.cat([torch.cat(row, dim=2) for row in parts])
