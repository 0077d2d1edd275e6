"""tools/preprocess_data.py and megatron_qwen.data.preprocess against independent references.

The reference shards are built here with tiktoken directly (an Encoding made from qwen.tiktoken and the
pattern of the Qwen v1 release, NFC applied here) and written with megatron-core's own IndexedDatasetBuilder the way
Megatron-LM's preprocess_data.py writes them; megatron-core's IndexedDataset reads the outputs back.
"""

import base64
import gzip
import importlib.metadata
import json
import os
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
import tiktoken
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megatron_qwen.data import inputs, jsonl_input
from megatron_qwen.data import preprocess as pp
from mpi_run import mpirun_command, mpirun_or_skip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "preprocess_data.py")
TOOL_ENV = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}  # this checkout's package
# The Qwen v1 tokenizer facts.
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501 (Qwen's pattern, verbatim)
QWEN_VOCAB, EOD = 151_851, 151_643
NUM_DOCS = 600
BAD_LINE = 450  # in the second half of the corpus, i.e. read by the second worker

SAMPLES = [
    "",
    "Hello world! 你好，世界。",
    "Cafe\u0301 na\u0308ive A\u030a: combining accents that NFC composes",
    "emoji 😀 👍🏽 👨‍👩‍👧 🇯🇵 and text after them",
    "Русский текст, العربية, हिन्दी, 日本語のテキスト, 한국어 문장",
    "<|endoftext|> and <|im_start|> are plain text in a corpus",
    "tabs\tand\nnew lines\r\nand trailing spaces   ",
    "   ",
    "code: def f(x):\n    return x ** 2  # ok\n",
]


def tokenizer_file():
    return str(importlib.metadata.distribution("dashscope").locate_file("dashscope/resources/qwen.tiktoken"))


@pytest.fixture(scope="module")
def encoding():
    """tiktoken over qwen.tiktoken, built here rather than through megatron_qwen.tokenizer."""
    with open(tokenizer_file(), "rb") as f:
        ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}
    enc = tiktoken.Encoding(name="qwen-reference", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens={})
    assert enc.encode_ordinary("Hello world! 你好，世界。") == [9707, 1879, 0, 220, 108386, 3837, 99489, 1773]
    return enc


def make_records():
    """NUM_DOCS records with a text and a title: empty documents, mixed scripts, emoji, three very long ones."""
    rng = np.random.default_rng(0)
    words = "the of 数据 données модель 🙂 λ x=1; Ω ünd और 🚀 tokenizer\n".split(" ")
    records = []
    for i in range(NUM_DOCS):
        if i in (5, 300, 590):
            text = " ".join(rng.choice(words, size=25_000))  # ~150 KB
        else:
            text = SAMPLES[i % len(SAMPLES)] + (f" #{i}" if i % 4 else "")
        records.append({"id": i, "text": text, "title": f"Title {i} — {SAMPLES[(i + 3) % len(SAMPLES)][:12]}"})
    return records


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=bool(record["id"] % 2)) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    records = make_records()
    write_jsonl(root / "corpus.jsonl", records)
    return root / "corpus.jsonl", records


def reference_tokens(encoding, text, append_eod):
    tokens = encoding.encode_ordinary(unicodedata.normalize("NFC", text))
    return tokens + [EOD] if append_eod and tokens else tokens


def write_reference(prefix, encoding, texts, append_eod):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(QWEN_VOCAB))
    for text in texts:
        tokens = reference_tokens(encoding, text, append_eod)
        builder.add_document(torch.tensor(tokens, dtype=torch.int64), [len(tokens)] if tokens else [])
    builder.finalize(f"{prefix}.idx")
    return prefix


def shard_bytes(prefix):
    with open(f"{prefix}.bin", "rb") as b, open(f"{prefix}.idx", "rb") as i:
        return b.read(), i.read()


