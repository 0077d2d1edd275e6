"""The demo: raw text to a trained Qwen and back out through Hugging Face, on CPU ranks.

    python tools/demo.py [--steps 200] [--nproc 4] [--out demo_out]

1. builds a small JSONL corpus from this machine's Python standard-library sources;
2. preprocesses it into Megatron shards with tools/preprocess_data.py (2 workers, C++ builder);
3. pretrains the tiny Qwen at TP=2 x PP=2 with sequence parallelism on 4 CPU ranks (torchrun, gloo),
   the loss falling on screen, and saves a checkpoint;
4. converts the checkpoint to the Hugging Face Qwen2 format with tools/convert_checkpoint.py;
5. loads it with transformers' Qwen2ForCausalLM and prints a greedy continuation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("email", "json", "http", "logging", "asyncio", "unittest", "concurrent", "importlib", "xml", "urllib")
PROMPT = "import os\nimport sys\n\n\ndef main():\n"


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run(cmd: list[str], env: dict) -> None:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, check=True)


def write_corpus(path: Path) -> int:
    """One JSONL document per standard-library source file of a few packages."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    count = 0
    with open(path, "w") as out:
        for package in PACKAGES:
            for source in sorted((stdlib / package).rglob("*.py")):
                out.write(json.dumps({"text": source.read_text(errors="replace")}) + "\n")
                count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--nproc", type=int, default=4, help="CPU ranks (TP=2 x PP=2 needs 4)")
    parser.add_argument("--out", type=Path, default=REPO / "demo_out", help="work directory (default demo_out/)")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"))
    python = sys.executable
    start = time.time()

    banner("1. corpus")
    corpus = out / "corpus.jsonl"
    docs = write_corpus(corpus)
    print(f"{docs} documents, {corpus.stat().st_size / 1e6:.1f} MB -> {corpus}")

    banner("2. preprocess into Megatron shards")
    prefix = out / "data" / "stdlib"
    (out / "data").mkdir(exist_ok=True)
    run([python, "tools/preprocess_data.py", "--input", corpus, "--output-prefix", prefix, "--append-eod", "--workers", "2"], env)

    banner(f"3. pretrain the tiny Qwen at TP=2 x PP=2 with SP on {args.nproc} CPU ranks, {args.steps} steps")
    run_dir = out / "run"
    run([
        python, "-m", "torch.distributed.run", "--nproc-per-node", args.nproc, "--master-port", os.environ.get("MASTER_PORT", "29517"),
        "-m", "megatron_qwen.stages.pretrain", "configs/tiny.yaml",
        f"data.paths=[{prefix}_text_document]", f"logging.run_dir={run_dir}", f"training.save={run_dir / 'checkpoints'}",
        "parallel.tp=2", "parallel.pp=2", "parallel.sp=true", "parallel.device=cpu",
        "model.seq_length=64", "training.micro_batch_size=2", "training.global_batch_size=8",
        f"training.train_iters={args.steps}", "training.lr=2e-3", "training.min_lr=2e-4",
        f"training.lr_warmup_iters={max(1, args.steps // 10)}", "logging.log_interval=10",
    ], env)
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    ckpt = run_dir / "checkpoints" / latest

    banner("4. convert to Hugging Face (Qwen2 layout)")
    hf_dir = out / "hf"
    run([python, "tools/convert_checkpoint.py", "mcore-to-hf", "--ckpt", ckpt, "--out", hf_dir], env)

    banner("5. greedy continuation with transformers")
    import torch
    from transformers import Qwen2ForCausalLM

    from megatron_qwen.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    model = Qwen2ForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.eod_id)
    print("prompt:\n" + PROMPT + "continuation:\n" + tokenizer.decode(generated[0, ids.shape[1]:]))
    print(f"\ndemo finished in {time.time() - start:.0f} s; metrics in {run_dir / 'metrics.jsonl'}, "
          f"checkpoint {ckpt}, Hugging Face model in {hf_dir}")


if __name__ == "__main__":
    main()
