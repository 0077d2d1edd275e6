"""Checkpoint size and optimizer-state bytes of LoRA against full fine-tuning, as a Markdown table.

    python tools/bench_lora.py [--config configs/tiny.yaml] [--formula configs/qwen-7b.yaml] [--rank 16]

Measured (`--config`, one CPU rank, fp32): the model is built twice, with every parameter trained and with
``peft.method=lora`` at `--rank` on q, k, v, o, gate, up and down; each takes one optimizer step on a random batch
(so that Adam's state exists) and is saved as the training loop saves it. The table gives the trained parameters,
the bytes of the optimizer's state (every tensor it holds: Adam's two moments, and fp32 main weights when the model
is in bf16) and the checkpoint directory's bytes on disk.

Computed (`--formula`, bf16 training as on GPUs): parameters counted from the config's shape; the optimizer holds
12 bytes per trained parameter (fp32 main weight and two fp32 moments) and a checkpoint 14 (the bf16 weight and
those 12); an adapter-only checkpoint holds the adapters alone, the full one every parameter.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TARGETS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def optimizer_bytes(optimizer) -> int:
    """Bytes of every tensor the optimizer keeps: its state (moments) and, for a bf16 model, its fp32 main weights."""
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if hasattr(v, "numel") and v.dim())
        for group in getattr(opt, "shard_fp32_from_float16_groups", None) or getattr(
                opt, "fp32_from_float16_groups", None) or []:
            total += sum(p.numel() * p.element_size() for p in group)
    return total


def measure(config: str, rank: int, lora: bool, workdir: Path) -> dict:
    import torch

    from megatron_qwen.checkpoint.io import save_checkpoint
    from megatron_qwen.config import load_config
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.training.forward_backward import forward_backward, micro_batch_iterators
    from megatron_qwen.training.units import build_unit

    seq = 32
    peft = ["peft.method=lora", f"peft.rank={rank}", f"peft.alpha={2 * rank}", f"peft.target={TARGETS}"] if lora else []
    cfg = load_config(config, ["training.micro_batch_size=1", "training.global_batch_size=1",
                               f"model.seq_length={seq}", *peft])
    unit = build_unit(cfg, Runtime.cpu(), "lm")
    tokens = torch.randint(0, 1000, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    micro = [{"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, seq)}]
    unit.set_lr(0)
    unit.zero_grad()
    forward_backward(unit.chunks, micro_batch_iterators(unit.chunks, micro), 1, seq, 1)
    unit.step()
    path = save_checkpoint(workdir / ("lora" if lora else "full"), 1, [unit], {}, keep_last=1)
    trained = sum(p.numel() for chunk in unit.modules for p in chunk.parameters() if p.requires_grad)
    return {"trained": trained, "optimizer": optimizer_bytes(unit.optimizer), "checkpoint": directory_bytes(path)}


def counts(config: str, rank: int) -> tuple[int, int]:
    """(every parameter, LoRA parameters at `rank` on the seven projections) of the config's model."""
    from megatron_qwen.config import load_config

    m = load_config(config).model
    h, f, layers, vocab = m.hidden_size, m.ffn_hidden_size, m.num_layers, m.padded_vocab_size
    q, kv = m.num_attention_heads * m.head_dim, m.kv_heads * m.head_dim
    per_layer = h * (q + 2 * kv) + (q + 2 * kv) * m.qkv_bias + q * h + 3 * h * f + 2 * h
    total = vocab * h * (1 if m.tie_word_embeddings else 2) + layers * per_layer + h
    adapters = layers * rank * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + f) + (f + h))
    return total, adapters


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.1f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--formula", default=str(REPO / "configs" / "qwen-7b.yaml"))
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("MEGATRON_QWEN_DEVICE", "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    from megatron_qwen.platform.launch import init_distributed

    init_distributed(1, 1, None, device="cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        full, lora = (measure(args.config, args.rank, flag, Path(tmp)) for flag in (False, True))
    name = Path(args.config).stem
    for what, key in (("trained parameters", "trained"), ("optimizer state", "optimizer"),
                      ("checkpoint on disk", "checkpoint")):
        fmt = (lambda n: f"{n:,}") if key == "trained" else mib
        rows.append((f"{name} (measured, fp32)", what, fmt(full[key]), fmt(lora[key]), f"{lora[key] / full[key]:.2%}"))
    total, adapters = counts(args.formula, args.rank)
    name = Path(args.formula).stem
    for what, full_n, lora_n in (("trained parameters", total, adapters),
                                 ("optimizer state (12 B / trained parameter)", 12 * total, 12 * adapters),
                                 ("checkpoint (14 B / saved parameter)", 14 * total, 14 * adapters)):
        fmt = (lambda n: f"{n:,}") if what == "trained parameters" else mib
        rows.append((f"{name} (formula, bf16)", what, fmt(full_n), fmt(lora_n), f"{lora_n / full_n:.2%}"))
    print(f"LoRA rank {args.rank} on q, k, v, o, gate, up, down\n")
    print("| model | quantity | full fine-tuning | LoRA | LoRA / full |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
