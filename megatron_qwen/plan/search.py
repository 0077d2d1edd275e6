"""Enumerate the layouts the trainer accepts for a model, a cluster and a batch; keep those that fit in
GPU memory; rank them by predicted step time.

A layout is TP, CP, PP, VPP (DP is what they leave of the GPUs), for a MoE model EP and ETP, sequence
parallelism, recomputation, the distributed optimizer and the micro-batch size. Validity is decided by
`megatron_qwen.config.validate` itself, so the planner never lists a layout the trainer would refuse.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass

from megatron_qwen.config import Config, ConfigError, validate
from megatron_qwen.plan import PlanError
from megatron_qwen.plan.hardware import GPU
from megatron_qwen.plan.memory import (
    ModelShape,
    StateBytes,
    buckets_per_chunk,
    ddp_bucket_size,
    fp8_weight_copies_bytes,
    gpu_kernels,
    model_state_bytes,
    precision,
    stage_activation_bytes,
)
from megatron_qwen.plan.steptime import StepTime, mfu, model_flops_per_step, step_time

GIB = 2**30
RECOMPUTE = ("none", "selective", "full")
# CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers and the last stage's transient logits: a flat
# allowance per GPU on top of what the memory model counts.
DEFAULT_BUFFER_GIB = 3.0
# Fraction of the GPU's memory left free for allocator fragmentation.
DEFAULT_HEADROOM = 0.10


@dataclass(frozen=True)
class Layout:
    """One candidate layout."""

    tp: int
    pp: int
    vpp: int
    dp: int
    sp: bool
    recompute: str
    distributed_optimizer: bool
    micro_batch: int
    cp: int = 1
    ep: int = 1  # expert parallelism (MoE models only)
    etp: int | None = None  # expert tensor parallelism; None: TP (megatron-core's default)

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    def overrides(self, moe: bool = False) -> list[str]:
        """The trainer's dotted overrides for this layout; for a MoE model (`moe`) EP and ETP always, so that a
        config's own values do not stay in force (etp null: the experts split by TP)."""
        overrides = [
            f"parallel.tp={self.tp}",
            f"parallel.pp={self.pp}",
            f"parallel.vpp={self.vpp}",
            f"parallel.cp={self.cp}",
            f"parallel.sp={str(self.sp).lower()}",
            f"parallel.use_distributed_optimizer={str(self.distributed_optimizer).lower()}",
            f"training.recompute={self.recompute}",
            f"training.micro_batch_size={self.micro_batch}",
        ]
        if moe:
            overrides[4:4] = [f"parallel.ep={self.ep}", f"parallel.etp={'null' if self.etp is None else self.etp}"]
        return overrides

    def describe(self) -> str:
        """Short form for tables and messages, e.g. "TP4 CP2 PP4 VPP2 DP16 SP DistOpt mb=1"."""
        parts = [f"TP{self.tp}"] + ([f"CP{self.cp}"] if self.cp > 1 else []) + [f"PP{self.pp}"]
        if self.vpp > 1:
            parts.append(f"VPP{self.vpp}")
        if self.ep > 1 or self.etp is not None:
            parts.append(f"EP{self.ep}" + (f" ETP{self.etp}" if self.etp is not None else ""))
        parts.append(f"DP{self.dp}")
        if self.sp:
            parts.append("SP")
        if self.distributed_optimizer:
            parts.append("DistOpt")
        if self.recompute != "none":
            parts.append(self.recompute)
        parts.append(f"mb={self.micro_batch}")
        return " ".join(parts)


@dataclass(frozen=True)
class Request:
    """What to plan for: the model (a trainer config), the cluster and the batch."""

    cfg: Config
    num_gpus: int
    gpus_per_node: int
    gpu: GPU
    seq_length: int
    global_batch: int
    micro_batch: int | None = None  # None: every micro-batch size the batch allows
    tp: int | None = None  # None: every tensor-parallel size the model allows
    cp: int | None = None  # None: every context-parallel size the sequence allows
    fp8: bool = False
    headroom: float = DEFAULT_HEADROOM
    buffer_bytes: float = DEFAULT_BUFFER_GIB * GIB
    achievable_flops: float | None = None  # overrides the GPU table's sustained rate
    # Transformer Engine's TP communication overlap (Megatron-LM's --tp-comm-overlap), which this trainer does not
    # set up: only for comparing with runs that had it.
    tp_comm_overlap: bool = False

    @property
    def usable_bytes(self) -> float:
        """Memory a layout may use per GPU: the GPU's memory less the headroom."""
        return self.gpu.memory_bytes * (1 - self.headroom)


