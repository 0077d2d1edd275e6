"""The ranks' loop: rank 0 takes a batch from the queue and broadcasts it, every rank runs it, rank 0 answers.

One broadcast per batch carries the rows (prompt ids, token limit, seed, log-probabilities wanted) and the
sampling setting; while the engine generates, rank 0 decides after each step which rows end (their token limit,
a stop string, a stop id, a client gone) and broadcasts that decision, so every rank drops the same rows. Rows
that ask for log-probabilities are scored afterwards by one full forward of prompt + completion (the same
logits as `megatron-qwen forward`), and the last pipeline stage sends them to rank 0. An idle rank 0 broadcasts
a heartbeat every second, so the other ranks' waits never reach the collective timeout.
"""

from __future__ import annotations

import dataclasses
import secrets
import sys

import torch

from megatron_qwen.inference.engine import GenerationEngine
from megatron_qwen.inference.forward import ForwardPlan, forward_logits, writer_rank
from megatron_qwen.inference.sampling import SamplingParams
from megatron_qwen.serve.batching import RowText, Scheduler
from megatron_qwen.serve.protocol import Choice, Job, Limits, RequestError

HEARTBEAT_S = 1.0


@dataclasses.dataclass(frozen=True)
class Row:
    """What every rank needs of one row of a batch."""

    prompt: tuple[int, ...]
    max_tokens: int
    seed: int
    score: bool  # log-probabilities wanted
    top: int  # alternatives per position
    echo: bool  # score the prompt's positions too


@dataclasses.dataclass(frozen=True)
class Batch:
    rows: tuple[Row, ...]
    temperature: float
    top_p: float
    top_k: int


def batch_of(jobs: list[Job]) -> Batch:
    """The broadcast form of `jobs` (rank 0): one row per prompt and choice, each with its own seed."""
    rows = []
    for job in jobs:
        base = job.seed if job.seed is not None else secrets.randbelow(2 ** 62)
        for choice in range(job.rows):
            rows.append(Row(tuple(job.row_prompt(choice)), job.max_tokens, base + choice, job.logprobs is not None,
                            job.logprobs or 0, job.echo))
    first = jobs[0]
    return Batch(tuple(rows), first.temperature, first.top_p, first.top_k)


