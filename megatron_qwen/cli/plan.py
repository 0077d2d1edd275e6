"""Plan a parallel layout: which TP/CP/PP/VPP/EP/DP/SP/recompute/optimizer layouts fit, ranked by predicted step time.

    megatron-qwen plan --config configs/qwen-72b.yaml --gpus 256 --gpus-per-node 8 --gpu h100-80gb \
        --seq-length 4096 --global-batch 2048 [--micro-batch N] [--tp T] [--cp C] [--fp8] [--top 10] [--json] \
        [--emit-overrides]

Every layout that the trainer's config validation accepts for that many GPUs is evaluated; those whose
most loaded GPU fits in memory (less the headroom) are listed fastest first with memory per GPU (weights,
fp32 gradients, optimizer state, activations, the buffer allowance) and step time (compute, TP, CP, EP, PP,
DP, pipeline bubble) and MFU, and the KV cache a token takes in generation (key/value heads only). --json
prints the same for scripts; --emit-overrides prints only the best layout as the trainer's dotted
overrides. Exit status 2: the request cannot be planned (the message says why and what would work).
`python tools/plan.py` takes the same arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from megatron_qwen.config import ConfigError, load_config
from megatron_qwen.plan import PlanError
from megatron_qwen.plan.hardware import find_gpu
from megatron_qwen.plan.memory import ModelShape
from megatron_qwen.plan.search import DEFAULT_BUFFER_GIB, DEFAULT_HEADROOM, GIB, Evaluation, Plan, Request, plan


def plan_overrides(result: Plan, evaluation: Evaluation) -> list[str]:
    """The dotted overrides that make the trainer run `evaluation`'s layout for this request."""
    request = result.request
    extra = [f"model.seq_length={request.seq_length}", f"training.global_batch_size={request.global_batch}"]
    if request.fp8:
        extra += [f"model.fp8={request.cfg.model.fp8 or 'tensorwise'}", "model.fp8_backend=te"]
    return evaluation.layout.overrides(request.cfg.model.is_moe) + extra


def kv_cache_line(shape: ModelShape) -> str:
    """The generation KV cache of one token, in all and per tensor-parallel rank."""
    per_token = shape.kv_cache_bytes_per_token(1)
    return (f"KV cache (bf16) {per_token / 1024:.0f} KiB per token: {shape.num_layers} layers x "
            f"{shape.kv_heads} key/value heads x head_dim {shape.head_dim} x 2 (K and V) x 2 bytes, split by TP "
            f"({per_token * 2**20 / GIB:.1f} GiB per 1M tokens before TP)")


