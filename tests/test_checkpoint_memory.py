"""Saving with the distributed optimizer: the memory-efficient fully reshardable format keeps the other
data-parallel ranks from materialising the optimizer state of their whole TP x PP shard, and still
reshards on resume (4 gloo CPU ranks; see tests/parallel/checkpoint_memory_worker.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spawn import run_torchrun

WORKER = str(Path(__file__).parent / "parallel" / "checkpoint_memory_worker.py")
MIB = 2**20


@pytest.mark.parallel
def test_save_memory_and_resharding(tmp_path):
    from megatron_qwen.checkpoint.io import read_full_state_dict

    run_torchrun(4, [WORKER, "--workdir", str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    lines = [f"rank {r} (DP rank {f['dp_rank']}): peak host memory of a save {f['before'] / MIB:.0f} MiB before, "
             f"{f['now'] / MIB:.0f} MiB now" for r, f in enumerate(ranks)]
    print("\n" + "\n".join(lines))
    for line, f in zip(lines, ranks):
        if f["dp_rank"] == 0:  # gathers and writes the state, as before
            assert f["now"] <= 1.1 * f["before"], line
        else:  # sends its share only: its own optimizer state is about a third of what it gathered before
            assert f["now"] < 0.5 * f["before"], line
    assert sum(f["now"] for f in ranks) < 0.8 * sum(f["before"] for f in ranks)

    # Both formats hold the same tensors and load at TP=1 x PP=2 (from TP=2): the resumed state saved there
    # equals the original, optimizer moments and main weights included.
    before, now = (read_full_state_dict(tmp_path / "before" / "iter_0000001"),
                   read_full_state_dict(tmp_path / "now" / "iter_0000001"))
    assert before.keys() == now.keys() and any(k.startswith("optimizer.state.exp_avg.") for k in now)
    assert all(torch.equal(before[k], now[k]) for k in now)
    for name, original in (("before", before), ("now", now)):
        resharded = read_full_state_dict(tmp_path / f"{name}-resharded" / "iter_0000001")
        assert resharded.keys() == original.keys(), name
        assert all(torch.equal(resharded[k], original[k]) for k in original), \
            (name, [k for k in original if not torch.equal(resharded[k], original[k])])


@pytest.mark.usefixtures("single_rank")
def test_distributed_optimizer_over_torch_adam_resumes(tmp_path):
    """megatron-core 0.16.1's distributed optimizer over torch's AdamW (no Transformer Engine or apex) cannot
    load a checkpoint by itself; the trainer's load path can, and restores the state exactly."""
    from megatron.core import dist_checkpointing

    from megatron_qwen.checkpoint.directory import OPTIMIZER_KEY
    from megatron_qwen.config import load_config
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.checkpoint import io as checkpointing
    from megatron_qwen.training.forward_backward import forward_backward
    from megatron_qwen.training.units import build_unit

    cfg = load_config("configs/tiny.yaml", ["model.padded_vocab_size=1024", "model.num_layers=2", "model.seq_length=16",
                                            "parallel.use_distributed_optimizer=true", "training.global_batch_size=2"])
    unit = build_unit(cfg, Runtime.cpu(), "model")
    tokens = torch.randint(0, 1024, (2, 1, 17), generator=torch.Generator().manual_seed(0))
    unit.zero_grad()
    forward_backward(unit.chunks,
                     iter([{"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(1, 16)} for t in tokens]),
                     2, 16, 1)
    assert unit.step()[1]
    checkpointing.save_checkpoint(tmp_path, 1, [unit], {}, keep_last=1)
    path = tmp_path / "iter_0000001"

    fresh = build_unit(cfg, Runtime.cpu(), "model")
    model_state = checkpointing.chunks_state(fresh.modules)
    metadata = checkpointing.OPTIMIZER_METADATA
    with pytest.raises(AssertionError):  # no per-parameter step before torch's first step
        fresh.optimizer.sharded_state_dict(model_state, is_loading=True, metadata=metadata)
    request = checkpointing.units_state([fresh], loading=True)
    loaded = dist_checkpointing.load(request, str(path))
    with pytest.raises(KeyError, match="step"):  # the per-parameter step is copied from a state that has none
        fresh.optimizer.load_state_dict(loaded[OPTIMIZER_KEY])

    resumed = build_unit(cfg, Runtime.cpu(), "model")
    checkpointing.load_checkpoint(path, [resumed], restore_rng=False)

    def assert_same_state(after: str) -> None:
        (opt,) = unit.optimizer.chained_optimizers
        (again,) = resumed.optimizer.chained_optimizers
        pairs = [(p, q) for a, b in zip(opt.optimizer.param_groups, again.optimizer.param_groups, strict=True)
                 for p, q in zip(a["params"], b["params"], strict=True)]
        assert len(pairs) == len(list(unit.modules[0].parameters())), after
        for p, q in pairs:
            assert torch.equal(p, q), after
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt.optimizer.state[p][key], again.optimizer.state[q][key]), (after, key)

    # Equal state after the load and after each of two more steps (each parameter advances its own step counter).
    assert_same_state("the load")
    for step in range(2):
        for u in (unit, resumed):
            u.zero_grad()
            forward_backward(u.chunks,
                             iter([{"tokens": t[:, :-1], "labels": t[:, 1:],
                                    "loss_mask": torch.ones(1, 16)} for t in tokens]), 2, 16, 1)
            assert u.step()[1]
        assert_same_state(f"step {step + 1} after the load")
