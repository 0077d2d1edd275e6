"""The C++ indexed-dataset builder against megatron-core 0.16.1's own writer and reader."""

import os
import struct

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megatron_qwen.data.indexed import (
    IndexedShardWriter,
    ShardFormatError,
    merge_shards,
    optimal_dtype,
    validate_shard,
)

QWEN_VOCAB = 151_851


def random_documents(vocab_size, seed=0):
    """Documents of varied sizes: empty ones, single tokens, and one long enough to cross the 4 MiB write buffer."""
    rng = np.random.default_rng(seed)
    sizes = [0, 1, 7, 0, 300, 0, 2_500_000, 3, 1000, 0]
    return [rng.integers(0, vocab_size, size=n, dtype=np.int64) for n in sizes]


def write_with_megatron(prefix, documents, vocab_size):
    """The reference: megatron-core's IndexedDatasetBuilder, called the way Megatron-LM's preprocess_data.py calls
    it (one sequence per non-empty document, none for an empty one)."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(vocab_size))
    for doc in documents:
        builder.add_document(torch.from_numpy(doc), [len(doc)] if len(doc) else [])
    builder.finalize(f"{prefix}.idx")


def read_bytes(prefix):
    with open(f"{prefix}.bin", "rb") as b, open(f"{prefix}.idx", "rb") as i:
        return b.read(), i.read()


@pytest.mark.parametrize("vocab_size", [QWEN_VOCAB, 32_000], ids=["int32", "uint16"])
def test_bytes_equal_megatron_core_builder(tmp_path, vocab_size):
    documents = random_documents(vocab_size)
    write_with_megatron(tmp_path / "ref", documents, vocab_size)

    # One document at a time (int64 input, converted in C++), then a batch (int32 input) for the rest.
    with IndexedShardWriter(tmp_path / "ours", vocab_size) as writer:
        for doc in documents[:5]:
            writer.add_document(doc)
        rest = documents[5:]
        writer.add_documents(np.concatenate(rest).astype(np.int32), [len(d) for d in rest])

    assert writer.dtype == DType.optimal_dtype(vocab_size)
    assert read_bytes(tmp_path / "ours") == read_bytes(tmp_path / "ref")


@pytest.mark.parametrize("vocab_size", [QWEN_VOCAB, 32_000], ids=["int32", "uint16"])
def test_megatron_core_reads_documents_back(tmp_path, vocab_size):
    documents = random_documents(vocab_size, seed=1)
    with IndexedShardWriter(tmp_path / "shard", vocab_size) as writer:
        writer.add_documents(np.concatenate(documents), [len(d) for d in documents])

    dataset = IndexedDataset(str(tmp_path / "shard"))
    bounds = dataset.document_indices
    assert len(bounds) == len(documents) + 1
    for i, doc in enumerate(documents):
        sequences = [dataset[j] for j in range(bounds[i], bounds[i + 1])]
        read_back = np.concatenate(sequences) if sequences else np.zeros(0, np.int64)
        np.testing.assert_array_equal(read_back, doc)
        assert len(sequences) == (1 if len(doc) else 0)


def test_dtype_rule_matches_megatron_core():
    for vocab_size in [1, 255, 65_499, 65_500, 65_536, QWEN_VOCAB]:
        assert optimal_dtype(vocab_size) == DType.optimal_dtype(vocab_size), vocab_size


def test_merge_equals_one_write(tmp_path):
    documents = random_documents(QWEN_VOCAB, seed=2)
    write_with_megatron(tmp_path / "single", documents, QWEN_VOCAB)
    groups = [documents[:4], [], documents[4:7], documents[7:]]  # an empty shard too
    for n, group in enumerate(groups):
        with IndexedShardWriter(tmp_path / f"part{n}", QWEN_VOCAB) as writer:
            for doc in group:
                writer.add_document(doc)

    summary = merge_shards([tmp_path / f"part{n}" for n in range(len(groups))], tmp_path / "merged")

    assert read_bytes(tmp_path / "merged") == read_bytes(tmp_path / "single")
    assert summary.num_documents == len(documents)
    assert summary.num_tokens == sum(len(d) for d in documents)
    assert summary.num_sequences == sum(1 for d in documents if len(d))


def test_merge_rejects_mixed_dtypes_before_writing(tmp_path):
    with IndexedShardWriter(tmp_path / "wide", QWEN_VOCAB) as writer:
        writer.add_document([1, 2, 3])
    with IndexedShardWriter(tmp_path / "narrow", 1000) as writer:
        writer.add_document([1, 2, 3])
    with pytest.raises(ShardFormatError, match=r"narrow\.idx: dtype uint16 differs from int32"):
        merge_shards([tmp_path / "wide", tmp_path / "narrow"], tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["narrow.bin", "narrow.idx", "wide.bin", "wide.idx"]


def _shard(tmp_path):
    """A valid int32 shard of three documents (10, 0 and 5 tokens) to corrupt."""
    with IndexedShardWriter(tmp_path / "s", QWEN_VOCAB) as writer:
        writer.add_documents(np.arange(15), [10, 0, 5])
    return tmp_path / "s"


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


# (how to corrupt the shard, which file the error must name, words the message must contain)
CORRUPTIONS = {
    "truncated_bin": (lambda p: _truncate(f"{p}.bin", 40), ".bin", "truncated data: 40 bytes"),
    "extra_bin": (lambda p: open(f"{p}.bin", "ab").write(b"\0" * 4), ".bin", "do not belong together"),
    "wrong_magic": (lambda p: _patch(f"{p}.idx", 0, b"XXIDIDX"), ".idx", "not a Megatron indexed-dataset index"),
    "wrong_version": (lambda p: _patch(f"{p}.idx", 9, struct.pack("<Q", 2)), ".idx", "index version 2"),
    "unknown_dtype_code": (lambda p: _patch(f"{p}.idx", 17, b"\x09"), ".idx", "unknown dtype code 9"),
    "wrong_dtype_code": (lambda p: _patch(f"{p}.idx", 17, b"\x08"), ".idx", "disagree with the lengths and the dtype"),
    "truncated_idx": (lambda p: _truncate(f"{p}.idx", 60), ".idx", "truncated index: 60 bytes"),
    "truncated_header": (lambda p: _truncate(f"{p}.idx", 20), ".idx", "header alone takes 34"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupted_shard_errors_name_file_and_problem(tmp_path, corruption):
    prefix = _shard(tmp_path)
    assert validate_shard(prefix).num_documents == 3
    corrupt, suffix, words = CORRUPTIONS[corruption]
    corrupt(prefix)

    with pytest.raises(ShardFormatError) as info:
        validate_shard(prefix)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"{prefix}{suffix}: ")
    assert words in str(info.value)
    # Merging refuses the shard the same way and leaves nothing behind.
    with pytest.raises(ShardFormatError, match=words.replace(".", r"\.")):
        merge_shards([prefix], tmp_path / "merged")
    assert not [name for name in os.listdir(tmp_path) if name.startswith("merged")]


def test_missing_file_is_file_not_found(tmp_path):
    prefix = _shard(tmp_path)
    os.remove(f"{prefix}.bin")
    with pytest.raises(FileNotFoundError) as info:
        validate_shard(prefix)
    assert info.value.filename == f"{prefix}.bin"


def test_only_complete_shards_get_final_names(tmp_path):
    writer = IndexedShardWriter(tmp_path / "dropped", QWEN_VOCAB)
    writer.add_documents(np.arange(100), [60, 40])
    assert [name.split(".tmp-")[0] for name in os.listdir(tmp_path)] == ["dropped.bin"]
    del writer
    assert os.listdir(tmp_path) == []

    with pytest.raises(RuntimeError, match="boom"):
        with IndexedShardWriter(tmp_path / "failed", QWEN_VOCAB) as writer:
            writer.add_document([1, 2])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []

    with IndexedShardWriter(tmp_path / "done", QWEN_VOCAB) as writer:
        writer.add_document([1, 2])
    assert sorted(os.listdir(tmp_path)) == ["done.bin", "done.idx"]


def test_bad_tokens_are_rejected_without_changing_the_shard(tmp_path):
    with IndexedShardWriter(tmp_path / "s", 1000) as writer:
        writer.add_document([5, 6])
        outside = r"token 1000 at position 2 of the batch is outside the vocabulary \[0, 1000\)"
        with pytest.raises(ValueError, match=outside):
            writer.add_documents(np.array([1, 2, 1000, 3]), [2, 2])
        with pytest.raises(ValueError, match=r"token -1 at position 0"):
            writer.add_document(np.array([-1], np.int16))
        with pytest.raises(ValueError, match="lengths sum to 3 but 2 tokens"):
            writer.add_documents(np.array([1, 2]), [1, 2])
        with pytest.raises(ValueError, match="integer array"):
            writer.add_document(np.array([1.0, 2.0]))
        writer.add_document([7])
    dataset = IndexedDataset(str(tmp_path / "s"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == [[5, 6], [7]]


def test_writer_rejects_bad_vocab_size(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size must be an integer in \[1, 2\*\*31\].*got 0"):
        IndexedShardWriter(tmp_path / "s", 0)
    assert os.listdir(tmp_path) == []
