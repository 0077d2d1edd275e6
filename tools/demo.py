"""The demo: raw text to a trained Qwen and back out through Hugging Face, on CPU ranks.

    python tools/demo.py [--steps 40] [--nproc 4] [--out demo_out]
    python tools/demo.py --rlhf [options of tools/demo_rlhf.py]

1. builds a JSONL corpus from this machine's Python standard-library sources, holding every tenth
   file out of training;
2. preprocesses the training part into Megatron shards with tools/preprocess_data.py (2 workers, C++ builder);
3. makes an untrained Qwen2 model of configs/tiny.yaml's shape with transformers (its random
   initialisation) and imports it for TP=2 x PP=2 with `tools/convert_checkpoint.py hf-to-mcore`;
4. pretrains it at TP=2 x PP=2 with sequence parallelism on 4 CPU ranks (torchrun, gloo), the loss
   falling on screen;
5. draws the loss curve with tools/plot_metrics.py;
6. exports the trained checkpoint to the Hugging Face Qwen2 format (`convert_checkpoint.py mcore-to-hf`);
7. loads it with transformers' Qwen2ForCausalLM and prints the perplexity of the untrained and the
   trained model on the held-out files, the loss-curve PNG, and a greedy continuation of a Python prompt.

With --rlhf it runs the RLHF demo instead (tools/demo_rlhf.py: pretraining, SFT, a reward model and PPO),
passing the other options on to it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
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
PERPLEXITY_WINDOWS = 32  # held-out windows of SEQ tokens scored by transformers, spread over the held-out files
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
    counts = [0, 0]
    with open(train, "w") as train_out, open(heldout, "w") as heldout_out:
        for i, source in enumerate(sources):
            held = i % HELDOUT_EVERY == HELDOUT_EVERY - 1
            (heldout_out if held else train_out).write(json.dumps({"text": source.read_text(errors="replace")}) + "\n")
            counts[held] += 1
    return counts[0], counts[1]


def heldout_windows(path: Path, tokenizer):
    """PERPLEXITY_WINDOWS windows of SEQ tokens spread evenly over the held-out documents (each followed by
    the end-of-document token, as in training), as a (windows, SEQ) tensor."""
    import torch

    ids: list[int] = []
    for line in path.read_text().splitlines():
        ids += tokenizer.encode(json.loads(line)["text"]) + [tokenizer.eod_id]
    stride = (len(ids) - SEQ) // (PERPLEXITY_WINDOWS - 1)
    return torch.tensor([ids[i * stride : i * stride + SEQ] for i in range(PERPLEXITY_WINDOWS)])


def perplexity(model, windows) -> float:
    """exp of the mean next-token loss over every position of `windows` but the first of each."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(8):
            logits = model(input_ids=batch).logits[:, :-1].float()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                       reduction="sum").item()
            count += batch[:, 1:].numel()
    return math.exp(total / count)


