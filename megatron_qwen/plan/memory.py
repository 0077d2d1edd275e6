"""What one rank allocates for training: weights, gradients, optimizer state and saved activations.

Model state follows megatron-core 0.16.1 as the trainer sets it up (`wrap_ddp`, `build_optimizer`):

- weights: the rank's parameters in the model dtype. With the distributed optimizer megatron-core's DDP
  moves them into one contiguous, padded parameter buffer per model chunk.
- gradients: DDP's gradient buffer per model chunk, fp32 (`grad_reduce_in_fp32=True`), padded likewise.
- optimizer: Adam's two moments in fp32, the fp32 main copy of bf16 weights, and the step counter
  (`torch.optim.AdamW` keeps a float32 tensor per parameter; TE/apex FusedAdam one per group). With the
  distributed optimizer each DP rank keeps these only for its contiguous share of the gradient buffer.

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", section 4, term by term, for the layers this trainer builds (see `layer_activation_terms`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_qwen.config import ModelConfig, padded_vocab_size

# megatron-core's _ParamAndGradBuffer with the distributed optimizer: every parameter starts on a
# 64-element boundary and the buffer length is a multiple of lcm(dp, 128), so it splits evenly over DP.
PARAM_ALIGN = 64
BUFFER_ALIGN = 128


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Qwen network (v1, 1.5, 2, 2.5, 3 dense) that memory and time depend on."""

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

    @classmethod
    def from_config(cls, model: ModelConfig) -> "ModelShape":
        return cls(model.num_layers, model.hidden_size, model.num_attention_heads, model.ffn_hidden_size,
                   model.padded_vocab_size, model.num_query_groups, model.kv_channels, model.qkv_bias,
                   model.qk_layernorm, model.tie_word_embeddings)

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
        embeddings = (1 if self.tie_word_embeddings else 2) * self.vocab_size * self.hidden_size
        return self.num_layers * sum(layer_param_numels(self, 1)) + embeddings + self.hidden_size

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


# --------------------------------------------------------------------------- model state


