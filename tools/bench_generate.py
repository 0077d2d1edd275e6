"""Generation throughput: the KV-cache engine against full recompute and transformers' generate.

    python tools/bench_generate.py [--prompts 8] [--prompt-length 32] [--new-tokens 128] [--threads 1]
                                   [--repeat N] [--skip-slow]

On the tiny config (configs/tiny.yaml: 4 layers, hidden 256, Qwen's 151,936-row vocabulary) with random
weights, one process, the same torch threads for every contender, greedy, no stop token, it measures
new tokens per second of
  (1) the KV-cache engine (megatron_qwen.inference.engine, one prefill then one token per step; ids only,
      `SamplingParams(logprobs=False)`, as (3) returns them),
  (2) full recompute: the whole batch's sequences through the same model at every new token,
  (3) transformers' Qwen2ForCausalLM.generate (its own KV cache) on the model exported with mcore-to-hf,
checks that the three give the same tokens, then runs (1) again at TP=2 on 2 CPU ranks (torchrun, one
thread each), and prints one table with the ratios (targets: (1)/(2) >= 5, (1)/(3) >= 1.5). With --repeat N,
(1) and (3) run N times, alternating, and the table shows medians; beside wall time it shows CPU seconds,
which a machine shared with other jobs disturbs less. --skip-slow leaves out (2) and the TP=2 launch.
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

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure this checkout's engine, not an installed copy of the package

from megatron_qwen.checkpoint.directory import MODEL_CONFIG_FILE  # noqa: E402


def tiny_config(tp: int, world: int):
    from megatron_qwen.config import load_config, resolve

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"parallel.tp={tp}", "parallel.device=cpu",
                                                        "training.micro_batch_size=1",
                                                        f"training.global_batch_size={world // tp}"])
    return resolve(cfg, world)[0]


def prompts_of(args) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 151643, (args.prompts, args.prompt_length), generator=gen).tolist()


def timed(run) -> dict:
    """Wall and CPU seconds of `run()` (CPU time is this process's, all threads: steadier than wall time on a
    machine shared with other jobs), and the tokens it returns."""
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = run()
    return {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu, "tokens": tokens}


def median_run(runs: list[dict], new_tokens: int) -> dict:
    """The runs' median wall and CPU seconds, and new tokens/s at the median wall time."""
    seconds = statistics.median(r["seconds"] for r in runs)
    return {"tokens_per_s": new_tokens / seconds, "seconds": seconds, "tokens": runs[0]["tokens"],
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs)}


def engine_setup(args, weights: Path):
    """(1) on this launch's ranks: a function that generates and returns the tokens."""
    from megatron_qwen.inference.engine import GenerationEngine
    from megatron_qwen.inference.sampling import SamplingParams
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.launch import detect_launch, init_distributed
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.checkpoint.io import load_model

    launch = detect_launch()
    cfg = tiny_config(args.tp, launch.world_size)
    init_distributed(cfg.parallel.tp, 1, None, device="cpu")
    chunks = build_model(cfg, Runtime.cpu(), rope_at_positions=True)
    load_model(chunks, weights)
    engine = GenerationEngine(chunks, 151851)
    # The ids only, as transformers' generate returns them (no per-token log-probabilities).
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, logprobs=False)
    engine.generate(prompts_of(args)[:1], SamplingParams(max_new_tokens=2, temperature=0.0))  # warm-up
    return lambda: engine.generate(prompts_of(args), params).tokens


def recompute_run(args, weights: Path) -> list[list[int]]:
    """(2): the whole sequences through the model at every step (batched, no cache); the new tokens."""
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.checkpoint.io import load_model

    (model,) = build_model(tiny_config(1, 1), Runtime.cpu())
    load_model([model], weights)
    model.eval()
    tokens = torch.tensor(prompts_of(args))
    with torch.inference_mode():
        for _ in range(args.new_tokens):
            positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
            logits = model(tokens, positions, None)[:, -1, :151851]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens[:, args.prompt_length:].tolist()


