"""The demo: raw text to a trained Qwen and back out through Hugging Face, on CPU ranks.

    python tools/demo.py [--steps 60] [--nproc 4] [--out demo_out]
    python tools/demo.py --rlhf [options of tools/demo_rlhf.py]

1. builds a JSONL corpus from this machine's Python standard-library sources, holding every tenth
   file out of training;
2. preprocesses the training part into Megatron shards with tools/preprocess_data.py (2 workers, C++ builder);
3. saves the tiny Qwen's initial weights (training.train_iters=0 on one rank: training.seed gives the same
   weights at every layout, so these are where the run below starts);
4. pretrains at TP=2 x PP=2 with sequence parallelism on 4 CPU ranks (torchrun, gloo), the loss falling
   on screen;
5. draws the loss curve with tools/plot_metrics.py;
6. converts the trained and the initial checkpoints to the Hugging Face Qwen2 format with
   tools/convert_checkpoint.py;
7. loads both with transformers' Qwen2ForCausalLM and prints their perplexity on the held-out files, the
   loss-curve PNG, and the trained model's greedy continuation of a Python prompt.

With --rlhf it runs the RLHF demo instead (tools/demo_rlhf.py: pretraining, SFT, a reward model and PPO),
passing the other options on to it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("email", "json", "http", "logging", "asyncio", "unittest", "concurrent", "importlib", "xml", "urllib")
HELDOUT_EVERY = 10  # every tenth source file (in sorted order) is never trained on
SEQ = 64
PERPLEXITY_WINDOWS = 32  # held-out windows of SEQ tokens scored by transformers
PROMPT = "import os\nimport sys\n\n\ndef main():\n"


START = time.time()


def run_rlhf_demo(argv: list[str]) -> int:
    """tools/demo_rlhf.py's main(argv), imported by path (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("demo_rlhf", REPO / "tools" / "demo_rlhf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def banner(text: str) -> None:
    print(f"\n=== {text} [{time.time() - START:.0f} s]", flush=True)


def run(cmd: list, env: dict) -> None:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, check=True)


