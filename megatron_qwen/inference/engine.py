"""Generation with a KV cache at any TP/PP layout, on megatron-core's static inference context.

`GenerationEngine.generate` takes a batch of prompts of different lengths, left-pads them into one
block, runs one prefill forward pass over the prompts and then one token per step. megatron-core's
`StaticInferenceContext` keeps the keys and values of every layer on every pipeline stage; a step runs
this rank's model chunks in pipeline order with megatron-core's inference p2p helpers, as
`GPTInferenceWrapper.run_one_forward_step` does for one chunk, so interleaved pipelines (several chunks
per rank, whose layers have distinct global numbers in the cache) generate too. Each token is rotated at its
own position (position ids restart after each row's padding) and padding keys are masked, so a padded row
continues exactly as
it would alone. Rows stop at a stop id or after ``max_new_tokens``; finished rows are dropped from the
batch and from the KV cache, so they stop costing compute.

The last pipeline stage chooses the tokens: its last chunk returns the final hidden states, the engine
applies the output layer to the last position only, every TP rank there holds the gathered logits and draws
with the same seeded generator, so they agree, and the choice is broadcast to the earlier stages. Each step
brings its ids and log-probabilities to the host in one transfer; the rest of the bookkeeping (stops, rows
that leave the batch) is host-side, so a GPU runs the steps without waiting on the host more than once each.
Sequence parallelism is switched off while generating (megatron-core's `set_model_to_sequence_parallel`)
and back on after, so a model built for SP training can generate.

The KV cache is megatron-core's: each layer caches its key/value heads only ([length, batch, kv heads / tp,
head_dim]), so grouped-query models (Qwen2/2.5/3) keep heads / kv heads times less than their queries would need.
YaRN (`model.rope_scaling`) applies at every step as in the forward pass (frequencies and attention factor).

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
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer import utils as transformer_utils
from megatron.core.transformer.utils import set_model_to_sequence_parallel

from megatron_qwen.errors import UserError
from megatron_qwen.inference.sampling import SamplingParams, UniformDraws, sample, token_logprobs
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
def final_hidden_states(head: torch.nn.Module | None):
    """The last model chunk returns its final hidden states for the block, not logits: the engine applies the output
    layer to the last position only, with the product's operands in the order fastest for a few rows."""
    if head is None:
        yield
        return
    was = head.post_process
    head.post_process = False  # GPTModel._postprocess then returns the decoder's (final-normed) output
    try:
        yield
    finally:
        head.post_process = was


