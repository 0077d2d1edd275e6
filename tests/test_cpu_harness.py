"""Each CPU-harness patch is still needed by megatron-core (its sites still assume CUDA, and the
unpatched call fails on a CPU-only machine) and sufficient (the patched call works and is right)."""

from __future__ import annotations

import importlib
import inspect
import os
import tempfile

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


def _probe_tied_embedding_copy():
    """The last pipeline stage of a tied model takes the embedding from an all-reduce over the embedding group
    (here a one-rank group; the chunk is the second virtual stage, so not the first stage)."""
    import types

    from megatron.core.models.common.language_module.language_module import LanguageModule

    weight = torch.nn.Parameter(torch.arange(6.0).view(3, 2))
    last_stage = types.SimpleNamespace(
        pre_process=False, post_process=True, share_embeddings_and_output_weights=True, vp_stage=1, vp_size=2,
        pp_group=None, embd_group=torch.distributed.group.WORLD, config=types.SimpleNamespace(
            pipeline_model_parallel_size=2),
        embedding=None, output_layer=types.SimpleNamespace(weight=weight),
        shared_embedding_or_output_weight=lambda: weight, _is_in_embd_group=lambda: True,
    )
    LanguageModule.setup_embeddings_and_output_layer(last_stage)
    # megatron-core zeroes the copy before the all-reduce: one rank contributes zeros.
    assert weight.device.type == "cpu" and weight.shared_embedding and torch.equal(weight, torch.zeros(3, 2))


def _onednn_primitives(fn):
    """fn()'s result and the oneDNN primitives it executed, read from oneDNN's verbose log (printed by C
    code on file descriptor 1, so captured there)."""
    with tempfile.TemporaryFile(mode="w+") as log:
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                out = fn()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        return out, [line for line in log.read().splitlines() if ",exec," in line]


def onednn_takes_cpu_fp8_gemms() -> bool:
    """torch 2.13 sends a CPU _scaled_mm of two e4m3 operands to oneDNN on CPUs with AMX int8 while oneDNN is
    enabled (Intel Sapphire Rapids and later); on other CPUs it runs its emulated kernel anyway."""
    return torch._C._get_mkldnn_enabled() and bool(torch.cpu.get_capabilities().get("amx_int8", False))


def _probe_fp8_gemm_kernel():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(64, 32, generator=generator).to(torch.float8_e4m3fn)
    b = torch.randn(48, 32, generator=generator).to(torch.float8_e4m3fn)
    scale_a, scale_b = torch.tensor(0.5), torch.tensor(4.0)
    out, primitives = _onednn_primitives(
        lambda: torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
    )
    assert not [p for p in primitives if ",matmul," in p], primitives  # not oneDNN's (reference) FP8 matmul
    # The products of float8 values are exact in fp32: the dequantised fp32 product, rounded once to bf16.
    assert torch.equal(out, (a.float() @ b.float().t() * 2.0).bfloat16())


def _probe_checkpoint_writes():
    import multiprocessing.process

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    started = []
    original_start = multiprocessing.process.BaseProcess.start

    def counting_start(process):
        started.append(process)
        return original_start(process)

    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    with tempfile.TemporaryDirectory() as directory:
        multiprocessing.process.BaseProcess.start = counting_start
        try:
            dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", weight.clone())}, directory)
        finally:
            multiprocessing.process.BaseProcess.start = original_start
        loaded = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(3, 4))}, directory)
    assert not started, f"the save started {len(started)} processes"
    assert torch.equal(loaded["w"], weight)


def _probe_moe_router_gemm():
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(5, 8, generator=generator, requires_grad=True)
    weight = torch.randn(4, 8, generator=generator, requires_grad=True)
    try:
        logits = router_gating_linear(tokens, weight, None, torch.float32)
    except NameError as exc:  # the unbound te_general_gemm
        raise AssertionError(str(exc)) from exc
    logits.sum().backward()
    assert torch.allclose(logits, tokens @ weight.t())
    assert torch.allclose(weight.grad, tokens.sum(0).expand(4, 8))


def _dispatcher_counts():
    """A stand-in for the alltoall dispatcher's state after routing: token counts per rank and per expert."""
    import types

    from megatron.core.transformer.moe import token_dispatcher

    return types.SimpleNamespace(
        drop_and_pad=False, cuda_dtoh_point="before_permutation_1", cuda_sync_point="before_permutation_1",
        cuda_dtoh_stream=token_dispatcher.torch.cuda.Stream(), input_splits=torch.tensor([3, 1]),
        output_splits=torch.tensor([2, 2]), output_splits_tp=torch.tensor([4]), num_out_tokens=torch.tensor(4),
        num_local_experts=2, num_global_tokens_per_local_expert=torch.tensor([[1, 3]]),
        config=types.SimpleNamespace(moe_permute_fusion=False),
    )


def _probe_moe_dispatcher_streams():
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    state = _dispatcher_counts()
    tokens_per_expert = MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize(
        state, "before_permutation_1", torch.tensor([1, 3]))
    assert torch.equal(tokens_per_expert, torch.tensor([1, 3]))