def write_corpus(train: Path, heldout: Path) -> tuple[int, int]:
    """One JSONL document per standard-library source file of PACKAGES; every HELDOUT_EVERY-th file goes
    to `heldout` instead of `train`. Returns the two document counts."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [source for package in PACKAGES for source in sorted((stdlib / package).rglob("*.py"))]
    with open(train, "w") as train_out, open(heldout, "w") as heldout_out:
        for i, source in enumerate(sources):
            out = heldout_out if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else train_out
            out.write(json.dumps({"text": source.read_text(errors="replace")}) + "\n")
    held = len(sources) // HELDOUT_EVERY
    return len(sources) - held, held


def heldout_windows(path: Path, tokenizer):
    """The first PERPLEXITY_WINDOWS windows of SEQ tokens of the held-out documents, each followed by
    the end-of-document token, as a (windows, SEQ) tensor."""
    import torch

    ids: list[int] = []
    for line in path.read_text().splitlines():
        ids += tokenizer.encode(json.loads(line)["text"]) + [tokenizer.eod_id]
        if len(ids) >= PERPLEXITY_WINDOWS * SEQ:
            break
    return torch.tensor(ids[: PERPLEXITY_WINDOWS * SEQ]).view(-1, SEQ)


def perplexity(model, windows) -> float:
    """exp of the mean next-token loss over every position of `windows` but the first of each."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(8):
            logits = model(input_ids=batch).logits[:, :-1].float()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
            count += batch[:, 1:].numel()
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rlhf", action="store_true",
                        help="run the RLHF demo (tools/demo_rlhf.py) instead; the other options are passed on to it")
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--nproc", type=int, default=4, help="CPU ranks, a multiple of 4 (TP=2 x PP=2 x DP)")
    parser.add_argument("--out", type=Path, default=REPO / "demo_out", help="work directory (default demo_out/)")
    args, rest = parser.parse_known_args(argv)
    if args.rlhf:
        return run_rlhf_demo([a for a in argv if a != "--rlhf"])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.nproc % 4:
        parser.error(f"--nproc {args.nproc}: TP=2 x PP=2 needs a multiple of 4 ranks")
    out = args.out.resolve()
    for earlier in ("data", "initial", "run", "hf", "hf_initial"):  # a run dir with checkpoints would resume, not train
        shutil.rmtree(out / earlier, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"))
    python = sys.executable

    banner("1. corpus")
    train_jsonl, heldout_jsonl = out / "corpus.jsonl", out / "heldout.jsonl"
    docs, held = write_corpus(train_jsonl, heldout_jsonl)
    print(f"{docs} documents, {train_jsonl.stat().st_size / 1e6:.1f} MB -> {train_jsonl}; {held} held out -> {heldout_jsonl}")

    banner("2. preprocess into Megatron shards")
    prefix = out / "data" / "stdlib"
    (out / "data").mkdir(exist_ok=True)
    run([python, "tools/preprocess_data.py", "--input", train_jsonl, "--output-prefix", prefix, "--append-eod", "--workers", "2"], env)

    stage = [python, "-m", "torch.distributed.run", "--master-port", os.environ.get("MASTER_PORT", "29517")]
    common = [
        "-m", "megatron_qwen.stages.pretrain", "configs/tiny.yaml", f"data.paths=[{prefix}_text_document]", "parallel.device=cpu",
        f"model.seq_length={SEQ}", "training.micro_batch_size=2", "training.global_batch_size=8",
    ]
    banner("3. the initial weights (the untrained model below): a run of 0 steps on one rank saves them")
    initial_dir = out / "initial"
    run(stage + ["--nproc-per-node", 1] + common + [f"logging.run_dir={initial_dir}", "training.train_iters=0"], env)
    initial_ckpt = initial_dir / "checkpoints" / "iter_0000000"

    banner(f"4. pretrain at TP=2 x PP=2 with SP on {args.nproc} CPU ranks, {args.steps} steps (from the same weights: "
           "training.seed gives them at every layout)")
    run_dir = out / "run"
    run(stage + ["--nproc-per-node", args.nproc] + common + [
        f"logging.run_dir={run_dir}", f"training.save={run_dir / 'checkpoints'}",
        "parallel.tp=2", "parallel.pp=2", "parallel.sp=true",
        f"training.train_iters={args.steps}", "training.lr=2e-3", "training.min_lr=2e-4",
        f"training.lr_warmup_iters={max(1, args.steps // 10)}", "logging.log_interval=5",
    ], env)
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()

    banner("5. the loss curve")
    run([python, "tools/plot_metrics.py", run_dir], env)
    png = run_dir / "metrics.png"

    banner("6. convert the trained and the initial checkpoints to Hugging Face (Qwen2 layout)")
    hf_dir, hf_initial = out / "hf", out / "hf_initial"
    run([python, "tools/convert_checkpoint.py", "mcore-to-hf", "--ckpt", ckpt, "--out", hf_dir], env)
    run([python, "tools/convert_checkpoint.py", "mcore-to-hf", "--ckpt", initial_ckpt, "--out", hf_initial], env)

    banner("7. the exported models in transformers")
    import torch
    from transformers import Qwen2ForCausalLM

    from megatron_qwen.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    windows = heldout_windows(heldout_jsonl, tokenizer)
    trained = Qwen2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    untrained = Qwen2ForCausalLM.from_pretrained(hf_initial, dtype=torch.float32).eval()
    print(f"perplexity on {windows.numel():,} tokens of the {held} held-out files (windows of {SEQ}; "
          f"a {trained.config.vocab_size:,}-row vocabulary: an untrained model is near that):")
    print(f"  untrained (step 0)      {perplexity(untrained, windows):>10,.1f}")
    print(f"  trained ({args.steps} steps)     {perplexity(trained, windows):>10,.1f}")
    print(f"loss curve: {png}")
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        generated = trained.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.eod_id)
    print("greedy continuation of the trained model:\n" + PROMPT + tokenizer.decode(generated[0, ids.shape[1]:]))
    print(f"\ndemo finished in {time.time() - START:.0f} s; metrics in {run_dir / 'metrics.jsonl'}, "
          f"checkpoint {ckpt}, Hugging Face models in {hf_dir} and {hf_initial}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
