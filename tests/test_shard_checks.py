"""Shards are checked when datasets are built: a truncated or mismatched .bin is refused before the first step.

The shards are written with megatron-core's own IndexedDatasetBuilder; the expected sizes in the messages are
computed here from the token counts (4 bytes per int32 token).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from corpus import write_dense_corpus
from megatron_qwen.errors import DataError
from spawn import REPO, cpu_env, free_port

TRUNCATED_BYTES = 100_000  # the example: a copy cut off at 100,000 bytes


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("corpus") / "email_text_document"
    vocab = write_dense_corpus(prefix)
    shard = IndexedDataset(str(prefix))  # kept alive while its mmap-backed lengths are read
    tokens = int(np.sum(shard.sequence_lengths))
    del shard
    assert tokens * 4 > TRUNCATED_BYTES
    return str(prefix), vocab, tokens


def truncated_copy(corpus, directory) -> str:
    prefix, _, _ = corpus
    out = str(directory / "cut_text_document")
    shutil.copy(prefix + ".idx", out + ".idx")
    with open(prefix + ".bin", "rb") as src, open(out + ".bin", "wb") as dst:
        dst.write(src.read(TRUNCATED_BYTES))
    return out


def gpt_cfg(prefix: str, vocab: int, run_dir):
    from megatron_qwen.config import load_config

    return load_config("configs/tiny.yaml", [
        f"data.paths=[{prefix}]", f"model.padded_vocab_size={vocab}", "model.seq_length=64",
        "training.micro_batch_size=2", "training.global_batch_size=8", "training.train_iters=5",
        f"logging.run_dir={run_dir}", f"data.cache_dir={run_dir}/cache",
    ])


def test_truncated_bin_is_refused_with_expected_and_actual_size(corpus, tmp_path):
    from megatron_qwen.data.gpt import build_gpt_datasets

    cut = truncated_copy(corpus, tmp_path)
    _, vocab, tokens = corpus
    with pytest.raises(DataError) as info:
        build_gpt_datasets(gpt_cfg(cut, vocab, tmp_path), eod=0, vocab_size=vocab)
    message = str(info.value)
    assert f"{cut}.bin: truncated data: {TRUNCATED_BYTES} bytes" in message
    assert f"{tokens} int32 tokens = {tokens * 4} bytes" in message


def test_bin_of_another_shard_is_refused(corpus, tmp_path):
    from megatron_qwen.data.gpt import build_gpt_datasets

    prefix, vocab, tokens = corpus
    other = str(tmp_path / "other_text_document")
    write_dense_corpus(other, package="json", limit=10)
    shutil.copy(prefix + ".idx", other + ".idx")  # the .bin of one shard beside the index of another
    actual = os.path.getsize(other + ".bin")
    with pytest.raises(DataError, match=rf"other_text_document\.bin: (truncated data: )?{actual} "
                       rf"bytes, but .* describes (only )?{tokens} int32 tokens = {tokens * 4} bytes"):
        build_gpt_datasets(gpt_cfg(other, vocab, tmp_path), eod=0, vocab_size=vocab)


def test_shard_with_too_small_dtype_for_the_vocabulary_is_refused(tmp_path):
    from megatron_qwen.data.indexed import check_shard

    prefix = str(tmp_path / "small")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.add_document(torch.tensor([1, 2, 3], dtype=torch.int64), [3])
    builder.finalize(prefix + ".idx")
    assert check_shard(prefix, vocab_size=65_536).num_tokens == 3
    with pytest.raises(DataError,
                       match=r"holds uint16 tokens \(ids below 65,536\), but the run.s vocabulary has 151,851 ids"):
        check_shard(prefix, vocab_size=151_851)


def test_sft_mask_that_does_not_match_its_tokens_is_refused(tmp_path):
    from megatron_qwen.data.chat_datasets import _Shards
    from megatron_qwen.data.chat import SFT_KEYS
    from megatron_qwen.data.shard_names import shard_prefix

    prefix = str(tmp_path / "sft")
    for key, lengths, dtype in ((SFT_KEYS[0], [4, 3], np.int32), (SFT_KEYS[1], [4, 2], np.uint8)):
        builder = IndexedDatasetBuilder(shard_prefix(prefix, key) + ".bin", dtype=dtype)
        for n in lengths:
            builder.add_document(torch.ones(n, dtype=torch.int64), [n])
        builder.finalize(shard_prefix(prefix, key) + ".idx")
    with pytest.raises(DataError, match="document 1 has 2 mask entries for 3 tokens"):
        _Shards([prefix], SFT_KEYS, "--chat")
    # A truncated token shard is refused before the lengths are compared.
    tokens = shard_prefix(prefix, SFT_KEYS[0]) + ".bin"
    os.truncate(tokens, 8)
    with pytest.raises(DataError, match=r"chat_tokens_document\.bin: truncated data: 8 bytes, but .* 7 int32 tokens"):
        _Shards([prefix], SFT_KEYS, "--chat")


@pytest.mark.parallel
def test_pretraining_stage_refuses_truncated_bin_before_the_first_step(corpus, tmp_path):
    cut = truncated_copy(corpus, tmp_path)
    _, vocab, tokens = corpus
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "-m", "megatron_qwen.stages.pretrain", "configs/tiny.yaml",
        f"data.paths=[{cut}]", f"model.padded_vocab_size={vocab}", "model.seq_length=64",
        "training.micro_batch_size=2", "training.global_batch_size=8", "training.train_iters=5",
        f"logging.run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    assert f"{cut}.bin: truncated data: {TRUNCATED_BYTES} bytes" in errors[0]
    assert f"{tokens * 4} bytes" in errors[0]
    # No rank prints a traceback of its own (torchrun prefixes rank output with [rankN]:); the ranks exit 2 (whichever
    # torchrun reports first: every rank refuses the shard).
    assert "]: Traceback" not in output and "offset must be non-negative" not in output, output
    assert re.search(r"rank +: \d \(local_rank: \d\)\n +exitcode +: 2 ", output), output
    assert "iteration" not in proc.stdout, proc.stdout


def test_shards_are_checked_the_same_without_the_compiled_extension(tmp_path):
    """A bare GPU machine trains without the C++ extension: megatron-core's index reader stands in for it, with
    the same summary of a good shard and the same message for a truncated or overlong .bin."""
    from megatron_qwen.data import indexed

    prefix = str(tmp_path / "docs")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for n in (5, 7, 3):
        builder.add_document(torch.arange(n, dtype=torch.int64), [n])
    builder.finalize(prefix + ".idx")
    summary = indexed.validate_shard(prefix)
    assert indexed._summary_without_extension(prefix) == {
        "dtype": "int32", "num_sequences": 3, "num_documents": 3, "num_tokens": 15}
    assert (summary.num_sequences, summary.num_documents, summary.num_tokens) == (3, 3, 15)
    for size in (40, 64):
        with open(prefix + ".bin", "r+b") as f:
            f.truncate(size)
        with pytest.raises(ValueError) as compiled:
            indexed.validate_shard(prefix)
        with pytest.raises(ValueError) as fallback:
            indexed._summary_without_extension(prefix)
        assert str(fallback.value) == str(compiled.value)
