"""Context parallelism in the attention: each context-parallel (CP) rank holds a share of every sequence and
attends over the whole of it, exactly.

The split is megatron-core's causal load balancing (``megatron.core.utils.get_batch_on_this_cp_rank``): a
sequence of S tokens is cut into 2 x cp chunks and CP rank r holds chunks r and 2 x cp - 1 - r, so every rank has
as many (query, key) pairs under the causal mask as any other. Attention all-gathers each layer's keys and values
over the CP group (the Llama 3 paper's approach; the K/V heads before grouped-query attention repeats them, so
the bytes are those of the KV heads) and each rank's queries attend to all keys under a mask built from the
tokens' global positions. The backward of the gather is a reduce-scatter of dK/dV (megatron-core's own
sequence-parallel mapping over the CP group). Both layer specs (local and Transformer Engine) use `SDPAttention`
as their core attention, so this is the context parallelism of every run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, reduce_from_tensor_model_parallel_region

from megatron_qwen.errors import UserError
from megatron_qwen.packed_rows import packed_boundaries

# The micro-batch entries that hold one value per token ([b, s]) and are split along the sequence per CP rank.
SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


_OFF = False  # inside `context_parallel_off`: every rank runs whole sequences


def cp_size() -> int:
    """The context-parallel world size (1 before megatron-core's parallel state exists, or inside
    `context_parallel_off`)."""
    if _OFF or not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_context_parallel_world_size()


@contextlib.contextmanager
def context_parallel_off(chunks: list[torch.nn.Module]):
    """Run `chunks` on whole sequences for the block, as at CP=1 (each CP rank holds the whole model): what
    generation with a KV cache needs (PPO's rollouts). SDPAttention, the rotary split and the batch split all ask
    `cp_size()` or the config's ``context_parallel_size``, which read 1 inside the block. (Transformer Engine's
    attention keeps its own CP group: `megatron_qwen.rl.trainer` does not generate with it.)"""
    global _OFF
    configs = {id(c.config): c.config for c in (getattr(chunk, "module", chunk) for chunk in chunks)}
    sizes = {key: config.context_parallel_size for key, config in configs.items()}
    was, _OFF = _OFF, True
    try:
        for config in configs.values():
            config.context_parallel_size = 1
        yield
    finally:
        _OFF = was
        for key, config in configs.items():
            config.context_parallel_size = sizes[key]


def cp_rank() -> int:
    """This rank's index in its context-parallel group (0 without CP)."""
    return parallel_state.get_context_parallel_rank() if cp_size() > 1 else 0


def check_divisible(seq: int, size: int, what: str = "the sequence") -> None:
    """Refuse a sequence that cannot be cut into 2 x cp equal chunks, naming the fix."""
    if seq % (2 * size):
        raise UserError(f"{what} has {seq} tokens, not a multiple of 2 x parallel.cp = {2 * size}: context "
                        f"parallelism cuts every sequence into 2 x cp equal chunks; pad it to a multiple of "
                        f"{2 * size} tokens or use a smaller parallel.cp")


def chunk_ids(rank: int, size: int) -> tuple[int, int]:
    """The two chunks (of 2 x `size`) CP rank `rank` holds: ``rank`` and its mirror ``2 x size - 1 - rank``."""
    return rank, 2 * size - 1 - rank


def split_sequence(tensor: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """The share of `tensor` along sequence dimension `dim` that CP rank `rank` of `size` holds (its two chunks,
    in order), as megatron-core's get_batch_on_this_cp_rank cuts it."""
    if size == 1:
        return tensor
    check_divisible(tensor.shape[dim], size)
    chunks = tensor.view(*tensor.shape[:dim], 2 * size, tensor.shape[dim] // (2 * size), *tensor.shape[dim + 1:])
    index = torch.tensor(chunk_ids(rank, size), device=tensor.device)
    picked = chunks.index_select(dim, index)
    return picked.reshape(*tensor.shape[:dim], -1, *tensor.shape[dim + 1:])


def gather_sequence(local: torch.Tensor, dim: int) -> torch.Tensor:
    """The whole sequence back from every CP rank's share along `dim` (the inverse of `split_sequence`, gathered
    over the CP group); the identity without CP."""
    size = cp_size()
    if size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(size)]
    torch.distributed.all_gather(parts, local.contiguous(), group=parallel_state.get_context_parallel_group())
    chunk = local.shape[dim] // 2
    pieces: list[torch.Tensor | None] = [None] * (2 * size)
    for rank, part in enumerate(parts):
        first, second = chunk_ids(rank, size)
        pieces[first], pieces[second] = part.narrow(dim, 0, chunk), part.narrow(dim, chunk, chunk)
    return torch.cat(pieces, dim)


def split_batch(batch: dict, rank: int | None = None, size: int | None = None, model=None) -> dict:
    """A micro-batch with each per-token entry (`SEQUENCE_KEYS`, [b, s]) cut to this CP rank's share; other
    entries (per-sequence values) are kept whole. The identity without CP. Packed rows for a `model` whose context
    parallelism is Transformer Engine's go in the THD layout instead (`thd_batch`)."""
    size = cp_size() if size is None else size
    if size == 1:
        return batch
    rank = cp_rank() if rank is None else rank
    config = _config_of(model)
    if getattr(config, "te_context_parallel", False) and batch.get("position_ids") is not None:
        boundaries = packed_boundaries(batch["position_ids"])
        if boundaries is not None:
            return thd_batch(batch, thd_layout(boundaries, size, thd_multiple(config)), rank, size)
    if batch.get("attention_mask") is not None:
        raise UserError("an explicit attention_mask cannot be split over context-parallel ranks: set parallel.cp=1 "
                        "or give packed rows / position ids instead")
    return {k: split_sequence(v, 1, rank, size) if k in SEQUENCE_KEYS and isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _config_of(model):
    """The TransformerConfig of a model chunk, through its DDP wrapper; None without a model."""
    while model is not None and hasattr(model, "module"):
        model = model.module
    return getattr(model, "config", None)


def token_positions(local_seq: int, rank: int, size: int, device=None) -> torch.Tensor:
    """Global positions (0-based, in the full sequence) of the `local_seq` tokens CP rank `rank` holds."""
    chunk = local_seq // 2
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in chunk_ids(rank, size)])