@pytest.fixture(scope="module")
def references(tmp_path_factory, corpus, encoding):
    """Reference shard prefix per (key, append_eod)."""
    root = tmp_path_factory.mktemp("reference")
    _, records = corpus
    return {
        (key, eod): write_reference(root / f"{key}_{eod}", encoding, [r[key] for r in records], eod)
        for key in ("text", "title")
        for eod in (False, True)
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_equal_megatron_reference_for_any_worker_count(tmp_path, corpus, references, workers):
    path, _ = corpus
    result = pp.preprocess(
        [str(path)], str(tmp_path / "out"), json_keys=["text", "title"], append_eod=True, workers=workers
    )
    for key in ("text", "title"):
        assert shard_bytes(tmp_path / f"out_{key}_document") == shard_bytes(references[key, True])
    assert result.documents == NUM_DOCS
    assert result.outputs["text"].num_documents == NUM_DOCS
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"out_{key}_document.{ext}" for key in ("text", "title") for ext in ("bin", "idx")
    )


def test_megatron_reader_gives_tiktoken_tokens_per_document(tmp_path, corpus, encoding):
    path, records = corpus
    pp.preprocess([str(path)], str(tmp_path / "out"), append_eod=True, workers=2)
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    bounds = dataset.document_indices
    assert len(bounds) == NUM_DOCS + 1
    assert max(len(r["text"]) for r in records) > 100_000 and any(r["text"] == "" for r in records)
    for i, record in enumerate(records):
        sequences = [dataset[j].tolist() for j in range(bounds[i], bounds[i + 1])]
        expected = reference_tokens(encoding, record["text"], append_eod=True)
        assert sequences == ([expected] if expected else []), f"document {i}"


def test_cli_reads_multi_member_gzip(tmp_path, corpus, references):
    path, _ = corpus
    data = path.read_bytes()
    middle = data.index(b"\n", len(data) // 2) + 1
    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress(data[:middle]) + gzip.compress(data[middle:]))

    run = subprocess.run(
        [sys.executable, TOOL, "--input", str(tmp_path / "in.jsonl.gz"), "--output-prefix", str(tmp_path / "o"),
         "--workers", "2", "--tokenizer-file", tokenizer_file()],
        capture_output=True, text=True, timeout=120, env=TOOL_ENV,
    )
    assert run.returncode == 0, run.stderr
    assert f"documents: {NUM_DOCS:,}" in run.stderr
    assert shard_bytes(tmp_path / "o_text_document") == shard_bytes(references["text", False])


def test_glob_inputs_are_processed_in_sorted_order(tmp_path, corpus, references):
    _, records = corpus
    # Names sort in corpus order; they are written in another order so directory order does not help.
    for n in (2, 0, 1):
        write_jsonl(tmp_path / f"chunk_{n}.jsonl", records[n * 200 : (n + 1) * 200])
    pp.preprocess([str(tmp_path / "chunk_*.jsonl")], str(tmp_path / "out"), workers=2)
    assert shard_bytes(tmp_path / "out_text_document") == shard_bytes(references["text", False])


BAD_LINES = {
    "invalid_json": ('{"text": "unterminated', "invalid JSON (Unterminated string"),
    "not_an_object": ('["text", "x"]', "expected a JSON object, found a JSON array"),
    "missing_key": ('{"body": "x"}', "missing key 'text' (keys present: 'body')"),
    "not_a_string": ('{"text": 42}', "the value of 'text' is a JSON number, not a string"),
}


def corpus_with_bad_lines(tmp_path, records, bad):
    """The corpus with the given {line number: raw line} replaced."""
    lines = [json.dumps(r) for r in records]
    for number, raw in bad.items():
        lines[number - 1] = raw
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_line_stops_with_file_and_line_and_leaves_nothing(tmp_path, corpus, kind):
    raw, reason = BAD_LINES[kind]
    path = corpus_with_bad_lines(tmp_path, corpus[1], {BAD_LINE: raw})
    out_dir = tmp_path / "out"
    with pytest.raises(pp.PreprocessError) as info:
        pp.preprocess([str(path)], str(out_dir / "x"), workers=2)
    assert str(info.value).startswith(f"{path}:{BAD_LINE}: {reason}")
    assert "--skip-bad-lines" in str(info.value)
    assert os.listdir(out_dir) == []


