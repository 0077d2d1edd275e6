"""How long one optimizer step takes at a layout: GEMM compute, memory-bound kernels, TP, CP, EP, PP and DP
communication, pipeline bubble, the optimizer step.

A first-order model in the spirit of Narayanan et al. 2021 (section 3): the pipeline runs at the pace of
its slowest stage (the last one, which also computes the output layer), each micro-batch costs that
stage's GEMMs at the GPU's sustained rate and its memory-bound kernels at the sustained HBM rate, plus its
tensor-, context- and expert-parallel collectives and point-to-point transfers, the bubble adds
(p - 1)/(v * m) of that, the data-parallel reduction follows the last backward (overlapped with it,
bucket by bucket, when the config says so) and the Adam step follows it. Collectives are ring collectives at
the bus bandwidth of the links they cross (`hardware.GPU`). The GPU's two efficiencies are calibrated against
published MFU (docs/planner.md). What it leaves out: kernel launch gaps, and megatron-core's partial overlap of
backward TP collectives with weight-gradient GEMMs (so TP time is an upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_qwen.plan.hardware import GPU
from megatron_qwen.plan.memory import ModelShape

@dataclass(frozen=True)
class StepTime:
    """Seconds of one step, by cause."""

    compute: float
    tp: float
    pp: float
    dp: float
    bubble: float
    cp: float = 0.0  # context-parallel K/V exchange not hidden behind attention
    ep: float = 0.0  # expert-parallel all-to-all and the expert tensor-parallel gather/scatter
    memory: float = 0.0  # memory-bound kernels: norms, activation functions, RoPE, residual adds, cross entropy
    optimizer: float = 0.0  # the Adam step over the rank's share of the parameters

    @property
    def total(self) -> float:
        return (self.compute + self.tp + self.pp + self.dp + self.bubble + self.cp + self.ep + self.memory
                + self.optimizer)


# Bytes the Adam step moves per parameter it updates: reads and writes the fp32 main weight and both moments
# (24), reads the fp32 gradient twice (the gradient norm for clipping, then the update: 8) and writes the bf16
# weight (2).
ADAM_BYTES_PER_PARAMETER = 34
# The cross entropy over a rank's vocabulary shard per token and vocabulary entry: reads the bf16 logits (2),
# reduces the fp32 max and sum over them (8), writes the fp32 softmax (4), and backward reads it (4) and writes
# the bf16 gradient (2).
CROSS_ENTROPY_BYTES = 20


def memory_bound_bytes_per_token(shape: ModelShape, tp: int, sp: bool, act_bytes: int, moe: bool,
                                 etp: int | None = None) -> float:
    """HBM bytes one token's forward moves through one layer's memory-bound kernels on a TP rank (GEMMs and
    flash attention are compute-bound and not counted): the two norms (read and write h each) and two residual
    adds (read 2h, write h), whole on every rank unless SP divides them by t; RoPE on Q and K (read and write
    q + kv); the SwiGLU (read 2F, write F), for a MoE layer that of the shared expert and the top-k routed
    experts plus the dispatcher's permutation of the top-k copies there and back (read and write h each)."""
    h = shape.hidden_size
    norms_and_residuals = (2 * 2 * h + 2 * 3 * h) / (tp if sp else 1)
    rope = 2 * (shape.query_width + shape.kv_width) / tp
    if moe:
        shared = shape.moe_shared_expert_ffn_hidden_size or 0
        topk = shape.moe_router_topk
        mlp = (3 * shared + topk * 3 * shape.moe_ffn_hidden_size + topk * 4 * h) / tp
    else:
        mlp = 3 * shape.ffn_hidden_size / tp
    return (norms_and_residuals + rope + mlp) * act_bytes



def mlp_flops_per_token(shape: ModelShape, moe: bool) -> float:
    """Forward FLOPs per token of one layer's MLP: a dense SwiGLU 6hF; a MoE layer's router 2hE, the top-k
    experts it runs 6hF_e each and the shared expert 6hF_s (its gate 2h) -- activated FLOPs, not all experts'."""
    h = shape.hidden_size
    if not moe:
        return 6 * h * shape.ffn_hidden_size
    shared = shape.moe_shared_expert_ffn_hidden_size or 0
    gate = 2 * h if shape.moe_shared_expert_gate else 0
    return 2 * h * shape.num_experts + shape.moe_router_topk * 6 * h * shape.moe_ffn_hidden_size + 6 * h * shared + gate