def transformers_setup(args, hf_dir: Path):
    """(3): transformers' generate with its KV cache; a function that generates and returns the new tokens."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts_of(args))
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                  eos_token_id=None, suppress_tokens=list(range(151851, 151936)))
    with torch.inference_mode():
        model.generate(ids[:1], **dict(kwargs, max_new_tokens=2, min_new_tokens=2))  # warm-up

    def run() -> list[list[int]]:
        with torch.inference_mode():
            return model.generate(ids, **kwargs)[:, args.prompt_length:].tolist()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the one-process runs (default 1)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run (1) and (3) this many times, alternating, and report the medians (default 1)")
    parser.add_argument("--skip-slow", action="store_true", help="leave out (2) and the TP=2 launch")
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--engine-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.engine_only is not None:  # a rank of the TP=2 launch
        from megatron_qwen.inference.forward import is_writer

        torch.set_num_threads(1)
        run = engine_setup(args, args.engine_only / "weights")
        result = median_run([timed(run) for _ in range(args.repeat)], args.prompts * args.new_tokens)
        if is_writer():
            (args.engine_only / "tp2.json").write_text(json.dumps(result))
        return

    from megatron_qwen.convert.to_hf import mcore_to_hf
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.launch import init_distributed
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.checkpoint.io import save_model

    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29591")
    work = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    cfg = tiny_config(1, 1)
    init_distributed(1, 1, None, device="cpu")
    torch.manual_seed(0)
    save_model(build_model(cfg, Runtime.cpu()), work / "weights")
    (work / "weights" / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict()))
    mcore_to_hf(work / "weights", work / "hf", log=lambda _: None)

    new_tokens = args.prompts * args.new_tokens
    engine, transformers = engine_setup(args, work / "weights"), transformers_setup(args, work / "hf")
    runs: dict[str, list[dict]] = {"(1)": [], "(3)": []}
    for _ in range(args.repeat):  # alternating, so that a change in the machine's load touches both alike
        runs["(1)"].append(timed(engine))
        runs["(3)"].append(timed(transformers))
    results = {"(1) KV-cache engine": median_run(runs["(1)"], new_tokens)}
    if not args.skip_slow:
        results["(2) full recompute"] = median_run([timed(lambda: recompute_run(args, work / "weights"))], new_tokens)
    results["(3) transformers generate"] = median_run(runs["(3)"], new_tokens)
    if not args.skip_slow:
        env = dict(os.environ, OMP_NUM_THREADS="1", MEGATRON_QWEN_DEVICE="cpu", PYTHONWARNINGS="ignore")
        env.pop("MASTER_PORT")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        "29592", __file__, "--tp", "2", "--engine-only", str(work), "--prompts", str(args.prompts),
                        "--prompt-length", str(args.prompt_length), "--new-tokens", str(args.new_tokens),
                        "--repeat", str(args.repeat)], check=True, env=env, cwd=REPO)
        results["(1) engine at TP=2, 2 ranks"] = json.loads((work / "tp2.json").read_text())

    reference = results["(3) transformers generate"]["tokens"]
    same = {name: r["tokens"] == reference for name, r in results.items()}
    engine_speed = results["(1) KV-cache engine"]["tokens_per_s"]
    engine_cpu = results["(1) KV-cache engine"]["cpu_seconds"]
    print(f"\n{args.prompts} prompts x {args.new_tokens} new tokens (prompt length {args.prompt_length}), tiny config, "
          f"greedy; one process at {args.threads} torch thread(s); {os.cpu_count()} CPU cores; median of "
          f"{args.repeat} run(s) of (1) and (3), alternating")
    print("| contender | new tokens/s | seconds | CPU seconds | engine / this (wall) | engine / this (CPU) "
          "| same tokens as (3) |\n|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:.1f} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
              f"{engine_speed / r['tokens_per_s']:.2f}x | {r['cpu_seconds'] / engine_cpu:.2f}x | {same[name]} |")
    targets = [f"(1)/(3) >= 1.5x: {engine_speed / results['(3) transformers generate']['tokens_per_s']:.2f}x"]
    if "(2) full recompute" in results:
        targets.insert(0, f"(1)/(2) >= 5x: {engine_speed / results['(2) full recompute']['tokens_per_s']:.1f}x")
    print("targets (wall time): " + "; ".join(targets))

if __name__ == "__main__":
    main()
