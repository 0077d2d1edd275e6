"""Where the sequences packed into a micro-batch's rows begin and end (SFT packs several conversations into
one row): the datasets find the boundaries, the attention keeps each sequence to itself. Both import it
from here, so the data does not depend on the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def packed_boundaries(position_ids: torch.Tensor) -> list[int] | None:
    """Sequence boundaries (`PackedRows.from_boundaries`) of rows [b, s] whose position ids restart at 0 where a
    packed sequence begins, or None when no row holds more than one (every row starts a sequence)."""
    b, s = position_ids.shape
    starts = (position_ids == 0).cpu()
    starts[:, 0] = True  # every row starts a sequence (padding-only rows included)
    if int(starts.sum()) == b:
        return None
    return torch.nonzero(starts.reshape(-1)).flatten().tolist() + [b * s]


@dataclass
class PackedRows(PackedSeqParams):
    """Boundaries of the sequences packed into the rows of a micro-batch, in megatron-core's sbhd layout.

    ``cu_seqlens_q`` (= ``cu_seqlens_kv``): int32 start offsets of every sequence and the end, counted over the
    b x s tokens row after row, on the model's device; ``max_seqlen_q`` (= ``max_seqlen_kv``) the longest.
    ``boundaries``: the same offsets as Python ints, so that no step reads them back from the GPU.
    """

    boundaries: tuple[int, ...] = ()

    @classmethod
    def from_boundaries(cls, boundaries: list[int], device: torch.device) -> "PackedRows":
        """`boundaries`: sorted token offsets, 0 first and b x s last, every row start among them."""
        cu = torch.tensor(boundaries, dtype=torch.int32)
        if device.type == "cuda":
            cu = cu.pin_memory()  # an asynchronous copy: the host does not wait for the GPU
        cu = cu.to(device, non_blocking=True)
        longest = max(end - start for start, end in zip(boundaries, boundaries[1:]))
        return cls(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest,
                   boundaries=tuple(boundaries))

    def segments(self, seq: int):
        """(row, start, end) of every sequence, `start`/`end` within the row of `seq` tokens."""
        for start, end in zip(self.boundaries, self.boundaries[1:]):
            row = start // seq
            yield row, start - row * seq, end - row * seq
