"""What a rank runs with, resolved from the config and the machine: precision, GPU, the optional
accelerators and the start-up line. GPUs are stood in for by patching torch.cuda's queries, so the rules
that only a GPU machine exercises run here too."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from megatron_qwen.config import load_config
from megatron_qwen.platform.runtime import Accelerators, Runtime, resolve_runtime

NOTHING = Accelerators(transformer_engine="not installed", apex="not installed", fused_wgrad="not installed")


@pytest.fixture
def gpus(monkeypatch):
    """A node of `count` GPUs named `name` with compute capability `capability` (set the attributes)."""

    class Node:
        count, name, capability = 8, "NVIDIA H100 80GB HBM3", (9, 0)

    node = Node()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: node.count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: node.capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: node.name)
    return node


def cuda_config(*overrides):
    return load_config("configs/tiny.yaml", ["parallel.device=cuda", *overrides])


def test_precision_auto_is_bf16_where_the_gpu_has_it(gpus):
    runtime = resolve_runtime(cuda_config(), 3, NOTHING)
    assert runtime.device == torch.device("cuda", 3) and runtime.params_dtype == torch.bfloat16
    assert runtime.precision_note == ""


def test_precision_auto_falls_back_to_fp32_without_bf16_and_says_why(gpus):
    gpus.name, gpus.capability = "Tesla V100-SXM2-32GB", (7, 0)
    runtime = resolve_runtime(cuda_config(), 0, NOTHING)
    assert runtime.params_dtype == torch.float32
    assert "Tesla V100-SXM2-32GB has no bf16" in runtime.precision_note
    assert "float32 (training.precision=auto: Tesla V100-SXM2-32GB has no bf16" in runtime.describe()
    with pytest.raises(ValueError, match="training.precision=bf16 but this GPU has no bf16 .* use training.precision=fp32"):
        resolve_runtime(cuda_config("training.precision=bf16"), 0, NOTHING)
    # Explicit fp32 is what it says; CPU ranks keep fp32 under auto and may ask for bf16.
    assert resolve_runtime(cuda_config("training.precision=fp32"), 0, NOTHING).precision_note == ""
    cpu = resolve_runtime(load_config("configs/tiny.yaml", ["parallel.device=cpu", "training.precision=bf16"]))
    assert cpu.params_dtype == torch.bfloat16


def test_a_local_rank_beyond_the_visible_gpus_is_refused(gpus):
    gpus.count = 4
    with pytest.raises(ValueError, match="local rank 4 has no GPU: this node shows 4"):
        resolve_runtime(cuda_config(), 4, NOTHING)


def test_gradient_accumulation_fusion_only_when_apex_kernel_imports(single_rank):
    """megatron-core's ColumnParallelLinear (the output layer of both specs) refuses fusion without apex's
    kernel: the config must not ask for it then."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from megatron_qwen.model.qwen import transformer_config

    cfg = load_config("configs/tiny.yaml")
    gpu = Runtime(torch.device("cuda", 0), torch.bfloat16, use_te=True, accelerators=NOTHING)
    with_kernel = dataclasses.replace(gpu, accelerators=dataclasses.replace(NOTHING, fused_wgrad=None))
    assert transformer_config(cfg, with_kernel).gradient_accumulation_fusion is True
    assert transformer_config(cfg, gpu).gradient_accumulation_fusion is False
    assert transformer_config(cfg, Runtime.cpu()).gradient_accumulation_fusion is False

    # Built on this machine (no apex): the config chosen without the kernel builds; the fused one does not.
    config = dataclasses.replace(transformer_config(cfg, gpu), use_cpu_initialization=True, params_dtype=torch.float32)
    ColumnParallelLinear(8, 16, config=config, init_method=config.init_method, bias=False)
    fused = dataclasses.replace(config, gradient_accumulation_fusion=True)
    with pytest.raises(RuntimeError, match="fused_weight_gradient_mlp_cuda"):
        ColumnParallelLinear(8, 16, config=fused, init_method=config.init_method, bias=False)


def test_accelerators_are_detected_by_importing_them(tmp_path, monkeypatch):
    """A package that is installed but fails at import (a Transformer Engine built for another CUDA or torch)
    is reported as such, not selected."""
    broken = tmp_path / "transformer_engine"
    (broken / "pytorch").mkdir(parents=True)
    (broken / "__init__.py").write_text("")
    (broken / "pytorch" / "__init__.py").write_text(
        "raise ImportError('libtransformer_engine.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    found = Accelerators.detect()
    assert found.transformer_engine.startswith("installed but does not import (ImportError: libtransformer_engine.so")
    assert found.fused_wgrad == "not installed"  # apex's CUDA extension is not on this machine


def test_startup_line_says_why_each_accelerator_is_off(gpus, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "flash_sdp_enabled", lambda: True)
    runtime = resolve_runtime(cuda_config(), 0, NOTHING)
    line = runtime.describe()
    assert line.startswith("running on CUDA (NVIDIA H100 80GB HBM3) over NCCL, bfloat16 |")
    for part in ("Transformer Engine: no (not installed)", "apex: no (not installed)",
                 "fused weight-gradient accumulation: no (not installed)", "attention: SDPA flash"):
        assert part in line, (part, line)
    local = resolve_runtime(cuda_config("model.transformer_impl=local"), 0, dataclasses.replace(NOTHING, transformer_engine=None))
    assert "Transformer Engine: no (model.transformer_impl=local)" in local.describe()
    assert "Transformer Engine: no (CPU ranks)" in Runtime.cpu().describe()


@pytest.mark.parametrize("on_gpu, vpp, batch, overlap", [(True, 2, False, True), (True, 1, True, False), (False, 2, False, False), (False, 1, True, False)])
def test_interleaved_pipelines_overlap_p2p_on_gpus(on_gpu, vpp, batch, overlap):
    """GPUs overlap the interleaved schedule's transfers (megatron-core forbids it together with batched p2p);
    CPU ranks keep separate, blocking sends and receives."""
    from megatron_qwen.model.qwen import transformer_config

    cfg = load_config("configs/tiny.yaml", ["parallel.pp=2", f"parallel.vpp={vpp}"])
    runtime = Runtime(torch.device("cuda", 0), torch.bfloat16, False, NOTHING) if on_gpu else Runtime.cpu()
    config = transformer_config(cfg, runtime)
    assert (config.batch_p2p_comm, config.overlap_p2p_comm) == (batch, overlap)


def test_overlapped_communication_orders_gpu_work(gpus, monkeypatch):
    """torchrun sets no CUDA_DEVICE_MAX_CONNECTIONS: the run does, before CUDA starts, when it overlaps."""
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    resolve_runtime(cuda_config(), 0, NOTHING)  # overlap_grad_reduce is on by default
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")  # a value the user chose stays
    resolve_runtime(cuda_config(), 0, NOTHING)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
    quiet = cuda_config("parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false")
    resolve_runtime(quiet, 0, NOTHING)
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
    resolve_runtime(load_config("configs/tiny.yaml", ["parallel.device=cpu"]))  # CPU ranks: nothing to order
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
