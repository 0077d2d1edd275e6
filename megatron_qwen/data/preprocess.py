"""Corpora (JSON lines, plain, .gz or .zst; Parquet; Arrow) -> Megatron shards ``PREFIX_{key}_document.bin/.idx``.

What a record becomes is its mode's renderer (`megatron_qwen.data.renderers`: text, chat, preference,
prompts); which files are read, how they are cut and read is `megatron_qwen.data.inputs`. This module runs
the work, resumes it, and merges it.

How the work is split: the input files, in order, form one stream that is cut into equal parts,
``PARTS_PER_WORKER`` per worker process; each MPI rank owns a contiguous run of them. A line belongs to the
part holding its first byte (in a .gz/.zst file, to the part holding the compressed 1 MiB block that
decompresses to it), a Parquet row group or Arrow record batch to the part holding its first byte of the
file's span of unit sizes. A rank's workers take its parts one after another, so a stretch of slow text does
not leave the other workers idle; each reads only its part, checks each record and renders the good ones in
batches, and streams the part's own partial shard per key through the C++ builder, so no token crosses
between processes. Rank 0 then merges the partial shards in part order and deletes them. Documents therefore
keep input order and the output is byte-identical for any worker count and any number of MPI ranks, and a
row of a columnar file gives the same bytes as the JSON line of the same fields.

Resuming: a completed part is recorded beside its partial shards (``.part-NNNNN-of-NNNNN.json``) with the
run's fingerprint: every input's path, size and modification time, the tokenizer file's, the mode's options
and the part count. A run killed before its merge (preemption, a node failure) leaves those parts behind; a
rerun with the same fingerprint reuses them and does only the rest, giving the same bytes. Any difference
starts afresh and says which; ``resume=False`` (``--no-resume``) always does.

Nothing half-written is left under a final name: shards are written under temporary names and renamed when
complete. A failure (not a kill or an interrupt) removes every partial shard. A bad record (invalid JSON,
not an object, missing key, non-string value, a record breaking its mode's rules) stops the run with
``file:line`` (``file: row N``) and the reason, or is counted and skipped with ``skip_bad_lines``.

The command-line front end is ``tools/preprocess_data.py``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
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

from megatron_qwen.data.indexed import IndexedShardWriter, ShardFormatError, ShardSummary, merge_shards, validate_shard
from megatron_qwen.data.inputs import describe_inputs, expand_inputs, iter_piece_records, plan_parts, where
from megatron_qwen.data.jsonl_input import Piece
from megatron_qwen.data.shard_names import shard_prefix
from megatron_qwen.data.renderers import RENDERERS, Renderer, renderer_for
from megatron_qwen.errors import PreprocessError
from megatron_qwen.tokenizer import FAMILIES, default_tokenizer_file, load_tokenizer

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
    parts: int = 0  # the parts the input was cut into
    parts_reused: int = 0  # completed by an interrupted earlier run and reused
    reused_bytes: int = 0  # input bytes of the reused parts, not read again
    resume_note: str = ""  # why an earlier run's parts were not reused, if there were any
    # Counters of one mode (its renderer's stat_names), 0 in the others.
    truncated: int = 0  # chat: conversations that lost trailing exchanges to max_length
    trained_tokens: int = 0  # chat: tokens the loss mask trains


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs besides its part (picklable for spawned processes)."""

    renderer: Renderer
    tokenizer_file: str
    family: str  # the tokenizer family: special tokens and chat template
    skip_bad_lines: bool
    output_prefix: str | None  # None: tokenize and count only
    num_parts: int
    resume: bool = True
    fingerprint: dict | None = None  # set by the plan: what a completed part must match to be reused

    def partial_prefix(self, key: str, part: int) -> str:
        return f"{shard_prefix(self.output_prefix, key)}.part-{part:05d}-of-{self.num_parts:05d}"

    def record_path(self, part: int) -> str:
        """Where a completed part's results and the run's fingerprint are recorded."""
        return self.partial_prefix(self.renderer.keys[0], part) + ".json"


# Slots per part in the shared progress counters.
_DOCS, _TOKENS, _BYTES, _BAD = range(4)


