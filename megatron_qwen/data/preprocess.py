"""Corpora (JSON lines, optionally gzipped) -> Megatron shards ``PREFIX_{key}_document.bin/.idx``: the run.

What a line becomes is its mode's renderer (`megatron_qwen.data.renderers`: text, chat, preference); how
the input is cut and read is `megatron_qwen.data.jsonl_input`. This module runs the work and merges it.

How the work is split: the input files, in order, form one byte stream that is cut into equal parts,
``PARTS_PER_WORKER`` per worker process; each MPI rank owns a contiguous run of them. A line belongs to the
part holding its first byte (in a .gz file, to the part holding the compressed 1 MiB block that decompresses
to it). A rank's workers take its parts one after another, so a stretch of slow text does not leave the
other workers idle; each reads only its part, checks each line and renders the good ones in batches, and
streams the part's own partial shard per key through the C++ builder, so no token crosses between
processes. Rank 0 then merges the partial shards in part order and deletes them. Documents therefore keep
input order and the output is byte-identical for any worker count and any number of MPI ranks.

Nothing half-written is left behind: shards are written under temporary names and renamed when complete,
and on any failure every partial shard and temporary is removed. A bad line (invalid JSON, not an object,
missing key, non-string value, a record breaking its mode's rules) stops the run with ``file:line`` and the
reason, or is counted and skipped with ``skip_bad_lines``.

The command-line front end is ``tools/preprocess_data.py``.
"""

from __future__ import annotations

import glob
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
import traceback
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from megatron_qwen.data.indexed import IndexedShardWriter, ShardSummary, merge_shards
from megatron_qwen.data.shard_names import shard_prefix
from megatron_qwen.data.jsonl_input import Piece, expand_inputs, iter_piece_lines, line_number, plan_parts
from megatron_qwen.data.renderers import RENDERERS, Renderer, renderer_for
from megatron_qwen.errors import PreprocessError
from megatron_qwen.tokenizer import default_tokenizer_file, load_tokenizer

PARTS_PER_WORKER = 8  # more, smaller parts balance uneven text better but make more partial shards
BATCH_BYTES = 1 << 20  # JSONL text rendered per batch: large enough to amortise per-call costs
MAX_BAD_LINE_EXAMPLES = 10
_SKIP_HINT = "fix or remove the line, or skip such lines with --skip-bad-lines (skip_bad_lines=True)"


@dataclass
class PreprocessResult:
    """What a run read and wrote (identical on every MPI rank)."""

    documents: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    text_bytes: int = 0
    bad_lines: int = 0
    bad_line_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    outputs: dict[str, ShardSummary] = field(default_factory=dict)
    mode: str = "text"
    # Counters of one mode (its renderer's stat_names), 0 in the others.
    truncated: int = 0  # chat: conversations that lost trailing exchanges to max_length
    trained_tokens: int = 0  # chat: tokens the loss mask trains


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs besides its part (picklable for spawned processes)."""

    renderer: Renderer
    tokenizer_file: str
    skip_bad_lines: bool
    output_prefix: str | None  # None: tokenize and count only
    num_parts: int

    def partial_prefix(self, key: str, part: int) -> str:
        return f"{shard_prefix(self.output_prefix, key)}.part-{part:05d}-of-{self.num_parts:05d}"


# Slots per part in the shared progress counters.
_DOCS, _TOKENS, _BYTES, _BAD = range(4)


def _run_worker(parts: dict[int, list[Piece]], next_part, job: _Job, counters, conn) -> None:
    """Worker process: take this rank's parts in turn (``next_part`` is their shared cursor) and render each
    into its partial shards; finally send {part: result} or {"error": message} through ``conn``."""
    try:
        try:
            tokenizer = load_tokenizer(job.tokenizer_file)
        except (OSError, ValueError) as e:
            raise PreprocessError(f"cannot load the tokenizer: {e}") from None
        results = {}
        while True:
            with next_part.get_lock():
                part = next_part.value
                next_part.value += 1
            if part not in parts:
                break
            results[part] = _run_part(part, parts[part], job, tokenizer, counters)
        conn.send({"parts": results})
    except PreprocessError as e:
        conn.send({"error": str(e)})
    except BaseException as e:  # noqa: BLE001 - report anything (also KeyboardInterrupt) instead of dying silently
        conn.send({"error": f"a worker failed: {type(e).__name__}: {e}\n{traceback.format_exc()}"})
    finally:
        conn.close()


def _run_part(part: int, pieces: list[Piece], job: _Job, tokenizer, counters) -> dict:
    """Read and check the lines of ``pieces`` and render them, in batches, into the part's shards (if writing)."""
    renderer = job.renderer
    check = renderer.check  # looked up once: it is called for every line
    slot = 4 * part
    items: list = []  # what `check` made of the good lines since the last flush
    tokens = dict.fromkeys(renderer.token_keys, 0)
    stats = dict.fromkeys(renderer.stat_names, 0)
    bad_examples: list[str] = []
    pending_bytes = 0

    with ExitStack() as stack:
        writers = {}
        if job.output_prefix is not None:
            writers = {
                key: stack.enter_context(IndexedShardWriter(job.partial_prefix(key, part), renderer.vocab_size(key, tokenizer)))
                for key in renderer.keys
            }

        def flush() -> None:
            nonlocal pending_bytes
            if items:
                for key, lengths, flat in renderer.render(tokenizer, items, with_tokens=bool(writers)):
                    if writers:
                        writers[key].add_documents(flat, lengths)
                    if key in tokens:
                        total = int(lengths.sum())
                        tokens[key] += total
                        counters[slot + _TOKENS] += total
                for name, value in renderer.count(items).items():
                    stats[name] += value
                counters[slot + _DOCS] += len(items)
                items.clear()
            counters[slot + _BYTES] += pending_bytes
            pending_bytes = 0

        for piece in pieces:
            for line, newlines_before in iter_piece_lines(piece):
                pending_bytes += len(line) + 1
                item = check(tokenizer, line)
                if isinstance(item, str):
                    _bad_line(job, piece, newlines_before, item, counters, slot, bad_examples)
                    continue
                items.append(item)
                if pending_bytes >= BATCH_BYTES:
                    flush()
        flush()
    return {"tokens": tokens, "bad_examples": bad_examples, "stats": stats}


