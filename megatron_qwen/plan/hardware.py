"""The GPU table (`gpus.yaml`): memory, peak rates and bandwidths the planner's models read."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron_qwen.plan import PlanError

GPU_TABLE = Path(__file__).with_name("gpus.yaml")


@dataclass(frozen=True)
class GPU:
    """One entry of the table; rates in FLOP/s and bytes/s, memory in bytes."""

    name: str
    memory_bytes: float
    bf16_flops: float
    fp8_flops: float | None
    achievable_fraction: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    memory_bandwidth: float | None = None  # HBM bytes/s; None: the memory-bound terms are left out
    memory_efficiency: float = 1.0  # share of it that elementwise kernels and the optimizer sustain

    @property
    def achievable_memory_bandwidth(self) -> float | None:
        """The sustained HBM rate the time model divides memory-bound bytes by."""
        return None if self.memory_bandwidth is None else self.memory_bandwidth * self.memory_efficiency

    @property
    def achievable_bf16_flops(self) -> float:
        """The sustained BF16 GEMM rate the time model divides FLOPs by."""
        return self.bf16_flops * self.achievable_fraction


def load_gpus(path: str | Path = GPU_TABLE) -> dict[str, GPU]:
    """Every GPU of the table at `path`, by name."""
    table = yaml.safe_load(Path(path).read_text())
    gpus = {}
    for name, entry in table.items():
        fp8 = entry.get("fp8_tflops")
        gpus[name] = GPU(
            name=name,
            memory_bytes=entry["memory_gib"] * 2**30,
            bf16_flops=entry["bf16_tflops"] * 1e12,
            fp8_flops=None if fp8 is None else fp8 * 1e12,
            achievable_fraction=entry["achievable_fraction"],
            intra_node_bandwidth=entry["intra_node_gbps"] * 1e9,
            inter_node_bandwidth=entry["inter_node_gbps"] * 1e9,
            memory_bandwidth=entry["memory_tbps"] * 1e12,
            memory_efficiency=entry["memory_efficiency"],
        )
    return gpus


def find_gpu(name: str, gpus: dict[str, GPU] | None = None) -> GPU:
    """The table entry called `name` (case-insensitive); an unknown name raises PlanError listing the known ones."""
    gpus = load_gpus() if gpus is None else gpus
    key = name.strip().lower()
    if key in gpus:
        return gpus[key]
    # "h100" should suggest "h100-80gb" before "h200", which is closer letter by letter.
    close = [n for n in sorted(gpus) if key in n] or difflib.get_close_matches(key, list(gpus), n=1, cutoff=0.4)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    raise PlanError(
        f"unknown GPU {name!r}: {hint}known GPUs are {', '.join(sorted(gpus))} "
        f"(add an entry to {GPU_TABLE} for another one)"
    )
