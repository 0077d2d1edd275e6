"""Serving throughput: N clients at once against the same N requests one at a time, on one server.

    python tools/bench_serve.py [--ckpt CKPT] [--clients 16] [--max-tokens 32] [--nproc 1 --tp 1 --pp 1]

Without --ckpt a random tiny model (configs/tiny.yaml, hidden 128) is written to a temporary folder. Greedy
requests of different prompts, `max_tokens` new tokens each (`ignore` of stop ids is not offered, so a reply
may end early: the figure counts the tokens actually generated, from `usage`). Prints the load average before
and after: quote a ratio only from a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "1, 2, 3, 4,", "Qwen is a",
           "In the beginning", "The quick brown fox", "import torch", "Dear Sir or Madam,", "Roses are red,",
           "SELECT * FROM", "The mitochondria is", "To be or not to be", "Hello, world", "Once more", "Why is the sky"]


def tiny_checkpoint(folder: Path) -> Path:
    """A random tiny model (hidden 128, Qwen's vocabulary), saved with one CPU rank."""
    code = (
        "import sys, yaml, torch\n"
        "from megatron_qwen.platform.launch import init_distributed\n"
        "init_distributed(1, 1, None, device='cpu')\n"
        "from megatron_qwen.config import load_config\n"
        "from megatron_qwen.model.qwen import build_model\n"
        "from megatron_qwen.platform.runtime import Runtime\n"
        "from megatron_qwen.checkpoint.io import save_model\n"
        "cfg = load_config('configs/tiny.yaml', ['model.hidden_size=128', 'model.ffn_hidden_size=256'])\n"
        "torch.manual_seed(0)\n"
        "save_model(build_model(cfg, Runtime.cpu()), sys.argv[1])\n"
        "open(sys.argv[1] + '/model_config.yaml', 'w').write(yaml.safe_dump(cfg.to_dict()))\n"
    )
    path = folder / "tiny"
    env = {**os.environ, "MEGATRON_QWEN_DEVICE": "cpu", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29671", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, env=env, check=True, capture_output=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, default=None)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or tiny_checkpoint(Path(tmp))
        cmd = [sys.executable, "tools/serve.py", "--ckpt", str(ckpt), "--port", "0", "--tp", str(args.tp), "--pp",
               str(args.pp), "--max-batch", str(args.clients), "--max-queue", str(4 * args.clients)]
        if args.nproc > 1:
            cmd += ["--nproc", str(args.nproc)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": "29672"}
        server = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        try:
            for line in server.stderr:
                found = re.search(r"on (http://[\d.]+:\d+)/v1", line)
                if found:
                    url = found.group(1)
                    break
            else:
                raise SystemExit("the server exited before serving")
            threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
            prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(args.clients)]

            def ask(prompt: str) -> int:
                body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
                return httpx.post(url + "/v1/completions", json=body, timeout=600).json()["usage"]["completion_tokens"]

            ask(prompts[0])  # warm-up
            started = time.perf_counter()
            alone = sum(ask(p) for p in prompts)
            alone_s = time.perf_counter() - started
            counts = [0] * len(prompts)
            threads = [threading.Thread(target=lambda i=i: counts.__setitem__(i, ask(prompts[i])))
                       for i in range(len(prompts))]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            together_s = time.perf_counter() - started
        finally:
            server.terminate()
            server.wait(timeout=120)
    one, many = alone / alone_s, sum(counts) / together_s
    print(f"one at a time: {alone} tokens in {alone_s:.2f} s = {one:.1f} tokens/s")
    print(f"{args.clients} clients at once: {sum(counts)} tokens in {together_s:.2f} s = {many:.1f} tokens/s "
          f"({many / one:.2f}x)")
    print(f"load average after: {os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
