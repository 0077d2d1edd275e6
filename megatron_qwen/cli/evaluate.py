"""Evaluate a checkpoint with lm-evaluation-harness in process, at any TP/PP/EP layout, without an export.

    megatron-qwen evaluate [--nproc N] --ckpt CKPT --tasks T1,T2 [--num-fewshot N] [--limit N] \\
        [--include-path DIR] [--tp T --pp P --vpp V --ep E] [--batch-size 8] [--out DIR] [--log-samples] \\
        [--wandb-project P] [--precision auto|fp32|bf16] [--trust-checkpoint]

Tasks are lm-eval's names, or YAML task files in --include-path folders (tasks over local JSONL files for
machines without network: see docs/evaluation.md). Writes DIR/results.json (per task its metrics, shots and
version, the checkpoint and the layout it ran at; default DIR: CKPT/../eval), DIR/metrics.jsonl and, with
--wandb-project, a W&B run; prints a table.
lm-eval is an optional dependency: `pip install lm_eval` (pinned in constraints.txt).
"""

from __future__ import annotations

import argparse
import json
import sys
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
from megatron_qwen.platform.launch import detect_launch, refuse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-qwen evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="megatron-core checkpoint directory (any layout)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--num-fewshot", type=int, default=None, help="shots per task (default: the task's)")
    parser.add_argument("--limit", type=float, default=None,
                        help="documents per task (an integer), or a fraction of them (< 1)")
    parser.add_argument("--include-path", action="append", default=None,
                        help="a folder of YAML task files (repeatable)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows scored or generated together (default 8)")
    parser.add_argument("--out", type=Path, default=None, help="where to write results.json (default CKPT/../eval)")
    parser.add_argument("--log-samples", action="store_true", help="also write every document's requests and answers")
    parser.add_argument("--wandb-project", default=None, help="log the metrics to this W&B project")
    add_loading_options(parser, ep=True)
    args = parser.parse_args(argv)
    args.task_list = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.task_list:
        parser.error("--tasks names no task")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size} must be >= 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        parser.error(f"--num-fewshot {args.num_fewshot} must be >= 0")
    if args.limit is not None and (args.limit <= 0 or args.limit >= 1 and args.limit != int(args.limit)):
        parser.error(f"--limit {args.limit} must be a whole number of documents or a fraction in (0, 1)")
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    return args


def table(summary: dict) -> str:
    """The results as lines: task, shots, metric, value."""
    lines = [f"{'task':<28} {'shots':>5} {'metric':<24} {'value':>9}"]
    for task, metrics in summary["results"].items():
        for key, value in metrics.items():
            if isinstance(value, float) and "_stderr" not in key:
                lines.append(f"{task:<28} {summary['n-shot'].get(task, ''):>5} {key:<24} {value:>9.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Evaluate on this process's rank; returns the exit status."""
    args = parse_args(argv)
    launch = detect_launch()
    warn_if_trusted(args, launch.rank)
    try:
        from megatron_qwen.evaluation import harness

        manager = harness.task_manager(args.include_path)
        harness.check_tasks(manager, args.task_list)
        plan, tokenizer, runtime = prepare_replica(args, launch.world_size, "evaluate", launch.local_rank)
    except UserError as exc:
        return refuse(launch, str(exc))

    from megatron_qwen.evaluation.lm import QwenLM
    from megatron_qwen.training.metrics import MetricsLogger

    start_replica(plan)
    try:
        lm = QwenLM(inference.load_chunks(plan, args.ckpt, runtime), plan, tokenizer, batch_size=args.batch_size)
        results = harness.run_tasks(lm, args.task_list, manager, args.num_fewshot, args.limit, args.log_samples)
        if launch.rank == 0:
            out = args.out or args.ckpt.resolve().parent / "eval"
            out.mkdir(parents=True, exist_ok=True)
            summary = harness.summary(results)
            summary["checkpoint"] = str(args.ckpt.resolve())
            summary["layout"] = running_layout(plan)
            (out / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
            if args.log_samples:
                for task, samples in results.get("samples", {}).items():
                    with open(out / f"samples_{task}.jsonl", "w") as f:
                        for sample in samples:
                            f.write(json.dumps(sample, default=str) + "\n")
            from megatron_qwen.config import WandbConfig

            logger = MetricsLogger(out, WandbConfig(project=args.wandb_project), {"tasks": args.task_list,
                                   "checkpoint": str(args.ckpt)}, enabled=True)
            logger.log(0, harness.flat_metrics(results), console=False)
            logger.close()
            print(table(summary))
            print(f"wrote {out / 'results.json'} ({lm.requests_run} requests)", file=sys.stderr)
    finally:
        parallel_state.destroy_model_parallel()
    return 0