class RankLoop:
    """Runs batches on this rank; on rank 0 it also owns the queue and answers the jobs."""

    def __init__(self, engine: GenerationEngine, chunks, plan: ForwardPlan, tokenizer, limits: Limits,
                 scheduler: Scheduler | None):
        self.engine, self.chunks, self.plan, self.tokenizer, self.limits = engine, chunks, plan, tokenizer, limits
        self.scheduler = scheduler
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        # The rank that holds the last stage's logits for TP rank 0: it sends log-probabilities to rank 0.
        self.writer = writer_rank()
        self.batches = 0

    def run(self) -> None:
        """Serve until rank 0 is drained (SIGTERM) and idle."""
        while True:
            message = [None]
            if self.rank == 0:
                jobs = self.scheduler.next_batch(HEARTBEAT_S)
                jobs = [j for j in jobs if not j.cancelled.is_set()]
                if jobs:
                    message[0] = ("batch", batch_of(jobs))
                elif self.scheduler.draining and self.scheduler.idle():
                    message[0] = ("exit", None)
                else:
                    message[0] = ("idle", None)
                    self.scheduler.finished()
            if self.world > 1:
                torch.distributed.broadcast_object_list(message, src=0)
            kind, batch = message[0]
            if kind == "exit":
                return
            if kind == "batch":
                new_tokens = 0
                try:
                    new_tokens = self._run(batch, jobs if self.rank == 0 else None)
                except Exception as exc:
                    if self.rank == 0:
                        for job in jobs:
                            job.sink(("error", RequestError(500, f"the batch failed: {exc}", kind="server_error")))
                    raise
                finally:
                    if self.rank == 0:
                        self.scheduler.finished(new_tokens, sum(j.rows for j in jobs if j.cancelled.is_set()))
                self.batches += 1

    def _run(self, batch: Batch, jobs: list[Job] | None) -> int:
        """Run one batch; returns the ids generated."""
        rows = batch.rows
        # Rank 0: each row's job, choice index and text.
        owners, texts = [], []
        if jobs is not None:
            for job in jobs:
                for choice in range(job.rows):
                    owners.append((job, choice))
                    texts.append(RowText(self.tokenizer, job.stop_strings, job.stop_ids, job.max_tokens))
        generating = [i for i, row in enumerate(rows) if row.max_tokens > 0]
        new_tokens = 0
        if generating:
            params = SamplingParams(
                max_new_tokens=max(rows[i].max_tokens for i in generating), temperature=batch.temperature,
                top_k=batch.top_k, top_p=batch.top_p, stop_ids=self.limits.stop_ids,
                row_seeds=tuple(rows[i].seed for i in generating),
                logprobs=False,  # asked-for log-probabilities come from the scoring forward afterwards
            )
            result = self.engine.generate(
                [list(rows[i].prompt) for i in generating], params,
                on_token=self._streamer(generating, owners, texts) if jobs is not None else None,
                stop_rows=self._stopper(generating, owners, texts),
            )
            new_tokens = result.new_tokens
        choices = []
        if jobs is not None:
            for i, (job, choice) in enumerate(owners):
                text = texts[i]
                if not rows[i].max_tokens:
                    text.finish_reason = "length"
                choices.append(Choice(text=text.text, tokens=list(text.tokens), finish_reason=text.finish_reason
                                      or "length", generated=text.generated))
        if any(row.score for row in rows):
            kept = [choices[i].tokens for i in range(len(rows))] if jobs is not None else None
            scores = self._score(rows, kept)
            if jobs is not None:
                for i, entries in scores.items():
                    choices[i].logprobs = entries
        if jobs is None:
            return new_tokens
        at = 0
        for job in jobs:
            mine = choices[at:at + job.rows]
            if job.stream:
                for choice in range(job.rows):
                    piece = texts[at + choice].release()
                    job.sink(("text", (choice, piece, mine[choice].finish_reason)))
            job.sink(("done", mine))
            at += job.rows
        return new_tokens

    def _streamer(self, generating, owners, texts):
        def on_token(row: int, token: int) -> None:
            i = generating[row]
            job, choice = owners[i]
            texts[i].add(token)
            # A row's last piece goes out with its finish reason, after the batch.
            if job.stream and not job.cancelled.is_set() and texts[i].finish_reason is None:
                piece = texts[i].release()
                if piece:
                    job.sink(("text", (choice, piece, None)))
        return on_token

    def _stopper(self, generating, owners, texts):
        device = self.engine.device

        def stop_rows(active: list[int], ids: list[int]) -> set[int]:
            flags = torch.zeros(len(active), dtype=torch.int32, device=device)
            if self.rank == 0:
                ended = [texts[generating[row]].finish_reason is not None
                         or owners[generating[row]][0].cancelled.is_set() for row in active]
                flags = torch.tensor(ended, dtype=torch.int32, device=device)
            if self.world > 1:
                torch.distributed.broadcast(flags, src=0)
            return {row for row, flag in zip(active, flags.tolist()) if flag}
        return stop_rows

    def _score(self, rows: tuple[Row, ...], kept: list[list[int]] | None) -> dict[int, list]:
        """Per scored row: (id, log p, top alternatives) for each position scored (None for the first prompt
        token); computed on the last stage, received by rank 0."""
        completions = [None] * len(rows)
        if self.rank == 0:
            completions = kept
        if self.world > 1:
            box = [completions]
            torch.distributed.broadcast_object_list(box, src=0)
            completions = box[0]
        scores: dict[int, list] = {}
        device = self.engine.device
        for i, row in enumerate(rows):
            if not row.score:
                continue
            sequence = list(row.prompt) + list(completions[i])
            logits = forward_logits(self.chunks, self.plan, torch.tensor([sequence], device=device))
            if logits is None:
                continue
            logp = torch.log_softmax(logits[0].float(), dim=-1)
            start = 1 if row.echo else len(row.prompt)
            positions = torch.arange(start, len(sequence))
            targets = torch.tensor(sequence[start:])
            chosen = logp[positions - 1, targets].tolist() if len(positions) else []
            if row.top:
                top_lp, top_ids = logp[positions - 1].topk(row.top, dim=-1)
                alternatives = [list(zip(ids, lps)) for ids, lps in zip(top_ids.tolist(), top_lp.tolist())]
            else:
                alternatives = [[] for _ in chosen]
            entries = [(t, lp, alt) for t, lp, alt in zip(sequence[start:], chosen, alternatives)]
            scores[i] = ([None] if row.echo else []) + entries
        if self.world > 1 and self.writer != 0:
            box = [scores]
            torch.distributed.broadcast_object_list(box, src=self.writer)
            scores = box[0]
        return scores


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