@contextlib.contextmanager
def sequence_parallel_off(chunks: list[torch.nn.Module]):
    """Switch sequence parallelism off for the block (generation feeds one token at a time)."""
    was = chunks[0].config.sequence_parallel
    if was:
        for chunk in chunks:
            # megatron-core caches each model's modules under id(model) and never evicts: a model built after
            # another was freed can get its id, and the cached modules would be the dead model's, leaving this
            # one's layers sequence-parallel (on some tensor-parallel ranks and not others: a hang).
            cache = transformer_utils._sequence_parallel_attr_cache
            if cache is not None:
                cache.pop(id(chunk), None)
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
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
        self.head = self.chunks[-1] if self.last_stage else None
        self.output_weight = None  # [V / tp, h]: the output layer's, or with tied embeddings the embedding's
        if self.head is not None:
            layer = getattr(self.head, "output_layer", None)
            if not isinstance(layer, ColumnParallelLinear) or layer.bias is not None:
                raise ValueError("generation applies the language-model output layer itself (a bias-free "
                                 f"ColumnParallelLinear); this model's last chunk has {type(layer).__name__}")
            # Tied: the embedding (one stage) or the last stage's copy of it (PP > 1), sharded by vocabulary rows
            # over TP as the output layer would be.
            self.output_weight = (self.head.shared_embedding_or_output_weight()
                                  if self.head.share_embeddings_and_output_weights else layer.weight)

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
                raise UserError(
                    f"prompt {i} holds token id {bad[0]}, outside the model's vocabulary [0, {vocab_limit})"
                )
            if len(prompt) + params.max_new_tokens > max_positions:
                raise UserError(
                    f"prompt {i} has {len(prompt)} tokens; with --max-new-tokens {params.max_new_tokens} that is "
                    f"{len(prompt) + params.max_new_tokens} positions, over model.max_position_embeddings="
                    f"{max_positions}; shorten the prompt or lower --max-new-tokens"
                )

    def generate(self, prompts: list[list[int]], params: SamplingParams, on_token=None,
                 stop_rows=None) -> Generation:
        """Continue every prompt; the result is on every rank. ``on_token(row, id)`` is called on each new
        token (e.g. to stream one prompt's text). ``stop_rows(rows, ids)``, called on every rank after each
        step with the original rows still generating and their new ids, returns the rows to end now (a server's
        per-request token limits, stop strings and disconnected clients); every rank must return the same."""
        self.check(prompts, params)
        started = time.perf_counter()
        with torch.inference_mode(), sequence_parallel_off(self.chunks), final_hidden_states(self.head):
            result = self._generate(prompts, params, on_token, stop_rows)
        result.seconds = time.perf_counter() - started
        return result

    def _generate(self, prompts, params: SamplingParams, on_token, stop_rows) -> Generation:
        batch, longest = len(prompts), max(len(p) for p in prompts)
        total = longest + params.max_new_tokens
        pads = [longest - len(p) for p in prompts]
        tokens = self._to_device(torch.tensor([[self.pad_id] * pad + list(p) for pad, p in zip(pads, prompts)]))
        # Built once on the host: each step slices them, and only dropping finished rows re-indexes them.
        index, first_real = torch.arange(total), torch.tensor(pads)[:, None]
        positions = self._to_device((index[None, :] - first_real).clamp(min=0))  # [b, total]
        padding = index[None, :] < first_real  # [b, total]: padding keys are never attended to
        prefill = (index[:longest, None] >= index[None, :longest])[None] & ~padding[:, None, :longest]  # [b, q, k]
        prefill |= torch.eye(longest, dtype=torch.bool)  # a padding query sees itself
        # megatron-core's masks mark the keys to drop; without padding the attention's own causal rule is enough.
        mask = self._to_device(~prefill[:, None]) if any(pads) else None
        padding = self._to_device(padding[:, None, None, :])

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
        stops = set(params.stop_ids)
        active = list(range(batch))  # original row of each row still generating
        step_input, length = tokens, longest
        try:
            with pinned_ntk_alphas(self.chunks, alphas):
                for step in range(params.max_new_tokens):
                    hidden = self._forward(context, step_input, positions[:, :length], mask)
                    # Every draw consumes one number per original row, whichever rows are still running.
                    uniforms = None if params.greedy else self._to_device(draws.next()[active])
                    chosen, result = self._choose(hidden, params, uniforms, len(active))
                    ids, raw, scaled = result.tolist()  # the step's one transfer from the device
                    last = step + 1 == params.max_new_tokens
                    done = [last or int(token) in stops for token in ids]
                    for i, row in enumerate(active):
                        token = int(ids[i])
                        out.tokens[row].append(token)
                        out.logprobs[row].append(raw[i])
                        out.sampling_logprobs[row].append(scaled[i])
                        out.finished[row] = token in stops
                        if on_token is not None:
                            on_token(row, token)
                    if stop_rows is not None:
                        ended = stop_rows(list(active), [int(t) for t in ids])
                        done = [d or row in ended for d, row in zip(done, active)]
                    out.new_tokens += len(active)
                    if all(done):
                        break
                    if any(done):
                        keep = self._to_device(torch.tensor([i for i, d in enumerate(done) if not d]))
                        self._drop_finished_rows(context, keep)
                        chosen, positions, padding = chosen[keep], positions[keep], padding[keep]
                        active = [row for row, d in zip(active, done) if not d]
                        pads = [pad for pad, d in zip(pads, done) if not d]
                        if alphas is not None:
                            for chunk in self.chunks:
                                chunk.rotary_pos_emb.pinned_alphas = tuple(alphas[row] for row in active)
                    step_input, length = chosen[:, None], length + 1
                    mask = padding[..., :length] if any(pads) else None
        finally:
            context.reset()
        return out

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """`host` on the model's device, copied without making the host wait for the device."""
        if self.device.type == "cpu":
            return host
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def _forward(self, context: StaticInferenceContext, tokens, position_ids, attention_mask):
        """One step through every chunk of every stage, in pipeline order; the final hidden states [s, b, h] on the
        last stage."""
        batch, length = tokens.shape
        output = None
        for v, chunk in enumerate(self.chunks):
            hidden = None
            if self.pp > 1 and (v > 0 or self.pp_rank > 0):
                hidden = torch.empty(length, batch, self.config.hidden_size, dtype=self.config.params_dtype,
                                     device=self.device)
                recv_from_prev_pipeline_rank_(hidden, self.pp_group)
            chunk.set_input_tensor(hidden)
            output = chunk(tokens, position_ids, attention_mask, inference_context=context, runtime_gather_output=True)
            if self.pp > 1 and not (v == len(self.chunks) - 1 and self.last_stage):
                send_to_next_pipeline_rank(output.to(self.config.params_dtype), self.pp_group)
        context.increment_sequence_len_offset(length)
        return output if self.last_stage else None

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [b, vocab_limit] of the final hidden states [b, h], gathered over tensor parallelism."""
        full = self._vocab_major_logits(hidden)
        logits = torch.empty(hidden.shape[0], self.vocab_limit, dtype=torch.float32, device=hidden.device)
        return logits.copy_(full[:self.vocab_limit].t())  # ids past the tokenizer's are never drawn

    def _vocab_major_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer's product [V, b] for final hidden states [b, h], gathered over tensor parallelism."""
        # weight [V / tp, h] times hidden^T reads the weight once; on CPU (MKL) that is about twice as fast as
        # megatron-core's hidden x weight^T for a few rows, and the output layer dominates a decode step.
        local = torch.mm(self.output_weight, hidden.t())  # [V / tp, b]
        if self.tp_group is None:
            return local
        full = local.new_empty(local.shape[0] * self.tp_group.size(), local.shape[1])
        torch.distributed.all_gather_into_tensor(full, local, group=self.tp_group)
        return full

    def _choose(self, hidden, params: SamplingParams, uniforms, rows: int):
        """Device ids [rows] and the float64 [3, rows] of ids, log-probabilities and sampling log-probabilities,
        chosen on the last stage and broadcast to every pipeline stage."""
        result = torch.empty(3, rows, dtype=torch.float64, device=self.device)
        if self.last_stage and params.greedy and not params.logprobs:
            # The argmax straight from the output layer's [vocab, rows] product: no transposed copy, no softmax.
            chosen = self._vocab_major_logits(hidden[-1])[:self.vocab_limit].argmax(0)
            nan = torch.full_like(chosen, float("nan"), dtype=torch.float64)
            result = torch.stack([chosen.double(), nan, nan])
        elif self.last_stage:
            logits = self._logits(hidden[-1])
            chosen = sample(logits, params, uniforms)
            if params.logprobs:
                raw = token_logprobs(logits, chosen)
                scaled = raw if params.greedy else token_logprobs(logits, chosen, params.temperature)
            else:
                raw = scaled = torch.full_like(chosen, float("nan"), dtype=torch.float64)
            result = torch.stack([chosen.double(), raw.double(), scaled.double()])
        if self.pp_group is not None:
            torch.distributed.broadcast(result, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                        group=self.pp_group)
        return result[0].long(), result

    @staticmethod
    def _drop_finished_rows(context: StaticInferenceContext, keep_rows: torch.Tensor) -> None:
        """Keep only the cache rows of unfinished sequences: later steps run on the smaller batch."""
        for layer, (keys, values) in context.key_value_memory_dict.items():
            context.key_value_memory_dict[layer] = (keys[:, keep_rows].contiguous(), values[:, keep_rows].contiguous())
        context.max_batch_size = len(keep_rows)
