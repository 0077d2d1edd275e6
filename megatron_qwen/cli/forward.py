"""Full-vocabulary logits (and greedy continuations) of a checkpoint at any parallel layout.

    megatron-qwen forward [--nproc N] --ckpt CKPT --tokens TOKENS.npy --out LOGITS.npy \
        [--tp T --pp P --vpp V --ep E --cp C --sequence-parallel] [--generate K] [--trust-checkpoint]

`torchrun --nproc-per-node N tools/forward.py ...` is the same. Loads CKPT (saved or converted at any
layout) at the layout given here; ranks beyond TP x PP are data-parallel replicas that repeat the work.
Writes fp32 logits [batch, seq, vocab] of the (batch, seq) integer array in TOKENS.npy, gathered across
TP, from the last pipeline stage. With --generate K, K greedy tokens (from the KV-cache engine of
`megatron-qwen generate`, among the model family's token ids) are appended to each row, printed (decoded
when the vocabulary holds the family's tokens) and saved to --generated-out (default:
LOGITS.generated.npy); generation runs at --cp 1 only. Exit status 2: the request was refused, e.g. a checkpoint
holding pickled objects outside the allowlist (--trust-checkpoint unpickles them: only for a checkpoint from a
source you trust).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_qwen.checkpoint.safety import TRUST_WARNING
from megatron_qwen.config import TOKENIZER_VOCAB_SIZES
from megatron_qwen.errors import UserError
from megatron_qwen.inference import forward as inference
from megatron_qwen.inference.engine import GenerationEngine
from megatron_qwen.inference.sampling import SamplingParams
from megatron_qwen.platform.launch import detect_launch, init_distributed, refuse
from megatron_qwen.platform.runtime import resolve_runtime
from megatron_qwen.tokenizer import load_tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-qwen forward", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="megatron-core checkpoint directory")
    parser.add_argument("--tokens", required=True, type=Path, help=".npy (batch, seq) integer array")
    parser.add_argument("--out", required=True, type=Path, help="where to write the fp32 logits (.npy)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    parser.add_argument("--vpp", type=int, default=1, help="model chunks per pipeline rank (default 1)")
    parser.add_argument("--ep", type=int, default=1,
                        help="expert-parallel size of a mixture-of-experts model (default 1)")
    parser.add_argument("--cp", type=int, default=1,
                        help="context-parallel size: each row split over this many ranks (default 1)")
    parser.add_argument("--sequence-parallel", action="store_true", help="split the sequence over TP ranks")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--config", type=Path, default=None, help="model config YAML (default CKPT/model_config.yaml)")
    parser.add_argument("--generate", type=int, default=0, metavar="K", help="append K greedy tokens to each row")
    parser.add_argument("--generated-out", type=Path, default=None, help="where to write the continued rows (.npy)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle every object in CKPT, also types outside the allowlist "
                             "(can run code: trust its source)")
    args = parser.parse_args(argv)
    if args.generate < 0:
        parser.error(f"--generate {args.generate}: the number of tokens must be >= 0")
    if args.generate and args.cp > 1:
        parser.error(f"--generate {args.generate} with --cp {args.cp}: generation decodes one token at a time with a "
                     "KV cache, which context parallelism does not split; run --generate at --cp 1 (or give the "
                     "ranks to --tp), or drop --generate to get the logits at --cp")
    if args.generated_out is None:
        args.generated_out = args.out.with_suffix(".generated.npy")
    return args


def _print_generation(rows: np.ndarray, prompt_len: int, vocab_size: int, family: str) -> None:
    tokenizer = None
    if vocab_size >= TOKENIZER_VOCAB_SIZES[family]:
        try:
            tokenizer = load_tokenizer(family=family)
        except FileNotFoundError as exc:
            print(f"note: not decoding: {exc}")
    for i, row in enumerate(rows):
        new = row[prompt_len:].tolist()
        print(f"row {i}: generated ids {new}")
        if tokenizer is not None:
            try:
                print(f"row {i}: {tokenizer.decode(row[:prompt_len])!r} -> {tokenizer.decode(new)!r}")
            except ValueError as exc:  # prompt ids in the padding past the tokenizer's vocabulary
                print(f"row {i}: not decoded: {exc}")


def main(argv: list[str] | None = None) -> int:
    """Run one request on this process's rank; returns the exit status. Re-entrant: the process group
    stays, the model-parallel state is torn down, so a worker can call it for several layouts."""
    args = parse_args(argv)
    launch = detect_launch()
    if args.trust_checkpoint and launch.rank == 0:
        print(f"warning: --trust-checkpoint: {TRUST_WARNING}", file=sys.stderr, flush=True)
    try:
        plan = inference.prepare(
            args.ckpt, launch.world_size, tp=args.tp, pp=args.pp, vpp=args.vpp, sp=args.sequence_parallel,
            ep=args.ep, cp=args.cp, precision=args.precision, config_path=args.config,
            trust_checkpoint=args.trust_checkpoint,
        )
        tokens = inference.load_tokens(args.tokens, plan.vocab_size)
        runtime = resolve_runtime(plan.cfg, launch.local_rank)
    except UserError as exc:
        return refuse(launch, str(exc))

    cfg = plan.cfg
    init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp, device=cfg.parallel.device,
                     ep=cfg.parallel.ep, cp=cfg.parallel.cp,
                     timeout_minutes=cfg.parallel.timeout_minutes, seed=cfg.training.seed)
    try:
        chunks = inference.load_chunks(plan, args.ckpt, runtime)
        batch = torch.from_numpy(tokens).to(runtime.device)
        logits = inference.forward_logits(chunks, plan, batch)
        if inference.is_writer():
            inference.save_npy(args.out, logits.cpu().numpy())
            print(f"wrote {args.out}: logits {list(logits.shape)} (tp {args.tp}, pp {args.pp}, vpp {args.vpp}, "
                  f"sp {args.sequence_parallel}, cp {args.cp}, dp {plan.layout.dp})")
        if args.generate:
            # Greedy, exactly --generate tokens per row (no stop token), with the KV-cache engine.
            result = GenerationEngine(chunks, plan.generate_vocab).generate(
                tokens.tolist(), SamplingParams(max_new_tokens=args.generate, temperature=0.0)
            )
            rows = np.concatenate([tokens, np.asarray(result.tokens, dtype=np.int64)], axis=1)
            if inference.is_writer():
                inference.save_npy(args.generated_out, rows)
                _print_generation(rows, tokens.shape[1], plan.vocab_size, plan.cfg.model.family)
                print(f"wrote {args.generated_out}: tokens {list(rows.shape)}")
        torch.distributed.barrier()
    finally:
        parallel_state.destroy_model_parallel()
    return 0

