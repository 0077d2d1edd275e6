"""Worker for tests/test_checkpoint_memory.py, launched with torchrun on 4 gloo CPU ranks.

The tiny Qwen (its real 151,936-row vocabulary) with the distributed optimizer at TP=2 x DP=2 takes one
training step; then its checkpoint is saved twice through the trainer's save path, in megatron-core's
fully reshardable format as saved before (every data-parallel rank all-gathers the optimizer state of its
whole TP x PP shard) and as saved now (memory-efficient: gathered on DP rank 0 only), each rank measuring
the peak of its resident memory during the save. Then the model is rebuilt at TP=1 x PP=2 x DP=2, resumes
from each checkpoint and saves again: the test compares those against the originals tensor by tensor.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
SEQ, GLOBAL_BATCH = 32, 4
SAVED_BEFORE = {"distrib_optim_sharding_type": "fully_reshardable"}


def resident_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def build(tp: int, pp: int):
    from megatron.core import parallel_state

    from megatron_qwen.config import load_config, resolve
    from megatron_qwen.platform.launch import detect_launch, init_distributed
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.training.units import build_unit

    cfg = load_config(CONFIG, [
        f"model.seq_length={SEQ}", f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.use_distributed_optimizer=true",
        "training.micro_batch_size=1", f"training.global_batch_size={GLOBAL_BATCH}",
    ])
    cfg, layout, _ = resolve(cfg, detect_launch().world_size)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_distributed(tp, pp, None, device="cpu")
    return cfg, layout, build_unit(cfg, Runtime.cpu(), "model")


def main() -> None:
    from megatron.core import parallel_state

    from megatron_qwen.checkpoint import io as checkpointing
    from megatron_qwen.training.forward_backward import forward_backward

    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()

    cfg, layout, unit = build(2, 1)
    rank = torch.distributed.get_rank()
    num_micro = GLOBAL_BATCH // layout.dp
    tokens = torch.randint(0, 1000, (num_micro, 1, SEQ + 1), generator=torch.Generator().manual_seed(rank))
    batches = [{"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(1, SEQ)} for t in tokens]
    unit.zero_grad()
    forward_backward(unit.chunks, iter(batches), num_micro, SEQ, 1)
    assert unit.step()[1]

    figures = {"dp_rank": parallel_state.get_data_parallel_rank()}
    for name, metadata in (("before", SAVED_BEFORE), ("now", checkpointing.OPTIMIZER_METADATA)):
        gc.collect()
        torch.distributed.barrier()
        baseline = resident_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current size
        saved, checkpointing.OPTIMIZER_METADATA = checkpointing.OPTIMIZER_METADATA, metadata
        try:
            checkpointing.save_checkpoint(args.workdir / name, 1, [unit], {"consumed_samples": GLOBAL_BATCH},
                                          keep_last=1)
        finally:
            checkpointing.OPTIMIZER_METADATA = saved
        figures[name] = (resident_kib("VmHWM") - baseline) * 1024

    # Resume each at another layout, and save it there.
    del unit
    gc.collect()
    for name in ("before", "now"):
        _, _, unit = build(1, 2)
        checkpointing.load_checkpoint(args.workdir / name / "iter_0000001", [unit], restore_rng=False)
        checkpointing.save_checkpoint(args.workdir / f"{name}-resharded", 1, [unit], {"consumed_samples": GLOBAL_BATCH},
                                      keep_last=1)
        del unit
        gc.collect()
    (args.workdir / f"rank{rank}.json").write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
