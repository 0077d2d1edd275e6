"""Corpora (JSON lines, optionally gzipped) -> Megatron shards ``PREFIX_{key}_document.bin/.idx``.

How the work is split: the input files, in order, form one byte stream that is cut into equal parts,
``PARTS_PER_WORKER`` per worker process; each MPI rank owns a contiguous run of them. A line belongs to the
part holding its first byte (in a .gz file, to the part holding the compressed 1 MiB block that decompresses
to it). A rank's workers take its parts one after another, so a stretch of slow text does not leave the
other workers idle; each reads only its part, tokenizes in batches and streams the part's own partial shard
per key through the C++ builder, so no token crosses between processes. Rank 0 then merges the partial
shards in part order and deletes them. Documents therefore keep input order and the output is
byte-identical for any worker count and any number of MPI ranks.

Nothing half-written is left behind: shards are written under temporary names and renamed when complete,
and on any failure every partial shard and temporary is removed. A bad line (invalid JSON, not an object,
missing key, non-string value) stops the run with ``file:line`` and the reason, or is counted and skipped
with ``skip_bad_lines``.

Chat data (``mode="chat"``, ``--chat``): each line is a conversation (see `megatron_qwen.data.chat`), rendered
with ChatML into ``PREFIX_chat_tokens_document`` and a parallel loss-mask shard ``PREFIX_chat_mask_document``
(document i of each is conversation i; mask 1 where the token is trained, QwenLM finetune.py's rule). With
``max_length`` a longer conversation keeps its leading whole exchanges (counted as truncated); one whose
first exchange does not fit, like any record breaking the chat rules, is a bad line. Preference data
(``mode="preference"``, ``--preference``): each line is a pair, written as ``PREFIX_chosen_document`` and
``PREFIX_rejected_document``; a side over ``max_length`` is a bad line.

The command-line front end is ``tools/preprocess_data.py``.
"""

from __future__ import annotations

import glob
import itertools
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

from megatron_qwen.data.chat import PREFERENCE_KEYS, SFT_KEYS, ChatFormatError, render_conversation, render_preference
from megatron_qwen.data.indexed import IndexedShardWriter, ShardSummary, merge_shards, shard_prefix
from megatron_qwen.data.jsonl_input import Piece, expand_inputs, iter_piece_lines, json_type, line_number, plan_parts, record_of
from megatron_qwen.errors import PreprocessError
from megatron_qwen.tokenizer import default_tokenizer_file, load_tokenizer

PARTS_PER_WORKER = 8  # more, smaller parts balance uneven text better but make more partial shards
BATCH_BYTES = 1 << 20  # JSONL text tokenized per batch: large enough to amortise per-call costs
MAX_BAD_LINE_EXAMPLES = 10
_SKIP_HINT = "fix or remove the line, or skip such lines with --skip-bad-lines (skip_bad_lines=True)"
MODES = ("text", "chat", "preference")


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
    truncated: int = 0  # chat: conversations that lost trailing exchanges to max_length
    trained_tokens: int = 0  # chat: tokens the loss mask trains


def _texts_of(line: bytes, keys: Sequence[str]) -> list[str] | str:
    """The string values of ``keys`` in a JSON-object line, or the reason the line is unusable."""
    record = record_of(line)
    if isinstance(record, str):
        return record
    texts = []
    for key in keys:
        if key not in record:
            present = ", ".join(repr(k) for k in list(record)[:8]) or "none"
            return f"missing key {key!r} (keys present: {present}); choose the keys with --json-keys"
        value = record[key]
        if not isinstance(value, str):
            return f"the value of {key!r} is a JSON {json_type(value)}, not a string"
        texts.append(value)
    return texts


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs besides its part (picklable for spawned processes)."""

    json_keys: tuple[str, ...]  # text mode: the JSON keys; chat/preference: their shard keys
    append_eod: bool
    tokenizer_file: str
    skip_bad_lines: bool
    output_prefix: str | None  # None: tokenize and count only
    num_parts: int
    mode: str = "text"
    max_length: int | None = None

    @property
    def token_keys(self) -> tuple[str, ...]:
        """The keys whose shards hold token ids (the chat mask shard does not)."""
        return SFT_KEYS[:1] if self.mode == "chat" else self.json_keys

    def partial_prefix(self, key: str, part: int) -> str:
        return f"{shard_prefix(self.output_prefix, key)}.part-{part:05d}-of-{self.num_parts:05d}"


# Slots per part in the shared progress counters.
_DOCS, _TOKENS, _BYTES, _BAD = range(4)


def _run_worker(parts: dict[int, list[Piece]], next_part, job: _Job, counters, conn) -> None:
    """Worker process: take this rank's parts in turn (``next_part`` is their shared cursor) and tokenize each
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
            run_part = _tokenize_part if job.mode == "text" else _render_part
            results[part] = run_part(part, parts[part], job, tokenizer, counters)
        conn.send({"parts": results})
    except PreprocessError as e:
        conn.send({"error": str(e)})
    except BaseException as e:  # noqa: BLE001 - report anything (also KeyboardInterrupt) instead of dying silently
        conn.send({"error": f"a worker failed: {type(e).__name__}: {e}\n{traceback.format_exc()}"})
    finally:
        conn.close()


