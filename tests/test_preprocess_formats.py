"""Corpora as Parquet, Arrow (save_to_disk directories) and .jsonl.zst, and preprocessing that resumes after a kill.

The references are test_preprocess.py's: tiktoken built from qwen.tiktoken and megatron-core's own
IndexedDatasetBuilder, fed the texts of the same records; every format must give exactly those bytes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from megatron_qwen.data import preprocess as pp
import test_preprocess
from mpi_run import mpirun_command, mpirun_or_skip
from test_preprocess import TOOL, TOOL_ENV, make_records, shard_bytes, tokenizer_file, write_reference

# The fixture, bound here so that the tests below can name it.
encoding = test_preprocess.encoding

NULL_ROW = 101  # 1-based row (line) whose text is null: a bad record in every format
ROWS_PER_GROUP = 37


def format_records():
    """A quarter of test_preprocess's records (two of its ~150 KB ones among them), one with a null text."""
    records = make_records()[:150] + make_records()[290:310]
    records[NULL_ROW - 1] = {**records[NULL_ROW - 1], "text": None}
    return records


def good_texts(records, key="text"):
    return [r[key] for r in records if r[key] is not None]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def table_of(records):
    """The records with a non-string column (id) and a nested one (meta) beside the strings."""
    return pa.table({
        "id": pa.array([r["id"] for r in records], pa.int64()),
        "text": pa.array([r["text"] for r in records], pa.string()),
        "title": pa.array([r["title"] for r in records], pa.string()),
        "meta": pa.array([{"tags": ["a", "b"], "score": r["id"] / 7} for r in records]),
    })


def write_save_to_disk(directory, records, shards=2):
    """The layout datasets' save_to_disk writes: Arrow IPC stream shards listed in state.json, batches of 40 rows."""
    directory.mkdir()
    table = table_of(records)
    names = []
    bounds = [len(records) * s // shards for s in range(shards + 1)]
    for s in range(shards):
        names.append(f"data-{s:05d}-of-{shards:05d}.arrow")
        with pa.OSFile(str(directory / names[-1]), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
            for batch in table.slice(bounds[s], bounds[s + 1] - bounds[s]).to_batches(max_chunksize=40):
                writer.write_batch(batch)
    (directory / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names], "_split": None}))
    (directory / "dataset_info.json").write_text("{}")
    return directory


def write_zst(path, records, frames=3):
    """JSON lines as concatenated zstd frames, cut mid-line (as `cat a.zst b.zst` gives)."""
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    cuts = [len(data) * f // frames + 5 for f in range(1, frames)]
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    path.write_bytes(b"".join(zstandard.ZstdCompressor(level=3).compress(p) for p in pieces))
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, encoding):
    root = tmp_path_factory.mktemp("formats")
    records = format_records()
    write_jsonl(root / "corpus.jsonl", records)
    pq.write_table(table_of(records), root / "corpus.parquet", row_group_size=ROWS_PER_GROUP)
    write_save_to_disk(root / "saved", records)
    write_zst(root / "corpus.jsonl.zst", records)
    reference = write_reference(root / "reference", encoding, good_texts(records), append_eod=True)
    return root, records, reference


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("name", ["corpus.jsonl", "corpus.parquet", "saved", "corpus.jsonl.zst"])
def test_every_format_gives_the_reference_bytes(corpora, tmp_path, name, workers):
    root, records, reference = corpora
    assert pq.ParquetFile(root / "corpus.parquet").metadata.num_row_groups > 3
    result = pp.preprocess([str(root / name)], str(tmp_path / "out"), append_eod=True, workers=workers,
                           skip_bad_lines=True)
    assert shard_bytes(tmp_path / "out_text_document") == shard_bytes(reference)
    assert result.documents == len(records) - 1 and result.bad_lines == 1
    if name == "saved":  # 170 rows in two files of 85
        place = f"{root / name / 'data-00001-of-00002.arrow'}: row {NULL_ROW - 85}: "
    else:
        place = f"{root / name}:{NULL_ROW}: " if name.startswith("corpus.jsonl") else f"{root / name}: row {NULL_ROW}: "
    assert result.bad_line_examples[0].startswith(place), result.bad_line_examples
    assert "the value of 'text' is a JSON null, not a string" in result.bad_line_examples[0]


