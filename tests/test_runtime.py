"""What a rank runs with, resolved from the config and the machine: precision, GPU, the optional
accelerators and the start-up line. GPUs are stood in for by patching torch.cuda's queries, so the rules
that only a GPU machine exercises run here too."""

from __future__ import annotations

import dataclasses
import os
import re
import sys

import pytest
import torch

from megatron_qwen.config import load_config
from megatron_qwen.platform.runtime import Accelerators, Runtime, resolve_runtime
from megatron_qwen.platform import runtime as runtime_module

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
    with pytest.raises(ValueError,
                       match="training.precision=bf16 but this GPU has no bf16 .* use training.precision=fp32"):
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


def test_gradient_accumulation_fusion_stays_off_for_the_torchao_fp8_linears(single_rank, gpus, monkeypatch):
    """An image with apex's kernel (as NGC's) still builds model.fp8=rowwise and fp8_backend=torchao: the torchao
    FP8 linears compute their weight gradient themselves, so fusion is on only where every linear supports it."""
    from megatron.core.tensor_parallel import layers

    from megatron_qwen.model.fp8 import Float8ColumnParallelLinear, Float8RowParallelLinear
    from megatron_qwen.model.qwen import transformer_config

    apex = dataclasses.replace(NOTHING, transformer_engine=None, fused_wgrad=None, te_version="2.8.0")
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", True)  # apex's kernel "imports"
    for overrides in (["model.fp8=rowwise"], ["model.fp8=tensorwise", "model.fp8_backend=torchao"]):
        runtime = resolve_runtime(cuda_config(*overrides), 0, apex)
        assert (runtime.use_te, runtime.fp8_backend) == (False, "torchao"), overrides
        config = transformer_config(load_config("configs/tiny.yaml", overrides), runtime)
        assert config.gradient_accumulation_fusion is False and config.local_fp8_recipe is not None, overrides
        assert "fused weight-gradient accumulation: no (the torchao FP8 linears compute their own" in runtime.describe()
        config = dataclasses.replace(config, use_cpu_initialization=True, params_dtype=torch.float32)
        for linear in (Float8ColumnParallelLinear, Float8RowParallelLinear):
            extra = {"gather_output": False} if linear is Float8ColumnParallelLinear else {
                "input_is_parallel": True, "skip_bias_add": True}
            linear(16, 16, config=config, init_method=config.init_method, bias=False,
                   fp8_recipe=config.local_fp8_recipe, **extra)
    # Every other layout keeps it: the Transformer Engine spec (FP8 or not) and the local spec without FP8.
    for overrides in ([], ["model.fp8=tensorwise"], ["model.transformer_impl=local"]):
        runtime = resolve_runtime(cuda_config(*overrides), 0, apex)
        assert transformer_config(load_config("configs/tiny.yaml", overrides), runtime).gradient_accumulation_fusion
    # A config that turns it on by hand is refused with a message that says who turns it off.
    fused = dataclasses.replace(config, gradient_accumulation_fusion=True)
    with pytest.raises(ValueError, match=r"must be off; megatron_qwen.model.qwen.transformer_config turns it off "
                                         r"whenever model.fp8 runs on torchao"):
        Float8ColumnParallelLinear(16, 16, config=fused, init_method=config.init_method, bias=False,
                                   fp8_recipe="rowwise")


