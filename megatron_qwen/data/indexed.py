"""Megatron indexed datasets (PREFIX.bin + PREFIX.idx): write, merge and validate them.

The bytes are exactly those megatron-core 0.16.1's ``IndexedDatasetBuilder`` writes, so megatron-core's
``IndexedDataset`` (and the GPT datasets over it) read these shards directly. The work is done in C++
(csrc/indexed_builder.cpp): tokens cross from numpy in one call per batch, the ``.bin`` is streamed to disk
through a fixed buffer, and only the per-document index (O(documents)) is kept in memory.

Output first goes to ``PREFIX.bin.tmp-<pid>-<n>`` / ``PREFIX.idx.tmp-<pid>-<n>``; ``finalize()`` renames them,
so the final names only ever hold complete shards, and a writer dropped without finalizing deletes them.

One document is one sequence (no sentence splitting); an empty document adds a document boundary without a
sequence, exactly like Megatron-LM's ``tools/preprocess_data.py``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_qwen.errors import DataError

try:
    from megatron_qwen import _C
except ImportError:  # a machine without the compiled extension (a bare GPU box): shards are only read and checked
    _C = None


class _ShardFormatError(ValueError):
    pass


ShardFormatError = _C.ShardFormatError if _C is not None else _ShardFormatError
ShardFormatError.__doc__ = "A shard's .idx/.bin are malformed or disagree; the message names the file and the problem."

PathLike = str | os.PathLike


@dataclass(frozen=True)
class ShardSummary:
    """What a shard holds, counted as megatron-core counts it (``num_documents`` excludes the leading 0 index)."""

    prefix: str
    dtype: np.dtype
    num_sequences: int
    num_documents: int
    num_tokens: int


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Token dtype megatron-core picks for a vocabulary (``DType.optimal_dtype``): uint16 below 65,500, else int32."""
    return np.dtype(_C.dtype_name(_C.optimal_dtype_code(_check_vocab_size(vocab_size))))


def _check_vocab_size(vocab_size: int) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or not 0 < vocab_size <= 2**31:
        raise ValueError(f"vocab_size must be an integer in [1, 2**31] (the tokenizer's n_vocab), got {vocab_size!r}")
    return int(vocab_size)


def validate_shard(prefix: PathLike) -> ShardSummary:
    """Check PREFIX.idx against itself and PREFIX.bin and return what the shard holds.

    Raises ShardFormatError (a ValueError) naming the file and the problem (bad magic, version or dtype code,
    truncated or oversized files, pointers that disagree with the lengths, ...), or FileNotFoundError.
    """
    prefix = os.fspath(prefix)
    info = _C.shard_summary(prefix) if _C is not None else _summary_without_extension(prefix)
    return ShardSummary(prefix=prefix, **{**info, "dtype": np.dtype(info["dtype"])})