def test_mpi_size_two_reads_every_format(corpora, tmp_path, encoding):
    root, records, _ = corpora
    inputs = [str(root / "corpus.parquet"), str(root / "saved"), str(root / "corpus.jsonl.zst")]
    run = subprocess.run(
        [*mpirun_command(mpirun_or_skip(), 2), sys.executable, TOOL, "--mpi", "--input", *inputs, "--output-prefix",
         str(tmp_path / "mpi"), "--workers", "2", "--append-eod", "--json-keys", "text", "title", "--skip-bad-lines"],
        capture_output=True, text=True, timeout=300, env=TOOL_ENV,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    write_reference(tmp_path / "ref_text", encoding, good_texts(records) * 3, append_eod=True)
    titles = [r["title"] for r in records if r["text"] is not None] * 3
    write_reference(tmp_path / "ref_title", encoding, titles, append_eod=True)
    assert shard_bytes(tmp_path / "mpi_text_document") == shard_bytes(tmp_path / "ref_text")
    assert shard_bytes(tmp_path / "mpi_title_document") == shard_bytes(tmp_path / "ref_title")


def test_directory_input_takes_its_files_in_sorted_order(corpora, tmp_path, encoding):
    root, records, _ = corpora
    good = [r for r in records if r["text"] is not None]
    (tmp_path / "in" / "b").mkdir(parents=True)
    write_jsonl(tmp_path / "in" / "b" / "2.jsonl", good[100:])  # sorts after a/ and 1.parquet ... by path
    pq.write_table(table_of(good[:50]), tmp_path / "in" / "1.parquet", row_group_size=20)
    write_zst(tmp_path / "in" / "a.jsonl.zst", good[50:100])
    (tmp_path / "in" / "README.md").write_text("not a corpus file")
    pp.preprocess([str(tmp_path / "in")], str(tmp_path / "out"), workers=2)
    write_reference(tmp_path / "ref", encoding, [r["text"] for r in good], append_eod=False)
    assert shard_bytes(tmp_path / "out_text_document") == shard_bytes(tmp_path / "ref")


def test_chat_messages_column_of_structs_equals_jsonl(tmp_path):
    chats = [
        {"messages": [{"role": "user", "content": f"question {i} " * (i % 5 + 1)},
                      {"role": "assistant", "content": f"answer {i} 你好"}]}
        for i in range(60)
    ]
    write_jsonl(tmp_path / "chats.jsonl", chats)
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "chats.parquet", row_group_size=16)
    for name in ("chats.jsonl", "chats.parquet"):
        pp.preprocess([str(tmp_path / name)], str(tmp_path / name.replace(".", "_")), mode="chat", workers=2)
    for key in ("chat_tokens", "chat_mask"):
        parquet, jsonl = (tmp_path / f"chats_{fmt}_{key}_document" for fmt in ("parquet", "jsonl"))
        assert shard_bytes(parquet) == shard_bytes(jsonl)


def bad_inputs(tmp_path, corpora):
    root, records, _ = corpora
    data = (root / "corpus.parquet").read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    zst = bytearray((root / "corpus.jsonl.zst").read_bytes())
    zst[len(zst) // 2 : len(zst) // 2 + 64] = bytes(64)  # zeros in the middle of a frame
    (tmp_path / "damaged.jsonl.zst").write_bytes(bytes(zst))
    return {
        "truncated_parquet": ([tmp_path / "truncated.parquet"], {}, r"truncated\.parquet: cannot be read as Parquet"),
        "missing_column": ([root / "corpus.parquet"], {"json_keys": ["body"]},
                           r"corpus\.parquet: no column 'body' \(columns: 'id', 'text', 'title', 'meta'\)"),
        "nested_column": ([root / "corpus.parquet"], {"json_keys": ["meta"]},
                          r"corpus\.parquet: column 'meta' is struct<.*>, a nested column"),
        "non_string_column": ([root / "saved"], {"json_keys": ["id"]}, r"\.arrow: column 'id' is int64, not a string"),
        "damaged_zstd": ([tmp_path / "damaged.jsonl.zst"], {},
                         r"damaged\.jsonl\.zst: not a valid zstd file near compressed byte \d+"),
    }


@pytest.mark.parametrize(
    "kind", ["truncated_parquet", "missing_column", "nested_column", "non_string_column", "damaged_zstd"]
)
def test_bad_input_stops_with_file_and_place_and_leaves_nothing(corpora, tmp_path, kind):
    inputs, options, message = bad_inputs(tmp_path, corpora)[kind]
    (tmp_path / "out").mkdir()
    with pytest.raises(pp.PreprocessError, match=message) as info:
        pp.preprocess([str(p) for p in inputs], str(tmp_path / "out" / "x"), workers=2, skip_bad_lines=True, **options)
    assert "\n" not in str(info.value)
    assert os.listdir(tmp_path / "out") == []


# --------------------------------------------------------------------------- resume after a kill

RESUME_PARTS = 16  # 2 workers x PARTS_PER_WORKER


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory, encoding):
    """~2.7 MB of JSON lines, so that a 16-part run lasts long enough to be killed half-way."""
    root = tmp_path_factory.mktemp("resume")
    records = [r for r in make_records() for _ in range(4)]
    write_jsonl(root / "big.jsonl", records)
    write_reference(root / "reference", encoding, [r["text"] for r in records], append_eod=False)
    return root / "big.jsonl", root / "reference"


