"""Train a stage on this machine: torchrun's single-node launch of `python -m megatron_qwen.stages.STAGE`.

    megatron-qwen run STAGE CONFIG.yaml [dotted.key=value ...] [--nproc N]

The same as `torchrun --standalone --nproc-per-node N -m megatron_qwen.stages.STAGE CONFIG.yaml [key=value ...]`
(which, like the Slurm templates, keeps working), except for what it prints: the ranks' own lines only. When the
stage refuses its config or data (exit status 2) its error lines are all there is, without the launcher's failure
report; any other failure ends with one line naming the rank and its exit status (`--verbose` adds the launcher's
report). The exit status is the stage's: 0, 1 (a run that aborted), 2 (refused), 75 (stopped by a signal after
saving: requeue it).
"""

from __future__ import annotations

import argparse
import logging
import pkgutil
import signal
import sys
from pathlib import Path

import megatron_qwen.stages


def stages() -> list[str]:
    """The stages `run` can start: the modules of megatron_qwen.stages."""
    return sorted(m.name for m in pkgutil.iter_modules(megatron_qwen.stages.__path__) if not m.name.startswith("_"))


def launch(module_argv: list[str], nproc: int, verbose: bool = False) -> int:
    """Run ``python -m MODULE_ARGV`` on `nproc` ranks of this machine through torchrun's launcher; returns the exit
    status of the first rank that failed (0 when all succeeded)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args as torchrun_args
    from torch.distributed.run import run as torchrun

    if not verbose:
        # The launcher's own log (rendezvous, OMP_NUM_THREADS, the failure report) goes through `logging` in this
        # process only; the ranks are child processes and print as usual.
        logging.disable(logging.CRITICAL)
    try:
        torchrun(torchrun_args(["--standalone", "--nproc-per-node", str(nproc), "-m", *module_argv]))
    except ChildFailedError as exc:
        # The rank that stopped first, not one the launcher then stopped with SIGTERM (exit 143, or -15 unhandled).
        rank, failure = min(exc.failures.items(), key=lambda item: (item[1].exitcode in (143, -signal.SIGTERM),
                                                                  item[1].timestamp, item[0]))
        code = failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode  # killed by signal -exitcode
        if code != 2:  # a refusal has printed its reasons; anything else gets a line saying which rank stopped
            print(f"megatron-qwen: rank {rank} exited with status {code} (its output is above)", file=sys.stderr)
        return code
    except SignalException as exc:  # this launcher was interrupted; it has stopped the ranks
        return 128 + int(exc.sigval)
    finally:
        logging.disable(logging.NOTSET)
    return 0


def launch_command(command: str, argv: list[str], verbose: bool) -> int:
    """`megatron-qwen COMMAND ... --nproc N`: the command on N ranks (torchrun), without --nproc."""
    nproc_at = argv.index("--nproc")
    try:
        nproc = int(argv[nproc_at + 1])
    except (IndexError, ValueError):
        print(f"error: --nproc takes the number of ranks, e.g. `megatron-qwen {command} --nproc 2 ...`",
              file=sys.stderr)
        return 2
    if nproc < 1:
        print(f"error: --nproc {nproc}: run on at least one rank", file=sys.stderr)
        return 2
    rest = argv[:nproc_at] + argv[nproc_at + 2:]
    return launch(["megatron_qwen.cli", *(["--verbose"] if verbose else []), command, *rest], nproc, verbose)


def main(argv: list[str] | None = None, verbose: bool = False) -> int:
    """`megatron-qwen run ARGV`; returns the exit status."""
    names = stages()
    parser = argparse.ArgumentParser(prog="megatron-qwen run", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", help=f"one of {', '.join(names)}")
    parser.add_argument("config", help="the stage's YAML config, e.g. configs/stage/sft.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 training.train_iters=100")
    parser.add_argument("--nproc", type=int, default=1, help="ranks (processes) on this machine (default 1)")
    args = parser.parse_intermixed_args(argv)
    if args.stage not in names:
        parser.error(f"no stage {args.stage!r}; the stages are {', '.join(names)}")
    if not Path(args.config).is_file():
        parser.error(f"config {args.config} does not exist; the stage configs are in configs/stage/")
    if args.nproc < 1:
        parser.error(f"--nproc {args.nproc}: run on at least one rank")
    return launch([f"megatron_qwen.stages.{args.stage}", args.config, *args.overrides], args.nproc, verbose)