def test_fused_kernels_need_a_c_compiler_and_python_headers(tmp_path, monkeypatch, gpus):
    """megatron-core's bias-activation and bias-dropout fusions are torch.compile'd: on a machine without a C
    compiler (or Python.h) they are turned off, and the start-up line says why."""
    from megatron_qwen.model.qwen import transformer_config
    from megatron_qwen.platform import runtime as rt

    bare, tools = tmp_path / "bare", tmp_path / "tools"
    bare.mkdir()
    tools.mkdir()
    (tools / "gcc").write_text("#!/bin/sh\n")
    (tools / "gcc").chmod(0o755)
    headers = tmp_path / "include"
    headers.mkdir()
    (headers / "Python.h").write_text("")
    monkeypatch.setattr(rt.sysconfig, "get_paths", lambda scheme=None: {"include": str(headers)})
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(bare))
    assert rt.compile_toolchain() == "no C compiler: neither $CC nor gcc nor clang on PATH"
    monkeypatch.setenv("CC", "/nowhere/cc")
    assert rt.compile_toolchain() == "CC=/nowhere/cc is not an executable"
    monkeypatch.setenv("CC", str(tools / "gcc"))
    assert rt.compile_toolchain() is None
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tools))
    assert rt.compile_toolchain() is None
    (headers / "Python.h").unlink()
    assert rt.compile_toolchain().startswith(f"no Python headers: {headers}/Python.h is missing")

    cfg = cuda_config()
    without = dataclasses.replace(NOTHING, compiler="no C compiler: neither $CC nor gcc nor clang on PATH")
    off = resolve_runtime(cfg, 0, without)
    config = transformer_config(cfg, off)
    assert (config.bias_activation_fusion, config.bias_dropout_fusion) == (False, False)
    assert "fused kernels (torch.compile): no (no C compiler: neither $CC nor gcc nor clang on PATH)" in off.describe()
    on = resolve_runtime(cfg, 0, dataclasses.replace(NOTHING, compiler=None))
    config = transformer_config(cfg, on)
    assert (config.bias_activation_fusion, config.bias_dropout_fusion) == (True, True)
    assert "fused kernels (torch.compile): yes" in on.describe()
    assert "fused kernels (torch.compile): no (CPU ranks)" in Runtime.cpu().describe()
    assert transformer_config(cfg, Runtime.cpu()).bias_activation_fusion is False


def test_tensorwise_fp8_falls_back_to_torchao_below_transformer_engine_2_2(gpus):
    """Float8CurrentScaling, TE's tensorwise recipe, arrived in Transformer Engine 2.2: fp8_backend=auto takes
    torchao below it and says why on the start-up line; asking for TE there is refused."""
    from megatron_qwen.config import ConfigError

    def te(version):
        return dataclasses.replace(NOTHING, transformer_engine=None, te_version=version)

    for version in ("2.1.0+8eb1712", "1.13.0", "2.0.0", "not-a-version"):
        runtime = resolve_runtime(cuda_config("model.fp8=tensorwise"), 0, te(version))
        assert (runtime.use_te, runtime.fp8_backend) == (False, "torchao"), version
        line = runtime.describe()
        assert line.endswith(f"FP8: torchao (local layers) (Transformer Engine {version} has no "
                             "Float8CurrentScaling, which model.fp8=tensorwise needs (TE >= 2.2))"), version
        assert "Transformer Engine: no (model.fp8 runs on torchao)" in line
        with pytest.raises(ConfigError, match=rf"model.fp8_backend=te: Transformer Engine {re.escape(version)} has no "
                                              r"Float8CurrentScaling.* or set model.fp8_backend=torchao"):
            resolve_runtime(cuda_config("model.fp8=tensorwise", "model.fp8_backend=te"), 0, te(version))
        with pytest.raises(ConfigError, match=r"model.transformer_impl=transformer_engine: Transformer Engine"):
            resolve_runtime(cuda_config("model.fp8=tensorwise", "model.transformer_impl=transformer_engine"), 0,
                            te(version))
    for version in ("2.2.0.dev0+a1b2c3", "2.2.0rc0", "2.2.0", "2.8.0+cu12"):
        runtime = resolve_runtime(cuda_config("model.fp8=tensorwise"), 0, te(version))
        assert (runtime.use_te, runtime.fp8_backend, runtime.fp8_note) == (True, "te", ""), version
    # Delayed scaling is in every release; rowwise is torchao's alone, whatever TE's version.
    assert resolve_runtime(cuda_config("model.fp8=delayed"), 0, te("2.1.0")).use_te
    assert resolve_runtime(cuda_config("model.fp8=rowwise"), 0, te("2.1.0")).fp8_note == ""


