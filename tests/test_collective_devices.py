"""No collective of a group that is NCCL's on GPUs gets a tensor in host memory.

NCCL refuses host tensors; on CPU ranks every group is gloo's, which takes them, so such a call passes every
CPU test and fails the first GPU step. tests/collective_residency.py tracks where each tensor would live on a
GPU run and records every collective; one pretraining step and PPO steps at DP=2 and at TP=2 run on 2 ranks
with it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from collective_residency import RUN_DEVICE, ResidencyMode, is_host
from spawn import REPO, run_torchrun


def test_residency_follows_where_a_gpu_run_would_put_each_tensor():
    weight = torch.nn.Linear(2, 2).weight  # built outside the mode, as the model's parameters are: device
    with ResidencyMode():
        assert weight.device == RUN_DEVICE and not is_host(weight)
        host = [torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), torch.from_numpy(np.zeros(3, dtype=np.float32)),
                torch.as_tensor([4.0, 5.0, 6.0])]
        assert all(is_host(t) and t.device == torch.device("cpu") for t in host)
        device = [torch.zeros(3, device=RUN_DEVICE), host[0].to(RUN_DEVICE), host[1].to(weight.device),
                  host[2] + weight[0, 0], torch.zeros_like(weight)[0, :1].expand(3)]
        assert not any(is_host(t) for t in device)
        assert is_host(host[0])  # moving a tensor leaves the original where it was
        assert is_host(device[0].cpu()) and is_host(device[1].to("cpu")) and is_host(host[0] * 2)
        assert not is_host(device[0])
        assert is_host(torch.stack([host[0], host[1]])) and not is_host(torch.stack([host[0], device[0]]))
        device[0].copy_(host[1])
        device[0][1] = host[2][0]
        assert not is_host(device[0])  # in-place writes keep a tensor where it lives
        assert is_host(device[0].new_zeros(2, device="cpu")) and not is_host(device[0].new_zeros(2))


@pytest.mark.parallel
def test_collectives_of_would_be_nccl_groups_get_device_tensors(tmp_path):
    from test_ppo import write_prompts

    write_prompts(tmp_path / "prompts", count=100)
    run_torchrun(2, [str(REPO / "tests" / "parallel" / "collectives_worker.py"), "--workdir", str(tmp_path),
                     "--prompts", str(tmp_path / "prompts")])
    expected = {
        "pretrain": {"megatron_qwen/training/forward_backward.py:reduce_reports",
                     "megatron/core/distributed/param_and_grad_buffer.py:start_grad_sync",
                     "megatron_qwen/training/context.py:any_rank"},
        "ppo": {"megatron_qwen/rl/rewards.py:update", "megatron_qwen/rl/ppo_math.py:masked_mean_and_var",
                "megatron_qwen/rl/trainer.py:_weighted", "megatron_qwen/rl/trainer.py:metrics",
                "megatron_qwen/rl/scorers.py:__call__", "megatron_qwen/rl/logprobs.py:token_entropy",
                "megatron_qwen/training/forward_backward.py:reduce_reports",
                "megatron/core/distributed/param_and_grad_buffer.py:start_grad_sync"},
    }
    expected["ppo-tp2"] = expected["ppo"] | {
        "megatron/core/tensor_parallel/mappings.py:_reduce_scatter_along_first_dim"}
    for rank in (0, 1):
        stages = json.loads((tmp_path / f"collectives-{rank}.json").read_text())
        for stage, callers in expected.items():
            calls = stages[stage]
            # The recorder saw the collectives this check is about, each with its tensors: it cannot pass vacuously.
            assert callers <= {c["caller"] for c in calls if c["nccl_on_gpus"]}, (rank, stage, callers)
            assert all(c["tensors"] > 0 for c in calls)
            wrong = [(c["op"], c["caller"], c["host_tensors"]) for c in calls
                     if c["nccl_on_gpus"] and c["host_tensors"]]
            assert not wrong, (rank, stage, wrong)
