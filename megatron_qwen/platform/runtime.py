"""Where this process runs and with what: the device, the parameter dtype and the optional accelerators.

Resolved once per process from the config (`resolve_runtime`); model building, the loop and the tools
take the `Runtime` instead of re-deriving any of it. `Accelerators` says which optional pieces are in
use and why the others are not, for the one start-up line a run prints.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

from megatron_qwen.config import Config
from megatron_qwen.errors import ConfigError
from megatron_qwen.platform.launch import use_cpu_ranks


def _try_import(name: str) -> str | None:
    """None when module `name` imports, else why not (one line)."""
    if importlib.util.find_spec(name.split(".")[0]) is None:
        return "not installed"
    try:
        importlib.import_module(name)
    except Exception as exc:  # a broken or mismatched install fails in many ways; report, never crash here
        return f"installed but does not import ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


@dataclass(frozen=True)
class Accelerators:
    """Optional accelerators found in this process: each is None when usable, else the reason it is not."""

    transformer_engine: str | None
    apex: str | None

    @classmethod
    def detect(cls) -> "Accelerators":
        # Imported, not just found: a TE whose CUDA build does not match torch is found but fails at import.
        return cls(transformer_engine=_try_import("transformer_engine.pytorch"), apex=_try_import("apex"))


# Nothing optional is used on CPU ranks (the CUDA kernels cannot run there).
ON_CPU_RANKS = Accelerators(transformer_engine="CPU ranks", apex="CPU ranks")


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
                f"model.transformer_impl=transformer_engine but Transformer Engine is {accelerators.transformer_engine}; "
                "install it or set model.transformer_impl=local"
            ])
        if on_cpu:
            raise ConfigError(["model.transformer_impl=transformer_engine needs CUDA ranks; use parallel.device=cuda or "
                               "model.transformer_impl=local"])
        return True
    return impl == "auto" and not on_cpu and accelerators.transformer_engine is None


def precision_dtype(precision: str, on_cpu: bool) -> torch.dtype:
    """``training.precision`` as a dtype: ``auto`` is bf16 on GPU and fp32 on CPU."""
    if precision == "auto":
        precision = "fp32" if on_cpu else "bf16"
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

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    @classmethod
    def cpu(cls, params_dtype: torch.dtype = torch.float32) -> "Runtime":
        """CPU ranks with the local layer spec (tests, single-process tools, layout descriptions)."""
        return cls(torch.device("cpu"), params_dtype, False, ON_CPU_RANKS)

    def describe(self) -> str:
        """The start-up line: what this run is made of, and why an optional piece is not used."""
        te = "yes" if self.use_te else f"no ({'CPU ranks' if self.on_cpu else self.accelerators.transformer_engine or 'model.transformer_impl=local'})"
        apex = "yes" if self.accelerators.apex is None else f"no ({self.accelerators.apex})"
        if self.on_cpu:
            sdpa = "math kernel (CPU)"
        else:
            sdpa = "flash" if torch.backends.cuda.flash_sdp_enabled() else "memory-efficient/math (flash disabled)"
        device = "CPU ranks over gloo" if self.on_cpu else f"CUDA ({torch.cuda.get_device_name(self.device)}) over NCCL"
        dtype = str(self.params_dtype).removeprefix("torch.")
        fp8 = {None: "off", "te": "Transformer Engine", "torchao": "torchao (local layers)"}[self.fp8_backend]
        return (f"running on {device}, {dtype} | Transformer Engine: {te} | apex: {apex} | attention: SDPA {sdpa} "
                f"| FP8: {fp8}")


def resolve_runtime(cfg: Config, local_rank: int = 0, accelerators: Accelerators | None = None) -> Runtime:
    """This process's `Runtime` for `cfg` (``parallel.device``, ``training.precision``, ``model.transformer_impl``,
    ``model.fp8`` and ``model.fp8_backend``)."""
    on_cpu = use_cpu_ranks(cfg.parallel.device)
    if on_cpu:
        accelerators, device = ON_CPU_RANKS, torch.device("cpu")
    else:
        accelerators = accelerators or Accelerators.detect()
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise ConfigError([
                f"local rank {local_rank} has no GPU: this node shows {visible} (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most {visible} ranks per node"
            ])
        device = torch.device("cuda", local_rank)
    use_te = use_transformer_engine(cfg, on_cpu, accelerators)
    fp8_backend = None
    if cfg.model.fp8 is not None:
        fp8_backend = "te" if use_te else "torchao"
        if not use_te and importlib.util.find_spec("torchao") is None:
            raise ConfigError([
                f"model.fp8={cfg.model.fp8} runs on torchao here, which is not installed: "
                "pip install torchao==0.18.0 (see README, FP8), or set model.fp8=null"
            ])
    return Runtime(
        device=device,
        params_dtype=precision_dtype(cfg.training.precision, on_cpu),
        use_te=use_te,
        accelerators=accelerators,
        fp8_backend=fp8_backend,
    )