def test_failed_run_keeps_previous_complete_output(tmp_path, corpus, references):
    path, records = corpus
    out = tmp_path / "out"
    pp.preprocess([str(path)], str(out / "x"), workers=2)
    before = sorted(os.listdir(out))
    bad = corpus_with_bad_lines(tmp_path, records, {3: "{"})
    with pytest.raises(pp.PreprocessError, match=r"bad\.jsonl:3: invalid JSON"):
        pp.preprocess([str(bad)], str(out / "x"), workers=2)
    assert sorted(os.listdir(out)) == before
    assert shard_bytes(out / "x_text_document") == shard_bytes(references["text", False])


def test_skip_bad_lines_counts_and_drops_them(tmp_path, corpus, encoding):
    _, records = corpus
    bad = {2: "not json", BAD_LINE: '{"text": null}', NUM_DOCS: '{"title": "no text"}'}
    path = corpus_with_bad_lines(tmp_path, records, bad)
    result = pp.preprocess([str(path)], str(tmp_path / "out"), workers=2, skip_bad_lines=True)

    assert result.bad_lines == 3
    assert [e.split(": ")[0] for e in result.bad_line_examples] == [f"{path}:{n}" for n in sorted(bad)]
    good = [r["text"] for i, r in enumerate(records, 1) if i not in bad]
    write_reference(tmp_path / "ref", encoding, good, append_eod=False)
    assert shard_bytes(tmp_path / "out_text_document") == shard_bytes(tmp_path / "ref")


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_parts_partition_the_lines(tmp_path, monkeypatch, compressed):
    """However a file is cut into parts, every line is read by exactly one part, in order, with its line number."""
    monkeypatch.setattr(jsonl_input, "BLOCK_BYTES", 64)  # many blocks (and .gz split points) in a small file
    rng = np.random.default_rng(1)
    lines = [bytes(rng.integers(97, 123, size=n).astype(np.uint8)) for n in rng.integers(0, 150, size=300)]
    assert b"" in lines
    data = b"\n".join(lines)  # no final newline
    path = tmp_path / ("f.jsonl.gz" if compressed else "f.jsonl")
    path.write_bytes(gzip.compress(data[:5000], 1) + gzip.compress(data[5000:], 1) if compressed else data)
    for num_parts, gz_cut_every in [(1, 1), (2, 1), (3, 1), (7, 1), (12, 4)]:
        parts = inputs.plan_parts([(str(path), path.stat().st_size)], num_parts, gz_cut_every)
        seen = []
        for part in parts:
            for piece in part:
                seen += [(line, jsonl_input.line_number(piece, before))
                         for line, before in jsonl_input.iter_piece_lines(piece)]
        assert seen == [(line, n) for n, line in enumerate(lines, 1)], num_parts
        cut_after = [p for p in range(num_parts - 1) if parts[p]]  # parts that end at a cut
        assert all((p + 1) % gz_cut_every == 0 for p in cut_after) if compressed else len(cut_after) == num_parts - 1


def test_input_errors_name_the_value(tmp_path):
    with pytest.raises(pp.PreprocessError, match=r"--input '.*nothing\*\.jsonl' matches no file"):
        pp.preprocess([str(tmp_path / "nothing*.jsonl")], str(tmp_path / "o"))
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(pp.PreprocessError, match="is given twice"):
        pp.preprocess([str(tmp_path / "a.jsonl"), str(tmp_path / "*.jsonl")], str(tmp_path / "o"))
    with pytest.raises(pp.PreprocessError, match="--workers must be a positive integer, got 0"):
        pp.preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "o"), workers=0)
    with pytest.raises(pp.PreprocessError, match=r"--tokenizer-file '.*missing\.tiktoken' does not exist"):
        pp.preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "o"), tokenizer_file=tmp_path / "missing.tiktoken")
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl"]


def test_mpi_run_equals_single_process(tmp_path, corpus, references):
    path, _ = corpus
    run = subprocess.run(
        [*mpirun_command(mpirun_or_skip(), 2), sys.executable, TOOL, "--mpi",
         "--input", str(path), "--output-prefix", str(tmp_path / "mpi"), "--workers", "2", "--append-eod",
         "--json-keys", "text", "title"],
        capture_output=True, text=True, timeout=180, env=TOOL_ENV,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    for key in ("text", "title"):
        assert shard_bytes(tmp_path / f"mpi_{key}_document") == shard_bytes(references[key, True])
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"mpi_{key}_document.{ext}" for key in ("text", "title") for ext in ("bin", "idx")
    )
