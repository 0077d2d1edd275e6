"""The tiny Qwen built at TP, PP, TP x PP with SP, interleaved PP and DP starts from exactly the weights of
the single-process build, and one forward+backward gives its loss and gradients (multi-rank, gloo, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spawn import run_torchrun

WORKER = str(Path(__file__).parent / "parallel" / "equivalence_worker.py")
# 4 ranks: data parallelism takes what TP x PP leaves (DP=4, 2, 2, 1, 1, 2, 2, 1).
LAYOUTS = [
    "tp1-pp1-vpp1-sp0",
    "tp2-pp1-vpp1-sp0",
    "tp1-pp2-vpp1-sp0",
    "tp1-pp4-vpp1-sp0",
    "tp2-pp2-vpp1-sp1",
    "tp1-pp2-vpp2-sp0",
    "tp1-pp2-vpp2-sp0-p2p",  # with the p2p overlap GPUs run
    "tp2-pp2-vpp2-sp1",
]
RTOL = 1e-5


def max_relative_difference(a, b) -> float:
    """max |a - b| / max |b| over one tensor."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


@pytest.mark.parallel
def test_layouts_match_single_process(tmp_path):
    from megatron_qwen.checkpoint.io import read_full_state_dict

    run_torchrun(1, [WORKER, "--workdir", str(tmp_path), "--reference"])
    run_torchrun(4, [WORKER, "--workdir", str(tmp_path), "--layouts", ",".join(LAYOUTS)])

    ref_loss = json.loads((tmp_path / "reference" / "loss.json").read_text())["loss"]
    ref_grads = read_full_state_dict(tmp_path / "reference" / "grads")
    assert len(ref_grads) == 10 and all(g.abs().max() > 0 for g in ref_grads.values())
    ref_initial = read_full_state_dict(tmp_path / "reference" / "initial")
    # No two layers start alike: layer tensors are stacked on the first axis.
    for key, stacked in ref_initial.items():
        if key.startswith("decoder.layers.") and stacked.std() > 0:
            assert all(not torch.equal(stacked[i], stacked[j]) for i in range(len(stacked)) for j in range(i)), key

    report = []
    for name in LAYOUTS:
        initial = read_full_state_dict(tmp_path / name / "initial")
        assert initial.keys() == ref_initial.keys(), name
        assert all(torch.equal(initial[k], ref_initial[k]) for k in initial), \
            (name, [k for k in initial if not torch.equal(initial[k], ref_initial[k])])
        result = json.loads((tmp_path / name / "loss.json").read_text())
        grads = read_full_state_dict(tmp_path / name / "grads")
        assert grads.keys() == ref_grads.keys(), name
        loss_diff = abs(result["loss"] - ref_loss) / abs(ref_loss)
        grad_diff = {k: max_relative_difference(grads[k], ref_grads[k]) for k in ref_grads}
        worst = max(grad_diff, key=grad_diff.get)
        report.append(f"{name} (dp{result['dp']}): loss rel diff {loss_diff:.2e}, max grad rel diff "
                      f"{grad_diff[worst]:.2e} ({worst})")
        assert loss_diff <= RTOL, report[-1]
        assert grad_diff[worst] <= RTOL, report[-1]
    print("\n" + "\n".join(report))