def _tokenize_part(part: int, pieces: list[Piece], job: _Job, tokenizer, counters) -> dict:
    """Read, check and tokenize the lines of ``pieces`` in batches into the part's shards (if writing)."""
    slot = 4 * part
    keys = job.json_keys
    texts: dict[str, list[str]] = {key: [] for key in keys}
    tokens = dict.fromkeys(keys, 0)
    bad_examples: list[str] = []
    pending_bytes = 0

    with ExitStack() as stack:
        writers = {}
        if job.output_prefix is not None:
            writers = {
                key: stack.enter_context(IndexedShardWriter(job.partial_prefix(key, part), tokenizer.n_vocab))
                for key in keys
            }

        def flush() -> None:
            nonlocal pending_bytes
            count = len(texts[keys[0]])
            for key in keys:
                ids = tokenizer.encode_batch(texts[key], num_threads=1)
                if job.append_eod:
                    for doc in ids:
                        if doc:  # Megatron-LM leaves empty documents empty
                            doc.append(tokenizer.eod_id)
                lengths = np.fromiter(map(len, ids), np.int64, count=count)
                total = int(lengths.sum())
                if writers:
                    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=total)
                    writers[key].add_documents(flat, lengths)
                tokens[key] += total
                counters[slot + _TOKENS] += total
                texts[key].clear()
            counters[slot + _DOCS] += count
            counters[slot + _BYTES] += pending_bytes
            pending_bytes = 0

        for piece in pieces:
            for line, newlines_before in iter_piece_lines(piece):
                pending_bytes += len(line) + 1
                found = _texts_of(line, keys)
                if isinstance(found, str):
                    _bad_line(job, piece, newlines_before, found, counters, slot, bad_examples)
                    continue
                for key, text in zip(keys, found):
                    texts[key].append(text)
                if pending_bytes >= BATCH_BYTES:
                    flush()
        flush()
    return {"tokens": tokens, "bad_examples": bad_examples, "truncated": 0, "trained_tokens": 0}


def _bad_line(job: _Job, piece: Piece, newlines_before: int, reason: str, counters, slot: int, examples: list[str]) -> None:
    """Stop at an unusable line with file:line and the reason, or count it under skip_bad_lines."""
    where = f"{piece.path}:{line_number(piece, newlines_before)}"
    if not job.skip_bad_lines:
        raise PreprocessError(f"{where}: {reason}; {_SKIP_HINT}")
    counters[slot + _BAD] += 1
    if len(examples) < MAX_BAD_LINE_EXAMPLES:
        examples.append(f"{where}: {reason}")