def as_dict(result: Plan, evaluation: Evaluation) -> dict:
    m, t, layout = evaluation.memory, evaluation.time, evaluation.layout
    shape = ModelShape.from_config(result.request.cfg.model)
    return {
        "layout": dataclasses.asdict(evaluation.layout),
        # What a GPU of this layout would cache per token when generating (its TP share of its stage's layers).
        "kv_cache_bytes_per_token": shape.kv_cache_bytes_per_token(layout.tp, shape.num_layers // layout.pp),
        "overrides": plan_overrides(result, evaluation),
        "memory_gib": {
            "pipeline_rank": m.pp_rank,
            "weights": m.weights / GIB,
            "gradients": m.gradients / GIB,
            "optimizer": m.optimizer / GIB,
            "activations": m.activations / GIB,
            "buffers": m.buffers / GIB,
            "total": m.total / GIB,
        },
        "time_s": {"compute": t.compute, "memory": t.memory, "tp": t.tp, "cp": t.cp, "ep": t.ep, "pp": t.pp,
                   "dp": t.dp, "bubble": t.bubble, "optimizer": t.optimizer, "total": t.total},
        "mfu": evaluation.mfu,
        "rejection": evaluation.rejection,
    }


def format_table(result: Plan, top: int) -> str:
    request = result.request
    cfg = request.cfg
    shape = ModelShape.from_config(cfg.model)
    considered = len(result.fitting) + len(result.rejected)
    lines = [
        f"{cfg.model.name} ({shape.num_parameters() / 1e9:.1f}B parameters) on "
        f"{request.num_gpus} x {request.gpu.name} ({request.gpus_per_node} per node), "
        f"seq {request.seq_length}, global batch {request.global_batch}{', FP8' if request.fp8 else ''}: "
        f"{considered} valid layouts, {len(result.fitting)} fit in {request.usable_bytes / GIB:.1f} GiB "
        f"({request.headroom:.0%} headroom, buffers {request.buffer_bytes / GIB:.1f} GiB)",
        kv_cache_line(shape),
        "",
        f"{'#':>3}  {'layout':<52} {'weights':>7} {'grads':>6} {'optim':>6} {'activ':>6} {'buf':>4} {'GiB':>6}"
        f"   {'compute':>7} {'memory':>6} {'TP':>6} {'CP':>6} {'EP':>6} {'PP':>6} {'DP':>6} {'bubble':>6} {'optim':>6}"
        f" {'step s':>7}  {'MFU':>5}",
    ]
    for i, e in enumerate(result.fitting[:top], 1):
        m, t = e.memory, e.time
        lines.append(
            f"{i:>3}  {e.layout.describe():<52} {m.weights / GIB:>7.1f} {m.gradients / GIB:>6.1f} "
            f"{m.optimizer / GIB:>6.1f} {m.activations / GIB:>6.1f} {m.buffers / GIB:>4.1f} {m.total / GIB:>6.1f}   "
            f"{t.compute:>7.2f} {t.memory:>6.2f} {t.tp:>6.2f} {t.cp:>6.2f} {t.ep:>6.2f} {t.pp:>6.2f} {t.dp:>6.2f} "
            f"{t.bubble:>6.2f} {t.optimizer:>6.2f} {t.total:>7.2f}  {e.mfu:>5.1%}"
        )
    lines += ["", "overrides of #1: " + " ".join(plan_overrides(result, result.fitting[0]))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-qwen plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the model's config YAML (e.g. configs/qwen-72b.yaml)")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the job (the world size)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--gpu", required=True, help="GPU model from megatron_qwen/plan/gpus.yaml, e.g. h100-80gb")
    parser.add_argument("--seq-length", type=int, default=None, help="training sequence length (default: the config's)")
    parser.add_argument("--global-batch", type=int, default=None, help="sequences per step (default: the config's)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="consider only this micro-batch size (default: all)")
    parser.add_argument("--tp", type=int, default=None,
                        help="consider only this tensor-parallel size (default: every size the model allows)")
    parser.add_argument("--cp", type=int, default=None,
                        help="consider only this context-parallel size (default: every size the sequence allows)")
    parser.add_argument("--fp8", action="store_true", help="FP8 GEMMs through Transformer Engine")
    parser.add_argument("--top", type=int, default=10, help="layouts to list (default 10)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--emit-overrides", action="store_true", help="print only the best layout as dotted overrides")
    parser.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                        help=f"fraction of GPU memory kept free (default {DEFAULT_HEADROOM})")
    parser.add_argument("--buffer-gib", type=float, default=DEFAULT_BUFFER_GIB,
                        help="allowance per GPU for CUDA context, workspaces and NCCL buffers "
                             f"(default {DEFAULT_BUFFER_GIB})")
    parser.add_argument("--achievable-tflops", type=float, default=None,
                        help="sustained BF16 GEMM rate per GPU (default: the table's)")
    parser.add_argument("--inter-node-gbps", type=float, default=None,
                        help="network bandwidth per GPU, GB/s (default: the table's)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        gpu = find_gpu(args.gpu)
        if args.inter_node_gbps:
            gpu = dataclasses.replace(gpu, inter_node_bandwidth=args.inter_node_gbps * 1e9)
        request = Request(
            cfg=cfg,
            num_gpus=args.gpus,
            gpus_per_node=args.gpus_per_node,
            gpu=gpu,
            seq_length=args.seq_length or cfg.model.seq_length,
            global_batch=args.global_batch or cfg.training.global_batch_size,
            micro_batch=args.micro_batch,
            tp=args.tp,
            cp=args.cp,
            fp8=args.fp8,
            headroom=args.headroom,
            buffer_bytes=args.buffer_gib * GIB,
            achievable_flops=args.achievable_tflops * 1e12 if args.achievable_tflops else None,
        )
        result = plan(request)
    except (ConfigError, PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.emit_overrides:
        print(" ".join(plan_overrides(result, result.fitting[0])))
    elif args.json:
        out = {
            "model": cfg.model.name,
            "parameters": ModelShape.from_config(cfg.model).num_parameters(),
            "kv_cache_bytes_per_token": ModelShape.from_config(cfg.model).kv_cache_bytes_per_token(1),
            "gpu": gpu.name,
            "gpus": args.gpus,
            "gpus_per_node": args.gpus_per_node,
            "seq_length": request.seq_length,
            "global_batch": request.global_batch,
            "fp8": args.fp8,
            "usable_gib": request.usable_bytes / GIB,
            "valid_layouts": len(result.fitting) + len(result.rejected),
            "fitting_layouts": len(result.fitting),
            "layouts": [as_dict(result, e) for e in result.fitting[: args.top]],
        }
        print(json.dumps(out, indent=1))
    else:
        print(format_table(result, args.top))
    return 0

