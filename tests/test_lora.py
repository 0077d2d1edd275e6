"""Training with low-rank adapters (`peft.*`, megatron_qwen/model/lora.py) on gloo CPU ranks.

One optimizer step at TP=2 x PP=2 with SP (and two more layouts) against one rank: loss, gradient norm and every
adapter after the step, with the base weights bit-identical and only the adapters in DDP's buffers and Adam's
state. Then the stages: SFT with adapters learns the synthetic chat task, DPO's first step from a reference that
is the policy with its adapters off has loss ln 2, PPO with a LoRA policy raises the rule reward; adapter-only
checkpoints (small, naming their base) resume at another layout, and a base with another fingerprint is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spawn import run_torchrun

WORKER = str(Path(__file__).parent / "parallel" / "lora_worker.py")
LAYOUTS = {"tp2-pp2-sp": "2,2,1,1,0", "tp2-sp-dp2-distopt": "2,1,1,1,1", "pp2-vpp2-dp2": "1,2,2,0,0"}


def max_relative_difference(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """The worker's reference (one rank) and its layouts (four ranks, one spawn): their directory."""
    root = tmp_path_factory.mktemp("lora-step")
    run_torchrun(1, [WORKER, "--workdir", str(root), "--reference"])
    run_torchrun(4, [WORKER, "--workdir", str(root), "--layouts",
                     ";".join(f"{name}:{sizes}" for name, sizes in LAYOUTS.items())])
    return root


@pytest.mark.parallel
def test_one_step_at_tp2_pp2_sp_equals_one_rank(one_step):
    from megatron_qwen.checkpoint.io import read_full_state_dict
    from megatron_qwen.model.lora import is_adapter_key

    ref = json.loads((one_step / "reference" / "reports.json").read_text())["ranks"][0]
    init = read_full_state_dict(one_step / "init")
    ref_after = read_full_state_dict(one_step / "reference" / "after")
    ref_grads = read_full_state_dict(one_step / "reference" / "grads")
    adapters = sorted(k for k in init if is_adapter_key(k))
    # q, k, v, o, gate, up, down: an A and a B each, layers stacked.
    assert len(adapters) == 14, adapters
    # The reference moved every adapter (A too: B started nonzero) and kept the base bit for bit.
    assert all(not torch.equal(ref_after[k], init[k]) and ref_grads[k].abs().max() > 0 for k in adapters)
    assert all(torch.equal(ref_after[k], init[k]) for k in init if k not in adapters)
    for name in LAYOUTS:
        got = json.loads((one_step / name / "reports.json").read_text())["ranks"][0]
        assert got["updated"]
        assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (name, got["loss"], ref["loss"])
        assert abs(got["grad_norm"] - ref["grad_norm"]) <= 1e-5 * ref["grad_norm"], (name, got, ref)
        after = read_full_state_dict(one_step / name / "after")
        assert after.keys() == init.keys()
        for key in init:
            if is_adapter_key(key):
                assert max_relative_difference(after[key], ref_after[key]) < 1e-5, (name, key)
            else:
                assert torch.equal(after[key], init[key]), (name, key)
        if (one_step / name / "grads").exists():  # the adapters' reduced gradients (without the distributed optimizer)
            grads = read_full_state_dict(one_step / name / "grads")
            for key in adapters:
                assert max_relative_difference(grads[key], ref_grads[key]) < 1e-5, (name, key)


@pytest.mark.parallel
def test_only_adapters_get_gradients_and_optimizer_state(one_step):
    for name in ["reference", *LAYOUTS]:
        for rank, checks in enumerate(json.loads((one_step / name / "reports.json").read_text())["ranks"]):
            assert checks["trainable_not_adapters"] == [], (name, rank)
            assert checks["main_grads_not_adapters"] == [], (name, rank)
            assert checks["adapters_without_main_grad"] == 0, (name, rank)
            # Adam's moments cover exactly the adapters (summed over DP with the distributed optimizer).
            assert checks["moment_elements"] == checks["adapter_elements"] > 0, (name, rank, checks)
