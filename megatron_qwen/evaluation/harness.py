"""Running lm-evaluation-harness tasks on a `QwenLM` and shaping the results (JSON, metrics for the logger).

Tasks are lm-eval's own names or YAML task files in ``include_path`` folders (a task over local JSONL files
sets ``dataset_path: json`` and ``dataset_kwargs.data_files``: what offline machines use).
"""

from __future__ import annotations

import math

from megatron_qwen.errors import UserError


def task_manager(include_path: list[str] | None):
    """lm-eval's TaskManager over its own tasks and the folders in `include_path`."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UserError("evaluation needs lm-evaluation-harness: pip install lm_eval (the version pinned in "
                        "constraints.txt)") from exc
    return TaskManager(include_path=include_path or None)


def check_tasks(manager, tasks: list[str]) -> None:
    """UserError naming the tasks lm-eval does not know, before any model is loaded."""
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}: not lm-eval tasks, nor in --include-path; "
                        "`python -m lm_eval ls tasks` lists lm-eval's")


def run_tasks(lm, tasks: list[str], manager, num_fewshot: int | None = None, limit: float | None = None,
              log_samples: bool = False) -> dict:
    """lm-eval's results for `tasks` on `lm`. Every rank runs every request; lm-eval aggregates the metrics on each
    node's first process (``LOCAL_RANK`` 0) and returns None on the others."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           log_samples=log_samples, bootstrap_iters=0, verbosity="WARNING")


def summary(results: dict) -> dict:
    """The JSON written to the run directory: per task its metrics, shots and version, and the settings."""
    return {
        "results": results.get("results", {}),
        "n-shot": results.get("n-shot", {}),
        "versions": results.get("versions", {}),
        "n-samples": results.get("n-samples", {}),
        "config": {k: v for k, v in results.get("config", {}).items() if k in ("limit", "bootstrap_iters")},
    }


def flat_metrics(results: dict, prefix: str = "eval") -> dict:
    """``{"eval/TASK/METRIC": value}`` for every numeric metric (lm-eval's ``acc,none`` becomes ``acc``)."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                name, _, filt = key.partition(",")
                name = name if filt in ("", "none") else f"{name}_{filt}"
                flat[f"{prefix}/{task}/{name}"] = float(value)
    return flat