@dataclass(frozen=True)
class Memory:
    """Peak memory of the most loaded GPU of a layout, in bytes."""

    pp_rank: int  # which pipeline rank it is
    weights: int
    gradients: int
    optimizer: int
    activations: int
    buffers: float
    expert_weights: int = 0  # the part of weights and gradients in the expert buffers (MoE)
    expert_gradients: int = 0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers


@dataclass(frozen=True)
class Evaluation:
    """A layout with its predicted memory and step time; `rejection` names what does not fit."""

    layout: Layout
    memory: Memory
    time: StepTime
    mfu: float
    rejection: str | None

    @property
    def fits(self) -> bool:
        return self.rejection is None


@dataclass(frozen=True)
class Plan:
    """The planner's answer: layouts that fit, fastest first, and those rejected for memory."""

    request: Request
    fitting: list[Evaluation]
    rejected: list[Evaluation]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def base_config(request: Request) -> Config:
    """The request's config with its sequence length, global batch and FP8 choice applied."""
    cfg = request.cfg
    model = dataclasses.replace(cfg.model, seq_length=request.seq_length)
    if request.fp8:
        # The memory model counts Transformer Engine's FP8 weight copies: plan for its FP8.
        model = dataclasses.replace(model, fp8=model.fp8 or "tensorwise", fp8_backend="te")
    training = dataclasses.replace(cfg.training, global_batch_size=request.global_batch)
    return dataclasses.replace(cfg, model=model, training=training)


def layout_config(cfg: Config, layout: Layout) -> Config:
    """`cfg` with `layout`'s parallel and training settings."""
    parallel = dataclasses.replace(
        cfg.parallel,
        tp=layout.tp,
        pp=layout.pp,
        vpp=layout.vpp,
        cp=layout.cp,
        ep=layout.ep,
        etp=layout.etp,
        sp=layout.sp,
        use_distributed_optimizer=layout.distributed_optimizer,
    )
    training = dataclasses.replace(cfg.training, recompute=layout.recompute, micro_batch_size=layout.micro_batch)
    return dataclasses.replace(cfg, parallel=parallel, training=training)


def accepted(cfg: Config, layout: Layout, num_gpus: int) -> bool:
    """Whether the trainer's validation accepts `layout` for `num_gpus` ranks."""
    errors, _ = validate(layout_config(cfg, layout), num_gpus)
    return not errors


def expert_splits(cfg: Config, num_gpus: int, tp: int, pp: int) -> list[tuple[int, int | None]]:
    """(EP, ETP) pairs to try for a MoE model at TP x PP: every EP dividing the experts, with the experts split
    by TP (ETP unset, megatron-core's default) or whole on each rank (ETP = 1) -- the two usual choices; (1, None)
    for a dense model. `config.validate` decides which are valid."""
    if not cfg.model.is_moe:
        return [(1, None)]
    etps = [None] + ([1] if tp > 1 else [])
    return [(ep, etp) for ep in _divisors(cfg.model.num_experts) for etp in etps
            if num_gpus % ((etp or tp) * ep * pp) == 0]


