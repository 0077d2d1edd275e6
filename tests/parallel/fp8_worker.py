"""Worker for tests/test_fp8.py (4 gloo CPU ranks): one forward+backward of the tiny Qwen, FP8 at TP=1 and at
TP=2 x PP=2 with SP, from the same weights and data (equivalence_worker's run), plus the same TP=2 x PP=2 run
with every amax left local to its rank, to show what the tensor-parallel amax reduction is for.

Each run writes its loss and its gradients (full shapes, through dist_checkpointing) under --workdir/NAME.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from equivalence_worker import run

TP1 = "tp1-pp1-vpp1-sp0"
TP2PP2SP = "tp2-pp2-vpp1-sp1"


@contextlib.contextmanager
def local_amax():
    """Every rank scales by its own shard's amax: the TP reduction switched off (only to measure its effect)."""
    from megatron_qwen.model import fp8

    saved = fp8.amax_needs_tp_reduction
    fp8.amax_needs_tp_reduction = lambda split_dim, axiswise_dim: False
    try:
        yield
    finally:
        fp8.amax_needs_tp_reduction = saved


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--recipes", default="tensorwise,rowwise")
    args = parser.parse_args()
    run(TP1, args.workdir, reference=True, out_name="fp32-tp1")  # saves the weights every run starts from
    for recipe in args.recipes.split(","):
        extra = (f"model.fp8={recipe}",)
        run(TP1, args.workdir, reference=False, extra=extra, out_name=f"{recipe}-tp1")
        run(TP2PP2SP, args.workdir, reference=False, extra=extra, out_name=f"{recipe}-tp2pp2sp")
        with local_amax():
            run(TP2PP2SP, args.workdir, reference=False, extra=extra, out_name=f"{recipe}-tp2pp2sp-local-amax")


if __name__ == "__main__":
    main()
