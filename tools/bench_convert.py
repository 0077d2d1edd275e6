"""Benchmark checkpoint conversion memory: peak RSS against checkpoint size.

    python tools/bench_convert.py [--hidden 1024 --layers 8 --heads 8 --ffn 2816 --vocab 151936]
                                  [--dtype float32] [--workdir DIR] [--keep]

Generates a random transformers-Qwen2 checkpoint (default ~1.6 GB in fp32: hidden 1024, 8 layers,
vocabulary 151936; written as indexed safetensors shards of 500 MB, one shard in memory at a time),
then runs, each as its own process:
  (a) baseline     the interpreter with torch, megatron-core and the converter imported (the fixed cost);
  (b) hf-to-mcore  tools/convert_checkpoint.py at TP=2 x PP=2;
  (c) mcore-to-hf  tools/convert_checkpoint.py back to safetensors, with 2 GB shards (the default: one
                   shard holds this whole model) and with 500 MB shards.
Peak RSS is the sum over the process and its children, sampled from /proc every 10 ms. Finally the
round trips are checked: every tensor of (c) must equal the generated one (compared shard by shard).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
CONVERT = str(REPO / "tools" / "convert_checkpoint.py")


def generate(directory: Path, hidden: int, layers: int, heads: int, ffn: int, vocab: int, dtype: torch.dtype,
             shard_bytes: int) -> tuple[int, int]:
    """Write a random Qwen2 checkpoint; returns (total bytes, largest tensor bytes)."""
    from safetensors.torch import save_file

    from megatron_qwen.config import ModelConfig
    from megatron_qwen.convert.layouts import QWEN2, expected_tensors, hf_config

    m = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=ffn,
                    padded_vocab_size=vocab)
    shapes = expected_tensors(QWEN2, m, vocab)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {name: torch.Size(shape).numel() * itemsize for name, shape in shapes.items()}
    shards: list[list[str]] = [[]]
    for name in shapes:
        if shards[-1] and sum(sizes[n] for n in shards[-1]) + sizes[name] > shard_bytes:
            shards.append([])
        shards[-1].append(name)
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: (torch.randn(shapes[name], generator=gen) * 0.02).to(dtype) for name in names}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(hf_config(QWEN2, m, vocab, str(dtype).removeprefix("torch.")),
                                                      indent=2))
    return sum(sizes.values()), max(sizes.values())


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd`; returns (peak RSS summed over its process tree in bytes, wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        parent = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [parent] + parent.children(recursive=True)
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output}")
    return peak, time.perf_counter() - start


def compare(original: Path, converted: Path) -> int:
    """Number of tensors compared; raises if any differs. Holds one shard of each side at a time."""
    from safetensors import safe_open

    index = json.loads((original / "model.safetensors.index.json").read_text())["weight_map"]
    back_index = converted / "model.safetensors.index.json"
    back = (json.loads(back_index.read_text())["weight_map"] if back_index.exists()
            else dict.fromkeys(index, "model.safetensors"))
    if set(back) != set(index):
        raise SystemExit(f"round trip changed the tensor names: {sorted(set(back) ^ set(index))[:5]}")
    for file in sorted(set(index.values())):
        with safe_open(str(original / file), "pt") as f:
            for name in f.keys():
                with safe_open(str(converted / back[name]), "pt") as g:
                    if not torch.equal(f.get_tensor(name), g.get_tensor(name)):
                        raise SystemExit(f"round trip changed {name}")
    return len(index)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    workdir.mkdir(parents=True, exist_ok=True)
    hf, ckpt, back, back_small = workdir / "hf", workdir / "mcore", workdir / "hf-back", workdir / "hf-back-500MB"
    outputs = (hf, ckpt, back, back_small)
    for path in outputs:
        shutil.rmtree(path, ignore_errors=True)
    try:
        total, largest = generate(hf, args.hidden, args.layers, args.heads, args.ffn, args.vocab,
                                  getattr(torch, args.dtype), 500 * 10**6)
        baseline, _ = run_measured([sys.executable, "-c",
                                    "import megatron.core, megatron_qwen.convert, megatron_qwen.model.qwen"])
        to_mcore, t_mcore = run_measured([sys.executable, CONVERT, "hf-to-mcore", "--hf", str(hf), "--out", str(ckpt),
                                          "--tp", "2", "--pp", "2"])
        to_hf, t_hf = run_measured([sys.executable, CONVERT, "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(back)])
        to_hf_small, t_hf_small = run_measured(
            [sys.executable, CONVERT, "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(back_small), "--max-shard-size",
             "500MB"]
        )
        n = compare(hf, back)
        compare(hf, back_small)
        ckpt_bytes = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file())
        mib = 2**20
        print(f"checkpoint: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype}: "
              f"{total / mib:.0f} MiB safetensors ({n} tensors, largest {largest / mib:.0f} MiB); megatron-core "
              f"{ckpt_bytes / mib:.0f} MiB")
        print(f"baseline (imports only)      peak RSS {baseline / mib:7.0f} MiB")
        print(f"hf-to-mcore (TP=2 x PP=2)    peak RSS {to_mcore / mib:7.0f} MiB  ({(to_mcore - baseline) / mib:+.0f} "
              f"MiB over baseline, {to_mcore / total:.2f} x checkpoint)  {t_mcore:.1f} s")
        print(f"mcore-to-hf (2 GB shards)    peak RSS {to_hf / mib:7.0f} MiB  ({(to_hf - baseline) / mib:+.0f} MiB "
              f"over baseline, {to_hf / total:.2f} x checkpoint)  {t_hf:.1f} s")
        print(f"mcore-to-hf (500 MB shards)  peak RSS {to_hf_small / mib:7.0f} MiB  "
              f"({(to_hf_small - baseline) / mib:+.0f} MiB over baseline, {to_hf_small / total:.2f} x checkpoint)  "
              f"{t_hf_small:.1f} s")
        print(f"round trips: all {n} tensors bit-identical")
    finally:
        if not args.keep:
            for path in outputs:
                shutil.rmtree(path, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