def _run_worker(parts: dict[int, list[Piece]], next_part, job: _Job, counters, conn) -> None:
    """Worker process: take this rank's parts to do in turn (``next_part`` is their shared cursor into the
    sorted list) and render each into its partial shards; finally send {part: result} or {"error": message}."""
    try:
        try:
            tokenizer = load_tokenizer(job.tokenizer_file, job.family)
        except (OSError, ValueError) as e:
            raise PreprocessError(f"cannot load the tokenizer: {e}") from None
        todo = sorted(parts)
        results = {}
        while True:
            with next_part.get_lock():
                index = next_part.value
                next_part.value += 1
            if index >= len(todo):
                break
            part = todo[index]
            results[part] = _run_part(part, parts[part], job, tokenizer, counters)
            if job.output_prefix is not None:
                _record_part(job, part, results[part])
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
    columns = renderer.columns
    items: list = []  # what `check` made of the good lines since the last flush
    tokens = dict.fromkeys(renderer.token_keys, 0)
    stats = dict.fromkeys(renderer.stat_names, 0)
    bad_examples: list[str] = []
    pending_bytes = 0

    with ExitStack() as stack:
        writers = {}
        if job.output_prefix is not None:
            writers = {
                key: stack.enter_context(IndexedShardWriter(job.partial_prefix(key, part),
                                                            renderer.vocab_size(key, tokenizer)))
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
            for record, position, size in iter_piece_records(piece, columns):
                pending_bytes += size
                item = check(tokenizer, record)
                if isinstance(item, str):
                    _bad_line(job, where(piece, position), item, counters, slot, bad_examples)
                    continue
                items.append(item)
                if pending_bytes >= BATCH_BYTES:
                    flush()
        flush()
    return {"tokens": tokens, "bad_examples": bad_examples, "stats": stats, "counters": list(counters[slot : slot + 4])}


def _record_part(job: _Job, part: int, result: dict) -> None:
    """Record a part whose shards are complete (written after them, renamed into place: present means done)."""
    path = job.record_path(part)
    with open(f"{path}.tmp-{os.getpid()}", "w", encoding="utf-8") as f:
        json.dump({"fingerprint": job.fingerprint, "result": result}, f)
    os.replace(f"{path}.tmp-{os.getpid()}", path)


def _bad_line(job: _Job, where: str, reason: str, counters, slot: int, examples: list[str]) -> None:
    """Stop at an unusable record with file:line (file: row N) and the reason, or count it under skip_bad_lines."""
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


@dataclass(frozen=True)
class _Plan:
    """Rank 0's plan, given to every rank: the pieces of each part, the run's fingerprint, the parts reused."""

    parts: list[list[Piece]]
    fingerprint: dict | None
    reused: dict[int, dict]  # part -> its recorded result
    note: str  # why earlier parts were not reused ("" when there were none or all were)


def _plan(inputs: Sequence[str], job: _Job) -> _Plan:
    files = expand_inputs(inputs)
    parts = plan_parts(describe_inputs(files, job.renderer.columns), job.num_parts, gz_cut_every=PARTS_PER_WORKER)
    if job.output_prefix is None:
        return _Plan(parts, None, {}, "")
    os.makedirs(os.path.dirname(os.path.abspath(job.output_prefix)), exist_ok=True)
    fingerprint = _fingerprint(job, files)
    reused, note = _completed_parts(job, fingerprint)
    return _Plan(parts, fingerprint, reused, note)


def _fingerprint(job: _Job, files: Sequence[str]) -> dict:
    """What a completed part depends on: inputs and tokenizer (path, size, mtime), the mode's options, the cut."""

    def stat(path: str) -> list:
        st = os.stat(path)
        return [os.path.realpath(path), st.st_size, st.st_mtime_ns]

    fingerprint = {
        "inputs": [stat(p) for p in files],
        "tokenizer": stat(job.tokenizer_file),
        "options": {"renderer": repr(job.renderer), "skip_bad_lines": job.skip_bad_lines, "family": job.family},
        "parts": job.num_parts,
    }
    return json.loads(json.dumps(fingerprint))  # as it reads back from a record


def _difference(old: dict, new: dict) -> str:
    """What differs between an earlier run's fingerprint and this run's, in words."""
    old_inputs = {path: (size, mtime) for path, size, mtime in old.get("inputs", [])}
    for path, size, mtime in new["inputs"]:
        if path not in old_inputs:
            return f"input {path} was not one of its inputs"
        if old_inputs[path] != (size, mtime):
            return (f"input {path} changed since (size {old_inputs[path][0]:,} -> {size:,} bytes, "
                    "or its modification time)")
    if [i[0] for i in old.get("inputs", [])] != [i[0] for i in new["inputs"]]:
        return "its inputs were other files, or in another order"
    if old.get("tokenizer") != new["tokenizer"]:
        return f"the tokenizer file differs ({old.get('tokenizer')} -> {new['tokenizer']})"
    if old.get("options") != new["options"]:
        return f"its options differ ({old.get('options')} -> {new['options']})"
    if old.get("parts") != new["parts"]:
        return (f"it cut the input into {old.get('parts')} parts, this run into {new['parts']} "
                "(the same --workers and MPI size resume)")
    return "its record differs"


def _completed_parts(job: _Job, fingerprint: dict) -> tuple[dict[int, dict], str]:
    """Rank 0: the recorded parts of an earlier run of this output that this run can reuse, and a note on why not.

    Anything else an earlier run left (parts it did not finish, parts of another fingerprint) is removed.
    """
    first_key = shard_prefix(job.output_prefix, job.renderer.keys[0])
    records = sorted(glob.glob(glob.escape(first_key) + ".part-*-of-*.json"))
    reused: dict[int, dict] = {}
    note = ""
    if records and not job.resume:
        note = f"--no-resume: removed the {len(records)} completed parts of an earlier run of {job.output_prefix}"
    for path in records if job.resume else ():
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            part = int(path.rsplit(".part-", 1)[1].split("-of-")[0])
        except (OSError, ValueError, IndexError) as e:
            note = f"its record {path} cannot be read ({e})"
            break
        if record.get("fingerprint") != fingerprint or not path.endswith(f"-of-{job.num_parts:05d}.json"):
            note = _difference(record.get("fingerprint") or {}, fingerprint)
            break
        try:
            for key in job.renderer.keys:
                validate_shard(job.partial_prefix(key, part))
        except (ShardFormatError, FileNotFoundError) as e:
            note = f"its part {part} is damaged ({e})"
            break
        reused[part] = record["result"]
    if note and job.resume:
        note = f"not resuming the earlier run of {job.output_prefix}: {note}; starting afresh"
        reused = {}
    for key in job.renderer.keys:
        final = glob.escape(shard_prefix(job.output_prefix, key))
        for path in glob.glob(final + ".part-*"):
            part = int(path.rsplit(".part-", 1)[1].split("-of-")[0])
            if part not in reused or not path.startswith(job.partial_prefix(key, part) + "."):
                os.remove(path)
        for path in glob.glob(final + ".bin.tmp-*") + glob.glob(final + ".idx.tmp-*"):
            os.remove(path)  # a merge that was killed; its final names were never written
    return reused, note


def _remove_partials(job: _Job, parts: Sequence[int], keep_completed: bool = False) -> None:
    """Delete the partial shards and records of ``parts`` and any temporaries their writers left (e.g. when
    killed); with ``keep_completed``, the parts already recorded as complete stay for a rerun to resume."""
    for part in parts:
        if keep_completed and os.path.exists(job.record_path(part)):
            continue
        paths = [job.record_path(part), *glob.glob(glob.escape(job.record_path(part)) + ".tmp-*")]
        for key in job.renderer.keys:
            prefix = job.partial_prefix(key, part)
            paths += [prefix + ".bin", prefix + ".idx", *glob.glob(glob.escape(prefix) + ".*.tmp-*")]
        for path in paths:
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


def _run_workers(plan: _Plan, my_parts: range, workers: int, job: _Job, comm, progress: bool):
    """Run this rank's parts that are not reused in up to ``workers`` processes; return {part: result} and the
    global counter totals (reused parts included).

    Every rank loops in step (one allreduce per round) so all of them see a failure anywhere at once; then
    each removes its partial shards and all raise the same PreprocessError.
    """
    # Spawned (not forked) workers: safe under MPI and with threads in the parent.
    ctx = multiprocessing.get_context("spawn")
    counters = ctx.RawArray("q", 4 * job.num_parts)
    for part, record in plan.reused.items():
        if part in my_parts:
            counters[4 * part : 4 * part + 4] = record["counters"]
    next_part = ctx.Value("q", 0)
    parts = {p: plan.parts[p] for p in my_parts if p not in plan.reused}
    workers = min(workers, len(parts))
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
    except BaseException as e:
        _stop(procs)
        if job.output_prefix is not None:
            # Interrupted (Ctrl-C): the completed parts stay for a rerun to resume; anything else removes all.
            _remove_partials(job, my_parts, keep_completed=isinstance(e, KeyboardInterrupt))
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


def _merge(
    job: _Job, plan: _Plan, gathered: list[dict[int, dict]], totals: list[int], started: float
) -> PreprocessResult:
    """Rank 0: merge the partial shards in part order into the final shards and build the result."""
    renderer = job.renderer
    by_part = dict(plan.reused)
    for rank_results in gathered:
        by_part.update(rank_results)
    per_part = [by_part[p] for p in sorted(by_part)]
    result = PreprocessResult(
        documents=totals[_DOCS],
        tokens={key: sum(r["tokens"][key] for r in per_part) for key in renderer.token_keys},
        text_bytes=totals[_BYTES],
        bad_lines=totals[_BAD],
        bad_line_examples=[e for r in per_part for e in r["bad_examples"]][:MAX_BAD_LINE_EXAMPLES],
        mode=renderer.mode,
        parts=job.num_parts,
        parts_reused=len(plan.reused),
        reused_bytes=sum(r["counters"][_BYTES] for r in plan.reused.values()),
        resume_note=plan.note,
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
    plan = _on_root(comm, lambda: _plan(inputs, job))
    job = dataclasses.replace(job, fingerprint=plan.fingerprint)
    if progress and comm.rank == 0 and (plan.note or plan.reused):
        print(f"[preprocess] {plan.note or _reuse_line(len(plan.reused), job.num_parts)}", file=sys.stderr, flush=True)
    per_rank = workers * PARTS_PER_WORKER
    my_parts = range(comm.rank * per_rank, (comm.rank + 1) * per_rank)
    results, totals = _run_workers(plan, my_parts, workers, job, comm, progress)
    gathered = comm.gather(results, root=0)
    return _on_root(comm, lambda: _merge(job, plan, gathered, totals, started))


def _reuse_line(reused: int, parts: int) -> str:
    return f"resuming: {reused} of {parts} parts were completed by an earlier run and are reused"


def _make_job(json_keys, append_eod, tokenizer_file, skip_bad_lines, output_prefix, workers, comm, mode, max_length,
              resume=True, family="qwen") -> _Job:
    renderer = renderer_for(mode, json_keys, append_eod, max_length)
    if family not in FAMILIES:
        raise PreprocessError(
            f"--family {family!r} is not one of {', '.join(FAMILIES)}; name the model's tokenizer family"
        )
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
        family=family,
        skip_bad_lines=skip_bad_lines,
        output_prefix=None if output_prefix is None else os.fspath(output_prefix),
        num_parts=size * workers * PARTS_PER_WORKER,
        resume=resume,
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
    resume: bool = True,
    family: str = "qwen",
) -> PreprocessResult:
    """Tokenize ``inputs`` (files, globs, directories: JSONL, .jsonl.gz, .jsonl.zst, Parquet, Arrow) into
    ``shard_prefix(output_prefix, key)`` shards.

    Each JSON line (or row) is one document: the NFC-normalised string at each of ``json_keys`` (default ``text``),
    encoded with special tokens as plain text, plus ``<|endoftext|>`` when ``append_eod`` and the document
    is not empty. ``mode`` "chat" or "preference" renders conversations or preference pairs with the chat
    template of tokenizer ``family`` instead (see `megatron_qwen.data.renderers`), each at most ``max_length``
    tokens. ``workers`` processes per rank are spawned, so a script calling this needs the
    ``if __name__ == "__main__":`` guard.
    ``comm`` (an mpi4py communicator; all its ranks call this) spreads the parts over the ranks and rank 0
    merges them, so ``output_prefix`` must be on a filesystem all ranks share. Every rank returns the same
    result or raises the same PreprocessError. ``progress`` prints a progress line on stderr (rank 0).
    With ``resume``, the parts an interrupted earlier run of the same inputs and options completed are reused
    (see the module docstring); without, they are removed first.
    """
    job = _make_job(json_keys, append_eod, tokenizer_file, skip_bad_lines, output_prefix, workers, comm, mode,
                    max_length, resume, family)
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
    family: str = "qwen",
) -> PreprocessResult:
    """Read and tokenize like :func:`preprocess`, writing nothing: the corpus's document and token counts.

    Being the same pipeline minus the shards, it is also the throughput ceiling that preprocessing is
    measured against (tools/bench_preprocess.py).
    """
    job = _make_job(json_keys, append_eod, tokenizer_file, skip_bad_lines, None, workers, comm, mode, max_length,
                    family=family)
    return _run(inputs, job, workers, comm, progress)


def format_summary(result: PreprocessResult) -> str:
    """Human-readable end-of-run summary."""
    renderer = RENDERERS[result.mode]
    seconds = max(result.seconds, 1e-9)
    lines = [
        f"{renderer.unit}: {result.documents:,} in {seconds:.1f} s "
        f"({(result.text_bytes - result.reused_bytes) / 1e6 / seconds:,.2f} MB/s of input read)",
    ]
    if result.parts_reused:
        lines.append(
            f"resumed: {result.parts_reused} of {result.parts} parts reused from an earlier run "
            f"({result.reused_bytes / 1e6:,.1f} of {result.text_bytes / 1e6:,.1f} MB not read again)"
        )
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