def tool_command(corpus, prefix, *extra):
    return [sys.executable, TOOL, "--input", str(corpus), "--output-prefix", str(prefix), "--workers", "2",
            "--tokenizer-file", tokenizer_file(), *extra]


def records_of(prefix) -> list[str]:
    directory, name = os.path.split(str(prefix))
    return sorted(n for n in os.listdir(directory) if n.startswith(name) and n.endswith(".json"))


def kill_half_way(corpus, prefix) -> int:
    """Start the tool, kill -9 its whole process group once half of its parts are complete; return how many were."""
    proc = subprocess.Popen(tool_command(corpus, prefix), env=TOOL_ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while len(records_of(prefix)) < RESUME_PARTS // 2:
            assert proc.poll() is None, f"the run ended (exit code {proc.returncode}) before half its parts were done"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(records_of(prefix))
    assert RESUME_PARTS // 2 <= done < RESUME_PARTS and not os.path.exists(f"{prefix}_text_document.bin")
    return done


def test_kill_then_rerun_resumes_and_gives_the_same_bytes(big_corpus, tmp_path):
    corpus, reference = big_corpus
    prefix = tmp_path / "out"
    done = kill_half_way(corpus, prefix)
    rerun = subprocess.run(tool_command(corpus, prefix), env=TOOL_ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed: {done} of {RESUME_PARTS} parts reused from an earlier run" in rerun.stderr, rerun.stderr
    assert f"documents: {len(make_records()) * 4:,} in " in rerun.stderr  # reused parts counted once, not redone
    assert shard_bytes(f"{prefix}_text_document") == shard_bytes(reference)
    assert sorted(os.listdir(tmp_path)) == ["out_text_document.bin", "out_text_document.idx"]


def test_touched_input_or_no_resume_starts_afresh(big_corpus, tmp_path):
    corpus, reference = big_corpus
    prefix = tmp_path / "out"
    kill_half_way(corpus, prefix)
    os.utime(corpus)  # same bytes, a new modification time: it may have been rewritten
    rerun = subprocess.run(tool_command(corpus, prefix), env=TOOL_ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"not resuming the earlier run of {prefix}: input {os.path.realpath(corpus)} changed since" in rerun.stderr
    assert "resumed:" not in rerun.stderr
    assert shard_bytes(f"{prefix}_text_document") == shard_bytes(reference)

    os.remove(f"{prefix}_text_document.bin")
    done = kill_half_way(corpus, prefix)
    rerun = subprocess.run(tool_command(corpus, prefix, "--no-resume"), env=TOOL_ENV, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"--no-resume: removed the {done} completed parts of an earlier run" in rerun.stderr
    assert "resumed:" not in rerun.stderr
    assert shard_bytes(f"{prefix}_text_document") == shard_bytes(reference)


def test_changed_option_starts_afresh(big_corpus, tmp_path):
    corpus, _ = big_corpus
    prefix = tmp_path / "out"
    kill_half_way(corpus, prefix)
    rerun = subprocess.run(tool_command(corpus, prefix, "--append-eod"), env=TOOL_ENV, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "not resuming the earlier run" in rerun.stderr and "its options differ" in rerun.stderr
    assert "append_eod=False" in rerun.stderr and "append_eod=True" in rerun.stderr