def gathered_positions(local_seq: int, size: int, device=None) -> torch.Tensor:
    """Global positions of the keys after the all-gather: every rank's share, in rank order."""
    return torch.cat([token_positions(local_seq, r, size, device) for r in range(size)])


def keep_mask(query_positions: torch.Tensor, key_positions: torch.Tensor,
              query_segments: torch.Tensor | None = None, key_segments: torch.Tensor | None = None) -> torch.Tensor:
    """Which (query, key) pairs attend, from their global positions: causal (key at or before query), and within
    the same packed sequence when segment ids ([b, s] each) are given. [sq, sk], or [b, 1, sq, sk] with segments.

    The one place the attention pattern is decided from positions, so other masks (per-layer windows) compose
    with it by a logical and.
    """
    keep = key_positions[None, :] <= query_positions[:, None]
    if query_segments is not None:
        same = query_segments[:, :, None] == key_segments[:, None, :]
        keep = (keep[None] & same)[:, None]
    return keep


@functools.lru_cache(maxsize=1)
def attention_bias(local_seq: int, rank: int, size: int, boundaries: tuple[int, ...] | None, rows: int,
                   dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive mask (0 to attend, -inf not) of CP rank `rank`'s queries over the gathered keys: [sq, sk], or
    [rows, sq, sk] for packed rows (`boundaries` of the full rows). Built once per micro-batch shape and shared by
    every layer: attention saves its mask for the backward, and one shared tensor is saved once, where a mask per
    layer would cost (S / cp) x S values per layer (torch converts a boolean mask to this form inside each call)."""
    query_positions = token_positions(local_seq, rank, size, device)
    key_positions = gathered_positions(local_seq, size, device)
    if boundaries is None:
        keep = keep_mask(query_positions, key_positions)
    else:
        segments = segment_ids(boundaries, rows, local_seq * size, device)
        keep = keep_mask(query_positions, key_positions, segments[:, query_positions],
                         segments[:, key_positions])[:, 0]
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))


def segment_ids(boundaries: tuple[int, ...], rows: int, seq: int, device=None) -> torch.Tensor:
    """[rows, seq] index of the packed sequence each token belongs to, from `PackedRows` boundaries (token offsets
    over the rows x seq tokens of the full, unsplit rows)."""
    if boundaries[-1] != rows * seq:
        raise ValueError(f"packed rows end at token {boundaries[-1]}, not at rows x seq = {rows} x {seq}: the "
                         "boundaries must describe the full rows before the context-parallel split")
    starts = torch.zeros(rows * seq, dtype=torch.int64)
    starts[list(boundaries[1:-1])] = 1
    return starts.cumsum(0).view(rows, seq).to(device)


def gather_kv(tensor: torch.Tensor) -> torch.Tensor:
    """[s / cp, b, g, hn] -> [s, b, g, hn]: all CP ranks' shares in rank order; backward reduce-scatters."""
    return gather_from_sequence_parallel_region(tensor, tensor_parallel_output_grad=True,
                                                group=parallel_state.get_context_parallel_group())


def sum_over_cp(tensor: torch.Tensor) -> torch.Tensor:
    """Sums over this rank's share of each sequence -> sums over the whole sequence (all CP ranks). The backward
    passes each rank its own gradient unchanged, so a loss that every CP rank computes from the total is
    differentiated once per token. The identity without CP."""
    if cp_size() == 1:
        return tensor
    return reduce_from_tensor_model_parallel_region(tensor, group=parallel_state.get_context_parallel_group())


# ------------------------------------------------------------------ Transformer Engine's THD layout of packed rows
# With Transformer Engine's context parallelism (`megatron_qwen.model.qwen.te_context_parallel`) packed rows travel
# as one stream of tokens ("thd": tokens x heads x dim, batch 1) described by cumulative sequence lengths, as
# megatron-core's get_thd_batch_on_this_cp_rank passes them: every packed sequence is padded to a multiple of
# 2 x cp and each CP rank holds chunks r and 2 x cp - 1 - r of every sequence (TE's thd_get_partitioned_indices).


@dataclasses.dataclass(frozen=True)
class ThdLayout:
    """Where the tokens of packed rows go in the THD stream: `source` [T] is, for every stream position, the index
    of its token among the b x s tokens of the rows (-1: padding); `cu_seqlens` / `cu_seqlens_padded` are the
    offsets of the sequences without / with their padding (the stream holds sequence i at
    ``cu_seqlens_padded[i]``); `max_seqlen` is the longest padded sequence."""

    source: torch.Tensor
    cu_seqlens: tuple[int, ...]
    cu_seqlens_padded: tuple[int, ...]
    max_seqlen: int


def thd_layout(boundaries: tuple[int, ...], size: int, multiple: int = 1) -> ThdLayout:
    """The THD stream of packed rows with sequence `boundaries` (`PackedRows.boundaries`) for `size` CP ranks:
    each sequence padded to a multiple of 2 x size (TE's rule for splitting it), the last one further so that every
    rank's share is a multiple of `multiple` (the TP size under sequence parallelism)."""
    unit = 2 * size if size > 1 else 1
    lengths = [end - start for start, end in zip(boundaries, boundaries[1:])]
    padded = [-(-n // unit) * unit for n in lengths]
    whole = math.lcm(unit, size * multiple)
    padded[-1] += -sum(padded) % whole
    cu = tuple(itertools.accumulate(lengths, initial=0))
    cu_padded = tuple(itertools.accumulate(padded, initial=0))
    source = torch.full((cu_padded[-1],), -1, dtype=torch.int64)
    for start, length, at in zip(boundaries, lengths, cu_padded):
        source[at:at + length] = torch.arange(start, start + length)
    return ThdLayout(source, cu, cu_padded, max(padded))


def thd_multiple(config) -> int:
    """What every CP rank's share of a THD stream must be a multiple of: the TP size under sequence parallelism."""
    return config.tensor_model_parallel_size if config.sequence_parallel else 1


def thd_partitioned_indices(cu_seqlens_padded: tuple[int, ...], rank: int, size: int) -> torch.Tensor:
    """The stream positions CP rank `rank` of `size` holds: chunks ``rank`` and ``2 x size - 1 - rank`` of each
    sequence's 2 x size (what Transformer Engine's ``tex.thd_get_partitioned_indices`` returns)."""
    if size == 1:
        return torch.arange(cu_seqlens_padded[-1])
    parts = []
    for start, end in zip(cu_seqlens_padded, cu_seqlens_padded[1:]):
        if (end - start) % (2 * size):
            raise ValueError(f"a THD sequence of {end - start} tokens does not cut into 2 x cp = {2 * size} chunks")
        chunk = (end - start) // (2 * size)
        parts += [torch.arange(start + c * chunk, start + (c + 1) * chunk) for c in chunk_ids(rank, size)]
    return torch.cat(parts)


def thd_batch(batch: dict, layout: ThdLayout, rank: int, size: int) -> dict:
    """This CP rank's share of a micro-batch of packed rows in the THD layout: each per-token entry
    (`SEQUENCE_KEYS`, [b, s]) becomes [1, T / cp], padding positions hold 0 (a padded token is never trained:
    its loss_mask is 0); other entries are kept."""
    mine = layout.source[thd_partitioned_indices(layout.cu_seqlens_padded, rank, size)]
    real = mine >= 0
    out = dict(batch)
    for key in SEQUENCE_KEYS:
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            flat = value.reshape(-1)[mine.clamp(min=0).to(value.device)]
            out[key] = torch.where(real.to(value.device), flat, torch.zeros_like(flat))[None]
    return out


def thd_packed_seq_params(layout: ThdLayout, device: torch.device) -> PackedSeqParams:
    """megatron-core's PackedSeqParams of the THD stream, as get_thd_batch_on_this_cp_rank builds them: the real
    and the padded cumulative lengths (int32, on the device), the longest padded sequence."""
    cu, cu_padded = (torch.tensor(c, dtype=torch.int32, device=device)
                     for c in (layout.cu_seqlens, layout.cu_seqlens_padded))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
                           cu_seqlens_kv_padded=cu_padded, max_seqlen_q=layout.max_seqlen,
                           max_seqlen_kv=layout.max_seqlen)
