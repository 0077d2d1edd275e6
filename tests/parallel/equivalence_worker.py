"""Worker for tests/test_parallel_equivalence.py, launched with torchrun on gloo CPU ranks.

--reference (1 rank): build the tiny Qwen from the seed and run one forward+backward.
--layouts L1,L2,... (N ranks): for each layout (e.g. ``tp2-pp2-vpp1-sp1``) rebuild the parallel
state, build the model from the same seed, run the same global batch. Each run writes its initial
weights, its loss and its gradients under --workdir (weights and gradients as dist_checkpointing
checkpoints, so they are stored at full, unsharded shapes).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

MODEL_OVERRIDES = ["model.padded_vocab_size=1024", "model.seq_length=32"]
SEQ, GLOBAL_BATCH, MICRO_BATCH, SEED = 32, 8, 1, 1234


def parse_layout(name: str) -> tuple[dict, bool]:
    """``tp2-pp2-vpp1-sp1`` -> the parallel settings; a ``-p2p`` suffix asks for the interleaved schedule's
    overlapped p2p transfers (what GPU ranks run) on these CPU ranks too."""
    match = re.fullmatch(r"tp(\d+)-pp(\d+)-vpp(\d+)-sp([01])(-p2p)?", name)
    if not match:
        raise SystemExit(f"bad layout {name!r}; expected e.g. tp2-pp2-vpp1-sp1")
    tp, pp, vpp, sp = (int(g) for g in match.groups()[:4])
    return {"tp": tp, "pp": pp, "vpp": vpp, "sp": bool(sp)}, match.group(5) is not None


def global_batch(vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=gen)


def run(name: str, workdir: Path, reference: bool, extra: tuple[str, ...] = (), out_name: str | None = None) -> None:
    """One forward+backward at layout `name` (config overrides `extra` added), written to `out_name`
    (default: "reference" or the layout's name)."""
    from megatron.core import parallel_state

    from megatron_qwen.config import load_config, resolve
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.launch import detect_launch, init_distributed
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.checkpoint.io import save_model
    from megatron_qwen.training.forward_backward import forward_backward
    from megatron_qwen.training.units import wrap_ddp

    layout_args, overlap_p2p = parse_layout(name)
    overrides = MODEL_OVERRIDES + [f"parallel.{k}={str(v).lower()}" for k, v in layout_args.items()]
    overrides += [f"training.micro_batch_size={MICRO_BATCH}", f"training.global_batch_size={GLOBAL_BATCH}", *extra]
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml", overrides)
    cfg, layout, _ = resolve(cfg, detect_launch().world_size)

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_distributed(layout.tp, layout.pp, layout.vpp, device="cpu", seed=SEED)
    chunks = build_model(cfg, Runtime.cpu())
    chunks[0].config.overlap_p2p_comm = overlap_p2p  # one config object for all chunks
    out = workdir / (out_name or ("reference" if reference else name))
    save_model(chunks, out / "initial")
    model = wrap_ddp(chunks, cfg)

    num_micro = GLOBAL_BATCH // (MICRO_BATCH * layout.dp)
    tokens = global_batch(cfg.model.padded_vocab_size)
    mine = tokens.view(layout.dp, num_micro, MICRO_BATCH, SEQ + 1)[parallel_state.get_data_parallel_rank()]
    batches = [
        {"tokens": b[:, :-1], "labels": b[:, 1:], "loss_mask": torch.ones(MICRO_BATCH, SEQ)} for b in mine
    ]
    iterators = [iter(list(batches)) for _ in model] if len(model) > 1 else iter(batches)
    loss = forward_backward(model, iterators, num_micro, SEQ, MICRO_BATCH)["lm loss"]

    # Store gradients in the parameters so that dist_checkpointing writes them at full shape.
    for chunk in model:
        for param in chunk.parameters():
            param.data.copy_(param.main_grad)
    save_model(model, out / "grads")
    if torch.distributed.get_rank() == 0:
        (out / "loss.json").write_text(json.dumps({"loss": loss.item(), "dp": layout.dp}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--reference", action="store_true")
    group.add_argument("--layouts", type=str)
    args = parser.parse_args()
    if args.reference:
        run("tp1-pp1-vpp1-sp0", args.workdir, reference=True)
    else:
        for name in args.layouts.split(","):
            run(name, args.workdir, reference=False)


if __name__ == "__main__":
    main()
