"""Training throughput of this loop against a plain transformers training step of the same shape.

    python tools/bench_train.py [--steps 12] [--warmup 3] [--threads 2] [--seq 128] [--batch 4] [--workdir DIR]

Both run in one process each on the CPU with the same thread count, the same model (the `tiny` Qwen:
4 layers, hidden 256, the real 151,936-row vocabulary), the same batch and the same optimizer (AdamW,
beta 0.9/0.95, eps 1e-8, weight decay 0.1, clip 1.0):
  (a) this project: `python -m megatron_qwen.stages.pretrain configs/tiny.yaml` at TP=1 on a corpus made
      from Python's own sources, through megatron-core's schedule, DDP, optimizer and the data pipeline;
      tokens/s from its metrics.jsonl (step time includes fetching the batch);
  (b) transformers: Qwen2ForCausalLM forward with labels, backward, clip, torch.optim.AdamW step.
The first --warmup steps of each are left out; the median step time of the rest is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_corpus(prefix: Path) -> None:
    """Qwen tokens of the standard library's sources as one shard (megatron-core's own writer)."""
    import sysconfig

    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_qwen.tokenizer import load_tokenizer

    tok = load_tokenizer()
    files = sorted((Path(sysconfig.get_paths()["stdlib"]) / "email").rglob("*.py")) + sorted(
        (Path(sysconfig.get_paths()["stdlib"]) / "asyncio").rglob("*.py")
    )
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for path in files:
        ids = tok.encode(path.read_text(errors="replace")) + [tok.eod_id]
        builder.add_document(torch.tensor(ids, dtype=torch.int32), [len(ids)])
    builder.finalize(str(prefix) + ".idx")


def run_ours(args, workdir: Path, env: dict) -> list[float]:
    prefix = workdir / "bench_text_document"
    make_corpus(prefix)
    run_dir = workdir / "run"
    cmd = [
        sys.executable, "-m", "megatron_qwen.stages.pretrain", str(REPO / "configs" / "tiny.yaml"),
        f"data.paths=[{prefix}]", "data.allow_repeat=true", f"model.seq_length={args.seq}",
        f"training.micro_batch_size={args.batch}", f"training.global_batch_size={args.batch}",
        f"training.train_iters={args.steps}", "training.save_interval=0", f"logging.run_dir={run_dir}",
        "logging.log_interval=1", f"training.save={workdir / 'ckpt'}", "parallel.device=cpu",
    ]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens = args.seq * args.batch
    return [tokens / r["tokens_per_s"] for r in records if "tokens_per_s" in r][args.warmup:]


def run_transformers(args) -> list[float]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_qwen.config import load_config

    m = load_config(REPO / "configs" / "tiny.yaml").model
    config = Qwen2Config(
        vocab_size=m.padded_vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_attention_heads, rms_norm_eps=m.norm_epsilon, tie_word_embeddings=False,
        max_position_embeddings=m.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": m.rotary_base},
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).train()
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.steps):
        batch = torch.randint(0, 151643, (args.batch, args.seq + 1), generator=gen)
        start = time.perf_counter()
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1])  # labels shifted inside the model
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        times.append(time.perf_counter() - start)
    return times[args.warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--only", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only == "transformers":
        print(json.dumps(run_transformers(args)))
        return

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        ours = run_ours(args, workdir, env)
        cmd = [sys.executable, __file__, "--only", "transformers", "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--seq", str(args.seq), "--batch", str(args.batch)]
        theirs = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True,
                                           text=True).stdout.splitlines()[-1])

    tokens = args.seq * args.batch
    ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
    print(f"tiny Qwen (4 layers, hidden 256, vocab 151936), batch {args.batch} x {args.seq} tokens, "
          f"{args.threads} threads, median of {len(ours)} steps after {args.warmup} warm-up steps\n")
    print("| step | seconds/step (median, min-max) | tokens/s |")
    print("|---|---|---|")
    print(f"| (a) megatron-qwen loop, TP=1 | {ours_s:.3f} ({min(ours):.3f}-{max(ours):.3f}) | {tokens / ours_s:,.0f} |")
    print(f"| (b) transformers Qwen2ForCausalLM + AdamW | {theirs_s:.3f} ({min(theirs):.3f}-{max(theirs):.3f}) | "
          f"{tokens / theirs_s:,.0f} |")
    print(f"\nspeed-up (a)/(b): {theirs_s / ours_s:.2f}x (target >= 1.15x)")


if __name__ == "__main__":
    main()
