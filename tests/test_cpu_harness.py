"""Each CPU-harness patch is still needed by megatron-core (its sites still assume CUDA, and the
unpatched call fails on a CPU-only machine) and sufficient (the patched call works and is right)."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from megatron_qwen.platform import cpu as harness


def _source(module: str, qualname: str) -> str:
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return inspect.getsource(obj)


@pytest.mark.parametrize("patch", harness.PATCHES, ids=lambda p: p.name)
def test_patch_sites_still_assume_cuda(patch):
    assert patch.sites, f"patch {patch.name} names no megatron-core site"
    for module, qualname, snippet in patch.sites:
        assert snippet in _source(module, qualname), (
            f"patch {patch.name} may no longer be needed: {module}.{qualname} no longer contains {snippet!r}"
        )


def test_factory_modules_still_hard_code_cuda():
    for module in harness.CUDA_FACTORY_MODULES:
        src = inspect.getsource(importlib.import_module(module))
        assert 'device="cuda"' in src or "device='cuda'" in src, f"{module} no longer hard-codes device='cuda'"


def _probe_current_device():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    emb = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True).get_emb(4)
    assert emb.shape == (4, 1, 1, 8) and emb.device.type == "cpu"


def _probe_rng_tracker():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    outside_before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        drawn = torch.rand(3)
    # The tensor-parallel stream is seeded with seed + 2718 + tp_rank, and forking leaves the default one alone.
    assert torch.equal(drawn, torch.rand(3, generator=torch.Generator().manual_seed(7 + 2718)))
    assert torch.equal(torch.get_rng_state(), outside_before)


def _probe_synchronize():
    torch.cuda.synchronize()


def _probe_factory_device():
    from megatron.core import utils

    tensors = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]
    norm, _ = utils.local_multi_tensor_l2_norm(2048, torch.zeros(1, dtype=torch.int), [tensors], False)
    assert norm.item() == pytest.approx(13.0)


def _probe_tensor_methods():
    from megatron.core.optimizer import optimizer

    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.full((4,), 2.0)
    optimizer.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=4.0)
    assert torch.allclose(param.grad, torch.full((4,), 2.0 / (4.0 + 1e-6)))


PROBES = {
    "cuda_current_device": _probe_current_device,
    "cuda_rng_tracker": _probe_rng_tracker,
    "cuda_synchronize": _probe_synchronize,
    "cuda_factory_device": _probe_factory_device,
    "cuda_tensor_methods": _probe_tensor_methods,
}


def test_every_patch_has_a_probe():
    assert set(PROBES) == {p.name for p in harness.PATCHES}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the unpatched calls only fail on a machine without CUDA")
@pytest.mark.parametrize("name", sorted(PROBES))
def test_patch_needed_and_sufficient(name):
    before = harness.applied_patches()
    try:
        harness.apply_cpu_harness()
        harness.remove_cpu_harness((name,))
        with pytest.raises((AssertionError, RuntimeError)):
            PROBES[name]()
        harness.apply_cpu_harness((name,))
        PROBES[name]()
    finally:
        harness.remove_cpu_harness()
        if before:
            harness.apply_cpu_harness(before)


def test_remove_restores_originals():
    before = harness.applied_patches()
    original = (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.type)
    harness.remove_cpu_harness()
    try:
        pristine = (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.type)
        harness.apply_cpu_harness()
        assert torch.cuda.current_device is not pristine[0]
        harness.remove_cpu_harness()
        assert (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.type) == pristine
    finally:
        if before:
            harness.apply_cpu_harness(before)
    assert (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.type) == original