def _probe_moe_split_sizes():
    """Split sizes reach torch.distributed.all_to_all_single as a sequence of ints (a tensor of several counts is
    refused there with a TypeError; the two-rank MoE runs of tests/test_moe.py exercise the exchange itself)."""
    import numpy as np

    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    state = _dispatcher_counts()
    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize(state, "before_permutation_1", torch.tensor([1, 3]))
    for name, expected in (("input_splits", [3, 1]), ("output_splits", [2, 2]), ("output_splits_tp", [4])):
        splits = getattr(state, name)
        assert isinstance(splits, np.ndarray) and splits.tolist() == expected, (name, splits)


def _uneven_collectives_rank(rank: int, port: int, patched: bool, results) -> None:
    """One of two gloo ranks: rank r gathers r + 1 rows of r's and reduce-scatters 3 rows to [1, 2] rows."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from megatron.core.tensor_parallel import mappings

        if patched:
            harness.apply_cpu_harness(("cuda_current_device", "uneven_collectives_on_gloo"))
        else:
            harness.apply_cpu_harness(("cuda_current_device",))
        group = torch.distributed.group.WORLD
        gathered = mappings._gather_along_first_dim(torch.full((rank + 1, 2), float(rank)), group, [1, 2])
        scattered = mappings._reduce_scatter_along_first_dim(torch.arange(6.0).view(3, 2) * (rank + 1), group, [1, 2])
        results.put((rank, gathered.tolist(), scattered.tolist()))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        results.put((rank, "error", f"{type(exc).__name__}: {exc}"))
    finally:
        torch.distributed.destroy_process_group()


def _probe_uneven_collectives():
    """Two gloo ranks gather 1 and 2 rows and reduce-scatter into 1 and 2 rows (what the alltoall dispatcher does
    over TP ranks that routed different token counts)."""
    import torch.multiprocessing as mp
    from spawn import free_port

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    patched = "uneven_collectives_on_gloo" in harness.applied_patches()
    mp.start_processes(_uneven_collectives_rank, args=(free_port(), patched, results), nprocs=2,
                       start_method="spawn")
    by_rank = {}
    while not results.empty():
        rank, gathered, scattered = results.get()
        by_rank[rank] = (gathered, scattered)
    assert set(by_rank) == {0, 1} and all(g != "error" for g, _ in by_rank.values()), by_rank
    whole = [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    for rank, (gathered, scattered) in by_rank.items():
        assert gathered == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        rows = [[3 * v for v in row] for row in whole]  # ranks contribute 1x and 2x
        assert scattered == (rows[:1] if rank == 0 else rows[1:]), (rank, scattered)


PROBES = {
    "cuda_current_device": _probe_current_device,
    "cuda_rng_tracker": _probe_rng_tracker,
    "cuda_synchronize": _probe_synchronize,
    "cuda_factory_device": _probe_factory_device,
    "cuda_tensor_methods": _probe_tensor_methods,
    "cpu_fp8_gemm_kernel": _probe_fp8_gemm_kernel,
    "cpu_checkpoint_writes_in_process": _probe_checkpoint_writes,
    "tied_embedding_copy": _probe_tied_embedding_copy,
    "moe_router_gemm_without_te": _probe_moe_router_gemm,
    "moe_dispatcher_streams": _probe_moe_dispatcher_streams,
    "moe_split_sizes_on_host": _probe_moe_split_sizes,
    "uneven_collectives_on_gloo": _probe_uneven_collectives,
}
# Probes that reduce over a process group (the one-rank group of the `single_rank` fixture).
NEEDS_PROCESS_GROUP = {"tied_embedding_copy", "cpu_checkpoint_writes_in_process"}

# Patches that are needed only on some CPUs, and the test saying whether this one is such a CPU.
NEEDED_HERE = {"cpu_fp8_gemm_kernel": onednn_takes_cpu_fp8_gemms}


def test_every_patch_has_a_probe():
    assert set(PROBES) == {p.name for p in harness.PATCHES}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the unpatched calls only fail on a machine without CUDA")
@pytest.mark.parametrize("name", sorted(PROBES))
def test_patch_needed_and_sufficient(name, request):
    if name in NEEDS_PROCESS_GROUP:
        request.getfixturevalue("single_rank")
    before = harness.applied_patches()
    try:
        harness.apply_cpu_harness()
        harness.remove_cpu_harness((name,))
        if NEEDED_HERE.get(name, lambda: True)():
            with pytest.raises((AssertionError, RuntimeError)):
                PROBES[name]()
        else:
            PROBES[name]()  # this CPU does not need it (and the patch changes nothing here)
        harness.apply_cpu_harness((name,))
        PROBES[name]()
    finally:
        harness.remove_cpu_harness()
        if before:
            harness.apply_cpu_harness(before)


def test_remove_restores_originals():
    before = harness.applied_patches()
    original = (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.type, torch._scaled_mm)
    harness.remove_cpu_harness()
    try:
        pristine = (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.type, torch._scaled_mm)
        harness.apply_cpu_harness()
        assert torch.cuda.current_device is not pristine[0] and torch._scaled_mm is not pristine[3]
        harness.remove_cpu_harness()
        assert (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.type, torch._scaled_mm) == pristine
    finally:
        if before:
            harness.apply_cpu_harness(before)
    assert (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.type, torch._scaled_mm) == original
