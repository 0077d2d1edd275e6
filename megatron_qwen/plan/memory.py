"""What one rank allocates for training: weights, gradients, optimizer state and saved activations.

Model state follows megatron-core 0.16.1 as the trainer sets it up (`wrap_ddp`, `build_optimizer`):

- weights: the rank's parameters in the model dtype. With the distributed optimizer megatron-core's DDP
  moves them into one contiguous, padded parameter buffer per model chunk.
- gradients: DDP's gradient buffer per model chunk, fp32 (`grad_reduce_in_fp32=True`), padded likewise.
- optimizer: Adam's two moments in fp32, the fp32 main copy of bf16 weights, and the step counter
  (`torch.optim.AdamW` keeps a float32 tensor per parameter; TE/apex FusedAdam one per group). With the
  distributed optimizer each DP rank keeps these only for its contiguous share of the gradient buffer.
- a MoE model's routed experts: a second buffer per chunk, split over EP x ETP and reduced (and sharded)
  over the expert data-parallel group.

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", section 4, term by term, for the layers this trainer builds (see `layer_activation_terms`).
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

from megatron_qwen.config import ModelConfig, padded_vocab_size

# megatron-core's _ParamAndGradBuffer with the distributed optimizer: every parameter starts on a
# 64-element boundary and the buffer length is a multiple of lcm(dp, 128), so it splits evenly over DP.
PARAM_ALIGN = 64
BUFFER_ALIGN = 128


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Qwen network (v1, 1.5, 2, 2.5, 3, dense or mixture-of-experts) that memory and time
    depend on."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int  # per-branch SwiGLU width
    vocab_size: int  # embedding rows before tensor-parallel padding
    num_query_groups: int | None = None  # key/value heads (None: one per query head)
    kv_channels: int | None = None  # head width (None: hidden_size / num_attention_heads)
    qkv_bias: bool = True
    qk_layernorm: bool = False  # an RMSNorm over head_dim on every query and key head (Qwen3)
    tie_word_embeddings: bool = False  # the output layer is the embedding (a copy on the last stage when PP > 1)
    # Mixture of experts (None: dense): routed experts of moe_ffn_hidden_size each, moe_router_topk per token, an
    # optional shared expert (with a sigmoid gate in Qwen2-MoE); moe_layers says which layers are MoE (the others
    # are dense MLPs of ffn_hidden_size).
    num_experts: int | None = None
    moe_router_topk: int = 0
    moe_ffn_hidden_size: int = 0
    moe_shared_expert_ffn_hidden_size: int | None = None
    moe_shared_expert_gate: bool = False
    moe_layers: tuple[bool, ...] = ()

    @classmethod
    def from_config(cls, model: ModelConfig) -> "ModelShape":
        moe = {}
        if model.is_moe:
            moe = dict(num_experts=model.num_experts, moe_router_topk=model.moe_router_topk,
                       moe_ffn_hidden_size=model.moe_ffn_hidden_size,
                       moe_shared_expert_ffn_hidden_size=model.moe_shared_expert_ffn_hidden_size,
                       moe_shared_expert_gate=model.moe_shared_expert_gate, moe_layers=tuple(model.moe_layers))
        return cls(model.num_layers, model.hidden_size, model.num_attention_heads, model.ffn_hidden_size,
                   model.padded_vocab_size, model.num_query_groups, model.kv_channels, model.qkv_bias,
                   model.qk_layernorm, model.tie_word_embeddings, **moe)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` (0-based) routes tokens to experts."""
        return bool(self.moe_layers) and self.moe_layers[layer]

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def head_dim(self) -> int:
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads

    @property
    def query_width(self) -> int:
        """Output features of the query projection (and input features of the attention output projection)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Output features of the key projection, and of the value projection."""
        return self.kv_heads * self.head_dim

    def vocab_per_rank(self, tp: int) -> int:
        """Embedding (and output-layer) rows on one TP rank, after padding the vocabulary for TP."""
        return padded_vocab_size(self.vocab_size, tp) // tp

    def num_parameters(self) -> int:
        """Parameters of the whole network, a tied embedding and output layer counted once."""
        return self._parameters(self.num_experts or 0)

    def num_activated_parameters(self) -> int:
        """Parameters one token runs through: every expert a layer has replaced by the `moe_router_topk` it is
        routed to (the router and the shared expert always run); the whole network for a dense model."""
        return self._parameters(self.moe_router_topk)

    def _parameters(self, experts_per_layer: int) -> int:
        embeddings = (1 if self.tie_word_embeddings else 2) * self.vocab_size * self.hidden_size
        dense = sum(sum(layer_param_numels(self, 1, self.is_moe_layer(i))) for i in range(self.num_layers))
        routed = self.num_moe_layers * experts_per_layer * 3 * self.hidden_size * self.moe_ffn_hidden_size
        return dense + routed + embeddings + self.hidden_size

    def kv_cache_bytes_per_token(self, tp: int, num_layers: int | None = None, dtype_bytes: int = 2) -> int:
        """Bytes one token's keys and values take in a generation KV cache on one TP rank, over `num_layers`
        layers (default: all; a pipeline rank holds its own layers'): the KV heads only (grouped-query
        attention caches num_query_groups heads, not one per query head), each TP rank its share of them."""
        layers = self.num_layers if num_layers is None else num_layers
        return 2 * layers * self.kv_width // tp * dtype_bytes


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of state the trainer allocates."""

    param_bytes: int  # model weights
    main_param_bytes: int  # the optimizer's fp32 copy of the weights (0 when the weights are fp32 already)
    activation_bytes: int  # activations saved for backward
    step_bytes: int  # Adam's step counter per parameter tensor
    grad_bytes: int = 4  # DDP's main gradients (grad_reduce_in_fp32=True)
    adam_bytes: int = 8  # exp_avg and exp_avg_sq in fp32


def precision(dtype: str, fused_adam: bool) -> Precision:
    """The trainer's precision: "fp32" (CPU ranks; the optimizer updates the weights in place) or "bf16"
    (GPU; bf16 weights and activations, fp32 main weights). `fused_adam`: TE or apex FusedAdam, which
    megatron-core prefers, keeps one step counter per group; without them it uses torch.optim.AdamW,
    which keeps a float32 step tensor per parameter."""
    step = 0 if fused_adam else 4
    if dtype == "fp32":
        return Precision(param_bytes=4, main_param_bytes=0, activation_bytes=4, step_bytes=step)
    if dtype == "bf16":
        return Precision(param_bytes=2, main_param_bytes=4, activation_bytes=2, step_bytes=step)
    raise ValueError(f"precision {dtype!r} must be fp32 or bf16")


@dataclass(frozen=True)
class StateBytes:
    """Model state of one rank, in bytes."""

    weights: int
    gradients: int
    optimizer: int
    expert_weights: int = 0  # the part of weights and gradients in a MoE model's expert buffers
    expert_gradients: int = 0


# --------------------------------------------------------------------------- model state


@functools.lru_cache(maxsize=4096)  # pure; the planner asks for the same layers many times
def layer_param_numels(shape: ModelShape, tp: int, moe: bool = False) -> tuple[int, ...]:
    """Element counts of one decoder layer's parameters on a TP rank outside its routed experts, in
    megatron-core's registration order: input RMSNorm, attention output projection, fused QKV weight ([q; k; v]
    rows of every query group) and its bias (when `qkv_bias`), the query and key RMSNorms over head_dim
    (`qk_layernorm`, not split by TP), pre-MLP RMSNorm, then fc1 ([gate; up]) and fc2 of a dense MLP, or for a
    MoE layer (`moe`) the router's [experts, hidden] weight (whole on every rank), and the shared expert's fc1
    and fc2 (split by TP like a dense MLP) with its [1, hidden] gate. The routed experts are in
    `expert_param_numels`: megatron-core keeps them in a buffer of their own."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    qkv = shape.query_width + 2 * shape.kv_width
    numels = [h, h * shape.query_width // tp, qkv * h // tp]
    if shape.qkv_bias:
        numels.append(qkv // tp)
    if shape.qk_layernorm:
        numels += [shape.head_dim, shape.head_dim]
    numels.append(h)
    if not moe:
        return tuple(numels + [2 * f * h // tp, f * h // tp])
    numels.append(shape.num_experts * h)
    shared = shape.moe_shared_expert_ffn_hidden_size
    if shared:
        numels += [2 * shared * h // tp, shared * h // tp] + ([h] if shape.moe_shared_expert_gate else [])
    return tuple(numels)


def expert_param_numels(shape: ModelShape, ep: int, etp: int) -> tuple[int, ...]:
    """Element counts of one MoE layer's routed experts on a rank: its num_experts / EP local experts, each an
    fc1 ([gate; up], 2 x moe_ffn_hidden_size rows) and fc2 split by expert tensor parallelism (ETP)."""
    h, f = shape.hidden_size, shape.moe_ffn_hidden_size
    return (2 * f * h // etp, f * h // etp) * (shape.num_experts // ep)


def chunk_layers(shape: ModelShape, pp: int, vpp: int, pp_rank: int, chunk: int) -> range:
    """The decoder layers (0-based) of model chunk `chunk` on pipeline rank `pp_rank`: megatron-core gives
    virtual stage chunk * pp + pp_rank the next num_layers / (pp * vpp) layers."""
    per_chunk = shape.num_layers // (pp * vpp)
    start = (chunk * pp + pp_rank) * per_chunk
    return range(start, start + per_chunk)


def chunk_expert_numels(shape: ModelShape, pp: int, vpp: int, pp_rank: int, chunk: int, ep: int,
                        etp: int) -> list[int]:
    """Element counts of the routed experts' parameters of model chunk `chunk` on pipeline rank `pp_rank`."""
    return [n for layer in chunk_layers(shape, pp, vpp, pp_rank, chunk) if shape.is_moe_layer(layer)
            for n in expert_param_numels(shape, ep, etp)]


def chunk_param_numels(shape: ModelShape, tp: int, pp: int, vpp: int, pp_rank: int, chunk: int) -> list[int]:
    """Element counts of the parameters (outside routed experts) of model chunk `chunk` (virtual stage) on
    pipeline rank `pp_rank`, in registration order: the embedding on the very first chunk, its layers, and the final
    RMSNorm and output layer on the very last. A tied output layer is the embedding itself when one
    stage holds both (PP = 1); with PP > 1 the last stage holds a copy (megatron-core's
    share_embeddings_and_output_weights)."""
    h = shape.hidden_size
    first = pp_rank == 0 and chunk == 0
    last = pp_rank == pp - 1 and chunk == vpp - 1
    embedding = shape.vocab_per_rank(tp) * h
    numels = [embedding] if first else []
    for layer in chunk_layers(shape, pp, vpp, pp_rank, chunk):
        numels += layer_param_numels(shape, tp, shape.is_moe_layer(layer))
    if last:
        numels += [h] if shape.tie_word_embeddings and pp == 1 else [h, embedding]
    return numels


def shared_embedding_indices(shape: ModelShape, pp: int, vpp: int, pp_rank: int, chunk: int) -> frozenset[int]:
    """Which of `chunk_param_numels` are the two copies of a tied embedding with PP > 1 (the first stage's
    embedding, the last stage's output layer): megatron-core's DDP gives each its own bucket with the
    distributed optimizer, so that both stages shard it alike."""
    if not shape.tie_word_embeddings or pp == 1:
        return frozenset()
    indices = set()
    if pp_rank == 0 and chunk == 0:
        indices.add(0)
    if pp_rank == pp - 1 and chunk == vpp - 1:
        indices.add(len(chunk_param_numels(shape, 1, pp, vpp, pp_rank, chunk)) - 1)
    return frozenset(indices)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def ddp_bucket_size(overlap_grad_reduce: bool, configured: int | None, dp: int) -> int | None:
    """Elements per gradient bucket of the trainer's DDP (`wrap_ddp`): ``parallel.ddp_bucket_size``, else
    megatron-core's default max(4e7, 1e6 x DP); None (one bucket) without ``parallel.overlap_grad_reduce``."""
    if not overlap_grad_reduce:
        return None
    return configured if configured is not None else max(40_000_000, 1_000_000 * dp)


def chunk_bucket_size(bucket_size: int | None, pp_rank: int, chunk: int) -> int | None:
    """The bucket size megatron-core's DDP uses for model chunk `chunk` on pipeline rank `pp_rank`: buckets
    only in the first chunk of the first stage, whose reduction alone would be exposed; one elsewhere."""
    return bucket_size if pp_rank == 0 and chunk == 0 else None


def buffer_layout(
    numels: list[int], dp: int, distributed_optimizer: bool, bucket_size: int | None = None,
    alone: frozenset[int] = frozenset(),
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Where each parameter (given in registration order) sits in its chunk's DDP buffer, as (start, end)
    element offsets, and the buffer's buckets, as (start, end); the buffer's length is the last bucket's end.

    megatron-core lays parameters out in reverse registration order (roughly the order in which backward
    produces their gradients) and closes a bucket once it holds `bucket_size` elements or more (None: one
    bucket). With the distributed optimizer each parameter starts on a 64-element boundary and each bucket
    is padded to a multiple of lcm(dp, 128); without it parameters are packed end to end. The parameters
    at the indices `alone` (a tied embedding's copies, `shared_embedding_indices`) get a bucket of their
    own with the distributed optimizer.
    """
    ranges: list[tuple[int, int]] = [(0, 0)] * len(numels)
    buckets: list[tuple[int, int]] = []

    def close(end: int) -> int:
        padded = _round_up(end, math.lcm(dp, BUFFER_ALIGN)) if distributed_optimizer else end
        buckets.append((buckets[-1][1] if buckets else 0, padded))
        return padded

    end = 0
    open_bucket = False
    for i in reversed(range(len(numels))):
        start = _round_up(end, PARAM_ALIGN) if distributed_optimizer else end
        own_bucket = distributed_optimizer and i in alone
        if own_bucket and open_bucket:
            start = close(start)
        end = start + numels[i]
        ranges[i] = (start, end)
        open_bucket = True
        if own_bucket or bucket_size is not None and end - (buckets[-1][1] if buckets else 0) >= bucket_size:
            end = close(end)
            open_bucket = False
    if open_bucket:
        close(end)
    return ranges, buckets


def owned_numels(ranges: list[tuple[int, int]], buckets: list[tuple[int, int]], dp: int, dp_rank: int) -> list[int]:
    """How many elements of each parameter DP rank `dp_rank` owns under the distributed optimizer: each
    bucket is cut into `dp` equal contiguous shares, regardless of parameter boundaries."""
    starts = [lo for lo, _ in buckets]
    owned = []
    for start, end in ranges:
        # A parameter lies within one bucket (`buffer_layout` closes buckets between parameters).
        lo, hi = buckets[bisect.bisect_right(starts, start) - 1]
        share = (hi - lo) // dp
        mine = (lo + dp_rank * share, lo + (dp_rank + 1) * share)
        owned.append(max(0, min(end, mine[1]) - max(start, mine[0])))
    return owned


def _buffer_state(numels: list[int], dp: int, distributed_optimizer: bool, prec: Precision, dp_rank: int,
                  bucket_size: int | None, alone: frozenset[int] = frozenset()) -> StateBytes:
    """Weights, gradients and optimizer state of one DDP buffer holding `numels`, reduced (and with the
    distributed optimizer sharded) over `dp` ranks."""
    if not numels:
        return StateBytes(0, 0, 0)
    ranges, buckets = buffer_layout(numels, dp, distributed_optimizer, bucket_size, alone)
    buffer_numel = buckets[-1][1]
    if distributed_optimizer:
        weights = buffer_numel * prec.param_bytes  # the parameters live in the padded buffer
        owned = [n for n in owned_numels(ranges, buckets, dp, dp_rank) if n]
    else:
        weights = sum(numels) * prec.param_bytes
        owned = numels
    optimizer = sum(owned) * (prec.adam_bytes + prec.main_param_bytes) + len(owned) * prec.step_bytes
    return StateBytes(weights, buffer_numel * prec.grad_bytes, optimizer)


def model_state_bytes(
    shape: ModelShape,
    tp: int,
    pp: int,
    vpp: int,
    dp: int,
    distributed_optimizer: bool,
    prec: Precision,
    pp_rank: int = 0,
    dp_rank: int = 0,
    bucket_size: int | None = None,
    ep: int = 1,
    etp: int | None = None,
    expert_dp: int | None = None,
) -> StateBytes:
    """Weights, gradients and optimizer state that megatron-core allocates on the rank at pipeline
    position `pp_rank` and data-parallel position `dp_rank`, summed over its `vpp` model chunks, with
    gradient buckets of `bucket_size` elements (`ddp_bucket_size`).

    `dp` is the group the dense gradients are reduced over (data x context parallel: CP ranks hold the same
    weights). A MoE model's routed experts sit in a second buffer per chunk, split over EP x ETP (`etp`
    defaults to `tp`) and reduced and sharded over the expert data-parallel group (`expert_dp`, world /
    (ETP x EP x PP); defaults to `dp`); the rank is taken at position 0 of that group."""
    weights = gradients = optimizer = expert_weights = expert_gradients = 0
    for chunk in range(vpp):
        chunk_bucket = chunk_bucket_size(bucket_size, pp_rank, chunk)
        dense = _buffer_state(chunk_param_numels(shape, tp, pp, vpp, pp_rank, chunk), dp, distributed_optimizer, prec,
                              dp_rank, chunk_bucket, shared_embedding_indices(shape, pp, vpp, pp_rank, chunk))
        experts = _buffer_state(chunk_expert_numels(shape, pp, vpp, pp_rank, chunk, ep, etp or tp),
                                expert_dp or dp, distributed_optimizer, prec, 0, chunk_bucket)
        weights += dense.weights + experts.weights
        gradients += dense.gradients + experts.gradients
        optimizer += dense.optimizer + experts.optimizer
        expert_weights += experts.weights
        expert_gradients += experts.gradients
    return StateBytes(weights, gradients, optimizer, expert_weights, expert_gradients)


def buckets_per_chunk(shape: ModelShape, tp: int, pp: int, vpp: int, dp: int, distributed_optimizer: bool,
                      bucket_size: int | None, pp_rank: int = 0) -> list[int]:
    """The number of DDP gradient buckets of each model chunk on pipeline rank `pp_rank`."""
    return [
        len(buffer_layout(chunk_param_numels(shape, tp, pp, vpp, pp_rank, chunk), dp, distributed_optimizer,
                          chunk_bucket_size(bucket_size, pp_rank, chunk),
                          shared_embedding_indices(shape, pp, vpp, pp_rank, chunk))[1])
        for chunk in range(vpp)
    ]


def fp8_weight_copies_bytes(shape: ModelShape, tp: int, pp: int, ep: int = 1, etp: int | None = None) -> int:
    """With FP8, Transformer Engine caches each layer GEMM's weight cast to FP8 and its transpose (1 byte
    each per element) between micro-batches; the output layer (and a MoE router) stays BF16. Per pipeline rank
    (the first's layers)."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    qkv, proj = (shape.query_width + 2 * shape.kv_width) * h, shape.query_width * h
    total = 0
    for layer in range(shape.num_layers // pp):
        if shape.is_moe_layer(layer):
            mlp = 3 * h * (shape.moe_shared_expert_ffn_hidden_size or 0) // tp + sum(expert_param_numels(
                shape, ep, etp or tp))
        else:
            mlp = 3 * h * f // tp  # fc1 ([gate; up]), fc2
        total += (qkv + proj) // tp + mlp  # QKV, projection
    return 2 * total


# --------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Kernels:
    """Which implementation of a layer runs, as far as it changes what is saved for backward."""

    # Transformer Engine fuses each RMSNorm into the following linear (TELayerNormColumnParallelLinear):
    # the norm keeps its input and the rstd, and the linear its normalised input.
    te_norm_linear: bool
    # megatron-core's bias_swiglu kernel (bias_activation_fusion, on GPU) keeps only the fc1 output.
    fused_swiglu: bool
    # CUDA's fused dropout keeps a bool mask; the CPU one keeps its scaled noise in the activation dtype.
    bool_dropout_mask: bool
    # Context parallelism in the project's attention (local spec) all-gathers K and V over the CP group and the
    # attention core keeps the gathered, whole-sequence K and V for backward; Transformer Engine's ring passes K/V
    # chunks from rank to rank and keeps only the local chunk (it passes them round again in backward).
    cp_gathers_kv: bool = False

    def dropout_mask_bytes(self, act_bytes: int) -> int:
        return 1 if self.bool_dropout_mask else act_bytes


LOCAL_CPU = Kernels(te_norm_linear=False, fused_swiglu=False, bool_dropout_mask=False,
                    cp_gathers_kv=True)  # the local spec on CPU ranks


def gpu_kernels(model: ModelConfig) -> Kernels:
    """What a GPU run of this model uses: fused SwiGLU and dropout always, Transformer Engine's fused
    norms unless the config asks for the local spec (`auto` assumes TE is installed on the cluster)."""
    te = model.transformer_impl != "local"
    return Kernels(te_norm_linear=te, fused_swiglu=True, bool_dropout_mask=True, cp_gathers_kv=not te)


def layer_activation_terms(
    shape: ModelShape,
    seq: int,
    micro_batch: int,
    tp: int,
    sp: bool,
    recompute: str,
    act_bytes: int,
    kernels: Kernels,
    hidden_dropout: bool = False,
    cp: int = 1,
    moe: bool = False,
    etp: int | None = None,
) -> dict[str, int]:
    """Bytes one decoder layer keeps for backward after the forward of one micro-batch, by term.

    Korthikanti et al. count, per layer, s*b*h*(34 + 5*a*s/h) bytes at 16 bits without parallelism
    (a = heads): attention 11sbh + 5as^2b (QKV input 2sbh, Q and K 4sbh, V 2sbh, projection input 2sbh,
    dropout mask sbh, softmax output 2as^2b, its dropout mask as^2b and output 2as^2b), MLP 19sbh (fc1
    input 2sbh, GeLU input 8sbh, fc2 input 8sbh, dropout mask sbh), LayerNorms 4sbh. TP divides the
    attention core and MLP terms by t, sequence parallelism the rest; selective recomputation drops the
    5as^2b term; full recomputation keeps only each layer's input, 2sbh (2sbh/t with SP).

    This trainer's layer differs, and the terms below count what it really keeps (s tokens per sequence,
    b sequences, bytes per activation element `act_bytes`; "sharded" terms are divided by t under SP):

    - attention core: flash attention (SDPA's flash kernel on CPU and GPU, TE's on GPU) keeps Q, K, V,
      its output and the fp32 softmax log-sum-exp (4 bytes per head and token), never an s x s matrix,
      so there is no 5as^2b term. With multi-head attention V is a view of the fused QKV output, which
      therefore stays whole (q + 2kv features, q = heads x head_dim, kv = KV heads x head_dim); rotary
      embedding makes new Q and K (q + kv); the output is also the projection's input (q). With grouped-query
      attention the core repeats K and V over the query heads and keeps those copies (q each) instead of
      the QKV output and the rotated K.
    - query/key norms (`qk_layernorm`): like the RMSNorms below, per head over head_dim, on Q and K.
    - RoPE: cos and sin are recomputed in the activation dtype for Q and for K in every layer: 4*s*d.
    - dropout: Qwen pretrains without; with hidden dropout each of the two residual dropouts keeps a mask
      (sharded; `Kernels.dropout_mask_bytes` per element). Attention dropout inside flash attention keeps
      only its RNG state.
    - RMSNorm, local spec (sharded): x.float() (4h bytes, fp32 whatever the dtype), the normalised x before
      the weight (h*act_bytes) and the fp32 rsqrt (4); TE's fused norm keeps its input and rstd instead.
    - linear inputs: QKV and fc1 keep their (sharded) inputs, fc2 its input (F/t).
    - SwiGLU (F = per-branch width): the fc1 output (2F/t) plus, without the fused kernel, the SiLU output
      and the up branch (F/t each).
    - selective recomputation (megatron-core's "core_attn"): recomputes the attention core, which then
      keeps only its inputs (and a 4-byte mask-type tensor passed through the checkpoint); with flash
      attention this saves just the log-sum-exp.
    - full recomputation: the layer's (sharded) input.
    - context parallelism (`cp`): a rank holds seq / cp tokens of each sequence, so every per-token term is
      divided by CP. With `Kernels.cp_gathers_kv` (the local spec) the attention core keeps the all-gathered
      K and V of the whole sequence (cp times the rank's own; repeated over the query heads with grouped-query
      attention), and V is no longer a view of the QKV output; Transformer Engine's ring keeps the local ones.
    - a MoE layer (`moe`): the dense MLP's terms are replaced by the router's fp32 logits and probabilities
      (2 x 4 bytes per expert and token), the shared expert's (a dense MLP of its width) and the routed
      experts': each token of the rank's (sharded) share is dispatched to top-k experts and, with expert
      tensor parallelism `etp` (default TP), gathered over the ETP group, so the local experts see
      sharded x etp x top-k tokens (an even routing), each keeping its fc1 input (h), fc1 output (2F/etp),
      fc2 input (F/etp) and, without the fused kernel, SiLU output and up half; plus the routing probability
      of each. Read from megatron-core's MoE layer, not measured on CPU ranks.
    """
    h, f = shape.hidden_size, shape.ffn_hidden_size
    q, kv = shape.query_width // tp, shape.kv_width // tp  # query and key (= value) features on a rank
    heads, kv_heads = shape.num_attention_heads // tp, shape.kv_heads // tp
    gqa = kv_heads < heads
    tokens = seq // cp * micro_batch
    sharded = (seq // cp // tp if sp else seq // cp) * micro_batch
    # Keys and values the attention core keeps: the whole sequence's after the local spec's CP all-gather.
    gathered = cp > 1 and kernels.cp_gathers_kv
    kv_tokens = seq * micro_batch if gathered else tokens
    if recompute == "full":
        return {"checkpointed layer input": sharded * h * act_bytes}
    norm_per_token = h * act_bytes + 4 if kernels.te_norm_linear else 4 * h + h * act_bytes + 4
    # The attention core repeats each key/value head over its query heads (grouped-query attention) and
    # flash attention keeps those repeated copies; recomputed (selective), it keeps its inputs instead.
    repeated_kv = gqa and recompute != "selective"
    # The fused QKV output stays whole while a view of it is kept: V (multi-head, or the recomputed core's
    # input), or in fp32 the key norm's input (x.float() of an fp32 tensor is the tensor itself).
    local_qk_norms = shape.qk_layernorm and not kernels.te_norm_linear
    qkv_kept = not repeated_kv or (local_qk_norms and act_bytes == 4)
    if gathered:
        # The gathered V is a new tensor; the QKV output stays only as the key norm's fp32 input.
        qkv_kept = local_qk_norms and act_bytes == 4
    kv_kept = q if repeated_kv else kv
    terms = {
        "RMSNorms": 2 * sharded * norm_per_token,
        "QKV and fc1 inputs": 2 * sharded * h * act_bytes,
        "QKV output (V)": tokens * (q + 2 * kv) * act_bytes if qkv_kept else 0,
        "rotated Q and K": (tokens * q + kv_tokens * kv_kept) * act_bytes,
        "repeated V": kv_tokens * q * act_bytes if repeated_kv else 0,
        "gathered V": kv_tokens * kv * act_bytes if gathered and not repeated_kv else 0,
        "attention output": tokens * q * act_bytes,
        "RoPE cos/sin": 4 * (seq // cp) * shape.head_dim * act_bytes,
    }
    swiglu_bytes = act_bytes * (2 if kernels.fused_swiglu else 4)
    if moe:
        shared = shape.moe_shared_expert_ffn_hidden_size or 0
        routed = sharded * (etp or tp) * shape.moe_router_topk
        expert_f = shape.moe_ffn_hidden_size // (etp or tp)
        terms.update({
            "router logits and probabilities": 2 * sharded * shape.num_experts * 4,
            "shared expert": tokens * shared // tp * (swiglu_bytes + act_bytes),
            "routed expert inputs": routed * (h * act_bytes + 4),
            "routed experts": routed * expert_f * (swiglu_bytes + act_bytes),
        })
    else:
        terms.update({"SwiGLU": tokens * f // tp * swiglu_bytes, "fc2 input": tokens * f // tp * act_bytes})
    if shape.qk_layernorm and kernels.te_norm_linear:
        # Transformer Engine's RMSNorm (the TE spec's q/k norms) keeps a contiguous copy of its input and the rstd
        # of every head (read from its code, not measured here).
        terms["query and key RMSNorms"] = tokens * ((q + kv) * act_bytes + 4 * (heads + kv_heads))
    elif shape.qk_layernorm:
        # Qwen's RMSNorm over head_dim keeps its fp32 input, a new copy unless it already is one (in fp32 the
        # key is a view of the kept QKV output; so is the query, unless a rank's query heads come from several
        # groups, whose [q; k; v] rows megatron-core's reshape copies out), the normalised x and the rsqrt of
        # every head.
        query_copied = gqa and kv_heads > 1
        q_input = 4 * q if act_bytes != 4 or query_copied else 0
        k_input = 4 * kv if act_bytes != 4 else 0
        terms["query and key RMSNorms"] = tokens * (q_input + k_input + (q + kv) * act_bytes
                                                   + 4 * (heads + kv_heads))
    if recompute == "selective":
        terms["checkpointed mask type"] = 4
    else:
        terms["attention log-sum-exp"] = tokens * heads * 4
    if hidden_dropout:
        terms["dropout masks"] = 2 * sharded * h * kernels.dropout_mask_bytes(act_bytes)
    return terms


def layer_activation_bytes(
    shape: ModelShape,
    seq: int,
    micro_batch: int,
    tp: int,
    sp: bool,
    recompute: str,
    act_bytes: int,
    kernels: Kernels,
    hidden_dropout: bool = False,
    cp: int = 1,
    moe: bool = False,
    etp: int | None = None,
) -> int:
    """Sum of `layer_activation_terms`."""
    terms = layer_activation_terms(shape, seq, micro_batch, tp, sp, recompute, act_bytes, kernels, hidden_dropout,
                                   cp, moe, etp)
    return sum(terms.values())


def embedding_activation_bytes(
    shape: ModelShape,
    seq: int,
    micro_batch: int,
    tp: int,
    sp: bool,
    act_bytes: int,
    kernels: Kernels,
    hidden_dropout: bool = False,
) -> int:
    """The embedding lookup keeps its int64 token ids, and under TP a bool mask of the ids outside the
    rank's vocabulary shard; with hidden dropout the embedding dropout keeps a mask of its (sharded) output."""
    tokens = seq * micro_batch
    out_of_shard = tokens if tp > 1 else 0
    dropout = (seq // tp if sp else seq) * micro_batch * shape.hidden_size * kernels.dropout_mask_bytes(act_bytes)
    return tokens * 8 + out_of_shard + (dropout if hidden_dropout else 0)


def head_activation_bytes(
    shape: ModelShape, seq: int, micro_batch: int, tp: int, sp: bool, act_bytes: int, kernels: Kernels
) -> int:
    """Final RMSNorm, output layer and vocabulary-parallel cross entropy of one micro-batch.

    The norm and the output layer's input are sharded under SP like a layer's (the final norm is a
    separate TE norm on GPU). The cross entropy keeps the fp32 softmax over the rank's vocabulary shard
    (Korthikanti's 4sbv/t) plus a bool mask and int64 targets per token.
    """
    h = shape.hidden_size
    sharded = (seq // tp if sp else seq) * micro_batch
    tokens = seq * micro_batch
    norm = sharded * (h * act_bytes + 4 if kernels.te_norm_linear else 4 * h + h * act_bytes + 4)
    return norm + sharded * h * act_bytes + tokens * (4 * shape.vocab_per_rank(tp) + 1 + 8)


def rope_frequencies_bytes(shape: ModelShape, seq: int) -> int:
    """Full recomputation checkpoints the fp32 rotary frequencies once per model chunk and micro-batch."""
    return seq * shape.head_dim * 4


def microbatch_activation_bytes(
    shape: ModelShape,
    seq: int,
    micro_batch: int,
    tp: int,
    sp: bool,
    recompute: str,
    act_bytes: int,
    kernels: Kernels,
    recompute_num_layers: int = 1,
    hidden_dropout: bool = False,
    cp: int = 1,
    etp: int | None = None,
) -> int:
    """Activations one micro-batch leaves saved after the forward of the whole network on one pipeline
    stage (what `torch.autograd.graph.saved_tensors_hooks` sees during a PP=1 forward), on one rank of a
    context-parallel group of `cp` (each holding seq / cp tokens of every sequence)."""
    return _layers_activation_bytes(shape, range(shape.num_layers), seq, micro_batch, tp, sp, recompute, act_bytes,
                                    kernels, recompute_num_layers, hidden_dropout, cp, etp)[0] + (
        embedding_activation_bytes(shape, seq // cp, micro_batch, tp, sp, act_bytes, kernels, hidden_dropout)
        + head_activation_bytes(shape, seq // cp, micro_batch, tp, sp, act_bytes, kernels)
        + context_parallel_mask_bytes(seq, cp, act_bytes, kernels))


def context_parallel_mask_bytes(seq: int, cp: int, act_bytes: int, kernels: Kernels) -> int:
    """The local spec's context-parallel attention keeps one additive mask of its queries over the whole sequence
    ([seq / cp, seq] in the activation dtype), built once per micro-batch and shared by every layer."""
    return (seq // cp) * seq * act_bytes if cp > 1 and kernels.cp_gathers_kv else 0


def _layers_activation_bytes(shape: ModelShape, layers: range, seq: int, micro_batch: int, tp: int, sp: bool,
                             recompute: str, act_bytes: int, kernels: Kernels, recompute_num_layers: int,
                             hidden_dropout: bool, cp: int, etp: int | None) -> tuple[int, int]:
    """What `layers` keep after one micro-batch's forward, and (full recomputation) the most that the
    backward of one checkpointed group rebuilds at once."""
    @functools.lru_cache(maxsize=None)
    def kind(moe: bool, how: str, dropout: bool) -> int:
        return layer_activation_bytes(shape, seq, micro_batch, tp, sp, how, act_bytes, kernels, dropout, cp, moe, etp)

    def layer(i: int, how: str, dropout: bool = hidden_dropout) -> int:
        return kind(shape.is_moe_layer(i), how, dropout)

    if recompute != "full":
        return sum(layer(i, recompute) for i in layers), 0
    groups = [layers[g:g + recompute_num_layers] for g in range(0, len(layers), recompute_num_layers)]
    kept = sum(layer(group[0], "full", False) for group in groups) + rope_frequencies_bytes(shape, seq // cp)
    return kept, max(sum(layer(i, "none") for i in group) for group in groups)


def microbatches_in_flight(pp: int, vpp: int, num_microbatches: int, pp_rank: int) -> int:
    """Chunk-micro-batches whose activations pipeline rank `pp_rank` holds at its peak under megatron-core's
    schedules: the warm-up forwards plus the one in 1F1B's steady state, capped by the total.

    1F1B: pp - pp_rank - 1 warm-up forwards, so the first stage holds pp micro-batches of pp/pp = all its
    layers. Interleaved 1F1B with vpp chunks: 2*(pp - pp_rank - 1) + (vpp - 1)*pp warm-up forwards of one
    chunk each, i.e. the first stage holds (1 + (pp - 1)/(pp*vpp)) times its layers' activations, as
    Korthikanti et al. state. No pipelining: one micro-batch at a time.
    """
    if pp == 1:
        return 1
    if vpp == 1:
        warmup = pp - pp_rank - 1
    else:
        warmup = 2 * (pp - pp_rank - 1) + (vpp - 1) * pp
    return min(warmup + 1, num_microbatches * vpp)


def stage_activation_bytes(
    shape: ModelShape,
    seq: int,
    micro_batch: int,
    tp: int,
    sp: bool,
    pp: int,
    vpp: int,
    num_microbatches: int,
    recompute: str,
    recompute_num_layers: int,
    act_bytes: int,
    kernels: Kernels,
    pp_rank: int,
    hidden_dropout: bool = False,
    cp: int = 1,
    etp: int | None = None,
) -> int:
    """Peak activation bytes on pipeline rank `pp_rank` during a training step (a rank of a context-parallel
    group of `cp`, which holds seq / cp tokens of each sequence).

    Micro-batches in flight (`microbatches_in_flight`) times one chunk's saved activations; the
    embedding's token ids on the first stage; the head (norm, output layer, cross entropy) of a single
    micro-batch on the last stage, which runs each backward right after its forward; with pipelining
    each in-flight chunk also keeps its output tensor until its backward; with full recomputation the
    backward of one checkpointed group rebuilds that group's full activations.
    """
    in_flight = microbatches_in_flight(pp, vpp, num_microbatches, pp_rank)
    per_chunk, transient = _layers_activation_bytes(shape, chunk_layers(shape, pp, vpp, pp_rank, 0), seq, micro_batch,
                                                    tp, sp, recompute, act_bytes, kernels, recompute_num_layers,
                                                    hidden_dropout, cp, etp)
    local = seq // cp
    if pp > 1:
        per_chunk += (local // tp if sp else local) * micro_batch * shape.hidden_size * act_bytes
    total = in_flight * per_chunk + transient
    if pp_rank == 0:
        total += in_flight * embedding_activation_bytes(shape, local, micro_batch, tp, sp, act_bytes, kernels,
                                                        hidden_dropout)
    if pp_rank == pp - 1:
        total += head_activation_bytes(shape, local, micro_batch, tp, sp, act_bytes, kernels)
    return total
