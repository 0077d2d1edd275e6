"""Worker for tests/test_fp8.py (4 gloo CPU ranks): FP8 at TP=2 against FP8 at TP=1, with the tensor-parallel
amax reduction and with every amax left local to its rank (to show what the reduction is for).

1. Single linears (--workdir/linears.json): a column- and a row-parallel FP8 linear at TP=2, with and without
   sequence parallelism, against the same linear at TP=1 (a one-rank group), the same full weights and data.
   No value is cast to float8 twice here, so the only differences left are those of fp32 summation order.
2. The tiny Qwen (equivalence_worker's run): one forward+backward at TP=1 (DP=4) and at TP=2 x PP=2 with SP,
   loss and full gradients written under --workdir/NAME.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: fp8_reference

from equivalence_worker import run  # noqa: E402
from fp8_reference import build_linear, forward_backward, linear_data  # noqa: E402

T, K, N = 64, 256, 384
TP1 = "tp1-pp1-vpp1-sp0"
TP2PP2SP = "tp2-pp2-vpp1-sp1"
REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def local_amax(enabled: bool = True):
    """Every rank scales by its own shard's amax: the TP reduction switched off (only to measure its effect)."""
    from megatron_qwen.model import fp8

    saved = fp8.amax_needs_tp_reduction
    if enabled:
        fp8.amax_needs_tp_reduction = lambda split_dim, axiswise_dim: False
    try:
        yield
    finally:
        fp8.amax_needs_tp_reduction = saved


@functools.cache
def _config(tp: int, sp: bool):
    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import transformer_config
    from megatron_qwen.platform.runtime import Runtime

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"parallel.tp={tp}", f"parallel.sp={str(sp).lower()}"])
    return transformer_config(cfg, Runtime.cpu())


def _gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(group.size())]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _linear(kind: str, recipe: str, config, group, w, bias):
    layer = build_linear(kind, recipe, K, N, config, group, bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def compare_casts(tp_group) -> dict:
    """Cast a [T, K] operand whose second half of features is 1e-5 of the first (so that TP=1's scale puts it
    near e4m3's subnormal range) from its shards, split along the features (a row-parallel input) and along the
    tokens (a sequence-parallel input), and count the elements whose dequantized value differs from the cast
    of the whole tensor."""
    from torchao.float8.float8_training_tensor import GemmInputRole

    from megatron_qwen.model.fp8 import Float8Scaling, _Operand, _to_float8

    x = linear_data(T, K, N, seed=7)[0]
    x[:, K // 2:] *= 1e-5
    r = tp_group.rank()
    counts = {}
    for recipe in ("tensorwise", "rowwise"):
        scaling = Float8Scaling.for_recipe(recipe)
        cast = scaling.config.cast_config_input

        def dequantized(t, split_dim, group):
            (t8,) = _to_float8([_Operand(t, cast, GemmInputRole.INPUT, -1, split_dim)], scaling, group)
            return t8._data.float() / t8._scale

        whole = dequantized(x, None, None)
        for split_dim in (1, 0):
            shard = x.chunk(2, dim=split_dim)[r]
            for local in (False, True):
                with local_amax(local):
                    mine = dequantized(shard, split_dim, tp_group)
                differs = (_gather(mine, split_dim, tp_group) != whole).sum().item()
                counts[f"{recipe} split {'features' if split_dim else 'tokens'}"
                       f"{' local-amax' if local else ''}"] = differs
    return counts


def compare_linears(workdir: Path) -> None:
    from megatron.core import parallel_state

    from megatron_qwen.platform.launch import init_distributed

    init_distributed(2, 1, None, device="cpu")
    tp_group = parallel_state.get_tensor_model_parallel_group()
    r, rank = parallel_state.get_tensor_model_parallel_rank(), dist.get_rank()
    alone = [dist.new_group([i]) for i in range(dist.get_world_size())][rank]  # TP=1 on every rank
    x, w, bias, dy = linear_data(T, K, N, seed=5)
    n, k, t = (slice(r * N // 2, (r + 1) * N // 2), slice(r * K // 2, (r + 1) * K // 2),
               slice(r * T // 2, (r + 1) * T // 2))
    results = {}
    for recipe in ("tensorwise", "rowwise"):
        for kind in ("column", "row"):
            b = bias if kind == "column" else None
            reference = forward_backward(_linear(kind, recipe, _config(1, False), alone, w, b), x, dy)
            for sp in (False, True):
                for local in (False, True):
                    if kind == "column":  # weight split along its outputs, the input whole (or its tokens, under SP)
                        layer = _linear(kind, recipe, _config(2, sp), tp_group, w[n], bias[n])
                        with local_amax(local):
                            y, dx, dw = forward_backward(layer, x[t] if sp else x, dy[:, n])
                        got = (_gather(y, 1, tp_group), _gather(dx, 0, tp_group) if sp else dx,
                               _gather(dw, 0, tp_group))
                    else:  # weight split along its inputs; under SP the output is scattered over the tokens
                        layer = _linear(kind, recipe, _config(2, sp), tp_group, w[:, k], None)
                        with local_amax(local):
                            y, dx, dw = forward_backward(layer, x[:, k], dy[t] if sp else dy)
                        got = (_gather(y, 0, tp_group) if sp else y, _gather(dx, 1, tp_group), _gather(dw, 1, tp_group))
                    name = f"{recipe} {kind}{' SP' if sp else ''}{' local-amax' if local else ''}"
                    results[name] = {
                        out: ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
                        for out, a, ref in zip(("output", "input grad", "weight grad"), got, reference)
                    }
    casts = compare_casts(tp_group)
    if rank == 0:
        (workdir / "linears.json").write_text(json.dumps({"linears": results, "casts": casts}, indent=1))


@contextlib.contextmanager
def recorded_scales(workdir: Path, name: str):
    """Record the scale of every float8 cast of the run (tensorwise: one number each) by GEMM role, and write
    this rank's lists to workdir/name/scales-RANK.json if it is tensor-parallel rank 0 (the other TP ranks
    cast the same tensors, or their shards)."""
    from megatron.core import parallel_state

    from megatron_qwen.model import fp8

    records: dict[str, list[float]] = {}
    saved = fp8._to_float8

    def recording(operands, scaling, group):
        out = saved(operands, scaling, group)
        for op, t in zip(operands, out):
            records.setdefault(op.role.name, []).append(t._scale.item())
        return out

    fp8._to_float8 = recording
    try:
        yield
    finally:
        fp8._to_float8 = saved
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        (workdir / name / f"scales-{dist.get_rank()}.json").write_text(json.dumps(records))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    compare_linears(args.workdir)
    extra = ("model.fp8=tensorwise",)
    with recorded_scales(args.workdir, "tp1"):
        # also saves the weights every run starts from
        run(TP1, args.workdir, reference=True, extra=extra, out_name="tp1")
    with recorded_scales(args.workdir, "tp2pp2sp"):
        run(TP2PP2SP, args.workdir, reference=False, extra=extra, out_name="tp2pp2sp")
    with local_amax(), recorded_scales(args.workdir, "tp2pp2sp-local-amax"):
        run(TP2PP2SP, args.workdir, reference=False, extra=extra, out_name="tp2pp2sp-local-amax")


if __name__ == "__main__":
    main()
