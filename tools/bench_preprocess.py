"""Benchmark corpus preprocessing: this project's pipeline against its ceiling and the Megatron-LM approach.

    python tools/bench_preprocess.py [--workers 2] [--corpus-mb 50] [--workdir DIR] [--repeat 1]

Builds two JSONL corpora from text on this machine (Python's standard-library sources, /usr/share/doc,
man pages): LONG, one document per file, and SHORT, ~300-byte paragraphs, and each also as Parquet (row
groups of ~8 MB of text) and as .jsonl.zst (a zstd frame per 4 MB). Then, with the same tokenizer and
worker count, each in its own subprocess:
  (a) tokenize   workers read, parse and tokenize their part of the JSONL and discard the tokens (the ceiling);
  (b) pipeline   tools/preprocess_data.py (partial shards through the C++ builder, then one merge), on the
                 JSONL, the Parquet and the .jsonl.zst (rates counted in JSONL bytes, so they compare);
  (c) megatron   the Megatron-LM approach: a Pool(imap, chunksize 32) returns token lists to the main
                 process, which writes them with megatron-core's IndexedDatasetBuilder.
Times run from the start of the work (worker start-up included) to complete output, leaving out each
interpreter's own imports; CPU seconds add up all processes of a method (less sensitive to other load on
the machine than wall time). Peak RSS is the largest single process (getrusage of the process and its
children) and the sum over the process tree (sampled from /proc every 20 ms). (b) also runs on each corpus
twice over (same largest document, twice the size), in every format, to show that its memory does not grow
with the corpus. (b) and (c) outputs, and (b)'s outputs from the three formats, are compared byte for byte.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT_DOC_BYTES = 300
MEGATRON_LM_CHUNKSIZE = 32  # Megatron-LM's preprocess_data.py: pool.imap(encoder.encode, fin, 32)


def local_texts():
    """Yield (path, text) of readable text files in a fixed order: stdlib sources, then docs, then man pages."""
    stdlib = sysconfig.get_paths()["stdlib"]
    roots = [(stdlib, (".py",)), ("/usr/share/doc", None), ("/usr/share/man", (".gz",))]
    for root, suffixes in roots:
        for directory, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages"))
            for name in sorted(files):
                path = os.path.join(directory, name)
                if os.path.islink(path) or (suffixes and not name.endswith(suffixes)):
                    continue
                try:
                    data = gzip.open(path).read() if name.endswith(".gz") else open(path, "rb").read()
                except (OSError, EOFError):
                    continue
                if data and b"\0" not in data[:8192]:
                    yield path, data.decode("utf-8", errors="replace")


def short_documents(text: str):
    """Split a text into ~SHORT_DOC_BYTES documents at paragraph (else line) boundaries."""
    doc = ""
    for paragraph in text.split("\n\n"):
        for line in paragraph.splitlines(keepends=True) if len(paragraph) > 2 * SHORT_DOC_BYTES else [paragraph]:
            doc += line
            if len(doc.encode()) >= SHORT_DOC_BYTES:
                yield doc
                doc = ""
        if doc:
            doc += "\n\n"
    if doc.strip():
        yield doc


def write_corpora(workdir: str, target_bytes: int) -> dict[str, str]:
    """Write long.jsonl and short.jsonl of at least target_bytes each, cycling through the local texts if needed."""
    paths = {name: os.path.join(workdir, f"{name}.jsonl") for name in ("long", "short")}
    if all(os.path.exists(p) and os.path.getsize(p) >= target_bytes for p in paths.values()):
        return paths
    files = {name: open(path, "w", encoding="utf-8") for name, path in paths.items()}
    written = dict.fromkeys(paths, 0)
    try:
        while min(written.values()) < target_bytes:
            before = dict(written)
            for _, text in local_texts():
                if written["long"] < target_bytes:
                    line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                    files["long"].write(line)
                    written["long"] += len(line.encode())
                if written["short"] < target_bytes:
                    for doc in short_documents(text):
                        line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                        files["short"].write(line)
                        written["short"] += len(line.encode())
                if min(written.values()) >= target_bytes:
                    break
            if written == before:
                raise SystemExit("no readable text found under the stdlib, /usr/share/doc or /usr/share/man")
    finally:
        for f in files.values():
            f.close()
    return paths


def doubled(path: str) -> str:
    """The corpus twice over: twice the size, the same largest document (which alone sets per-document memory)."""
    out = path.replace(".jsonl", ".x2.jsonl")
    if not os.path.exists(out) or os.path.getsize(out) != 2 * os.path.getsize(path):
        with open(path, "rb") as src, open(out, "wb") as dst:
            data = src.read()
            dst.write(data)
            dst.write(data)
    return out


PARQUET_GROUP_BYTES = 8_000_000  # text per row group (FineWeb's files hold row groups of this order)
ZSTD_FRAME_BYTES = 4_000_000


def other_formats(path: str) -> dict[str, str]:
    """The JSONL corpus as Parquet and as .jsonl.zst (concatenated frames): {format: path}, written once."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    outputs = {"parquet": path.replace(".jsonl", ".parquet"), "zstd": path + ".zst"}
    if not os.path.exists(outputs["parquet"]):
        with open(path, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        rows = max(1, int(len(texts) * PARQUET_GROUP_BYTES / os.path.getsize(path)))
        pq.write_table(pa.table({"text": texts}), outputs["parquet"], row_group_size=rows)
    if not os.path.exists(outputs["zstd"]):
        compressor = zstandard.ZstdCompressor(level=3)
        with open(path, "rb") as src, open(outputs["zstd"], "wb") as dst:
            while block := src.read(ZSTD_FRAME_BYTES):
                dst.write(compressor.compress(block))
    return outputs


# ---- the three methods; each runs in a child process started by `measure` ----------------------------------
# Each does its imports, then returns the work to be timed (which returns the number of documents written).


def tokenize_only(input_path, output_prefix, workers):
    from megatron_qwen.data.preprocess import count_tokens

    return lambda: count_tokens([input_path], workers=workers).documents


def pipeline(input_path, output_prefix, workers):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import preprocess_data

    from megatron_qwen.data.indexed import validate_shard

    def work():
        argv = ["--input", input_path, "--output-prefix", output_prefix, "--workers", str(workers)]
        if preprocess_data.main(argv):
            raise SystemExit(f"tools/preprocess_data.py {' '.join(argv)} failed")
        return validate_shard(f"{output_prefix}_text_document").num_documents

    return work


class _MegatronLMEncoder:
    """Megatron-LM's Encoder, reduced to what this corpus needs: one JSON key, no sentence splitting."""

    tokenizer = None

    def initializer(self):
        from megatron_qwen.tokenizer import load_tokenizer

        _MegatronLMEncoder.tokenizer = load_tokenizer()

    def encode(self, line):
        ids = _MegatronLMEncoder.tokenizer.encode(json.loads(line)["text"])
        return ids, [len(ids)] if ids else [], len(line)


def megatron_lm(input_path, output_prefix, workers):
    import multiprocessing

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_qwen.tokenizer import N_VOCAB

    def work():
        encoder = _MegatronLMEncoder()
        documents = 0
        pool = multiprocessing.Pool(workers, initializer=encoder.initializer)
        with pool, open(input_path, encoding="utf-8") as fin:
            builder = IndexedDatasetBuilder(f"{output_prefix}_text_document.bin", dtype=DType.optimal_dtype(N_VOCAB))
            for ids, lengths, _ in pool.imap(encoder.encode, fin, MEGATRON_LM_CHUNKSIZE):
                builder.add_document(ids, lengths)
                documents += 1
            builder.finalize(f"{output_prefix}_text_document.idx")
        return documents

    return work


METHODS = {"tokenize": tokenize_only, "pipeline": pipeline, "megatron": megatron_lm}


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def child_main(method, input_path, output_prefix, workers):
    """Run one method here and print its wall and CPU time, documents and peak single-process RSS as JSON."""
    work = METHODS[method](input_path, output_prefix, workers)
    cpu_before, started = _cpu_seconds(), time.monotonic()
    documents = work()
    report = {"seconds": time.monotonic() - started, "cpu_seconds": _cpu_seconds() - cpu_before}
    max_rss_kb = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(json.dumps({**report, "documents": documents, "max_rss_mb": max_rss_kb / 1024}))


def _tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants, from /proc."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


def measure(method, input_path, output_prefix, workers) -> dict:
    """Run a method in a fresh interpreter; return its report plus the sampled peak RSS of its process tree."""
    command = [sys.executable, os.path.abspath(__file__), "--child", method, input_path, output_prefix, str(workers)]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}  # this checkout's code
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0

    def sample():
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, _tree_rss_bytes(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{method} on {input_path} failed:\n{err}")
    report = json.loads(out.strip().splitlines()[-1])
    report["tree_rss_mb"] = peak / 2**20
    report["mb"] = os.path.getsize(input_path) / 1e6
    return report


def same_shards(a: str, b: str) -> bool:
    for ext in (".bin", ".idx"):
        with open(a + ext, "rb") as fa, open(b + ext, "rb") as fb:
            while True:
                x, y = fa.read(1 << 24), fb.read(1 << 24)
                if x != y:
                    return False
                if not x:
                    break
    return True


def main(argv=None) -> None:
    """Build the corpora, run the methods, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--corpus-mb", type=float, default=50.0, help="size of each corpus (JSONL bytes)")
    parser.add_argument("--workdir", default=None, help="where corpora and outputs go (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method; the fastest counts")
    parser.add_argument("--child", nargs=4, metavar=("METHOD", "INPUT", "PREFIX", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        method, input_path, prefix, workers = args.child
        return child_main(method, input_path, prefix, int(workers))

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_preprocess_")
    os.makedirs(workdir, exist_ok=True)
    corpora = write_corpora(workdir, int(args.corpus_mb * 1e6))
    print(f"corpora in {workdir}, workers={args.workers}, {os.cpu_count()} CPUs", file=sys.stderr)
    load_before = os.getloadavg()[0]

    formats = {name: other_formats(path) for name, path in corpora.items()}
    # (method, input format): the JSONL runs of every method, and the pipeline on each other format.
    variants = [(method, "jsonl") for method in METHODS] + [("pipeline", f) for f in ("parquet", "zstd")]

    def source(name, fmt):
        return corpora[name] if fmt == "jsonl" else formats[name][fmt]

    rows, runs = {}, {}
    for repeat in range(args.repeat):
        # Methods interleaved, so that a burst of load from elsewhere does not hit one method's runs only.
        for name in corpora:
            for method, fmt in variants:
                print(f"  run {repeat + 1}/{args.repeat}: {name} corpus, {method} on {fmt} ...", file=sys.stderr)
                prefix = os.path.join(workdir, f"{name}_{method}_{fmt}")
                report = measure(method, source(name, fmt), prefix, args.workers)
                report["mb"] = os.path.getsize(corpora[name]) / 1e6  # the same text in every format
                runs.setdefault((name, method, fmt), []).append(report)
    for key, reports in runs.items():
        rows[key] = {**min(reports, key=lambda r: r["seconds"]), "cpu_seconds": min(r["cpu_seconds"] for r in reports)}
    for name, path in corpora.items():
        pipeline_out = os.path.join(workdir, f"{name}_pipeline_jsonl_text_document")
        rows[name, "same"] = all(
            same_shards(pipeline_out, os.path.join(workdir, f"{name}_{method}_{fmt}_text_document"))
            for method, fmt in variants if method != "tokenize"
        )
        x2_inputs = {"jsonl": doubled(path), **other_formats(doubled(path))}
        for fmt, x2_path in x2_inputs.items():
            x2_prefix = os.path.join(workdir, f"{name}_x2_{fmt}")
            rows[name, "x2", fmt] = measure("pipeline", x2_path, x2_prefix, args.workers)

    print(
        f"\nworkers={args.workers}, CPUs={os.cpu_count()}, corpora {args.corpus_mb:g} MB each (JSONL), best of "
        f"{args.repeat} run(s), load average {load_before:.2f} before and {os.getloadavg()[0]:.2f} after\n"
    )
    print("| corpus | method | MB/s | docs/s | seconds | CPU seconds | peak RSS: largest process / process tree (MB) |")
    print("|---|---|---|---|---|---|---|")
    labels = {"tokenize": "(a) tokenize only", "pipeline": "(b) this pipeline", "megatron": "(c) Megatron-LM way"}
    for name in corpora:
        for method, fmt in variants:
            r = rows[name, method, fmt]
            print(
                f"| {name} ({rows[name, 'tokenize', 'jsonl']['documents']:,} docs) | {labels[method]}, {fmt} "
                f"| {r['mb'] / r['seconds']:.2f} "
                f"| {r['documents'] / r['seconds']:,.0f} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} "
                f"| {r['max_rss_mb']:.0f} / {r['tree_rss_mb']:.0f} |"
            )
    print("\nThroughput ratios by wall time (and by CPU time, which holds up when other jobs load the machine):")
    print("\n| corpus | input | b/a (target >= 0.90) | b/c (target >= 1.5 on short) | same bytes as (b) on JSONL "
          "and (c) | (b) peak RSS on the corpus / on it twice over, largest process / tree (MB) |")
    print("|---|---|---|---|---|---|")
    for name in corpora:
        a, c = rows[name, "tokenize", "jsonl"], rows[name, "megatron", "jsonl"]
        for fmt in ("jsonl", "parquet", "zstd"):
            b, x2 = rows[name, "pipeline", fmt], rows[name, "x2", fmt]
            print(
                f"| {name} | {fmt} | {a['seconds'] / b['seconds']:.2f} (CPU {a['cpu_seconds'] / b['cpu_seconds']:.2f}) "
                f"| {c['seconds'] / b['seconds']:.2f} (CPU {c['cpu_seconds'] / b['cpu_seconds']:.2f}) | "
                f"{'yes' if rows[name, 'same'] else 'NO'} | {b['max_rss_mb']:.0f} / {b['tree_rss_mb']:.0f} -> "
                f"{x2['max_rss_mb']:.0f} / {x2['tree_rss_mb']:.0f} |"
            )


if __name__ == "__main__":
    main()
