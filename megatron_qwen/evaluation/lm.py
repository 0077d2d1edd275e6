"""lm-evaluation-harness's `LM` for a loaded checkpoint at any TP/PP layout, in process (no export, no server).

`QwenLM` is a `TemplateLM`, so a context and its continuation are tokenized exactly as lm-eval's Hugging Face
backend does it (the context's trailing spaces move to the continuation; the pair is encoded whole and split).
Scoring runs the full-sequence forward (`inference.forward.forward_logits`, the logits of `megatron-qwen
forward`) over batches of rows; generation runs the KV-cache engine, greedy unless the task samples, stopped
at the task's `until` strings. Every rank runs every request in the same order (lm-eval is told it is one
process: rank 0 of 1), so the ranks' collectives line up; the last pipeline stage computes the scores and
sends them to all ranks, so every rank returns the same answers.

lm-eval is an optional dependency (`pip install lm_eval`): this module imports it.
"""

from __future__ import annotations

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from megatron_qwen.inference.engine import GenerationEngine
from megatron_qwen.inference.forward import ForwardPlan, forward_logits, writer_rank
from megatron_qwen.inference.sampling import SamplingParams

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task gives none


class QwenLM(TemplateLM):
    """A checkpoint's model chunks on this rank, as lm-eval's language model."""

    def __init__(self, chunks, plan: ForwardPlan, tokenizer, batch_size: int = 8, max_length: int | None = None):
        super().__init__()
        self.chunks, self.plan, self.tokenizer_ = chunks, plan, tokenizer
        self.engine = GenerationEngine(chunks, plan.generate_vocab)
        self.batch_size = batch_size
        self.max_length = max_length or plan.cfg.model.max_position_embeddings
        self.device_ = self.engine.device
        self.writer = writer_rank()
        self.requests_run = 0

    # lm-eval splits requests over data-parallel ranks by these; every rank here runs every request.
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eod_id

    @property
    def tokenizer_name(self) -> str:
        return f"qwen-{self.tokenizer_.family}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer_.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer_.decode(tokens)

    # ----------------------------------------------------------------------- scoring

    def _share(self, value):
        """`value` from the writer rank (the last stage's TP rank 0), on every rank."""
        if torch.distributed.get_world_size() == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=self.writer)
        return box[0]

    def _score_rows(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """Per (input ids, continuation length): the continuation's summed log-probability and whether every
        continuation token is the argmax; the continuation is the last ids of input + one more (its targets)."""
        out: list[tuple[float, bool]] = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            longest = max(len(ids) for ids, _ in batch) - 1
            # Right-padded: causal attention keeps the real positions' logits as they are alone.
            inputs = torch.full((len(batch), longest), self.eot_token_id, dtype=torch.long)
            for r, (ids, _) in enumerate(batch):
                inputs[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            logits = forward_logits(self.chunks, self.plan, inputs.to(self.device_))
            scores = None
            if logits is not None:
                scores = []
                for r, (ids, n) in enumerate(batch):
                    logp = torch.log_softmax(logits[r, len(ids) - 1 - n:len(ids) - 1].double(), dim=-1)
                    targets = torch.tensor(ids[-n:], device=logp.device)
                    scores.append((float(logp.gather(1, targets[:, None]).sum()),
                                   bool((logp.argmax(-1) == targets).all())))
            out += self._share(scores)
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        rows = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]
            rows.append((whole, len(continuation)))
        self.requests_run += len(rows)
        return self._score_rows(rows)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's total log-probability, in disjoint windows of at most max_length tokens, the first one
        conditioned on end-of-text (lm-eval's rolling windows, as its Hugging Face backend cuts them)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logp
        return totals

    # ----------------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of its `until` strings, end-of-text or max_gen_toks; the text before
        the first stop string."""
        eos = self.tok_decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out = [""] * len(requests)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            new = int(kwargs.pop("max_gen_toks"))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            room = self.max_length - new
            if room < 1:
                raise ValueError(f"max_gen_toks={new} leaves no room for a context in max_length={self.max_length}")
            params = SamplingParams(max_new_tokens=new, temperature=temperature,
                                    stop_ids=self.tokenizer_.generation_stop_ids(self.plan.generate_vocab),
                                    logprobs=False)
            for start in range(0, len(members), self.batch_size):
                rows = members[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-room:] or [self.eot_token_id] for i in rows]
                result = self.engine.generate(prompts, params, stop_rows=self._text_stops(until, params.stop_ids))
                for i, tokens in zip(rows, result.tokens):
                    text = self.tok_decode([t for t in tokens if t not in params.stop_ids])
                    out[i] = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
                self.requests_run += len(rows)
        return out

    def _text_stops(self, until: list[str], stop_ids: tuple[int, ...]):
        """Rows end once their text holds a stop string; every rank has the same ids, so decides the same."""
        texts: dict[int, list[int]] = {}

        def stop_rows(active: list[int], ids: list[int]) -> set[int]:
            ended = set()
            for row, token in zip(active, ids):
                if token in stop_ids:
                    continue
                texts.setdefault(row, []).append(token)
                text = self.tok_decode(texts[row])
                if any(stop in text for stop in until):
                    ended.add(row)
            return ended
        return stop_rows
