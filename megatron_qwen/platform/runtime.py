"""Where this process runs and with what: the device, the parameter dtype and the optional accelerators.

Resolved once per process from the config (`resolve_runtime`); model building, the loop and the tools
take the `Runtime` instead of re-deriving any of it. `Accelerators` says which optional pieces are in
use and why the others are not, for the one start-up line a run prints.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import sysconfig
from dataclasses import dataclass

import torch
from packaging.version import InvalidVersion, Version

from megatron_qwen.config import Config
from megatron_qwen.errors import ConfigError
from megatron_qwen.platform.launch import local_gpu, use_cpu_ranks


def _try_import(name: str) -> str | None:
    """None when module `name` imports, else why not (one line)."""
    if importlib.util.find_spec(name.split(".")[0]) is None:
        return "not installed"
    try:
        importlib.import_module(name)
    except Exception as exc:  # a broken or mismatched install fails in many ways; report, never crash here
        return f"installed but does not import ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def _te_version() -> str:
    """The installed Transformer Engine's version, as megatron-core reads it ("unknown" when it cannot tell)."""
    version = getattr(importlib.import_module("transformer_engine"), "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version("transformer-engine")
        except importlib.metadata.PackageNotFoundError:
            return "unknown"
    return str(version)


def compile_toolchain() -> str | None:
    """None when torch.compile can build its GPU kernels here, else what is missing.

    megatron-core's bias-activation and bias-dropout fusions are torch.compile'd; Inductor's Triton kernels
    are launched through a C stub that Triton compiles on first use, with the compiler in $CC (else gcc,
    else clang on PATH) against Python's headers (Python.h)."""
    compiler = os.environ.get("CC")
    if compiler:
        if shutil.which(compiler) is None:
            return f"CC={compiler} is not an executable"
    elif shutil.which("gcc") is None and shutil.which("clang") is None:
        return "no C compiler: neither $CC nor gcc nor clang on PATH"
    scheme = sysconfig.get_default_scheme()
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
    if not os.path.isfile(os.path.join(include, "Python.h")):
        return f"no Python headers: {include}/Python.h is missing (install python3-dev)"
    return None


@dataclass(frozen=True)
class Accelerators:
    """Optional accelerators found in this process: each is None when usable, else the reason it is not."""

    transformer_engine: str | None
    apex: str | None
    # apex's fused weight-gradient GEMM (a separate CUDA extension of apex). megatron-core's own
    # ColumnParallelLinear (the output layer in both specs) refuses gradient_accumulation_fusion without it.
    fused_wgrad: str | None = "not checked"
    # Transformer Engine's version when it imports (None: not checked, e.g. an Accelerators made by hand).
    te_version: str | None = None
    # A C compiler and Python's headers, which torch.compile'd fused kernels need at run time (`compile_toolchain`).
    compiler: str | None = "not checked"

    @classmethod
    def detect(cls) -> "Accelerators":
        # Imported, not just found: a TE whose CUDA build does not match torch is found but fails at import.
        transformer_engine = _try_import("transformer_engine.pytorch")
        return cls(
            transformer_engine=transformer_engine,
            apex=_try_import("apex"),
            fused_wgrad=_try_import("fused_weight_gradient_mlp_cuda"),
            te_version=_te_version() if transformer_engine is None else None,
            compiler=compile_toolchain(),
        )


# Nothing optional is used on CPU ranks (the CUDA kernels cannot run there).
ON_CPU_RANKS = Accelerators(transformer_engine="CPU ranks", apex="CPU ranks", fused_wgrad="CPU ranks",
                            compiler="CPU ranks")

# The first Transformer Engine release with each `model.fp8` recipe it runs (megatron-core checks the same:
# Float8CurrentScaling, TE's tensorwise recipe, arrived in 2.2; delayed scaling is in every release).
TE_RECIPE_SINCE = {"tensorwise": ("2.2.0.dev0", "2.2", "Float8CurrentScaling")}


def te_recipe_missing(recipe: str | None, accelerators: Accelerators) -> str | None:
    """Why the usable Transformer Engine cannot run FP8 `recipe` (its version is too old), or None."""
    if recipe not in TE_RECIPE_SINCE or accelerators.te_version is None:
        return None
    since, release, name = TE_RECIPE_SINCE[recipe]
    try:
        too_old = Version(accelerators.te_version) < Version(since)
    except InvalidVersion:
        too_old = True
    if too_old:
        return (f"Transformer Engine {accelerators.te_version} has no {name}, which model.fp8={recipe} needs "
                f"(TE >= {release})")
    return None


def use_transformer_engine(cfg: Config, on_cpu: bool, accelerators: Accelerators) -> bool:
    """Whether to build the Transformer Engine spec: asked for, or `auto` with TE importable on GPU.

    With ``model.fp8`` set, ``model.fp8_backend`` decides too: ``te`` needs Transformer Engine, ``torchao`` runs
    FP8 in the local spec, and ``auto`` takes Transformer Engine when it is usable and has the recipe.
    """
    impl, fp8, backend = cfg.model.transformer_impl, cfg.model.fp8, cfg.model.fp8_backend
    if fp8 is not None and backend == "te":
        reason = "CPU ranks" if on_cpu else accelerators.transformer_engine
        if reason is not None:
            raise ConfigError([
                f"model.fp8_backend=te but Transformer Engine is not usable here ({reason}); run on GPUs with "
                "Transformer Engine installed, or set model.fp8_backend=torchao (or auto) for FP8 in the local layers"
            ])
    if fp8 is not None and not on_cpu and accelerators.transformer_engine is None:
        missing = te_recipe_missing(fp8, accelerators)
        if missing is not None and (backend == "te" or impl == "transformer_engine"):
            asked = "model.fp8_backend=te" if backend == "te" else "model.transformer_impl=transformer_engine"
            raise ConfigError([
                f"{asked}: {missing}; upgrade Transformer Engine (e.g. the container named in slurm/pretrain.sbatch), "
                f"or set model.fp8_backend=torchao and model.transformer_impl=auto for FP8 in the local layers"
            ])
        if missing is not None and backend == "auto":
            return False  # torchao runs the recipe; resolve_runtime puts the reason on the start-up line
    if fp8 is not None and backend == "te":
        return True
    if fp8 is not None and (backend == "torchao" or fp8 == "rowwise"):
        return False  # torchao's FP8 linears are part of the local spec
    if fp8 == "delayed" and impl != "transformer_engine" and (on_cpu or accelerators.transformer_engine is not None):
        raise ConfigError([
            f"model.fp8=delayed needs Transformer Engine, which is not usable here "
            f"({'CPU ranks' if on_cpu else accelerators.transformer_engine}); use model.fp8=tensorwise or rowwise "
            "(torchao), or run where Transformer Engine is installed"
        ])
    if impl == "transformer_engine":
        if accelerators.transformer_engine is not None:
            raise ConfigError([
                "model.transformer_impl=transformer_engine but Transformer Engine is "
                f"{accelerators.transformer_engine}; "
                "install it or set model.transformer_impl=local"
            ])
        if on_cpu:
            raise ConfigError(["model.transformer_impl=transformer_engine needs CUDA ranks; use parallel.device=cuda "
                               "or model.transformer_impl=local"])
        return True
    return impl == "auto" and not on_cpu and accelerators.transformer_engine is None


def gpu_has_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively: compute capability 8.0 (A100) and later. V100 (7.0) and
    T4 (7.5) have fp16 tensor cores only."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def precision_dtype(precision: str, on_cpu: bool, bf16_supported: bool = True) -> torch.dtype:
    """``training.precision`` as a dtype: ``auto`` is bf16 on a GPU that has it, fp32 on CPU ranks and on older
    GPUs. fp16 is never chosen, since fp16 training needs loss scaling, which the trainer does not do; asking
    for bf16 on a GPU without it is a ConfigError."""
    if precision == "bf16" and not on_cpu and not bf16_supported:
        raise ConfigError([
            "training.precision=bf16 but this GPU has no bf16 (compute capability below 8.0, e.g. V100); "
            "use training.precision=fp32 (or auto, which picks fp32 there): fp16 is not supported because the "
            "trainer does no loss scaling"
        ])
    if precision == "auto":
        precision = "bf16" if not on_cpu and bf16_supported else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


@dataclass(frozen=True)
class Runtime:
    """The device, parameter dtype and layer implementation of this process's ranks."""

    device: torch.device
    params_dtype: torch.dtype
    use_te: bool
    accelerators: Accelerators
    # Which library runs the FP8 GEMMs of ``model.fp8``: "te" (the Transformer Engine spec) or "torchao" (the
    # local spec's FP8 linears); None when FP8 is off. The model follows ``use_te``; this names it for the logs.
    fp8_backend: str | None = None
    precision_note: str = ""  # why training.precision=auto chose params_dtype, when it is not the obvious choice
    fp8_note: str = ""  # why model.fp8_backend=auto chose torchao although Transformer Engine imports
    sdpa_kernel: str = ""  # the SDPA kernel a probe call ran on this GPU at the model's head size and dtype

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def wgrad_fusion_off(self, local_fp8: bool) -> str | None:
        """Why megatron-core's gradient_accumulation_fusion (apex's fused weight-gradient GEMM) must stay off,
        or None. It is on only where every linear of the model supports it: megatron-core's and Transformer
        Engine's do, the torchao FP8 linears (`local_fp8`) compute their weight gradient in FP8 themselves."""
        if self.on_cpu:
            return "CPU ranks"
        if self.accelerators.fused_wgrad is not None:
            return self.accelerators.fused_wgrad
        if local_fp8:
            return "the torchao FP8 linears compute their own weight gradients"
        return None

    @property
    def fused_kernels_off(self) -> str | None:
        """Why megatron-core's torch.compile'd bias-activation and bias-dropout fusions are off, or None."""
        return "CPU ranks" if self.on_cpu else self.accelerators.compiler

    @classmethod
    def cpu(cls, params_dtype: torch.dtype = torch.float32) -> "Runtime":
        """CPU ranks with the local layer spec (tests, single-process tools, layout descriptions)."""
        return cls(torch.device("cpu"), params_dtype, False, ON_CPU_RANKS)

    def describe(self) -> str:
        """The start-up line: what this run is made of, and why an optional piece is not used."""
        not_te = "model.fp8 runs on torchao" if self.fp8_backend == "torchao" else "model.transformer_impl=local"
        not_te = "CPU ranks" if self.on_cpu else self.accelerators.transformer_engine or not_te
        te = "yes" if self.use_te else f"no ({not_te})"
        apex = "yes" if self.accelerators.apex is None else f"no ({self.accelerators.apex})"
        wgrad_off = self.wgrad_fusion_off(local_fp8=self.fp8_backend == "torchao")
        wgrad = "yes" if wgrad_off is None else f"no ({wgrad_off})"
        fused = "yes" if self.fused_kernels_off is None else f"no ({self.fused_kernels_off})"
        if self.on_cpu:
            sdpa = "math kernel (CPU)"
        else:
            sdpa = self.sdpa_kernel or "not probed"
        device = "CPU ranks over gloo" if self.on_cpu else f"CUDA ({torch.cuda.get_device_name(self.device)}) over NCCL"
        dtype = str(self.params_dtype).removeprefix("torch.") + (
            f" ({self.precision_note})" if self.precision_note else "")
        fp8 = {None: "off", "te": "Transformer Engine", "torchao": "torchao (local layers)"}[self.fp8_backend]
        fp8 += f" ({self.fp8_note})" if self.fp8_note else ""
        return (f"running on {device}, {dtype} | Transformer Engine: {te} | apex: {apex} | "
                f"fused weight-gradient accumulation: {wgrad} | fused kernels (torch.compile): {fused} | "
                f"attention: SDPA {sdpa} | FP8: {fp8}")


def overlaps_communication(cfg: Config) -> bool:
    """Whether the run overlaps communication with compute on GPUs: tensor-parallel collectives with the
    GEMMs (TP > 1), data-parallel reductions and gathers with backward and forward, pipeline transfers of
    the interleaved schedule."""
    p = cfg.parallel
    return p.tp > 1 or p.vpp > 1 or p.overlap_grad_reduce or (p.overlap_param_gather and p.use_distributed_optimizer)


def order_gpu_work(cfg: Config) -> None:
    """With overlapped communication, CUDA_DEVICE_MAX_CONNECTIONS=1 (unless already set): one hardware queue
    makes the GPU start kernels in the order they are issued, which megatron-core's overlap relies on (a
    collective issued before a GEMM must not wait behind it). CUDA reads it when it creates its context, so
    this runs before anything touches CUDA; the Slurm and mpirun scripts export it, torchrun does not."""
    if overlaps_communication(cfg) and not torch.cuda.is_initialized():
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


# Marks in the kernel names of each SDPA implementation (cuDNN's generated kernels first: some are named
# "..._flash_fprop..."; then flash_fwd_kernel, the memory-efficient cutlass fmha kernels); a call that launched
# none of them ran the math path (GEMMs, softmax).
SDPA_KERNEL_MARKS = (("cuDNN", ("cudnn",)), ("flash", ("flash",)),
                     ("memory-efficient", ("fmha", "efficient", "mem_eff")))


def sdpa_kernel_kind(kernel_names) -> str:
    """Which SDPA implementation ran, named from the kernels a call launched."""
    names = " ".join(kernel_names).lower()
    return next((kind for kind, marks in SDPA_KERNEL_MARKS if any(mark in names for mark in marks)), "math")


def probe_sdpa_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Run one causal SDPA call shaped as the model's attention and name the kernel torch's dispatcher chose:
    flash is not the only fused kernel (torch >= 2.11 may prefer cuDNN attention on Hopper)."""
    import torch.nn.functional as F

    try:
        q = torch.randn(1, 2, 256, head_dim, device=device, dtype=dtype)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
            torch.cuda.synchronize(device)
    except (RuntimeError, AssertionError) as e:  # a diagnostic for the start-up line: never what stops a run
        return f"unknown (the probe failed: {e})"
    return sdpa_kernel_kind(event.name for event in prof.events())


def resolve_runtime(cfg: Config, local_rank: int = 0, accelerators: Accelerators | None = None) -> Runtime:
    """This process's `Runtime` for `cfg` (``parallel.device``, ``training.precision``, ``model.transformer_impl``,
    ``model.fp8`` and ``model.fp8_backend``). On GPUs it first sets CUDA's work ordering for communication
    overlap (`order_gpu_work`)."""
    if cfg.parallel.device != "cpu":
        order_gpu_work(cfg)  # before use_cpu_ranks asks CUDA anything
    on_cpu = use_cpu_ranks(cfg.parallel.device)
    if on_cpu:
        accelerators, device = ON_CPU_RANKS, torch.device("cpu")
    else:
        accelerators = accelerators or Accelerators.detect()
        device = torch.device("cuda", local_gpu(local_rank))
    use_te = use_transformer_engine(cfg, on_cpu, accelerators)
    fp8_backend, fp8_note = None, ""
    if cfg.model.fp8 is not None:
        fp8_backend = "te" if use_te else "torchao"
        if cfg.model.fp8_backend == "auto" and not use_te and not on_cpu and accelerators.transformer_engine is None:
            fp8_note = te_recipe_missing(cfg.model.fp8, accelerators) or ""
        if not use_te and importlib.util.find_spec("torchao") is None:
            raise ConfigError([
                f"model.fp8={cfg.model.fp8} runs on torchao here, which is not installed: "
                "pip install torchao==0.18.0 (see docs/fp8.md), or set model.fp8=null"
            ])
    bf16 = on_cpu or gpu_has_bf16(device)
    note = ""
    if cfg.training.precision == "auto" and not bf16:
        note = (f"training.precision=auto: {torch.cuda.get_device_name(device)} has no bf16, "
                "and fp16 would need loss scaling")
    dtype = precision_dtype(cfg.training.precision, on_cpu, bf16)
    return Runtime(
        device=device,
        params_dtype=dtype,
        use_te=use_te,
        accelerators=accelerators,
        fp8_backend=fp8_backend,
        precision_note=note,
        fp8_note=fp8_note,
        sdpa_kernel="" if on_cpu else probe_sdpa_kernel(device, dtype, cfg.model.head_dim),
    )
