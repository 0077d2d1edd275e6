"""Serve a checkpoint over an OpenAI-compatible HTTP API, at any TP/PP/EP layout, with the KV-cache engine.

    megatron-qwen serve [--nproc N] --ckpt CKPT [--tp T --pp P --vpp V --ep E] [--host 127.0.0.1] [--port 8000] \\
        [--api-key KEY] [--model-name NAME] [--max-batch 16] [--max-queue 256] [--batch-wait-ms 5] \\
        [--precision auto|fp32|bf16] [--trust-checkpoint]

Routes: GET /v1/models, POST /v1/completions (prompt as text, texts, ids or lists of ids; echo and logprobs
score a prompt), POST /v1/chat/completions (messages rendered with the checkpoint family's chat template),
GET /health. Streaming (server-sent events), n, seed, temperature, top_p, top_k, max_tokens, stop (strings),
stop_token_ids and usage as OpenAI defines them. Rank 0 serves HTTP; the other ranks follow its broadcasts.
The API key (--api-key, else $MEGATRON_QWEN_API_KEY) is required as `Authorization: Bearer KEY` when set.
SIGTERM stops taking requests, finishes the queued ones and exits. The ranks are exactly TP x PP x EP (one replica;
at EP > 1 every rank runs every batch and each holds 1/EP of every MoE layer's experts).
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from megatron.core import parallel_state

from megatron_qwen.cli.loading import (
    add_loading_options,
    prepare_replica,
    running_layout,
    start_replica,
    warn_if_trusted,
)
from megatron_qwen.errors import UserError
from megatron_qwen.inference import forward as inference
from megatron_qwen.inference.engine import GenerationEngine
from megatron_qwen.platform.launch import detect_launch, refuse

API_KEY_ENV = "MEGATRON_QWEN_API_KEY"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-qwen serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="megatron-core checkpoint directory (any layout)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--api-key", default=None, help=f"require this key (default ${API_KEY_ENV}, else none)")
    parser.add_argument("--model-name", default=None, help="the model id clients name (default: CKPT's folder name)")
    parser.add_argument("--max-batch", type=int, default=16, help="rows (prompts x n) per engine batch (default 16)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="rows queued or running before requests get 503 (default 256)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long a batch that is not full waits for more requests (default 5 ms)")
    add_loading_options(parser, ep=True)
    args = parser.parse_args(argv)
    for name in ("max_batch", "max_queue"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.max_queue < args.max_batch:
        parser.error(f"--max-queue {args.max_queue} is below --max-batch {args.max_batch}; a batch could never fill")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} must be in 0..65535")
    if args.batch_wait_ms < 0:
        parser.error(f"--batch-wait-ms {args.batch_wait_ms} must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM (or Ctrl-C); returns the exit status."""
    # Imported here: aiohttp is needed only by this command.
    from megatron_qwen.serve.batching import Scheduler
    from megatron_qwen.serve.http import Api, HttpThread
    from megatron_qwen.serve.protocol import Limits
    from megatron_qwen.serve.worker import RankLoop, log

    args = parse_args(argv)
    launch = detect_launch()
    warn_if_trusted(args, launch.rank)
    try:
        plan, tokenizer, runtime = prepare_replica(
            args, launch.world_size, "serve", launch.local_rank,
            hint=" (for more replicas, run more servers behind a load balancer)")
        limits = Limits(model=args.model_name or args.ckpt.resolve().name, vocab_limit=plan.generate_vocab,
                        max_positions=plan.cfg.model.max_position_embeddings,
                        stop_ids=tokenizer.generation_stop_ids(plan.generate_vocab), max_rows=args.max_queue)
    except UserError as exc:
        return refuse(launch, str(exc))

    start_replica(plan)
    http = None
    try:
        chunks = inference.load_chunks(plan, args.ckpt, runtime)
        engine = GenerationEngine(chunks, plan.generate_vocab)
        scheduler = None
        if launch.rank == 0:
            scheduler = Scheduler(args.max_queue, args.max_batch, args.batch_wait_ms / 1000)
            api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
            http = HttpThread(Api(scheduler, tokenizer, limits, api_key), args.host, args.port)

            def drain(signum, frame):
                log(f"{signal.Signals(signum).name}: finishing the queued requests, then exiting")
                scheduler.drain()

            signal.signal(signal.SIGTERM, drain)
            signal.signal(signal.SIGINT, drain)
            layout = running_layout(plan)
            log(f"serving '{limits.model}' (tp {layout['tp']}, pp {layout['pp']}, ep {layout['ep']}) on "
                f"http://{args.host}:{http.port}/v1"
                + (" (API key required)" if api_key else ""))
        else:
            # Rank 0 decides when to stop; the others follow its broadcast.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        loop = RankLoop(engine, chunks, plan, tokenizer, limits, scheduler)
        loop.run()
        if launch.rank == 0:
            log(f"drained after {loop.batches} batch(es); exiting")
    finally:
        if http is not None:
            http.stop()
        parallel_state.destroy_model_parallel()
    return 0