def _summary_without_extension(prefix: str) -> dict:
    """`validate_shard`'s header and size checks through megatron-core's own index reader, for machines that have
    the package's Python but not its compiled extension (training reads shards; only preprocessing writes them)."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
    try:
        index = _IndexReader(idx, multimodal=False)
        lengths, pointers = index.sequence_lengths, index.sequence_pointers
        documents = index.document_indices
    except (AssertionError, ValueError, KeyError, struct.error) as e:
        raise ShardFormatError(f"{idx}: not a readable Megatron indexed-dataset index ({e})") from None
    dtype = np.dtype(index.dtype)
    tokens = int(lengths.sum(dtype=np.int64))
    expected = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if len(lengths) else 0
    actual = os.path.getsize(bin_)
    if actual < expected:
        raise ShardFormatError(
            f"{bin_}: truncated data: {actual} bytes, but {idx} describes {tokens} {dtype.name} tokens = {expected} "
            "bytes"
        )
    if actual > expected:
        raise ShardFormatError(
            f"{bin_}: {actual} bytes, but {idx} describes only {tokens} {dtype.name} tokens = {expected} bytes; "
            "the .idx and .bin do not belong together"
        )
    return {"dtype": dtype.name, "num_sequences": len(lengths), "num_documents": len(documents) - 1,
            "num_tokens": tokens}


def check_shard(prefix: str, vocab_size: int | None = None) -> ShardSummary:
    """Check a shard's .idx against itself and its .bin (sizes, pointers, document indices) and, given the
    model's ``vocab_size``, that its token dtype can hold the vocabulary; returns its `ShardSummary`.

    A truncated copy or a .bin paired with another shard's .idx is refused here, naming the file and the
    expected and actual sizes, instead of failing in numpy during the first steps.
    """
    try:
        summary = validate_shard(prefix)
    except ShardFormatError as e:
        raise DataError(
            f"data shard {prefix} is unusable: {e}; copy it again or re-run tools/preprocess_data.py"
        ) from None
    capacity = np.iinfo(summary.dtype).max + 1
    if vocab_size is not None and capacity < vocab_size:
        raise DataError(
            f"data shard {prefix} holds {summary.dtype} tokens (ids below {capacity:,}), but the run's vocabulary has "
            f"{vocab_size:,} ids: it was written with another tokenizer; preprocess the corpus with this one"
        )
    return summary


def merge_shards(prefixes: Sequence[PathLike], out_prefix: PathLike) -> ShardSummary:
    """Concatenate shards, in the given order, into one at ``out_prefix``: the same bytes as writing all their
    documents into one shard.

    Every input is validated (and their dtypes compared) before anything is written; then the .bin files are
    copied in large blocks (by the kernel where it can) and the index pointers rebased, so no token passes
    through Python. Returns the summary of the merged shard.
    """
    _C.merge_shards([os.fspath(p) for p in prefixes], os.fspath(out_prefix))
    return validate_shard(out_prefix)


class IndexedShardWriter:
    """Stream documents of token ids into one shard at ``prefix`` (PREFIX.bin / PREFIX.idx).

    ``vocab_size`` picks the dtype as megatron-core does (uint16 below 65,500, else int32) and bounds the
    token ids to [0, vocab_size). As a context manager, leaving the block normally finalizes the shard and
    leaving it by an exception discards it. Not thread-safe.
    """

    def __init__(self, prefix: PathLike, vocab_size: int):
        """Open the temporaries next to ``prefix`` (its directory must exist)."""
        vocab_size = _check_vocab_size(vocab_size)
        self._writer = _C.ShardWriter(os.fspath(prefix), _C.optimal_dtype_code(vocab_size), vocab_size)
        self.prefix: str = self._writer.prefix
        self.dtype = np.dtype(_C.dtype_name(self._writer.dtype_code))
        self._finalized = False

    def add_document(self, tokens) -> None:
        """Append one document (a 1-D integer array or a sequence of token ids) as one sequence."""
        tokens = np.ascontiguousarray(tokens)
        if tokens.size == 0:
            tokens = tokens.astype(np.int32)  # numpy makes [] float64; an empty document is still valid
        self._writer.add_documents(tokens, np.array([tokens.size], np.int64))

    def add_documents(self, flat_tokens, lengths) -> None:
        """Append many documents in one call: ``flat_tokens`` (1-D integer array) holds their tokens back to back
        and ``lengths[i]`` is the token count of document i. No per-token Python work; all-or-nothing on bad input.
        """
        self._writer.add_documents(np.ascontiguousarray(flat_tokens), np.ascontiguousarray(lengths, dtype=np.int64))

    def finalize(self) -> ShardSummary:
        """Write the index and move the shard to its final names; returns its summary."""
        self._writer.finalize()
        self._finalized = True
        return ShardSummary(self.prefix, self.dtype, self._writer.num_sequences, self.num_documents, self.num_tokens)

    def discard(self) -> None:
        """Delete the temporaries without producing a shard (what also happens when the writer is dropped)."""
        self._writer.discard()

    @property
    def num_documents(self) -> int:
        """Documents added so far."""
        return self._writer.num_documents

    @property
    def num_tokens(self) -> int:
        """Tokens added so far."""
        return self._writer.num_tokens

    def __enter__(self) -> IndexedShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
        elif not self._finalized:
            self.finalize()
