"""How long one optimizer step takes at a layout: compute, TP, PP and DP communication, pipeline bubble.

A first-order model in the spirit of Narayanan et al. 2021 (section 3): the pipeline runs at the pace of
its slowest stage (the last one, which also computes the output layer), each micro-batch costs that
stage's compute plus its tensor-parallel collectives and point-to-point transfers, the bubble adds
(p - 1)/(v * m) of that, and the data-parallel reduction follows the last backward (overlapped with it,
bucket by bucket, when the config says so). Collectives are ring collectives at the bus bandwidth of the
links they cross (`hardware.GPU`). What it leaves out: the
optimizer update (memory-bound, milliseconds), kernel launch gaps, and megatron-core's partial overlap of
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

    @property
    def total(self) -> float:
        return self.compute + self.tp + self.pp + self.dp + self.bubble


def forward_flops_per_token(shape: ModelShape, seq: int) -> tuple[float, float, float]:
    """Forward FLOPs per token (a multiply-add is 2) as (one layer's GEMMs, one layer's attention core,
    the output layer), with q = heads x head_dim and kv = KV heads x head_dim (h and h for multi-head
    attention with head_dim = h / heads): QKV 2h(q + 2kv), projection 2qh, SwiGLU 6hF; QK^T and AV over the
    full s x s 4sq (as Megatron-LM counts model FLOPs); output layer 2hV."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    q, kv = shape.query_width, shape.kv_width
    return 2 * h * (q + 2 * kv) + 2 * q * h + 6 * h * f, 4 * seq * q, 2 * h * shape.vocab_size


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
) -> StepTime:
    """Predicted step time of a layout.

    compute: the slowest stage's FLOPs per micro-batch (forward, backward = 2x forward, plus the forward
    of the layers with full recomputation or of the attention core with selective), divided over TP, at
    the GPU's achievable rate (`achievable_flops` overrides the table; FP8 runs the layer GEMMs at the FP8
    rate, attention and the output layer stay BF16). Causal flash attention computes half of the s x s
    products, so half of the model-FLOPs attention term is timed.
    tp: per layer and micro-batch 2 all-reduces forward and 2 backward of the (s, b, h) activations (under
    SP the same volume as all-gathers and reduce-scatters), 2 more forward with full recomputation; over
    NVLink when the TP group fits in a node.
    pp: per micro-batch and model chunk one activation sent forward and one gradient backward ((s/t, b, h)
    under SP); over the network when the job spans nodes.
    bubble: (p - 1)/(v * m) of the pipeline's busy time, m = micro-batches per step.
    dp: the gradient all-reduce of the fp32 gradient buffer (`gradient_bytes` per rank), or with the
    distributed optimizer its reduce-scatter plus the all-gather of the weights (`weight_bytes`); over
    NVLink when the DP group fits in a node. The part on the critical path: all of it without overlap.
    With `overlap_grad_reduce` megatron-core reduces each of the `num_buckets` buckets as soon as the last
    micro-batch's backward has produced its gradients, so only what outlasts that backward is exposed, and
    at least the last bucket (the first layers' gradients come last). With `overlap_param_gather` (the
    distributed optimizer) the weights are gathered bucket by bucket during the next step's first forward,
    exposing at least the first bucket likewise.
    """
    num_microbatches = global_batch // (micro_batch * dp)
    tokens = seq * micro_batch
    layers = shape.num_layers // pp
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
    activation = tokens * shape.hidden_size * act_bytes
    tp_passes = 2 * (4 + (2 if recompute == "full" else 0))  # all-reduces count as two ring passes
    tp_mb = layers * tp_passes * ring_seconds(activation, tp, intra if tp <= gpus_per_node else inter)
    world = tp * pp * dp
    pp_bandwidth = intra if world <= gpus_per_node else inter
    pp_mb = 2 * vpp * (activation / (tp if sp else 1)) / pp_bandwidth if pp > 1 else 0.0

    per_mb = compute_mb + tp_mb + pp_mb
    dp_bandwidth = intra if tp * dp <= gpus_per_node else inter
    reduce = ring_seconds(gradient_bytes, dp, dp_bandwidth, all_reduce=not distributed_optimizer)
    gather = ring_seconds(weight_bytes, dp, dp_bandwidth) if distributed_optimizer else 0.0
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
    )


def mfu(model_flops: float, seconds: float, num_gpus: int, gpu: GPU) -> float:
    """Model FLOPs utilisation against the dense BF16 peak (also with FP8, as is usual)."""
    return model_flops / (seconds * num_gpus * gpu.bf16_flops)