def layer_param_numels(shape: ModelShape, tp: int) -> tuple[int, ...]:
    """Element counts of one decoder layer's parameters on a TP rank, in megatron-core's registration
    order: input RMSNorm, attention output projection, fused QKV weight ([q; k; v] rows of every query
    group) and its bias (when `qkv_bias`), the query and key RMSNorms over head_dim (`qk_layernorm`, not
    split by TP), pre-MLP RMSNorm, fc1 ([gate; up]) and fc2."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    qkv = shape.query_width + 2 * shape.kv_width
    numels = [h, h * shape.query_width // tp, qkv * h // tp]
    if shape.qkv_bias:
        numels.append(qkv // tp)
    if shape.qk_layernorm:
        numels += [shape.head_dim, shape.head_dim]
    return tuple(numels + [h, 2 * f * h // tp, f * h // tp])


def chunk_param_numels(shape: ModelShape, tp: int, pp: int, vpp: int, pp_rank: int, chunk: int) -> list[int]:
    """Element counts of the parameters of model chunk `chunk` (virtual stage) on pipeline rank
    `pp_rank`, in registration order: the embedding on the very first chunk, its layers, and the final
    RMSNorm and output layer on the very last. A tied output layer is the embedding itself when one
    stage holds both (PP = 1); with PP > 1 the last stage holds a copy (megatron-core's
    share_embeddings_and_output_weights)."""
    h = shape.hidden_size
    first = pp_rank == 0 and chunk == 0
    last = pp_rank == pp - 1 and chunk == vpp - 1
    embedding = shape.vocab_per_rank(tp) * h
    numels = [embedding] if first else []
    numels += list(layer_param_numels(shape, tp)) * (shape.num_layers // (pp * vpp))
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
    owned = [0] * len(ranges)
    for lo, hi in buckets:
        share = (hi - lo) // dp
        mine = (lo + dp_rank * share, lo + (dp_rank + 1) * share)
        for i, (start, end) in enumerate(ranges):
            owned[i] += max(0, min(end, mine[1]) - max(start, mine[0]))
    return owned


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
) -> StateBytes:
    """Weights, gradients and optimizer state that megatron-core allocates on the rank at pipeline
    position `pp_rank` and data-parallel position `dp_rank`, summed over its `vpp` model chunks, with
    gradient buckets of `bucket_size` elements (`ddp_bucket_size`)."""
    weights = gradients = optimizer = 0
    for chunk in range(vpp):
        numels = chunk_param_numels(shape, tp, pp, vpp, pp_rank, chunk)
        ranges, buckets = buffer_layout(numels, dp, distributed_optimizer,
                                        chunk_bucket_size(bucket_size, pp_rank, chunk),
                                        shared_embedding_indices(shape, pp, vpp, pp_rank, chunk))
        buffer_numel = buckets[-1][1]
        gradients += buffer_numel * prec.grad_bytes
        if distributed_optimizer:
            weights += buffer_numel * prec.param_bytes  # the parameters live in the padded buffer
            owned = [n for n in owned_numels(ranges, buckets, dp, dp_rank) if n]
        else:
            weights += sum(numels) * prec.param_bytes
            owned = numels
        optimizer += sum(owned) * (prec.adam_bytes + prec.main_param_bytes) + len(owned) * prec.step_bytes
    return StateBytes(weights, gradients, optimizer)


def buckets_per_chunk(shape: ModelShape, tp: int, pp: int, vpp: int, dp: int, distributed_optimizer: bool,
                      bucket_size: int | None, pp_rank: int = 0) -> list[int]:
    """The number of DDP gradient buckets of each model chunk on pipeline rank `pp_rank`."""
    return [
        len(buffer_layout(chunk_param_numels(shape, tp, pp, vpp, pp_rank, chunk), dp, distributed_optimizer,
                          chunk_bucket_size(bucket_size, pp_rank, chunk),
                          shared_embedding_indices(shape, pp, vpp, pp_rank, chunk))[1])
        for chunk in range(vpp)
    ]


def fp8_weight_copies_bytes(shape: ModelShape, tp: int, pp: int) -> int:
    """With FP8, Transformer Engine caches each layer GEMM's weight cast to FP8 and its transpose (1 byte
    each per element) between micro-batches; the output layer stays BF16. Per pipeline rank."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    qkv, proj = (shape.query_width + 2 * shape.kv_width) * h, shape.query_width * h
    per_layer = (qkv + proj + 3 * h * f) // tp  # QKV, projection, fc1 ([gate; up]), fc2
    return 2 * per_layer * (shape.num_layers // pp)


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

    def dropout_mask_bytes(self, act_bytes: int) -> int:
        return 1 if self.bool_dropout_mask else act_bytes


LOCAL_CPU = Kernels(te_norm_linear=False, fused_swiglu=False, bool_dropout_mask=False)  # the local spec on CPU ranks


def gpu_kernels(model: ModelConfig) -> Kernels:
    """What a GPU run of this model uses: fused SwiGLU and dropout always, Transformer Engine's fused
    norms unless the config asks for the local spec (`auto` assumes TE is installed on the cluster)."""
    return Kernels(te_norm_linear=model.transformer_impl != "local", fused_swiglu=True, bool_dropout_mask=True)


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
    """
    h, f = shape.hidden_size, shape.ffn_hidden_size
    q, kv = shape.query_width // tp, shape.kv_width // tp  # query and key (= value) features on a rank
    heads, kv_heads = shape.num_attention_heads // tp, shape.kv_heads // tp
    gqa = kv_heads < heads
    tokens = seq * micro_batch
    sharded = (seq // tp if sp else seq) * micro_batch
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
    terms = {
        "RMSNorms": 2 * sharded * norm_per_token,
        "QKV and fc1 inputs": 2 * sharded * h * act_bytes,
        "QKV output (V)": tokens * (q + 2 * kv) * act_bytes if qkv_kept else 0,
        "rotated Q and K": tokens * (q + (q if repeated_kv else kv)) * act_bytes,
        "repeated V": tokens * q * act_bytes if repeated_kv else 0,
        "attention output": tokens * q * act_bytes,
        "RoPE cos/sin": 4 * seq * shape.head_dim * act_bytes,
        "SwiGLU": tokens * f // tp * act_bytes * (2 if kernels.fused_swiglu else 4),
        "fc2 input": tokens * f // tp * act_bytes,
    }
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
) -> int:
    """Sum of `layer_activation_terms`."""
    terms = layer_activation_terms(shape, seq, micro_batch, tp, sp, recompute, act_bytes, kernels, hidden_dropout)
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
) -> int:
    """Activations one micro-batch leaves saved after the forward of the whole network on one pipeline
    stage (what `torch.autograd.graph.saved_tensors_hooks` sees during a PP=1 forward)."""
    layers = shape.num_layers
    if recompute == "full":
        inputs = math.ceil(layers / recompute_num_layers)
        body = inputs * layer_activation_bytes(shape, seq, micro_batch, tp, sp, "full", act_bytes, kernels)
        body += rope_frequencies_bytes(shape, seq)
    else:
        body = layers * layer_activation_bytes(shape, seq, micro_batch, tp, sp, recompute, act_bytes, kernels,
                                               hidden_dropout)
    embedding = embedding_activation_bytes(shape, seq, micro_batch, tp, sp, act_bytes, kernels, hidden_dropout)
    return embedding + body + head_activation_bytes(shape, seq, micro_batch, tp, sp, act_bytes, kernels)


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
) -> int:
    """Peak activation bytes on pipeline rank `pp_rank` during a training step.

    Micro-batches in flight (`microbatches_in_flight`) times one chunk's saved activations; the
    embedding's token ids on the first stage; the head (norm, output layer, cross entropy) of a single
    micro-batch on the last stage, which runs each backward right after its forward; with pipelining
    each in-flight chunk also keeps its output tensor until its backward; with full recomputation the
    backward of one checkpointed group rebuilds that group's full activations.
    """
    chunk_layers = shape.num_layers // (pp * vpp)
    in_flight = microbatches_in_flight(pp, vpp, num_microbatches, pp_rank)
    if recompute == "full":
        groups = math.ceil(chunk_layers / recompute_num_layers)
        per_chunk = groups * layer_activation_bytes(shape, seq, micro_batch, tp, sp, "full", act_bytes, kernels)
        per_chunk += rope_frequencies_bytes(shape, seq)
        recomputed = min(recompute_num_layers, chunk_layers)
        transient = recomputed * layer_activation_bytes(shape, seq, micro_batch, tp, sp, "none", act_bytes, kernels,
                                                        hidden_dropout)
    else:
        layer = layer_activation_bytes(shape, seq, micro_batch, tp, sp, recompute, act_bytes, kernels, hidden_dropout)
        per_chunk = chunk_layers * layer
        transient = 0
    if pp > 1:
        per_chunk += (seq // tp if sp else seq) * micro_batch * shape.hidden_size * act_bytes
    total = in_flight * per_chunk + transient
    if pp_rank == 0:
        total += in_flight * embedding_activation_bytes(shape, seq, micro_batch, tp, sp, act_bytes, kernels,
                                                        hidden_dropout)
    if pp_rank == pp - 1:
        total += head_activation_bytes(shape, seq, micro_batch, tp, sp, act_bytes, kernels)
    return total