def forward_flops_per_token(shape: ModelShape, seq: int) -> tuple[float, float, float]:
    """Forward FLOPs per token (a multiply-add is 2) as (one layer's GEMMs, one layer's attention core,
    the output layer), with q = heads x head_dim and kv = KV heads x head_dim (h and h for multi-head
    attention with head_dim = h / heads): QKV 2h(q + 2kv), projection 2qh, the MLP (`mlp_flops_per_token`,
    averaged over the layers of a MoE model); QK^T and AV over the full s x s 4sq (as Megatron-LM counts model
    FLOPs); output layer 2hV."""
    h = shape.hidden_size
    q, kv = shape.query_width, shape.kv_width
    if shape.moe_layers:
        mlp = sum(mlp_flops_per_token(shape, moe) for moe in shape.moe_layers) / shape.num_layers
    else:
        mlp = mlp_flops_per_token(shape, False)
    return 2 * h * (q + 2 * kv) + 2 * q * h + mlp, 4 * seq * q, 2 * h * shape.vocab_size


def model_flops_per_step(shape: ModelShape, seq: int, global_batch: int) -> float:
    """Model FLOPs of a step, forward + backward (3x forward), without recomputation: the numerator of MFU."""
    gemm, attention, output = forward_flops_per_token(shape, seq)
    return 3 * (shape.num_layers * (gemm + attention) + output) * seq * global_batch


def ring_seconds(nbytes: float, group: int, bandwidth: float, all_reduce: bool = False) -> float:
    """A ring all-gather or reduce-scatter of an `nbytes` tensor over `group` ranks moves (group-1)/group of
    it through each link; an all-reduce is both, twice that."""
    if group == 1:
        return 0.0
    return (2 if all_reduce else 1) * (group - 1) / group * nbytes / bandwidth


