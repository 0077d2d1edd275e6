"""Benchmark checkpoint conversion: wall time and peak host memory both ways, per model shape, as a table.

    python tools/bench_convert.py [--case small --case qwen2.5-7b] [--workdir DIR] [--keep]
    python tools/bench_convert.py --case custom --hidden 512 --layers 4 --heads 8 --kv-heads 2 --ffn 1024 \
        --vocab 151936 [--dtype bfloat16]

Cases (default: both named ones):
  small        transformers-Qwen2, hidden 1024, 8 layers, 8 heads, FFN 2816, vocabulary 151936, fp32 (~1.6 GB)
  qwen2.5-7b   Qwen2.5-7B's shape: hidden 3584, 28 layers, 28 heads / 4 key-value heads, FFN 18944,
               vocabulary 152064, q/k/v bias, untied, bf16 (~15.2 GB)
Each case writes a random checkpoint (indexed safetensors shards of 500 MB, one shard in memory at a time),
then runs, each as its own process: hf-to-mcore (tools/convert_checkpoint.py at TP=2 x PP=2), mcore-to-hf
back with 2 GB shards (the default) and with 500 MB shards. The baseline is the interpreter with torch,
megatron-core and the converter imported (the fixed cost). Peak RSS is the sum over the process and its
children, sampled from /proc every 10 ms. Every round trip is checked: each exported tensor must equal the
generated one (compared shard by shard). Disk: about 3x the checkpoint per case, freed after it.
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


CASES = {
    "small": dict(hidden=1024, layers=8, heads=8, kv_heads=8, ffn=2816, vocab=151936, dtype="float32"),
    "qwen2.5-7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, ffn=18944, vocab=152064, dtype="bfloat16"),
}


def generate(directory: Path, shape: dict, shard_bytes: int) -> tuple[int, int]:
    """Write a random Qwen2 checkpoint of `shape` (see CASES); returns (total bytes, largest tensor bytes)."""
    from safetensors.torch import save_file

    from megatron_qwen.config import ModelConfig
    from megatron_qwen.convert.layouts import QWEN2, expected_tensors, hf_config

    dtype = getattr(torch, shape["dtype"])
    m = ModelConfig(num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
                    num_query_groups=shape["kv_heads"] if shape["kv_heads"] != shape["heads"] else None,
                    ffn_hidden_size=shape["ffn"], padded_vocab_size=shape["vocab"])
    shapes = expected_tensors(QWEN2, m, shape["vocab"])
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {name: torch.Size(s).numel() * itemsize for name, s in shapes.items()}
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
    config = hf_config(QWEN2, m, shape["vocab"], shape["dtype"])
    (directory / "config.json").write_text(json.dumps(config, indent=2))
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


def bench_case(workdir: Path, name: str, shape: dict, baseline: float) -> list[str]:
    """Generate, convert both ways and check case `name`; returns its table rows."""
    hf, ckpt, back, back_small = workdir / "hf", workdir / "mcore", workdir / "hf-back", workdir / "hf-back-500MB"
    outputs = (hf, ckpt, back, back_small)
    for path in outputs:
        shutil.rmtree(path, ignore_errors=True)
    try:
        total, largest = generate(hf, shape, 500 * 10**6)
        to_mcore, t_mcore = run_measured([sys.executable, CONVERT, "hf-to-mcore", "--hf", str(hf), "--out", str(ckpt),
                                          "--tp", "2", "--pp", "2"])
        to_hf, t_hf = run_measured([sys.executable, CONVERT, "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(back)])
        n = compare(hf, back)
        shutil.rmtree(back)  # one export on disk at a time
        to_hf_small, t_hf_small = run_measured(
            [sys.executable, CONVERT, "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(back_small), "--max-shard-size",
             "500MB"]
        )
        compare(hf, back_small)
    finally:
        for path in outputs:
            shutil.rmtree(path, ignore_errors=True)
    gib, mib = 2**30, 2**20
    label = (f"{name}: hidden {shape['hidden']}, {shape['layers']} layers, {shape['heads']}/{shape['kv_heads']} heads, "
             f"{shape['dtype']}, {total / gib:.1f} GiB (largest tensor {largest / mib:.0f} MiB), {n} tensors")

    def row(step, peak, seconds):
        return (f"| {label} | {step} | {seconds:.1f} | {peak / mib:.0f} | {(peak - baseline) / mib:+.0f} | "
                f"{peak / total:.2f} |")

    return [row("hf-to-mcore (TP=2 x PP=2)", to_mcore, t_mcore), row("mcore-to-hf (2 GB shards)", to_hf, t_hf),
            row("mcore-to-hf (500 MB shards)", to_hf_small, t_hf_small)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", choices=(*CASES, "custom"), default=None,
                        help="repeatable; default: every named case")
    for key in ("hidden", "layers", "heads", "kv-heads", "ffn", "vocab"):
        parser.add_argument(f"--{key}", type=int, default=None, help="the custom case's shape")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="the custom case's")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (the checkpoints never are)")
    args = parser.parse_args()
    cases = {name: CASES[name] for name in args.case or CASES if name != "custom"}
    if "custom" in (args.case or ()):
        shape = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                 "ffn": args.ffn, "vocab": args.vocab}
        missing = [f"--{k.replace('_', '-')}" for k, v in shape.items() if v is None]
        if missing:
            parser.error(f"--case custom needs {' '.join(missing)}")
        cases["custom"] = {**shape, "dtype": args.dtype}

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        baseline, _ = run_measured([sys.executable, "-c",
                                    "import megatron.core, megatron_qwen.convert, megatron_qwen.model.qwen"])
        rows = [row for name, shape in cases.items() for row in bench_case(workdir, name, shape, baseline)]
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"baseline (imports only): peak RSS {baseline / 2**20:.0f} MiB; load average {os.getloadavg()[0]:.2f}")
    print("| case | step | wall s | peak RSS MiB | over baseline MiB | peak / checkpoint |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("round trips: every tensor bit-identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