def import_transformers():
    """transformers' Qwen2 classes, without the import-time warnings of torchao's GPU kernels (which transformers
    imports; the demo runs none of them) and without progress bars."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    return Qwen2Config, Qwen2ForCausalLM


def untrained_model(path: Path):
    """A Qwen2ForCausalLM of configs/tiny.yaml's shape with transformers' random initialisation (normal with
    the config's init_method_std), saved to `path` in the Hugging Face format; returns the model."""
    import torch

    from megatron_qwen.config import load_config
    from megatron_qwen.convert.layouts import QWEN2, hf_config

    model_cfg = load_config(str(REPO / "configs" / "tiny.yaml")).model
    Qwen2Config, Qwen2ForCausalLM = import_transformers()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**hf_config(QWEN2, model_cfg, model_cfg.padded_vocab_size, "float32"))).eval()
    model.save_pretrained(path)
    return model


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rlhf", action="store_true",
                        help="run the RLHF demo (tools/demo_rlhf.py) instead; the other options are passed on to it")
    parser.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    parser.add_argument("--nproc", type=int, default=4, help="CPU ranks, a multiple of 4 (TP=2 x PP=2 x DP)")
    parser.add_argument("--out", type=Path, default=REPO / "demo_out", help="work directory (default demo_out/)")
    if "--rlhf" in argv:  # before parsing: every other option, --help included, is the RLHF demo's
        return run_rlhf_demo([a for a in argv if a != "--rlhf"])
    args = parser.parse_args(argv)
    if args.nproc % 4:
        parser.error(f"--nproc {args.nproc}: TP=2 x PP=2 needs a multiple of 4 ranks")
    out = args.out.resolve()
    for earlier in ("data", "hf_initial", "initial", "run", "hf"):  # a run directory with a checkpoint would resume
        shutil.rmtree(out / earlier, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"))
    python = sys.executable

    banner("1. corpus")
    train_jsonl, heldout_jsonl = out / "corpus.jsonl", out / "heldout.jsonl"
    docs, held = write_corpus(train_jsonl, heldout_jsonl)
    print(f"{docs} documents, {train_jsonl.stat().st_size / 1e6:.1f} MB -> {train_jsonl}; "
          f"{held} held out -> {heldout_jsonl}")

    banner("2. preprocess into Megatron shards")
    prefix = out / "data" / "stdlib"
    (out / "data").mkdir()
    run([python, "tools/preprocess_data.py", "--input", train_jsonl, "--output-prefix", prefix, "--append-eod",
         "--workers", "2"], env)

    banner("3. an untrained Qwen2 of the tiny shape (transformers' random initialisation), imported for TP=2 x PP=2")
    hf_initial, initial = out / "hf_initial", out / "initial"
    untrained = untrained_model(hf_initial)
    print(f"saved {hf_initial}")
    run([python, "tools/convert_checkpoint.py", "hf-to-mcore", "--hf", hf_initial, "--out", initial, "--tp", 2, "--pp",
         2], env)

    banner(f"4. pretrain it at TP=2 x PP=2 with SP on {args.nproc} CPU ranks, {args.steps} steps")
    run_dir = out / "run"
    run([
        python, "-m", "torch.distributed.run", "--nproc-per-node", args.nproc, "--master-port",
        os.environ.get("MASTER_PORT", "29517"),
        "-m", "megatron_qwen.stages.pretrain", "configs/tiny.yaml",
        f"data.paths=[{prefix}_text_document]", f"logging.run_dir={run_dir}", f"training.init_from={initial}",
        "parallel.tp=2", "parallel.pp=2", "parallel.sp=true", "parallel.device=cpu",
        f"model.seq_length={SEQ}", "training.micro_batch_size=2", "training.global_batch_size=8",
        f"training.train_iters={args.steps}", "training.lr=2e-3", "training.min_lr=2e-4",
        f"training.lr_warmup_iters={max(1, args.steps // 10)}", "logging.log_interval=5",
    ], env)
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()

    banner("5. the loss curve")
    run([python, "tools/plot_metrics.py", run_dir], env)
    png = run_dir / "metrics.png"

    banner("6. export to Hugging Face (Qwen2 layout)")
    hf_dir = out / "hf"
    run([python, "tools/convert_checkpoint.py", "mcore-to-hf", "--ckpt", ckpt, "--out", hf_dir], env)

    banner("7. the untrained and the trained model in transformers")
    import torch

    from megatron_qwen.tokenizer import load_tokenizer

    _, Qwen2ForCausalLM = import_transformers()
    tokenizer = load_tokenizer()
    windows = heldout_windows(heldout_jsonl, tokenizer)
    trained = Qwen2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    print(f"perplexity on {windows.numel():,} tokens of the {held} held-out files (an untrained model is near "
          f"the vocabulary's {trained.config.vocab_size:,} rows):")
    print(f"  untrained            {perplexity(untrained, windows):>10,.0f}")
    print(f"  trained ({args.steps} steps)   {perplexity(trained, windows):>10,.0f}")
    print(f"loss curve: {png}")
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        generated = trained.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.eod_id)
    print("greedy continuation of the trained model:\n" + PROMPT + tokenizer.decode(generated[0,
                                                                                              ids.shape[1]:].tolist()))
    print(f"\ndemo finished in {time.time() - START:.0f} s; metrics in {run_dir / 'metrics.jsonl'}, "
          f"checkpoint {ckpt}, Hugging Face model in {hf_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