def _bad_line(job: _Job, piece: Piece, newlines_before: int, reason: str, counters, slot: int, examples: list[str]) -> None:
    """Stop at an unusable line with file:line and the reason, or count it under skip_bad_lines."""
    where = f"{piece.path}:{line_number(piece, newlines_before)}"
    if not job.skip_bad_lines:
        raise PreprocessError(f"{where}: {reason}; {_SKIP_HINT}")
    counters[slot + _BAD] += 1
    if len(examples) < MAX_BAD_LINE_EXAMPLES:
        examples.append(f"{where}: {reason}")


class _SingleProcess:
    """The collective operations of a one-rank run (the subset of an mpi4py communicator that is used)."""

    rank, size = 0, 1

    def allreduce(self, value):
        return value

    def gather(self, value, root=0):
        return [value]

    def bcast(self, value, root=0):
        return value


def _on_root(comm, fn):
    """Run ``fn`` on rank 0 and give every rank its value, or raise its PreprocessError on every rank."""
    outcome = None
    if comm.rank == 0:
        try:
            outcome = ("ok", fn())
        except (PreprocessError, OSError, ValueError) as e:
            outcome = ("error", str(e))
    status, value = comm.bcast(outcome, root=0)
    if status == "error":
        raise PreprocessError(value)
    return value


def _plan(inputs: Sequence[str], output_prefix: str | None, num_parts: int) -> list[list[Piece]]:
    files = expand_inputs(inputs)
    if output_prefix is not None:
        os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    return plan_parts([(path, os.path.getsize(path)) for path in files], num_parts, gz_cut_every=PARTS_PER_WORKER)


def _remove_partials(job: _Job, parts: Sequence[int]) -> None:
    """Delete the partial shards of ``parts`` and any temporaries their writers left (e.g. when killed)."""
    for part in parts:
        for key in job.renderer.keys:
            prefix = job.partial_prefix(key, part)
            for path in [prefix + ".bin", prefix + ".idx", *glob.glob(glob.escape(prefix) + ".*.tmp-*")]:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass


class _Progress:
    """Rank 0's progress line on stderr: in place every second on a terminal, a new line every 30 s otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.interval = 1.0 if self.tty else 30.0
        self.started = self.last = time.monotonic()

    def update(self, docs: int, tokens: int, text_bytes: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < self.interval):
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        line = (
            f"[preprocess] {docs:,} docs | {tokens:,} tokens | {text_bytes / 1e6:,.1f} MB | "
            f"{text_bytes / 1e6 / elapsed:,.2f} MB/s | {elapsed:,.0f} s"
        )
        sys.stderr.write(("\r" + line + ("\n" if final else "")) if self.tty else line + "\n")
        sys.stderr.flush()


def _run_workers(plan: list[list[Piece]], my_parts: range, workers: int, job: _Job, comm, progress: bool):
    """Run this rank's parts in ``workers`` processes; return {part: result} and the global counter totals.

    Every rank loops in step (one allreduce per round) so all of them see a failure anywhere at once; then
    each removes its partial shards and all raise the same PreprocessError.
    """
    # Spawned (not forked) workers: safe under MPI and with threads in the parent.
    ctx = multiprocessing.get_context("spawn")
    counters = ctx.RawArray("q", 4 * job.num_parts)
    next_part = ctx.Value("q", my_parts.start)
    parts = {p: plan[p] for p in my_parts}
    procs, conns, results, errors = [], [], {}, []
    meter = _Progress(progress and comm.rank == 0)
    try:
        for _ in range(workers):
            receiver, sender = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_run_worker, args=(parts, next_part, job, counters, sender), daemon=True)
            proc.start()
            sender.close()
            procs.append(proc)
            conns.append(receiver)
        while True:
            pending = [w for w in range(workers) if w not in results]
            if pending:
                multiprocessing.connection.wait([conns[w] for w in pending] + [procs[w].sentinel for w in pending], 0.2)
            else:
                time.sleep(0.2)  # this rank is done; keep in step while the others finish
            for w in pending:
                if conns[w].poll():
                    try:
                        results[w] = conns[w].recv()
                    except EOFError:
                        results[w] = {"error": "a worker process exited without a result"}
                elif procs[w].exitcode is not None:
                    results[w] = {
                        "error": f"a worker process died with exit code {procs[w].exitcode} (a negative code is the "
                        "signal that killed it, e.g. -9 when the machine ran out of memory)"
                    }
                if w in results and "error" in results[w]:
                    errors.append(results[w]["error"])
            mine = np.frombuffer(counters, np.int64).reshape(-1, 4)[my_parts.start : my_parts.stop].sum(axis=0)
            state = np.concatenate([[len(errors), workers - len(results)], mine])
            failed, running, *totals = comm.allreduce(state)
            meter.update(totals[_DOCS], totals[_TOKENS], totals[_BYTES], final=not running and not failed)
            if failed or not running:
                break
    except BaseException:
        _stop(procs)
        if job.output_prefix is not None:
            _remove_partials(job, my_parts)
        raise
    _stop(procs)
    if failed:
        if job.output_prefix is not None:
            _remove_partials(job, my_parts)
        first = comm.gather(errors[:1], root=0)
        raise PreprocessError(comm.bcast(next(e for errs in first for e in errs) if comm.rank == 0 else None, root=0))
    by_part = {part: result for r in results.values() for part, result in r["parts"].items()}
    return by_part, [int(t) for t in totals]


def _stop(procs) -> None:
    for proc in procs:
        if proc.exitcode is None:
            proc.terminate()
        proc.join()


def _merge(job: _Job, gathered: list[dict[int, dict]], totals: list[int], started: float) -> PreprocessResult:
    """Rank 0: merge the partial shards in part order into the final shards and build the result."""
    renderer = job.renderer
    per_part = [rank_results[p] for rank_results in gathered for p in sorted(rank_results)]
    result = PreprocessResult(
        documents=totals[_DOCS],
        tokens={key: sum(r["tokens"][key] for r in per_part) for key in renderer.token_keys},
        text_bytes=totals[_BYTES],
        bad_lines=totals[_BAD],
        bad_line_examples=[e for r in per_part for e in r["bad_examples"]][:MAX_BAD_LINE_EXAMPLES],
        mode=renderer.mode,
        **{name: sum(r["stats"][name] for r in per_part) for name in renderer.stat_names},
    )
    if job.output_prefix is not None:
        try:
            for key in renderer.keys:
                partials = [job.partial_prefix(key, p) for p in range(job.num_parts)]
                result.outputs[key] = merge_shards(partials, shard_prefix(job.output_prefix, key))
        finally:
            _remove_partials(job, range(job.num_parts))
    result.seconds = time.monotonic() - started
    return result


def _run(inputs: Sequence[str], job: _Job, workers: int, comm, progress: bool) -> PreprocessResult:
    started = time.monotonic()
    comm = comm if comm is not None else _SingleProcess()
    plan = _on_root(comm, lambda: _plan(inputs, job.output_prefix, job.num_parts))
    per_rank = workers * PARTS_PER_WORKER
    my_parts = range(comm.rank * per_rank, (comm.rank + 1) * per_rank)
    results, totals = _run_workers(plan, my_parts, workers, job, comm, progress)
    gathered = comm.gather(results, root=0)
    return _on_root(comm, lambda: _merge(job, gathered, totals, started))


def _make_job(json_keys, append_eod, tokenizer_file, skip_bad_lines, output_prefix, workers, comm, mode, max_length) -> _Job:
    renderer = renderer_for(mode, json_keys, append_eod, max_length)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise PreprocessError(f"--workers must be a positive integer, got {workers!r}")
    try:
        tokenizer_file = os.fspath(tokenizer_file if tokenizer_file is not None else default_tokenizer_file())
    except FileNotFoundError as e:
        raise PreprocessError(str(e)) from None
    if not os.path.isfile(tokenizer_file):
        raise PreprocessError(f"--tokenizer-file {tokenizer_file!r} does not exist; pass the path of qwen.tiktoken")
    size = comm.size if comm is not None else 1
    return _Job(
        renderer=renderer,
        tokenizer_file=tokenizer_file,
        skip_bad_lines=skip_bad_lines,
        output_prefix=None if output_prefix is None else os.fspath(output_prefix),
        num_parts=size * workers * PARTS_PER_WORKER,
    )


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    json_keys: Sequence[str] | None = None,
    append_eod: bool = False,
    workers: int = 1,
    tokenizer_file: str | os.PathLike | None = None,
    skip_bad_lines: bool = False,
    comm=None,
    progress: bool = False,
    mode: str = "text",
    max_length: int | None = None,
) -> PreprocessResult:
    """Tokenize JSONL(.gz) ``inputs`` (paths or globs) into ``shard_prefix(output_prefix, key)`` shards.

    Each JSON line is one document: the NFC-normalised string at each of ``json_keys`` (default ``text``),
    encoded with special tokens as plain text, plus ``<|endoftext|>`` when ``append_eod`` and the document
    is not empty. ``mode`` "chat" or "preference" renders conversations or preference pairs with ChatML
    instead (see `megatron_qwen.data.renderers`), each at most ``max_length`` tokens. ``workers``
    processes per rank are spawned, so a script calling this needs the ``if __name__ == "__main__":`` guard.
    ``comm`` (an mpi4py communicator; all its ranks call this) spreads the parts over the ranks and rank 0
    merges them, so ``output_prefix`` must be on a filesystem all ranks share. Every rank returns the same
    result or raises the same PreprocessError. ``progress`` prints a progress line on stderr (rank 0).
    """
    job = _make_job(json_keys, append_eod, tokenizer_file, skip_bad_lines, output_prefix, workers, comm, mode, max_length)
    return _run(inputs, job, workers, comm, progress)


def count_tokens(
    inputs: Sequence[str],
    json_keys: Sequence[str] | None = None,
    append_eod: bool = False,
    workers: int = 1,
    tokenizer_file: str | os.PathLike | None = None,
    skip_bad_lines: bool = False,
    comm=None,
    progress: bool = False,
    mode: str = "text",
    max_length: int | None = None,
) -> PreprocessResult:
    """Read and tokenize like :func:`preprocess`, writing nothing: the corpus's document and token counts.

    Being the same pipeline minus the shards, it is also the throughput ceiling that preprocessing is
    measured against (tools/bench_preprocess.py).
    """
    job = _make_job(json_keys, append_eod, tokenizer_file, skip_bad_lines, None, workers, comm, mode, max_length)
    return _run(inputs, job, workers, comm, progress)


def format_summary(result: PreprocessResult) -> str:
    """Human-readable end-of-run summary."""
    renderer = RENDERERS[result.mode]
    seconds = max(result.seconds, 1e-9)
    lines = [
        f"{renderer.unit}: {result.documents:,} in {seconds:.1f} s ({result.documents / seconds:,.0f}/s, "
        f"{result.text_bytes / 1e6 / seconds:,.2f} MB/s of JSONL text)",
    ]
    for key, count in result.tokens.items():
        lines.append(f"tokens[{key}]: {count:,}")
    lines += renderer.summary_lines(result)
    if result.bad_lines:
        lines.append(f"bad lines skipped: {result.bad_lines:,}; first ones:")
        lines += [f"  {example}" for example in result.bad_line_examples]
    for key, summary in result.outputs.items():
        lines.append(
            f"wrote {summary.prefix}.bin/.idx: {summary.num_documents:,} documents, "
            f"{summary.num_sequences:,} sequences, {summary.num_tokens:,} {summary.dtype} tokens"
        )
    return "\n".join(lines)