def test_transformer_engine_version_is_read_when_it_imports(tmp_path, monkeypatch):
    package = tmp_path / "transformer_engine"
    (package / "pytorch").mkdir(parents=True)
    (package / "__init__.py").write_text("__version__ = '2.1.0+8eb1712'\n")
    (package / "pytorch" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        found = Accelerators.detect()
    finally:  # later tests import their own stand-ins under the same name
        for name in ("transformer_engine.pytorch", "transformer_engine"):
            sys.modules.pop(name, None)
    assert (found.transformer_engine, found.te_version) == (None, "2.1.0+8eb1712")


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
    monkeypatch.setattr(runtime_module, "probe_sdpa_kernel", lambda device, dtype, head_dim: "flash")
    runtime = resolve_runtime(cuda_config(), 0, NOTHING)
    line = runtime.describe()
    assert line.startswith("running on CUDA (NVIDIA H100 80GB HBM3) over NCCL, bfloat16 |")
    for part in ("Transformer Engine: no (not installed)", "apex: no (not installed)",
                 "fused weight-gradient accumulation: no (not installed)", "attention: SDPA flash"):
        assert part in line, (part, line)
    local = resolve_runtime(cuda_config("model.transformer_impl=local"), 0,
                            dataclasses.replace(NOTHING, transformer_engine=None))
    assert "Transformer Engine: no (model.transformer_impl=local)" in local.describe()
    assert "Transformer Engine: no (CPU ranks)" in Runtime.cpu().describe()


@pytest.mark.parametrize("on_gpu, vpp, batch, overlap, sync", [
    (True, 2, False, True, False), (True, 1, True, False, False),
    (False, 2, False, False, True), (False, 1, True, False, True),
])
def test_interleaved_pipelines_overlap_p2p_on_gpus(on_gpu, vpp, batch, overlap, sync):
    """GPUs overlap the interleaved schedule's transfers (megatron-core forbids it together with batched p2p);
    CPU ranks keep separate, blocking sends and receives. GPUs never synchronise the device after a batched
    transfer (megatron-core's batch_p2p_sync, on by default), which would stall the overlapped gradient reduce."""
    from megatron_qwen.model.qwen import transformer_config

    cfg = load_config("configs/tiny.yaml", ["parallel.pp=2", f"parallel.vpp={vpp}"])
    runtime = Runtime(torch.device("cuda", 0), torch.bfloat16, False, NOTHING) if on_gpu else Runtime.cpu()
    config = transformer_config(cfg, runtime)
    assert (config.batch_p2p_comm, config.overlap_p2p_comm, config.batch_p2p_sync) == (batch, overlap, sync)


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


def test_start_up_line_names_the_sdpa_kernel_that_ran(monkeypatch):
    """On GPUs the start-up line names the attention kernel a probe call launched (flash is not the only fused
    one: torch >= 2.11 may pick cuDNN attention on Hopper), classified from the kernels' names."""
    import torch

    from megatron_qwen.platform.runtime import Accelerators, Runtime, sdpa_kernel_kind

    assert sdpa_kernel_kind(["void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>"]) == "flash"
    assert sdpa_kernel_kind(["cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3"]) == "cuDNN"
    assert sdpa_kernel_kind(["cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64"]) == "cuDNN"
    assert sdpa_kernel_kind(["fmha_cutlassF_bf16_aligned_64x64_rf_sm80"]) == "memory-efficient"
    assert sdpa_kernel_kind(["ampere_bf16_s16816gemm_bf16_128x64", "softmax_warp_forward"]) == "math"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    runtime = Runtime(torch.device("cuda", 0), torch.bfloat16, False, Accelerators(None, None), sdpa_kernel="cuDNN")
    assert "attention: SDPA cuDNN |" in runtime.describe()
