"""Generation with a KV cache at any TP/PP layout, on megatron-core's static inference context.

`GenerationEngine.generate` takes a batch of prompts of different lengths, left-pads them into one
block, runs one prefill forward pass over the prompts and then one token per step. megatron-core's
`StaticInferenceContext` keeps the keys and values of every layer on every pipeline stage; a step runs
this rank's model chunks in pipeline order with megatron-core's inference p2p helpers, as
`GPTInferenceWrapper.run_one_forward_step` does for one chunk, so interleaved pipelines (several chunks
per rank, whose layers have distinct global numbers in the cache) generate too. Each token is rotated at its own position (position
ids restart after each row's padding) and padding keys are masked, so a padded row continues exactly as
it would alone. Rows stop at a stop id or after ``max_new_tokens``; finished rows are dropped from the
batch and from the KV cache, so they stop costing compute.

The last pipeline stage chooses the tokens: every TP rank there holds the gathered logits and draws
with the same seeded generator, so they agree, and the choice is broadcast to the earlier stages.
Sequence parallelism is switched off while generating (megatron-core's `set_model_to_sequence_parallel`)
and back on after, so a model built for SP training can generate.

Qwen v1's long-context decoding: with dynamic NTK, each row's alpha comes from its prompt's real length
at prefill and stays fixed while decoding (the release's ``_ntk_alpha_cached_list``); LogN scales queries
by their index in the (left-padded) block, as the release does in batched generation.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.inference.communication_utils import recv_from_prev_pipeline_rank_, send_to_next_pipeline_rank
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.utils import set_model_to_sequence_parallel

from megatron_qwen.errors import UserError
from megatron_qwen.inference.sampling import SamplingParams, UniformDraws, mask_vocab, sample, token_logprobs
from megatron_qwen.model.rotary import ntk_alpha, pinned_ntk_alphas


@dataclass
class Generation:
    """The continuation of each prompt, in prompt order."""

    prompt_tokens: list[list[int]]
    tokens: list[list[int]] = field(default_factory=list)  # the new ids, the stop id included when reached
    logprobs: list[list[float]] = field(default_factory=list)  # log p of each new id under the raw logits
    sampling_logprobs: list[list[float]] = field(default_factory=list)  # ... under the sampling temperature
    finished: list[bool] = field(default_factory=list)  # stopped at a stop id (not cut by max_new_tokens)
    seconds: float = 0.0
    new_tokens: int = 0


@contextlib.contextmanager
def sequence_parallel_off(chunks: list[torch.nn.Module]):
    """Switch sequence parallelism off for the block (generation feeds one token at a time)."""
    was = chunks[0].config.sequence_parallel
    if was:
        for chunk in chunks:
            set_model_to_sequence_parallel(chunk, set_to=False)
    try:
        yield
    finally:
        if was:
            for chunk in chunks:
                set_model_to_sequence_parallel(chunk, set_to=True)


class GenerationEngine:
    """Generates from this rank's model chunks (QwenModels built with ``rope_at_positions=True``)."""

    def __init__(self, chunks: list[torch.nn.Module], vocab_limit: int, pad_id: int = 0):
        self.chunks = [getattr(chunk, "module", chunk) for chunk in chunks]
        if not all(getattr(chunk, "rope_at_positions", False) for chunk in self.chunks):
            raise ValueError("generation needs QwenModels built with rope_at_positions=True (left-padded rows)")
        first = self.chunks[0]
        self.config = first.config
        self.vocab_limit = vocab_limit
        self.pad_id = pad_id
        self.max_positions = first.max_sequence_length
        self.device = next(first.parameters()).device
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.pp_group = parallel_state.get_pipeline_model_parallel_group() if self.pp > 1 else None
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)

    def check(self, prompts: list[list[int]], params: SamplingParams) -> None:
        """Raise UserError for a request this engine cannot run."""
        self.check_request(prompts, params, self.vocab_limit, self.max_positions)

    @staticmethod
    def check_request(prompts: list[list[int]], params: SamplingParams, vocab_limit: int, max_positions: int) -> None:
        """Raise UserError for a request that cannot run; needs no model, so tools check before loading one."""
        params.check()
        if not prompts:
            raise UserError("no prompts given")
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise UserError(f"prompt {i} is empty; give at least one token")
            bad = [t for t in prompt if not 0 <= t < vocab_limit]
            if bad:
                raise UserError(f"prompt {i} holds token id {bad[0]}, outside the model's vocabulary [0, {vocab_limit})")
            if len(prompt) + params.max_new_tokens > max_positions:
                raise UserError(
                    f"prompt {i} has {len(prompt)} tokens; with --max-new-tokens {params.max_new_tokens} that is "
                    f"{len(prompt) + params.max_new_tokens} positions, over model.max_position_embeddings="
                    f"{max_positions}; shorten the prompt or lower --max-new-tokens"
                )

    def generate(self, prompts: list[list[int]], params: SamplingParams, on_token=None) -> Generation:
        """Continue every prompt; the result is on every rank. ``on_token(row, id)`` is called on each new
        token (e.g. to stream one prompt's text)."""
        self.check(prompts, params)
        started = time.perf_counter()
        with torch.inference_mode(), sequence_parallel_off(self.chunks):
            result = self._generate(prompts, params, on_token)
        result.seconds = time.perf_counter() - started
        return result

    def _generate(self, prompts, params: SamplingParams, on_token) -> Generation:
        batch, longest = len(prompts), max(len(p) for p in prompts)
        total = longest + params.max_new_tokens
        pads = torch.tensor([longest - len(p) for p in prompts], device=self.device)
        tokens = torch.full((batch, longest), self.pad_id, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            tokens[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long, device=self.device)
        index = torch.arange(total, device=self.device)
        positions = (index[None, :] - pads[:, None]).clamp(min=0)  # [b, total]
        real_key = index[None, :] >= pads[:, None]  # [b, total]: padding keys are never attended to

        rotary = self.chunks[0].rotary_pos_emb
        alphas = None
        if rotary.use_dynamic_ntk:
            alphas = tuple(ntk_alpha(len(p), rotary.qwen_seq_length) for p in prompts)
        context = StaticInferenceContext(batch, total)
        for chunk in self.chunks:
            chunk.eval()

        out = Generation(prompt_tokens=[list(p) for p in prompts], tokens=[[] for _ in prompts],
                         logprobs=[[] for _ in prompts], sampling_logprobs=[[] for _ in prompts],
                         finished=[False] * batch)
        draws = UniformDraws(params, batch)
        stop = torch.tensor(sorted(set(params.stop_ids)) or [-1], device=self.device)
        active = torch.arange(batch, device=self.device)  # original row of each row still generating
        step_input, length = tokens, longest
        try:
            with pinned_ntk_alphas(self.chunks, alphas):
                for step in range(params.max_new_tokens):
                    start = length - step_input.shape[1]
                    query_index = torch.arange(start, length, device=self.device)
                    causal = query_index[:, None] >= index[None, :length]  # [q, k]
                    keep = causal[None] & real_key[active, None, :length]
                    keep |= query_index[None, :, None] == index[None, None, :length]  # a padding query sees itself
                    if alphas is not None:
                        for chunk in self.chunks:
                            chunk.rotary_pos_emb.pinned_alphas = tuple(alphas[int(r)] for r in active)
                    logits = self._forward(context, step_input, positions[active, :length], ~keep[:, None])
                    # Every draw consumes one number per original row, whichever rows are still running.
                    uniforms = draws.next()[active.cpu()].to(self.device)
                    chosen, raw, scaled = self._choose(logits, params, uniforms, len(active))
                    done = torch.isin(chosen, stop) | (step + 1 == params.max_new_tokens)
                    for i, row in enumerate(active.tolist()):
                        out.tokens[row].append(int(chosen[i]))
                        out.logprobs[row].append(float(raw[i]))
                        out.sampling_logprobs[row].append(float(scaled[i]))
                        out.finished[row] = bool(torch.isin(chosen[i], stop))
                        if on_token is not None:
                            on_token(row, int(chosen[i]))
                    out.new_tokens += len(active)
                    if bool(done.all()):
                        break
                    keep_rows = (~done).nonzero().squeeze(-1)
                    if len(keep_rows) < len(active):
                        self._drop_finished_rows(context, keep_rows)
                        active = active[keep_rows]
                        chosen = chosen[keep_rows]
                    step_input, length = chosen[:, None], length + 1
        finally:
            context.reset()
        return out

    def _forward(self, context: StaticInferenceContext, tokens, position_ids, attention_mask):
        """One step through every chunk of every stage, in pipeline order; logits [b, 1, vocab] on the last."""
        batch, length = tokens.shape
        output = None
        for v, chunk in enumerate(self.chunks):
            hidden = None
            if self.pp > 1 and (v > 0 or self.pp_rank > 0):
                hidden = torch.empty(length, batch, self.config.hidden_size, dtype=self.config.params_dtype, device=self.device)
                recv_from_prev_pipeline_rank_(hidden, self.pp_group)
            chunk.set_input_tensor(hidden)
            output = chunk(tokens, position_ids, attention_mask, inference_context=context, runtime_gather_output=True)
            if self.pp > 1 and not (v == len(self.chunks) - 1 and self.last_stage):
                send_to_next_pipeline_rank(output.to(self.config.params_dtype), self.pp_group)
        context.increment_sequence_len_offset(length)
        return output if self.last_stage else None

    def _choose(self, logits, params: SamplingParams, uniforms, rows: int):
        """Tokens and their log-probabilities on the last stage, broadcast to every pipeline stage."""
        result = torch.zeros(3, rows, dtype=torch.float64, device=self.device)
        if self.last_stage:
            last = mask_vocab(logits[:, -1, :], self.vocab_limit)
            chosen = sample(last, params, uniforms)
            raw = token_logprobs(last, chosen)
            scaled = raw if params.greedy else token_logprobs(last, chosen, params.temperature)
            result = torch.stack([chosen.double(), raw.double(), scaled.double()])
        if self.pp_group is not None:
            torch.distributed.broadcast(result, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=self.pp_group)
        return result[0].long(), result[1], result[2]

    @staticmethod
    def _drop_finished_rows(context: StaticInferenceContext, keep_rows: torch.Tensor) -> None:
        """Keep only the cache rows of unfinished sequences: later steps run on the smaller batch."""
        for layer, (keys, values) in context.key_value_memory_dict.items():
            context.key_value_memory_dict[layer] = (keys[:, keep_rows].contiguous(), values[:, keep_rows].contiguous())
        context.max_batch_size = len(keep_rows)