def step_time(
    shape: ModelShape,
    seq: int,
    global_batch: int,
    micro_batch: int,
    tp: int,
    pp: int,
    vpp: int,
    dp: int,
    sp: bool,
    recompute: str,
    distributed_optimizer: bool,
    gradient_bytes: int,
    weight_bytes: int,
    gpu: GPU,
    gpus_per_node: int,
    fp8: bool = False,
    achievable_flops: float | None = None,
    act_bytes: int = 2,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
    num_buckets: int = 1,
    cp: int = 1,
    cp_gathers_kv: bool = False,
    ep: int = 1,
    etp: int | None = None,
    expert_gradient_bytes: int = 0,
    expert_weight_bytes: int = 0,
    optimizer_parameters: int = 0,
    tp_comm_overlap: bool = False,
) -> StepTime:
    """Predicted step time of a layout.

    compute: the slowest stage's FLOPs per micro-batch (forward, backward = 2x forward, plus the forward
    of the layers with full recomputation or of the attention core with selective), divided over TP and CP
    (a CP rank holds seq / cp tokens; causal load balancing gives each the same attention work), at
    the GPU's achievable rate (`achievable_flops` overrides the table; FP8 runs the layer GEMMs at the FP8
    rate, attention and the output layer stay BF16). Causal flash attention computes half of the s x s
    products, so half of the model-FLOPs attention term is timed. A MoE layer counts the FLOPs of the
    experts each token is routed to (an even routing).
    tp: per layer and micro-batch 2 all-reduces forward and 2 backward of the (s/cp, b, h) activations (under
    SP the same volume as all-gathers and reduce-scatters), 2 more forward with full recomputation; over
    NVLink when the TP group fits in a node. A MoE layer's routed experts move their tokens in `ep` instead
    (its shared expert stays here).
    cp: per layer and micro-batch the K/V exchange of context parallelism. With Transformer Engine
    (`cp_gathers_kv` false) a ring of cp - 1 steps, each sending the rank's K/V chunk to the next rank while
    attention runs on the chunk received: only what outlasts that step's attention counts; backward sends K/V
    and their gradients (twice the bytes) against twice the attention work. In the local spec
    (`cp_gathers_kv`) an all-gather of K and V forward and a reduce-scatter of their gradients backward,
    not overlapped. A recomputed forward (selective or full) exchanges again. Over NVLink when TP x CP fits a node.
    ep: per MoE layer and micro-batch the token dispatcher's all-to-all over EP (dispatch and combine forward,
    their gradients backward, again with full recomputation) of top-k copies of the rank's tokens, (ep-1)/ep
    of which leave the rank, and with expert tensor parallelism (`etp`, default TP) the all-gather and
    reduce-scatter of the routed tokens over the ETP group; over NVLink when ETP x EP fits a node.
    pp: per micro-batch and model chunk one activation sent forward and one gradient backward ((s/(cp t), b, h)
    under SP); over the network when the job spans nodes.
    bubble: (p - 1)/(v * m) of the pipeline's busy time, m = micro-batches per step.
    dp: the gradient all-reduce of the fp32 gradient buffer (`gradient_bytes` per rank) over the DP x CP
    group, or with the distributed optimizer its reduce-scatter plus the all-gather of the weights
    (`weight_bytes`); a MoE model's expert buffer (`expert_gradient_bytes`, `expert_weight_bytes`) likewise
    over the expert data-parallel group world / (ETP x EP x PP); over NVLink when the group fits in a node.
    The part on the critical path: all of it without overlap.
    memory: the memory-bound kernels (`memory_bound_bytes_per_token`) of the last stage's layers, backward
    moving twice the forward's bytes (a recomputed forward once more), and its cross entropy
    (`CROSS_ENTROPY_BYTES` per vocabulary entry of the rank's shard), at the GPU's sustained HBM rate
    (`GPU.achievable_memory_bandwidth`; none when the GPU gives no bandwidth).
    optimizer: the Adam step over the `optimizer_parameters` this rank updates (its share with the distributed
    optimizer), `ADAM_BYTES_PER_PARAMETER` each, at the same rate, after the gradients are reduced.
    With `tp_comm_overlap` (Transformer Engine's userbuffers, Megatron-LM's --tp-comm-overlap) the TP collectives
    run under the layer GEMMs: only what outlasts those counts.
    With `overlap_grad_reduce` megatron-core reduces each of the `num_buckets` buckets as soon as the last
    micro-batch's backward has produced its gradients, so only what outlasts that backward is exposed, and
    at least the last bucket (the first layers' gradients come last). With `overlap_param_gather` (the
    distributed optimizer) the weights are gathered bucket by bucket during the next step's first forward,
    exposing at least the first bucket likewise.
    """
    etp = etp or tp
    num_microbatches = global_batch // (micro_batch * dp)
    tokens = seq // cp * micro_batch  # one CP rank's tokens of the micro-batch
    layers = shape.num_layers // pp
    moe_layers = sum(shape.is_moe_layer(i) for i in range(shape.num_layers - layers, shape.num_layers))
    gemm, attention, output = forward_flops_per_token(shape, seq)
    timed_attention = attention / 2
    recomputed_gemm = gemm if recompute == "full" else 0.0
    recomputed_attention = timed_attention if recompute in ("full", "selective") else 0.0
    layer_gemm = (3 * gemm + recomputed_gemm) * layers * tokens / tp
    layer_attention = (3 * timed_attention + recomputed_attention) * layers * tokens / tp
    bf16_rate = achievable_flops or gpu.achievable_bf16_flops
    gemm_rate = bf16_rate * (gpu.fp8_flops / gpu.bf16_flops) if fp8 and gpu.fp8_flops else bf16_rate
    # The last stage also runs the output layer; it paces the pipeline.
    compute_mb = layer_gemm / gemm_rate + layer_attention / bf16_rate + 3 * output * tokens / tp / bf16_rate
    forward_mb = (gemm * layers * tokens / tp / gemm_rate + timed_attention * layers * tokens / tp / bf16_rate
                  + output * tokens / tp / bf16_rate)
    backward_mb = compute_mb - forward_mb  # with the recomputed forward, which runs during backward

    intra, inter = gpu.intra_node_bandwidth, gpu.inter_node_bandwidth

    def bandwidth(span: int) -> float:
        """Links of a group whose ranks lie within `span` consecutive ranks."""
        return intra if span <= gpus_per_node else inter

    activation = tokens * shape.hidden_size * act_bytes
    forwards = 2 if recompute == "full" else 1  # full recomputation runs each layer's forward again
    # Ring passes of the activation per layer: each all-reduce counts two; half for attention, half for the MLP.
    attention_passes = 2 * (1 + forwards)
    mlp_passes = [attention_passes if not moe or shape.moe_shared_expert_ffn_hidden_size else 0
                  for moe in (True, False)]
    tp_passes = layers * attention_passes + moe_layers * mlp_passes[0] + (layers - moe_layers) * mlp_passes[1]
    tp_mb = tp_passes * ring_seconds(activation, tp, bandwidth(tp))

    kv_bytes = tokens * 2 * shape.kv_width // tp * act_bytes  # the rank's K and V
    cp_forwards = forwards + (1 if recompute == "selective" else 0)
    if cp == 1:
        cp_layer = 0.0
    elif cp_gathers_kv:
        exchange = ring_seconds(kv_bytes * cp, cp, bandwidth(tp * cp))
        cp_layer = (cp_forwards + 1) * exchange
    else:
        send = kv_bytes / bandwidth(tp * cp)
        step_attention = timed_attention * tokens / tp / bf16_rate / cp
        cp_layer = (cp - 1) * (cp_forwards * max(0.0, send - step_attention) + max(0.0, 2 * send - 2 * step_attention))
    cp_mb = layers * cp_layer

    routed = (tokens // tp if sp else tokens) * shape.moe_router_topk * shape.hidden_size * act_bytes
    ep_layer = (1 + forwards) * (2 * (ep - 1) / ep * routed / bandwidth(etp * ep)
                                 + 2 * ring_seconds(routed * etp, etp, bandwidth(etp))) if moe_layers else 0.0
    ep_mb = moe_layers * ep_layer

    if tp_comm_overlap:
        tp_mb = max(0.0, tp_mb - layer_gemm / gemm_rate)

    memory_mb = optimizer_time = 0.0
    memory_rate = gpu.achievable_memory_bandwidth
    if memory_rate:
        last = range(shape.num_layers - layers, shape.num_layers)
        layer_bytes = sum(memory_bound_bytes_per_token(shape, tp, sp, act_bytes, shape.is_moe_layer(i), etp)
                          for i in last)
        passes = 3 + (1 if recompute == "full" else 0)  # forward, backward (twice the bytes), recomputed forward
        head = CROSS_ENTROPY_BYTES * shape.vocab_per_rank(tp)
        memory_mb = tokens * (passes * layer_bytes + head) / memory_rate
        forward_mb += tokens * layer_bytes / memory_rate
        backward_mb += memory_mb - tokens * layer_bytes / memory_rate
        optimizer_time = optimizer_parameters * ADAM_BYTES_PER_PARAMETER / memory_rate

    world = tp * cp * pp * dp
    pp_mb = 2 * vpp * (activation / (tp if sp else 1)) / bandwidth(world) if pp > 1 else 0.0

    per_mb = compute_mb + tp_mb + pp_mb + cp_mb + ep_mb + memory_mb
    expert_dp = world // (etp * ep * pp)
    reduce = ring_seconds(gradient_bytes, dp * cp, bandwidth(tp * cp * dp), all_reduce=not distributed_optimizer)
    reduce += ring_seconds(expert_gradient_bytes, expert_dp, bandwidth(etp * ep * expert_dp),
                           all_reduce=not distributed_optimizer)
    gather = 0.0
    if distributed_optimizer:
        gather = (ring_seconds(weight_bytes, dp * cp, bandwidth(tp * cp * dp))
                  + ring_seconds(expert_weight_bytes, expert_dp, bandwidth(etp * ep * expert_dp)))
    if overlap_grad_reduce:
        reduce = max(reduce / num_buckets, reduce - backward_mb)
    if overlap_param_gather and distributed_optimizer:
        gather = max(gather / num_buckets, gather - forward_mb)
    dp_time = reduce + gather
    return StepTime(
        compute=num_microbatches * compute_mb,
        tp=num_microbatches * tp_mb,
        pp=num_microbatches * pp_mb,
        dp=dp_time,
        bubble=(pp - 1) / vpp * per_mb,
        cp=num_microbatches * cp_mb,
        ep=num_microbatches * ep_mb,
        memory=num_microbatches * memory_mb,
        optimizer=optimizer_time,
    )


def mfu(model_flops: float, seconds: float, num_gpus: int, gpu: GPU) -> float:
    """Model FLOPs utilisation against the dense BF16 peak (also with FP8, as is usual)."""
    return model_flops / (seconds * num_gpus * gpu.bf16_flops)
