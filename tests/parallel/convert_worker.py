"""Worker for tests/test_convert.py, launched with torchrun on gloo CPU ranks.

--forward "ARGS" (repeatable): run `megatron-qwen forward`'s main with ARGS in these ranks, one layout after the
other (the process group stays, the model-parallel state is rebuilt per run).
--resave SRC DST TP PP: load checkpoint SRC at TP x PP and save it again with megatron-core's own
`save_model`, giving a checkpoint sharded the way a training run at that layout writes one.
--hang-dump SECONDS: print every thread's stack to stderr if the rank is still running after SECONDS, so a
hang shows where each rank waits before the test's own timeout kills the launch.
"""

from __future__ import annotations

import argparse
import faulthandler
import shlex
import sys
from pathlib import Path


def resave(src: str, dst: str, tp: int, pp: int) -> None:
    from megatron.core import parallel_state

    from megatron_qwen.config import load_config, resolve
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.launch import detect_launch, init_distributed
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.checkpoint.io import load_model, save_model

    overrides = [f"parallel.tp={tp}", f"parallel.pp={pp}", "training.micro_batch_size=1",
                 "training.global_batch_size=4"]
    cfg, layout, _ = resolve(load_config(Path(src) / "model_config.yaml", overrides), detect_launch().world_size)
    init_distributed(layout.tp, layout.pp, None, device="cpu")
    try:
        chunks = build_model(cfg, Runtime.cpu())
        load_model(chunks, src)
        save_model(chunks, dst)
    finally:
        parallel_state.destroy_model_parallel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--forward", action="append", default=[])
    parser.add_argument("--resave", nargs=4, action="append", default=[], metavar=("SRC", "DST", "TP", "PP"))
    parser.add_argument("--hang-dump", type=float, default=0.0)
    args = parser.parse_args()
    if args.hang_dump > 0:
        # Repeats every SECONDS: a rank that is merely slow prints again later, a hung one shows the same stack.
        faulthandler.dump_traceback_later(args.hang_dump, repeat=True, file=sys.stderr)
    from megatron_qwen.cli import forward

    for run in args.forward:
        status = forward.main(shlex.split(run))
        if status != 0:
            raise SystemExit(f"megatron-qwen forward {run} exited with {status}")
    for src, dst, tp, pp in args.resave:
        resave(src, dst, int(tp), int(pp))
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