def candidate_layouts(cfg: Config, num_gpus: int, micro_batch: int | None = None,
                      tp_only: int | None = None, cp_only: int | None = None) -> list[Layout]:
    """Every layout `config.validate` accepts for `num_gpus` ranks: all TP x CP x PP x VPP splits (TP = `tp_only`,
    CP = `cp_only` when given), for a MoE model each EP / ETP (`expert_splits`), SP on/off, each recomputation,
    the distributed optimizer on/off and every micro-batch size (or `micro_batch`). TP must divide the
    key/value heads, so grouped-query models get fewer TP sizes; CP needs two chunks of every sequence per rank.
    A MoE model with TP > 1 always uses SP: megatron-core's MoE layer refuses to train without it.

    Each layout returned was accepted by `validate`. To keep the number of calls down, a TP x CP x PP split
    (and then each VPP and expert split) is first tried in its least constrained form (no SP, micro-batch 1 or
    the one asked for), and its other forms only if that one is accepted: SP and a larger micro-batch only add
    requirements; recomputation and the distributed optimizer add none, so each SP x micro-batch form is
    validated once for all of them.
    """
    layouts = []
    batch = cfg.training.global_batch_size
    moe_needs_sp = cfg.model.is_moe
    for tp in [tp_only] if tp_only else _divisors(num_gpus):
        if num_gpus % tp:
            continue
        for cp in [cp_only] if cp_only else _divisors(num_gpus // tp):
            if num_gpus % (tp * cp):
                continue
            for pp in _divisors(num_gpus // (tp * cp)):
                dp = num_gpus // (tp * cp * pp)
                base = Layout(tp, pp, 1, dp, False, "none", False, micro_batch or 1, cp)
                if not accepted(cfg, base, num_gpus):
                    continue
                vpps = _divisors(cfg.model.num_layers // pp) if pp > 1 else [1]
                micro_batches = [micro_batch] if micro_batch else _divisors(batch // dp)
                sps = (True,) if moe_needs_sp and tp > 1 else (False, True)
                for vpp, (ep, etp) in itertools.product(vpps, expert_splits(cfg, num_gpus, tp, pp)):
                    split = dataclasses.replace(base, vpp=vpp, ep=ep, etp=etp)
                    if (vpp > 1 or ep > 1 or etp) and not accepted(cfg, split, num_gpus):
                        continue
                    for sp, mb in itertools.product(sps, micro_batches):
                        # Recomputation and the distributed optimizer add no requirement: validated once.
                        if not accepted(cfg, dataclasses.replace(split, sp=sp, micro_batch=mb), num_gpus):
                            continue
                        layouts += [dataclasses.replace(split, sp=sp, recompute=recompute, micro_batch=mb,
                                                        distributed_optimizer=distributed_optimizer)
                                    for distributed_optimizer, recompute in itertools.product((False, True), RECOMPUTE)]
    return layouts


@functools.lru_cache(maxsize=4096)
def _state(shape: ModelShape, tp: int, pp: int, vpp: int, dp: int, distributed_optimizer: bool, dtype: str,
           pp_rank: int, bucket_size: int | None, ep: int = 1, etp: int | None = None,
           expert_dp: int | None = None) -> StateBytes:
    # Model state does not depend on SP, recomputation or the micro-batch: computed once per split.
    return model_state_bytes(shape, tp, pp, vpp, dp, distributed_optimizer, precision(dtype, fused_adam=True), pp_rank,
                             bucket_size=bucket_size, ep=ep, etp=etp, expert_dp=expert_dp)


@functools.lru_cache(maxsize=4096)
def _buckets(shape: ModelShape, tp: int, pp: int, vpp: int, dp: int, distributed_optimizer: bool,
             bucket_size: int | None) -> int:
    # The first pipeline stage's gradient buckets, likewise computed once per split.
    return sum(buckets_per_chunk(shape, tp, pp, vpp, dp, distributed_optimizer, bucket_size))


def expert_dp(num_gpus: int, layout: Layout) -> int:
    """The expert data-parallel size: what ETP x EP x PP leave of the GPUs."""
    return num_gpus // (layout.expert_tp * layout.ep * layout.pp)


def bucket_size(cfg: Config, layout: Layout) -> int | None:
    """The gradient bucket size the trainer's DDP uses at `layout` (None: one bucket per chunk)."""
    return ddp_bucket_size(cfg.parallel.overlap_grad_reduce, cfg.parallel.ddp_bucket_size, layout.dp * layout.cp)


def training_dtype(cfg: Config) -> str:
    """bf16 on GPUs unless the config asks for fp32."""
    return "fp32" if cfg.training.precision == "fp32" else "bf16"


def peak_memory(request: Request, cfg: Config, layout: Layout) -> Memory:
    """Memory of the most loaded pipeline rank (the first or the last; middle ranks hold less than the first)."""
    shape = ModelShape.from_config(cfg.model)
    dtype = training_dtype(cfg)
    act_bytes = precision(dtype, fused_adam=True).activation_bytes
    kernels = gpu_kernels(cfg.model)
    num_microbatches = request.global_batch // (layout.micro_batch * layout.dp)
    worst = None
    for pp_rank in sorted({0, layout.pp - 1}):
        # CP ranks hold the same weights as DP ranks: the gradients are reduced (and sharded) over DP x CP.
        state = _state(shape, layout.tp, layout.pp, layout.vpp, layout.dp * layout.cp, layout.distributed_optimizer,
                       dtype, pp_rank, bucket_size(cfg, layout), layout.ep, layout.expert_tp,
                       expert_dp(request.num_gpus, layout))
        fp8_copies = (fp8_weight_copies_bytes(shape, layout.tp, layout.pp, layout.ep, layout.expert_tp)
                      if request.fp8 else 0)
        weights = state.weights + fp8_copies
        activations = stage_activation_bytes(
            shape, request.seq_length, layout.micro_batch, layout.tp, layout.sp, layout.pp, layout.vpp,
            num_microbatches, layout.recompute, cfg.training.recompute_num_layers, act_bytes, kernels, pp_rank,
            hidden_dropout=cfg.model.hidden_dropout > 0, cp=layout.cp, etp=layout.expert_tp,
        )
        memory = Memory(pp_rank, weights, state.gradients, state.optimizer, activations, request.buffer_bytes,
                        state.expert_weights, state.expert_gradients)
        if worst is None or memory.total > worst.total:
            worst = memory
    return worst


def rejection(request: Request, memory: Memory) -> str | None:
    """None when `memory` fits the usable memory; otherwise which component does not fit, and by how much."""
    usable = request.usable_bytes
    if memory.total <= usable:
        return None
    state = memory.weights + memory.gradients + memory.optimizer
    room = usable - memory.buffers
    where = f"pipeline rank {memory.pp_rank}"
    if state > room:
        parts = {"optimizer state": memory.optimizer, "gradients": memory.gradients, "weights": memory.weights}
        listed = ", ".join(f"{name} {size / GIB:.1f}" for name, size in sorted(parts.items(), key=lambda kv: -kv[1]))
        return (f"model state does not fit: {state / GIB:.1f} GiB on {where} ({listed}) "
                f"against {room / GIB:.1f} GiB usable")
    return (
        f"activations do not fit: {memory.activations / GIB:.1f} GiB on {where}, which has {(room - state) / GIB:.1f} "
        f"GiB left after {state / GIB:.1f} GiB of model state"
    )


def optimizer_parameters(cfg: Config, memory: Memory) -> int:
    """How many parameters the rank's Adam step updates: its optimizer state over the bytes each holds."""
    prec = precision(training_dtype(cfg), fused_adam=True)
    return memory.optimizer // (prec.adam_bytes + prec.main_param_bytes)


def evaluate(request: Request, cfg: Config, layout: Layout) -> Evaluation:
    """Memory, step time and MFU of one layout."""
    memory = peak_memory(request, cfg, layout)
    shape = ModelShape.from_config(cfg.model)
    # The distributed optimizer all-gathers the model-dtype weights, not Transformer Engine's FP8 copies.
    fp8_copies = (fp8_weight_copies_bytes(shape, layout.tp, layout.pp, layout.ep, layout.expert_tp)
                  if request.fp8 else 0)
    gathered = memory.weights - memory.expert_weights - fp8_copies
    # The first stage finishes its backward last: its buckets bound what the overlapped reduction exposes.
    buckets = _buckets(shape, layout.tp, layout.pp, layout.vpp, layout.dp * layout.cp, layout.distributed_optimizer,
                       bucket_size(cfg, layout))
    time = step_time(
        shape, request.seq_length, request.global_batch, layout.micro_batch, layout.tp, layout.pp, layout.vpp,
        layout.dp, layout.sp, layout.recompute, layout.distributed_optimizer,
        gradient_bytes=memory.gradients - memory.expert_gradients, weight_bytes=gathered, gpu=request.gpu,
        gpus_per_node=request.gpus_per_node, fp8=request.fp8, achievable_flops=request.achievable_flops,
        act_bytes=precision(training_dtype(cfg), fused_adam=True).activation_bytes,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce, overlap_param_gather=cfg.parallel.overlap_param_gather,
        num_buckets=buckets, cp=layout.cp, cp_gathers_kv=gpu_kernels(cfg.model).cp_gathers_kv, ep=layout.ep,
        etp=layout.expert_tp, expert_gradient_bytes=memory.expert_gradients, expert_weight_bytes=memory.expert_weights,
        optimizer_parameters=optimizer_parameters(cfg, memory), tp_comm_overlap=request.tp_comm_overlap,
    )
    flops = model_flops_per_step(shape, request.seq_length, request.global_batch)
    return Evaluation(layout, memory, time, mfu(flops, time.total, request.num_gpus, request.gpu),
                      rejection(request, memory))


def check_request(request: Request, cfg: Config) -> None:
    """Errors the user can cause before any layout is tried, each with the fix."""
    if request.num_gpus < 1 or request.gpus_per_node < 1:
        raise PlanError(f"--gpus {request.num_gpus} and --gpus-per-node {request.gpus_per_node} must be >= 1")
    if request.num_gpus > request.gpus_per_node and request.num_gpus % request.gpus_per_node:
        lower = request.num_gpus // request.gpus_per_node * request.gpus_per_node
        raise PlanError(
            f"--gpus {request.num_gpus} spans several nodes but is not a multiple of --gpus-per-node "
            f"{request.gpus_per_node}; use whole nodes: {lower} or {lower + request.gpus_per_node}"
        )
    if request.fp8 and request.gpu.fp8_flops is None:
        raise PlanError(
            f"--fp8: {request.gpu.name} has no FP8 tensor cores; drop --fp8 or plan for an H100, H200, L40S or B200"
        )
    if request.fp8 and cfg.model.transformer_impl == "local":
        raise PlanError(
            "--fp8 needs Transformer Engine but the config sets model.transformer_impl=local; set it to auto"
        )
    if not 0 <= request.headroom < 1:
        raise PlanError(f"--headroom {request.headroom} must be in [0, 1)")
    errors, _ = validate(cfg)
    if errors:
        raise ConfigError(errors)
    if request.tp is not None:
        # An explicit TP size gets the trainer's own refusal (e.g. TP not dividing the key/value heads), fix named.
        parallel = dataclasses.replace(cfg.parallel, tp=request.tp, pp=1, vpp=1, sp=False)
        errors, _ = validate(dataclasses.replace(cfg, parallel=parallel))
        if errors:
            raise PlanError(f"--tp {request.tp}: " + "; ".join(errors))
        if request.num_gpus % request.tp:
            raise PlanError(f"--tp {request.tp} does not divide --gpus {request.num_gpus}; use a multiple of "
                            f"{request.tp} GPUs or a TP size that divides {request.num_gpus}")
    if request.cp is not None:
        parallel = dataclasses.replace(cfg.parallel, tp=1, pp=1, vpp=1, sp=False, cp=request.cp, ep=1, etp=None)
        errors, _ = validate(dataclasses.replace(cfg, parallel=parallel))
        if errors:
            raise PlanError(f"--cp {request.cp}: " + "; ".join(errors))
        if request.num_gpus % request.cp:
            raise PlanError(f"--cp {request.cp} does not divide --gpus {request.num_gpus}; use a multiple of "
                            f"{request.cp} GPUs or a CP size that divides {request.num_gpus}")


def has_accepted_layout(cfg: Config, num_gpus: int, micro_batch: int | None) -> bool:
    """Whether any layout is valid for `num_gpus` ranks. vpp=1, no SP and the smallest micro-batch are the
    least constrained settings, so trying only those is enough."""
    mb = micro_batch or 1
    for tp in _divisors(num_gpus):
        for pp in _divisors(num_gpus // tp):
            if accepted(cfg, Layout(tp, pp, 1, num_gpus // (tp * pp), False, "none", False, mb), num_gpus):
                return True
    return False


def nearest_valid_world_sizes(cfg: Config, num_gpus: int, micro_batch: int | None) -> list[int]:
    """The closest GPU counts below and above `num_gpus` at which some layout is valid."""
    below = next((n for n in range(num_gpus - 1, 0, -1) if has_accepted_layout(cfg, n, micro_batch)), None)
    above = next((n for n in range(num_gpus + 1, 4 * num_gpus + 2) if has_accepted_layout(cfg, n, micro_batch)), None)
    return [n for n in (below, above) if n is not None]


def frugal_layouts(cfg: Config, num_gpus: int, micro_batch: int | None) -> list[Layout]:
    """For each valid TP x CP x PP split, its least memory-hungry variant: SP when TP > 1, full recomputation,
    the distributed optimizer, no interleaving, the smallest micro-batch, and for a MoE model the largest EP."""
    layouts = []
    mb = micro_batch or 1
    for tp in _divisors(num_gpus):
        for cp in _divisors(num_gpus // tp):
            for pp in _divisors(num_gpus // (tp * cp)):
                layout = Layout(tp, pp, 1, num_gpus // (tp * cp * pp), tp > 1, "full", True, mb, cp)
                splits = [(ep, etp) for ep, etp in expert_splits(cfg, num_gpus, tp, pp) if etp is None]
                layout = dataclasses.replace(layout, ep=max(ep for ep, _ in splits))
                if accepted(cfg, layout, num_gpus):
                    layouts.append(layout)
    return layouts


def smallest_fitting_world_size(request: Request, cfg: Config, limit: int) -> tuple[int, Evaluation] | None:
    """The smallest whole-node GPU count above the request's (at most `limit`) where some layout fits."""
    n, step = request.num_gpus, request.gpus_per_node
    # Fill a partly used node first, then add whole nodes.
    first_whole = n + step if n >= step else 2 * step
    sizes = list(range(n + 1, min(step, limit) + 1)) + list(range(first_whole, limit + 1, step))
    for n in sizes:
        bigger = dataclasses.replace(request, num_gpus=n)
        for layout in frugal_layouts(cfg, n, request.micro_batch):
            memory = peak_memory(bigger, cfg, layout)
            if rejection(bigger, memory) is None:
                return n, evaluate(bigger, cfg, layout)
    return None


def plan(request: Request) -> Plan:
    """Every accepted layout evaluated; those that fit sorted by predicted step time (then memory).

    Raises PlanError when no layout is valid for the GPU count (naming the nearest counts that work) or
    none fits in memory (naming the smallest GPU count that fits, or the component that never fits).
    """
    cfg = base_config(request)
    check_request(request, cfg)
    layouts = candidate_layouts(cfg, request.num_gpus, request.micro_batch, request.tp, request.cp)
    if not layouts:
        m = cfg.model
        nearest = nearest_valid_world_sizes(cfg, request.num_gpus, request.micro_batch)
        batch = f"global batch {request.global_batch}" + (
            f", micro-batch {request.micro_batch}" if request.micro_batch else "")
        heads = f"{m.num_attention_heads} heads" + (
            f" and {m.kv_heads} key/value heads" if m.kv_heads != m.num_attention_heads else "")
        raise PlanError(
            f"no layout of {m.name} is valid on {request.num_gpus} GPUs"
            + (f" with --tp {request.tp}" if request.tp else "") + (f" with --cp {request.cp}" if request.cp else "")
            + f": TP must divide the {heads} and FFN {m.ffn_hidden_size}, PP x VPP the "
            f"{m.num_layers} layers, and DP x micro-batch the {batch}; "
            f"nearest GPU counts that work: {' or '.join(map(str, nearest)) or 'none'}"
        )
    evaluations = [evaluate(request, cfg, layout) for layout in layouts]
    fitting = sorted((e for e in evaluations if e.fits), key=lambda e: (e.time.total, e.memory.total))
    rejected = [e for e in evaluations if not e.fits]
    if not fitting:
        raise PlanError(too_big_message(request, cfg, rejected))
    return Plan(request, fitting, rejected)


def too_big_message(request: Request, cfg: Config, rejected: list[Evaluation]) -> str:
    """Why nothing fits: the leanest layout's shortfall and the smallest GPU count that would fit."""
    leanest = min(rejected, key=lambda e: e.memory.total)
    head = (
        f"no layout of {cfg.model.name} fits on {request.num_gpus} x {request.gpu.name} "
        f"({request.usable_bytes / GIB:.1f} GiB usable each): the leanest, {leanest.layout.describe()}, needs "
        f"{leanest.memory.total / GIB:.1f} GiB with {leanest.memory.buffers / GIB:.1f} GiB of buffers; "
        f"{leanest.rejection}"
    )
    limit = max(64 * request.num_gpus, 1024)
    found = smallest_fitting_world_size(request, cfg, limit)
    if found is None:
        return f"{head}; no GPU count up to {limit} fits either"
    n, evaluation = found
    return f"{head}; the smallest GPU count that fits is {n} (e.g. {evaluation.layout.describe()})"
