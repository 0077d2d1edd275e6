"""The CPU harness: megatron-core's real parallel code on CPU tensors over gloo.

megatron-core 0.16.1 assumes CUDA in a handful of places. Each `Patch` below replaces exactly one
such assumption, says why, and can be undone; the last one steers torch's CPU FP8 GEMM (torchao's
float8 training calls it) away from a oneDNN reference kernel. They are applied only when the ranks
run on CPU (no CUDA, or CPU asked for explicitly; see `megatron_qwen.platform.launch.use_cpu_ranks`),
so GPU runs use megatron-core and torch untouched. `tests/test_cpu_harness.py` proves each patch
still needed (the unpatched call fails on CPU) and sufficient (the patched call works), so an
upgrade shows exactly which ones changed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import queue
import types
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Patch:
    """One named replacement of a CUDA assumption; `apply()` returns the function that undoes it."""

    name: str
    why: str
    apply: Callable[[], Callable[[], None]]
    # (module, qualified name, source snippet): where megatron-core makes the assumption. The harness
    # test checks each site still contains its snippet, so an upgrade that drops one is noticed.
    sites: tuple[tuple[str, str, str], ...] = ()


def _set_attr(owner, attr: str, value) -> Callable[[], None]:
    old = getattr(owner, attr)
    setattr(owner, attr, value)
    return lambda: setattr(owner, attr, old)


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class _CpuFactoryTorch(types.ModuleType):
    """A stand-in for the `torch` name inside one megatron-core module: factory calls that hard-code
    ``device="cuda"`` get the CPU instead; every other attribute is torch's own."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange")

    def __init__(self):
        super().__init__("torch")
        for name in self._FACTORIES:
            setattr(self, name, self._wrap(getattr(torch, name)))

    @staticmethod
    def _wrap(factory):
        def cpu_factory(*args, **kwargs):
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
            return factory(*args, **kwargs)

        return cpu_factory

    def __getattr__(self, name):
        return getattr(torch, name)


# megatron-core modules whose code creates tensors with a literal device="cuda".
CUDA_FACTORY_MODULES = (
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens counter of every schedule
    "megatron.core.optimizer.clip_grads",  # grad-norm and zero-count accumulators
    "megatron.core.optimizer.optimizer",  # found_inf / scale tensors of the optimizer
    "megatron.core.rerun_state_machine",  # validation-result reductions
    "megatron.core.utils",  # local (non-apex) multi-tensor l2 norm used for the grad norm
)


def _patch_cuda_factories():
    proxy = _CpuFactoryTorch()
    undo = [_set_attr(importlib.import_module(m), "torch", proxy) for m in CUDA_FACTORY_MODULES]
    return lambda: [u() for u in undo]


def _cpu_current_device():
    return torch.device("cpu")


def _synchronize_nothing(device=None):
    return None


# Module-level replacements, so that applying a patch again installs the very same function.
def _patch_current_device():
    return _set_attr(torch.cuda, "current_device", _cpu_current_device)


def _patch_synchronize():
    return _set_attr(torch.cuda, "synchronize", _synchronize_nothing)


def _patch_rng():
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    cuda_ns = types.SimpleNamespace(
        get_rng_state=lambda device=None: torch.get_rng_state(),
        set_rng_state=lambda state, device=None: torch.set_rng_state(state),
        manual_seed=torch.manual_seed,
    )
    proxy = types.ModuleType("torch")
    proxy.__getattr__ = lambda name: getattr(torch, name)  # type: ignore[method-assign]
    proxy.cuda = cuda_ns
    undo = [
        _set_attr(random, "torch", proxy),
        _set_attr(random, "_get_cuda_rng_state",
                  lambda device=None, clone=False, graph_safe=False: torch.get_rng_state()),
        _set_attr(random, "_set_cuda_rng_state",
                  lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)),
    ]
    return lambda: [u() for u in undo]


@contextlib.contextmanager
def _cpu_tensors_pose_as_cuda():
    """Inside this block CPU tensors answer `.type()` with CUDA names ('torch.cuda.FloatTensor') and
    `.cuda()` returns the tensor itself."""
    original_type, original_cuda = torch.Tensor.type, torch.Tensor.cuda

    def cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original_type(self).replace("torch.", "torch.cuda.", 1)
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = cuda_named_type
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = original_type, original_cuda


