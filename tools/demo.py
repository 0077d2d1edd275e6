"""The demo: the tiny Qwen on 4 CPU ranks at TP=2 x PP=2, one forward+backward on real text.

    python tools/demo.py [--nproc 4] [--tp 2] [--pp 2]

Run without a launcher it starts itself under torchrun; each rank then builds its shard of the model
with megatron-core, and the loss of a batch of this repository's own source code, tokenized with the
Qwen tokenizer, is printed with the gradient norm.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def text_batch(tokenizer, count: int, length: int):
    """`count` windows of `length + 1` tokens from the repository's Python sources."""
    import torch

    text = "\n".join(p.read_text() for p in sorted((REPO / "megatron_qwen").rglob("*.py")))
    ids = torch.tensor(tokenizer.encode(text))
    needed = count * (length + 1)
    if ids.numel() < needed:
        raise SystemExit(f"only {ids.numel()} tokens of text, the demo needs {needed}")
    return ids[:needed].view(count, length + 1)


def run_rank(args) -> None:
    import torch
    from megatron.core import parallel_state

    from megatron_qwen.config import load_config, resolve
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.launch import detect_launch, init_distributed, use_cpu_ranks
    from megatron_qwen.tokenizer import load_tokenizer
    from megatron_qwen.training.forward_backward import forward_backward, wrap_ddp

    overrides = [f"parallel.tp={args.tp}", f"parallel.pp={args.pp}", f"parallel.sp={'true' if args.tp > 1 else 'false'}"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    cfg, layout, notes = resolve(cfg, detect_launch().world_size)
    on_cpu = use_cpu_ranks(cfg.parallel.device)
    info = init_distributed(layout.tp, layout.pp, None, device=cfg.parallel.device, seed=cfg.training.seed)
    chunks = build_model(cfg, on_cpu)
    model = wrap_ddp(chunks, cfg)

    t = cfg.training
    seq = cfg.model.seq_length
    num_micro = t.global_batch_size // (t.micro_batch_size * layout.dp)
    tokens = text_batch(load_tokenizer(), t.global_batch_size, seq)
    mine = tokens.view(layout.dp, num_micro, t.micro_batch_size, seq + 1)[parallel_state.get_data_parallel_rank()]
    batches = [{"tokens": b[:, :-1], "labels": b[:, 1:], "loss_mask": torch.ones(b.shape[0], seq)} for b in mine]
    loss = forward_backward(model, iter(batches), num_micro, seq, t.micro_batch_size)["lm loss"]

    # Squared grad norm and parameter count of the whole model: TP-replicated tensors counted once.
    totals = torch.zeros(2, dtype=torch.float64)
    for chunk in model:
        for p in chunk.parameters():
            if getattr(p, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_rank() == 0:
                totals += torch.tensor([p.main_grad.double().pow(2).sum().item(), p.numel()], dtype=torch.float64)
    torch.distributed.all_reduce(totals, group=parallel_state.get_model_parallel_group())
    if info.rank == 0:
        for note in notes:
            print(f"note: {note}")
        print(
            f"tiny Qwen ({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, vocab {cfg.model.padded_vocab_size}) "
            f"at TP={layout.tp} x PP={layout.pp} x DP={layout.dp}{' with SP' if layout.sp else ''} on {info.world_size} "
            f"{'CPU (gloo)' if on_cpu else 'GPU (nccl)'} ranks, {int(totals[1]):,} parameters"
        )
        print(f"global batch {t.global_batch_size} x {seq} tokens of this repository's source, {num_micro} micro-batches per rank")
        print(f"loss {loss.item():.4f} (ln(vocab) = {torch.log(torch.tensor(float(cfg.model.padded_vocab_size))).item():.4f} for a uniform guess)")
        print(f"gradient norm {totals[0].sqrt().item():.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=4, help="ranks to start (default 4)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    args = parser.parse_args()
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        run_rank(args)
        return
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "--master-port",
           os.environ.get("MASTER_PORT", "29517"), __file__, "--tp", str(args.tp), "--pp", str(args.pp)]
    print("$ " + " ".join(cmd[2:]), flush=True)
    sys.exit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    main()