def _render_part(part: int, pieces: list[Piece], job: _Job, tokenizer, counters) -> dict:
    """Chat/preference mode: check and render each record with ChatML into the part's shards (if writing)."""
    slot = 4 * part
    keys = job.json_keys
    pending: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    tokens = dict.fromkeys(job.token_keys, 0)
    bad_examples: list[str] = []
    truncated = trained = pending_bytes = 0

    with ExitStack() as stack:
        writers = {}
        if job.output_prefix is not None:
            writers = {
                # The mask shard holds 0/1, so its dtype is the smallest megatron-core picks.
                key: stack.enter_context(IndexedShardWriter(job.partial_prefix(key, part), 2 if key == SFT_KEYS[1] else tokenizer.n_vocab))
                for key in keys
            }

        def flush() -> None:
            nonlocal pending_bytes
            for key, docs in pending.items():
                if writers and docs:
                    writers[key].add_documents(np.concatenate(docs), np.fromiter(map(len, docs), np.int64, count=len(docs)))
                docs.clear()
            counters[slot + _BYTES] += pending_bytes
            pending_bytes = 0

        for piece in pieces:
            for line, newlines_before in iter_piece_lines(piece):
                pending_bytes += len(line) + 1
                record = record_of(line)
                try:
                    if isinstance(record, str):
                        raise ChatFormatError(record)
                    if job.mode == "chat":
                        chat = render_conversation(tokenizer, record, job.max_length)
                        docs = {SFT_KEYS[0]: np.asarray(chat.ids, np.int32), SFT_KEYS[1]: np.asarray(chat.mask, np.int32)}
                        truncated += chat.dropped_exchanges > 0
                        trained += int(docs[SFT_KEYS[1]].sum())
                    else:
                        sides = render_preference(tokenizer, record, job.max_length)
                        docs = {key: np.asarray(ids, np.int32) for key, ids in zip(PREFERENCE_KEYS, sides)}
                except ChatFormatError as e:
                    _bad_line(job, piece, newlines_before, str(e), counters, slot, bad_examples)
                    continue
                for key, doc in docs.items():
                    pending[key].append(doc)
                for key in tokens:
                    tokens[key] += len(docs[key])
                    counters[slot + _TOKENS] += len(docs[key])
                counters[slot + _DOCS] += 1
                if pending_bytes >= BATCH_BYTES:
                    flush()
        flush()
    return {"tokens": tokens, "bad_examples": bad_examples, "truncated": truncated, "trained_tokens": trained}


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
        for key in job.json_keys:
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
    per_part = [rank_results[p] for rank_results in gathered for p in sorted(rank_results)]
    result = PreprocessResult(
        documents=totals[_DOCS],
        tokens={key: sum(r["tokens"][key] for r in per_part) for key in job.token_keys},
        text_bytes=totals[_BYTES],
        bad_lines=totals[_BAD],
        bad_line_examples=[e for r in per_part for e in r["bad_examples"]][:MAX_BAD_LINE_EXAMPLES],
        mode=job.mode,
        truncated=sum(r["truncated"] for r in per_part),
        trained_tokens=sum(r["trained_tokens"] for r in per_part),
    )
    if job.output_prefix is not None:
        try:
            for key in job.json_keys:
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
    if mode not in MODES:
        raise PreprocessError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "text":
        keys = ("text",) if json_keys is None else tuple(json_keys)
        if not keys or len(set(keys)) != len(keys):
            raise PreprocessError(f"--json-keys must name one or more distinct keys, got {list(keys)}")
        if max_length is not None:
            raise PreprocessError("--max-length applies to --chat and --preference data; drop it for plain text")
    else:
        # A conversation is rendered whole with ChatML: keys, EOD and length come from the chat rules.
        for given, flag in ((json_keys is not None, "--json-keys"), (append_eod, "--append-eod")):
            if given:
                raise PreprocessError(f"{flag} does not apply to --{mode} data (records are rendered with ChatML); drop it")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
            raise PreprocessError(f"--max-length must be a positive integer (the model.seq_length to train at), got {max_length!r}")
        keys = SFT_KEYS if mode == "chat" else PREFERENCE_KEYS
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
        json_keys=keys,
        append_eod=append_eod,
        tokenizer_file=tokenizer_file,
        skip_bad_lines=skip_bad_lines,
        output_prefix=None if output_prefix is None else os.fspath(output_prefix),
        num_parts=size * workers * PARTS_PER_WORKER,
        mode=mode,
        max_length=max_length,
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
    instead (see the module docstring), each at most ``max_length`` tokens. ``workers``
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


_UNITS = {"text": "documents", "chat": "conversations", "preference": "pairs"}


def format_summary(result: PreprocessResult) -> str:
    """Human-readable end-of-run summary."""
    seconds = max(result.seconds, 1e-9)
    lines = [
        f"{_UNITS[result.mode]}: {result.documents:,} in {seconds:.1f} s ({result.documents / seconds:,.0f}/s, "
        f"{result.text_bytes / 1e6 / seconds:,.2f} MB/s of JSONL text)",
    ]
    for key, count in result.tokens.items():
        lines.append(f"tokens[{key}]: {count:,}")
    if result.mode == "chat":
        total = max(sum(result.tokens.values()), 1)
        lines.append(f"trained tokens (loss mask): {result.trained_tokens:,} ({100 * result.trained_tokens / total:.1f} %)")
        lines.append(f"conversations truncated to --max-length (trailing exchanges dropped): {result.truncated:,}")
    if result.bad_lines:
        lines.append(f"bad lines skipped: {result.bad_lines:,}; first ones:")
        lines += [f"  {example}" for example in result.bad_line_examples]
    for key, summary in result.outputs.items():
        lines.append(
            f"wrote {summary.prefix}.bin/.idx: {summary.num_documents:,} documents, "
            f"{summary.num_sequences:,} sequences, {summary.num_tokens:,} {summary.dtype} tokens"
        )
    return "\n".join(lines)
