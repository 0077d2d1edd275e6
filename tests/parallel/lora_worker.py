"""One optimizer step of a language model with low-rank adapters on a fixed global batch at several layouts.

``--reference`` (one rank) writes the starting model (base weights from the seed, every adapter's B made nonzero
so that A's gradient is too) and the TP=1 results; ``--layouts`` then runs each layout on the launch's ranks (data
parallelism takes the rest) from that checkpoint and the same global batch. Each run saves the model after the step
(base and adapters at full shape) and the adapters' reduced gradients in the same form, and writes its loss,
gradient norm and what DDP and the optimizer hold: which parameters have a main gradient and how many elements
the Adam moments cover, against the adapters' element count. A layout with ``moe`` set runs a tiny Qwen2-MoE
instead (a shared expert with its gate, layer 1 dense among MoE layers), its reference ``reference-moe`` from
``init-moe``: the shared experts take adapters, the routed experts and routers stay frozen.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
VOCAB, ROWS, LENGTH, MICRO = 128, 8, 16, 2
MODEL = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.ffn_hidden_size=128", f"model.padded_vocab_size={VOCAB}", "model.seq_length=32",
         "model.max_position_embeddings=64"]
MOE = ["model.num_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32",
       "model.moe_shared_expert_ffn_hidden_size=48", "model.moe_shared_expert_gate=true",
       "model.moe_mlp_only_layers=[1]", "model.moe_aux_loss_coeff=0.01"]
PEFT = ["peft.method=lora", "peft.rank=4", "peft.alpha=8", "training.lr=1e-3", "training.min_lr=1e-3",
        "training.lr_warmup_iters=0", "training.weight_decay=0.1"]


def batch() -> list[dict]:
    """The global batch: random token rows with next-token labels, the loss on every position but the first."""
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (ROWS, LENGTH + 1), generator=gen)
    mask = torch.ones(ROWS, LENGTH)
    mask[:, 0] = 0.0
    return [{"tokens": tokens[i:i + MICRO, :-1], "labels": tokens[i:i + MICRO, 1:], "loss_mask": mask[i:i + MICRO]}
            for i in range(0, ROWS, MICRO)]


def perturb_adapters(unit) -> None:
    """Give every adapter's B nonzero values (a fresh B is zero, which leaves A without a gradient)."""
    from megatron_qwen.model.lora import lora_modules

    gen = torch.Generator().manual_seed(11)
    for module in lora_modules(unit.modules):
        for b in module.lora_b.values():
            b.data.copy_(0.05 * torch.randn(b.shape, generator=gen))


def optimizer_elements(optimizer) -> int:
    """Elements covered by the Adam first moments of this rank's optimizer(s)."""
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            total += state["exp_avg"].numel()
    return total


def run(name: str, layout: dict, workdir: Path, reference: bool) -> None:
    from megatron.core import parallel_state

    from megatron_qwen.checkpoint.io import load_model, save_model
    from megatron_qwen.config import load_config, resolve
    from megatron_qwen.checkpoint.adapters import is_adapter_key
    from megatron_qwen.platform.launch import detect_launch, init_distributed
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.training.forward_backward import forward_backward, micro_batch_iterators
    from megatron_qwen.training.units import build_unit

    world = detect_launch().world_size
    moe = layout.get("moe", False)
    cfg = load_config(REPO / "configs" / "tiny.yaml", MODEL + (MOE if moe else []) + PEFT + [
        f"parallel.tp={layout['tp']}", f"parallel.ep={layout.get('ep', 1)}", f"parallel.pp={layout['pp']}",
        f"parallel.vpp={layout['vpp']}",
        f"parallel.sp={str(layout['sp']).lower()}",
        f"parallel.use_distributed_optimizer={str(layout['distopt']).lower()}",
        f"training.micro_batch_size={MICRO}", f"training.global_batch_size={ROWS}",
        *(["model.fp8=tensorwise"] if layout["fp8"] else []),
    ])
    cfg, resolved, _ = resolve(cfg, world)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_distributed(resolved.tp, resolved.pp, resolved.vpp, device="cpu", ep=resolved.ep)
    unit = build_unit(cfg, Runtime.cpu(), "lm")
    init = workdir / ("init-moe" if moe else "init")
    if reference:
        perturb_adapters(unit)
        save_model(unit.chunks, init)
    load_model(unit.chunks, init)

    dp = resolved.dp
    share = ROWS // dp // MICRO
    rank = parallel_state.get_data_parallel_rank()
    micro = batch()[rank * share:(rank + 1) * share]
    unit.set_lr(0)
    unit.zero_grad()
    out = forward_backward(unit.chunks, micro_batch_iterators(unit.chunks, micro), len(micro), LENGTH, MICRO)
    grad_norm, updated = unit.step()

    named = [(n, p) for chunk in unit.modules for n, p in chunk.named_parameters()]
    with_main_grad = [n for chunk in unit.chunks for n, p in chunk.module.named_parameters() if hasattr(p, "main_grad")]
    adapter_elements = sum(p.numel() for n, p in named if is_adapter_key(n))
    moments = torch.tensor([optimizer_elements(unit.optimizer)], dtype=torch.float64)
    if cfg.parallel.use_distributed_optimizer:  # each data-parallel rank holds a share of the state
        torch.distributed.all_reduce(moments, group=parallel_state.get_data_parallel_group())
    out_dir = workdir / name
    save_model(unit.chunks, out_dir / "after")
    if not cfg.parallel.use_distributed_optimizer:  # its buffers hold reduced gradients only in this rank's share
        for n, p in named:
            if is_adapter_key(n):
                p.data.copy_(p.main_grad)
        save_model(unit.chunks, out_dir / "grads")
    checks = {
        "loss": float(out["lm loss"]), "grad_norm": float(grad_norm), "updated": bool(updated),
        "trainable_not_adapters": [n for n, p in named if p.requires_grad and not is_adapter_key(n)],
        "main_grads_not_adapters": [n for n in with_main_grad if not is_adapter_key(n)],
        "adapters_without_main_grad": len([n for n, p in named if is_adapter_key(n)]) - len(
            [n for n in with_main_grad if is_adapter_key(n)]),
        "adapter_elements": adapter_elements, "moment_elements": int(moments.item()),
        "base_elements": sum(p.numel() for n, p in named if not is_adapter_key(n)),
    }
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, checks)
    if torch.distributed.get_rank() == 0:
        (out_dir / "reports.json").write_text(json.dumps({"dp": dp, "ranks": gathered}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--layouts", default="",
                        help="name:tp,pp,vpp,sp,distopt,fp8[,ep];... (fp8: FP8 base GEMMs; ep given: the MoE model)")
    args = parser.parse_args()
    if args.reference:
        one_rank = {"tp": 1, "pp": 1, "vpp": 1, "sp": False, "distopt": False, "fp8": False}
        run("reference", one_rank, args.workdir, reference=True)
        run("reference-moe", {**one_rank, "moe": True}, args.workdir, reference=True)
        return
    for item in args.layouts.split(";"):
        name, sizes = item.split(":")
        tp, pp, vpp, sp, distopt, fp8, *ep = (int(x) for x in sizes.split(","))
        moe = {"moe": True, "ep": ep[0]} if ep else {}
        run(name, {"tp": tp, "pp": pp, "vpp": vpp, "sp": bool(sp), "distopt": bool(distopt), "fp8": bool(fp8), **moe},
            args.workdir, reference=False)


if __name__ == "__main__":
    main()
