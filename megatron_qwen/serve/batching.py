"""The request queue and how batches are formed from it, and each row's text as its tokens arrive.

The KV-cache engine runs one static batch at a time with one sampling setting, so the server forms batches
from the queue instead of batching continuously: the oldest waiting request opens a batch; requests behind it
with the same temperature / top-p / top-k join it, in arrival order, up to ``max_batch`` rows; when the batch is
not full, the queue is given ``wait_s`` for more requests to arrive before the batch starts. A request with
another setting waits for the next batch (it keeps its place: it opens the next one). Rows of a batch stop on
their own (token limit, stop string, stop id, a client gone), and a stopped row leaves the engine's batch.

Capacity is counted in rows (prompts x n) queued or running; a request that would pass ``max_queue`` is refused
with 503 and a Retry-After, and a client that goes away frees its rows at once.
"""

from __future__ import annotations

import collections
import threading
import time

from megatron_qwen.serve.protocol import Job, RequestError


class Scheduler:
    """Thread-safe FIFO of jobs (HTTP threads put, the rank loop takes batches)."""

    def __init__(self, max_queue: int, max_batch: int, wait_s: float = 0.005):
        self.max_queue, self.max_batch, self.wait_s = max_queue, max_batch, wait_s
        self._jobs: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self.draining = False
        # Totals since start, for /health: batches run, ids generated, rows ended because their client went away.
        self.stats = {"batches": 0, "new_tokens": 0, "rows_cancelled": 0}

    def rows_in_use(self) -> tuple[int, int]:
        """(rows queued, rows running), not counting requests whose client has gone."""
        with self._cond:
            return (sum(j.rows for j in self._jobs if not j.cancelled.is_set()),
                    sum(j.rows for j in self._running if not j.cancelled.is_set()))

    def submit(self, job: Job) -> None:
        """Queue `job`; RequestError 503 when draining or when its rows would pass max_queue."""
        with self._cond:
            if self.draining:
                raise RequestError(503, "the server is shutting down", kind="server_error", retry_after=5)
            queued, running = (sum(j.rows for j in jobs if not j.cancelled.is_set())
                               for jobs in (self._jobs, self._running))
            if queued + running + job.rows > self.max_queue:
                raise RequestError(503, f"the server is busy: {queued + running} of its {self.max_queue} rows "
                                        "are taken; retry after the time in Retry-After", kind="server_error",
                                   code="queue_full", retry_after=1)
            self._jobs.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client has gone: drop the job if it waits; a running job's rows stop at the next step."""
        job.cancelled.set()
        with self._cond:
            if job in self._jobs:
                self._jobs.remove(job)
            self._cond.notify_all()

    def next_batch(self, timeout: float) -> list[Job]:
        """The next batch ([] if none arrived within `timeout` seconds): the oldest job and those behind it
        with its sampling setting, up to max_batch rows."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._jobs:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            opened = time.monotonic()
            while sum(j.rows for j in self._compatible()) < self.max_batch and time.monotonic() - opened < self.wait_s:
                self._cond.wait(self.wait_s - (time.monotonic() - opened))
                if not self._jobs:
                    return []
            batch = self._take_jobs()
            self._running = batch
            return batch

    def _compatible(self) -> list[Job]:
        first, rows, out = self._jobs[0], 0, []
        for job in self._jobs:
            if job.sampling_key != first.sampling_key or (out and rows + job.rows > self.max_batch):
                continue
            out.append(job)
            rows += job.rows
            if rows >= self.max_batch:
                break
        return out

    def _take_jobs(self) -> list[Job]:
        batch = self._compatible()
        for job in batch:
            self._jobs.remove(job)
        return batch

    def finished(self, new_tokens: int = 0, rows_cancelled: int = 0) -> None:
        """The running batch is done (after generating `new_tokens`, with `rows_cancelled` clients gone)."""
        with self._cond:
            if self._running:
                self.stats["batches"] += 1
            self.stats["new_tokens"] += new_tokens
            self.stats["rows_cancelled"] += rows_cancelled
            self._running = []
            self._cond.notify_all()

    def drain(self) -> None:
        """Refuse new requests; the queued ones still run."""
        with self._cond:
            self.draining = True
            self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            return not self._jobs and not self._running


class RowText:
    """One row's text as its ids arrive: stop strings cut it, and only text that cannot turn out to be part of a
    stop string (or half a UTF-8 character) is released for streaming."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...], stop_ids: tuple[int, ...], max_tokens: int):
        self.tokenizer, self.stop_strings, self.stop_ids = tokenizer, stop_strings, stop_ids
        self.max_tokens = max_tokens
        self.tokens: list[int] = []  # kept ids (no stop id)
        self.generated = 0
        self.text = ""  # decoded kept text (cut at a stop string once one appears)
        self.released = 0  # characters of `text` handed out
        self.finish_reason: str | None = None
        self._hold = max((len(s) for s in stop_strings), default=1) - 1

    def add(self, token: int) -> None:
        """Take the row's next id; sets `finish_reason` when the row ends."""
        if self.finish_reason is not None:
            return
        self.generated += 1
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens)
        for stop in self.stop_strings:
            at = self.text.find(stop, max(0, self.released - len(stop)))
            if at >= 0:
                self.text, self.finish_reason = self.text[:at], "stop"
        if self.finish_reason is None and self.generated >= self.max_tokens:
            self.finish_reason = "length"

    def release(self) -> str:
        """Text not handed out yet that is safe to hand out now (all of it once the row has ended)."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= self._hold
            while end > self.released and self.text[end - 1] == "\ufffd":  # a character still incomplete
                end -= 1
        if end <= self.released:
            return ""
        piece, self.released = self.text[self.released:end], end
        return piece