# (module, owner attribute path) of megatron-core functions that check `.type()` for CUDA names or
# call `.cuda()` on tensors that gloo can reduce on the CPU as they are.
CUDA_TENSOR_METHOD_SITES = (
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),  # asserts grad.type()
    # param.type()
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups"),
    # .cuda() before gather
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero"),
)


def _patch_tensor_methods():
    def scoped(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with _cpu_tensors_pose_as_cuda():
                return fn(*args, **kwargs)

        return wrapper

    undo = []
    for module_name, path in CUDA_TENSOR_METHOD_SITES:
        owner = importlib.import_module(module_name)
        *parents, attr = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        raw = owner.__dict__[attr]
        if isinstance(raw, classmethod):
            replacement = classmethod(scoped(raw.__func__))
        else:
            replacement = scoped(raw)
        undo.append(_set_attr(owner, attr, replacement))
    return lambda: [u() for u in undo]


# Where megatron-core copies the first stage's embedding onto the last stage's output layer of a model with tied
# embeddings and PP > 1: it moves the weight with ``.cuda()`` before the all-reduce over the embedding group.
TIED_EMBEDDING_SITE = ("megatron.core.models.common.language_module.language_module",
                       "LanguageModule.setup_embeddings_and_output_layer")


def _patch_tied_embedding_copy():
    module_name, path = TIED_EMBEDDING_SITE
    owner = getattr(importlib.import_module(module_name), path.split(".")[0])
    raw = owner.__dict__["setup_embeddings_and_output_layer"]

    @functools.wraps(raw)
    def on_cpu(self, *args, **kwargs):
        with _cpu_tensors_pose_as_cuda():
            return raw(self, *args, **kwargs)

    return _set_attr(owner, "setup_embeddings_and_output_layer", on_cpu)


_SCALED_MM = torch._scaled_mm


def _scaled_mm_off_onednn(mat_a, mat_b, *args, **kwargs):
    """torch._scaled_mm with oneDNN switched off for CPU operands (only oneDNN's switch, not its other flags)."""
    if mat_a.device.type != "cpu":
        return _SCALED_MM(mat_a, mat_b, *args, **kwargs)
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return _SCALED_MM(mat_a, mat_b, *args, **kwargs)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def _patch_fp8_gemm_kernel():
    return _set_attr(torch, "_scaled_mm", _scaled_mm_off_onednn)


_WRITE_RESULTS = queue.Queue()  # what the writer's Manager queue held, in-process


def _write_buckets_in_process(transform_list, use_msc, rank, write_buckets, global_results_queue):
    """megatron-core's FileSystemWriterAsync.write_preloaded_data_multiproc without forking: each bucket is
    written by this process, one after the other, and the results go to the same queue."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    results, count = queue.Queue(), queue.Queue()
    out: dict | Exception = {}
    for i, bucket in enumerate(write_buckets):
        count.put(i)
        FileSystemWriterAsync.write_preloaded_data(transform_list, i, bucket, results, count, use_fsync=True,
                                                   use_msc=use_msc)
        idx, written = results.get()
        if isinstance(written, Exception):
            out = written
            break
        out[idx] = written
    global_results_queue.put(out)


def _patch_checkpoint_writes():
    from megatron.core.dist_checkpointing.strategies import filesystem_async as module

    writer = module.FileSystemWriterAsync
    original = writer.__dict__["write_preloaded_data_multiproc"]  # the staticmethod object itself
    undo_queue = _set_attr(module, "_get_write_results_queue", lambda: _WRITE_RESULTS)
    writer.write_preloaded_data_multiproc = staticmethod(_write_buckets_in_process)

    def undo():
        writer.write_preloaded_data_multiproc = original
        undo_queue()

    return undo


MOE_UTILS = "megatron.core.transformer.moe.moe_utils"
MOE_DISPATCHER = "megatron.core.transformer.moe.token_dispatcher"


def _patch_moe_router_gemm():
    # moe_utils binds te_general_gemm only when Transformer Engine imports; the router's gating linear then tests
    # `te_general_gemm is not None`, a NameError without it. None takes the torch.mm branch beside that test.
    module = importlib.import_module(MOE_UTILS)
    if hasattr(module, "te_general_gemm"):
        return _set_attr(module, "te_general_gemm", None)
    module.te_general_gemm = None
    return lambda: delattr(module, "te_general_gemm")


class _HostStream:
    """A CUDA stream / event stand-in for CPU ranks: CPU work is already ordered, so waiting does nothing."""

    def wait_stream(self, stream) -> None:
        return None

    def record_event(self) -> "_HostStream":
        return self

    def synchronize(self) -> None:
        return None


_HOST_STREAM = _HostStream()


def _patch_moe_dispatcher_streams():
    module = importlib.import_module(MOE_DISPATCHER)
    cuda = types.ModuleType("torch.cuda")
    cuda.__getattr__ = lambda name: getattr(torch.cuda, name)  # type: ignore[method-assign]
    cuda.Stream = lambda *args, **kwargs: _HOST_STREAM
    cuda.current_stream = lambda device=None: _HOST_STREAM
    cuda.stream = lambda stream: contextlib.nullcontext()
    proxy = types.ModuleType("torch")
    proxy.__getattr__ = lambda name: getattr(torch, name)  # type: ignore[method-assign]
    proxy.cuda = cuda
    return _set_attr(module, "torch", proxy)


def _host_split_sizes(tensor, as_numpy: bool = False, record_stream: bool = False):
    """moe_utils.maybe_move_tensor_to_cpu for CPU ranks: the tensor is already on the host; split sizes asked
    `as_numpy` come back as a NumPy array, as they do from a GPU tensor."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _patch_moe_split_sizes():
    return _set_attr(importlib.import_module(MOE_DISPATCHER), "maybe_move_tensor_to_cpu", _host_split_sizes)


TP_MAPPINGS = "megatron.core.tensor_parallel.mappings"
_MAPPINGS_ORIGINAL: dict[str, Callable] = {}


def _gather_uneven_on_gloo(input_, group, output_split_sizes=None, use_global_buffer=False):
    """mappings._gather_along_first_dim with uneven `output_split_sizes` as gloo can run it: every rank's rows
    padded to the largest count, one even all-gather, the padding cut off again."""
    if output_split_sizes is None or group.size() == 1:
        return _MAPPINGS_ORIGINAL["_gather_along_first_dim"](input_, group, output_split_sizes, use_global_buffer)
    sizes = [int(n) for n in output_split_sizes]
    rows = max(sizes)
    padded = input_.new_zeros((rows, *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    gathered = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(gathered, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(gathered, sizes)])


def _reduce_scatter_uneven_on_gloo(input_, group, input_split_sizes=None, use_global_buffer=False):
    """mappings._reduce_scatter_along_first_dim with uneven `input_split_sizes` as gloo can run it: the whole
    tensor summed over the group, each rank keeping its own rows."""
    if input_split_sizes is None or group.size() == 1:
        return _MAPPINGS_ORIGINAL["_reduce_scatter_along_first_dim"](input_, group, input_split_sizes,
                                                                     use_global_buffer)
    summed = input_.contiguous().clone()
    torch.distributed.all_reduce(summed, group=group)
    sizes = [int(n) for n in input_split_sizes]
    start = sum(sizes[: group.rank()])
    return summed[start : start + sizes[group.rank()]].contiguous()


def _patch_uneven_collectives():
    module = importlib.import_module(TP_MAPPINGS)
    for name in ("_gather_along_first_dim", "_reduce_scatter_along_first_dim"):
        _MAPPINGS_ORIGINAL.setdefault(name, getattr(module, name))
    # inspect.getsource follows __wrapped__: the harness test reads megatron-core's own code while this is on.
    _gather_uneven_on_gloo.__wrapped__ = _MAPPINGS_ORIGINAL["_gather_along_first_dim"]
    _reduce_scatter_uneven_on_gloo.__wrapped__ = _MAPPINGS_ORIGINAL["_reduce_scatter_along_first_dim"]
    undo = [_set_attr(module, "_gather_along_first_dim", _gather_uneven_on_gloo),
            _set_attr(module, "_reduce_scatter_along_first_dim", _reduce_scatter_uneven_on_gloo)]
    return lambda: [u() for u in undo]


PATCHES: tuple[Patch, ...] = (
    Patch(
        "cuda_current_device",
        "megatron-core allocates buffers with device=torch.cuda.current_device(); on CPU ranks that device is the CPU.",
        _patch_current_device,
        sites=(
            ("megatron.core.models.common.embeddings.rotary_pos_embedding", "RotaryEmbedding.get_emb",
             "torch.cuda.current_device()"),
            ("megatron.core.pipeline_parallel.p2p_communication", "P2PCommunicator._communicate",
             "torch.cuda.current_device()"),
            ("megatron.core.distributed.param_and_grad_buffer", "_ParamAndGradBuffer.__init__",
             "torch.cuda.current_device()"),
        ),
    ),
    Patch(
        "cuda_rng_tracker",
        "The tensor-parallel RNG tracker saves/restores the CUDA generator; CPU ranks track the CPU generator.",
        _patch_rng,
        sites=(
            ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.add", "torch.cuda.get_rng_state()"),
            ("megatron.core.tensor_parallel.random", "model_parallel_cuda_manual_seed", "torch.cuda.manual_seed"),
        ),
    ),
    Patch(
        "cuda_synchronize",
        "Pipeline p2p exchanges call torch.cuda.synchronize() after batched send/recv; "
        "CPU work is already synchronous.",
        _patch_synchronize,
        sites=(("megatron.core.pipeline_parallel.p2p_communication", "P2PCommunicator._communicate",
                "torch.cuda.synchronize()"),),
    ),
    Patch(
        "cuda_factory_device",
        "A few megatron-core modules create tensors with a literal device='cuda'; on CPU ranks they get the CPU.",
        _patch_cuda_factories,
        sites=(
            ("megatron.core.pipeline_parallel.schedules", "forward_backward_no_pipelining", 'device="cuda"'),
            ("megatron.core.optimizer.clip_grads", "count_zeros_fp32", "device='cuda'"),
            ("megatron.core.optimizer.optimizer", "FP32Optimizer.__init__", "device='cuda'"),
            ("megatron.core.rerun_state_machine", "RerunStateMachine._reduce_any", "device='cuda'"),
            ("megatron.core.utils", "local_multi_tensor_l2_norm", 'device="cuda"'),
        ),
    ),
    Patch(
        "cuda_tensor_methods",
        "Grad clipping and the distributed optimizer accept only tensors whose .type() is "
        "'torch.cuda.FloatTensor' and move state with .cuda() before a gather; while those functions "
        "run, CPU tensors report CUDA type names and .cuda() leaves them on the CPU.",
        _patch_tensor_methods,
        sites=(
            ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32", "'torch.cuda.FloatTensor'"),
            ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups",
             "'torch.cuda.FloatTensor'"),
            ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero",
             ".cuda()"),
        ),
    ),
    Patch(
        "tied_embedding_copy",
        "A model with tied embeddings and PP > 1 builds, on its last stage, a copy of the first stage's embedding "
        "as the output layer, filled by an all-reduce over the embedding group after `weight.data.cuda()`; on CPU "
        "ranks .cuda() leaves the weight where it is (gloo reduces it on the CPU) while that setup runs.",
        _patch_tied_embedding_copy,
        sites=((*TIED_EMBEDDING_SITE, "weight.data.cuda()"),),
    ),
    Patch(
        "cpu_fp8_gemm_kernel",
        "On CPUs with AMX (Intel Sapphire Rapids and later) torch 2.13 sends a CPU torch._scaled_mm of float8 "
        "operands to oneDNN 3.12, which has no fast FP8 matmul there and runs its reference kernel (ref:any): "
        "a 1024x256x256 GEMM takes 3.4 s against 1.3 ms in fp32, so an FP8 training step takes 12 s instead of "
        "0.05 s. While torchao's float8 GEMM runs on CPU operands oneDNN is off, and torch takes the kernel it "
        "uses on every other CPU: dequantize, scale, fp32 matmul (the same products; measured bit-equal here).",
        _patch_fp8_gemm_kernel,
        sites=(("torchao.float8.float8_ops", "addmm_float8_unwrapped", "torch._scaled_mm("),),
    ),
    Patch(
        "cpu_checkpoint_writes_in_process",
        "megatron-core's checkpoint writer starts a spawn-context multiprocessing Manager at a process's first save "
        "(a fresh interpreter that imports the launching module again: seconds of CPU per rank) and forks one "
        "writer process per file at every save, from a process that runs gloo's threads. On CPU ranks there is no "
        "device copy to overlap with: each rank writes its files itself, with the same writer code and format.",
        _patch_checkpoint_writes,
        # The callers: the two replaced functions themselves cannot be inspected while the harness is on.
        sites=(
            ("megatron.core.dist_checkpointing.strategies.filesystem_async",
             "FileSystemWriterAsync.prepare_write_data", "_get_write_results_queue()"),
            ("megatron.core.dist_checkpointing.strategies.filesystem_async",
             "FileSystemWriterAsync.get_save_function_and_args", "self.write_preloaded_data_multiproc"),
        ),
    ),
    Patch(
        "moe_router_gemm_without_te",
        "megatron-core's MoE router computes its logits with RouterGatingLinearFunction, which calls Transformer "
        "Engine's te_general_gemm when `te_general_gemm is not None`; moe_utils binds that name only when Transformer "
        "Engine imports, so without it (every CPU rank) the test is a NameError. Bound to None, the same function "
        "takes its own torch.mm branch (forward and backward).",
        _patch_moe_router_gemm,
        sites=((MOE_UTILS, "RouterGatingLinearFunction.forward", "if te_general_gemm is not None"),
               (MOE_UTILS, "RouterGatingLinearFunction.backward", "if te_general_gemm is not None")),
    ),
    Patch(
        "moe_dispatcher_streams",
        "The alltoall token dispatcher creates a CUDA stream when it is built and copies the routing counts to the "
        "host on it (wait_stream, a stream context, record_event, event.synchronize) so the copy overlaps compute. "
        "On CPU ranks the counts are already on the host and every operation is ordered: inside the dispatcher's "
        "module the stream, the current stream and the event are a stand-in whose waits do nothing.",
        _patch_moe_dispatcher_streams,
        sites=((MOE_DISPATCHER, "MoEAlltoAllTokenDispatcher.__init__", "torch.cuda.Stream()"),
               (MOE_DISPATCHER, "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",
                "torch.cuda.current_stream()"),
               (MOE_DISPATCHER, "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize", ".record_event()")),
    ),
    Patch(
        "moe_split_sizes_on_host",
        "The alltoall dispatcher turns the per-rank token counts into split sizes with maybe_move_tensor_to_cpu("
        "..., as_numpy=True), which converts only CUDA tensors; CPU counts stay tensors, and gloo's all_to_all_single "
        "refuses tensors as split sizes (it takes a list of ints). On CPU ranks split sizes asked as NumPy become "
        "NumPy arrays, what the GPU path hands on.",
        _patch_moe_split_sizes,
        sites=((MOE_UTILS, "maybe_move_tensor_to_cpu", "if torch.is_tensor(tensor) and tensor.is_cuda:"),
               (MOE_DISPATCHER, "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize", "as_numpy=True")),
    ),
    Patch(
        "uneven_collectives_on_gloo",
        "With tensor (or expert-tensor) parallelism the alltoall dispatcher gathers the routed tokens of every TP rank "
        "and scatters their sum back, each rank contributing as many rows as it routed: "
        "torch.distributed.all_gather of a list of unequal tensors and torch.distributed.reduce_scatter, which NCCL "
        "runs and gloo refuses (unequal sizes; no reduce_scatter). On CPU ranks, for unequal splits only, the gather "
        "pads every rank's rows to the largest count and the reduce-scatter sums the whole tensor and keeps the "
        "rank's rows: the same values.",
        _patch_uneven_collectives,
        sites=((TP_MAPPINGS, "_gather_along_first_dim", "torch.distributed.all_gather(output_tensor_list"),
               (TP_MAPPINGS, "_reduce_scatter_along_first_dim", "torch.distributed.reduce_scatter(")),
    ),
)

_undo: dict[str, Callable[[], None]] = {}


def apply_cpu_harness(names: tuple[str, ...] | None = None) -> None:
    """Apply the named patches (all by default); applying one twice is a no-op."""
    for patch in PATCHES:
        if (names is None or patch.name in names) and patch.name not in _undo:
            _undo[patch.name] = patch.apply()


def remove_cpu_harness(names: tuple[str, ...] | None = None) -> None:
    """Undo the named patches (all by default), restoring megatron-core's and torch's own code."""
    for name in list(_undo):
        if names is None or name in names:
            _undo.pop(name)()


@contextlib.contextmanager
def patched_while(names: tuple[str, ...]):
    """The named patches applied for the block (those already applied stay applied afterwards)."""
    added = tuple(name for name in names if name not in _undo)
    apply_cpu_harness(added)
    try:
        yield
    finally:
        remove_cpu_harness(added)


def applied_patches() -> tuple[str, ...]:
    """Names of the patches currently applied in this process."""
    return tuple(_undo)
