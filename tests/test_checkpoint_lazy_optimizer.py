"""Saving a distributed optimizer that has not stepped yet, over an optimizer whose state is created lazily.

On GPUs megatron-core's distributed optimizer runs Transformer Engine's or apex's FusedAdam, which create a
parameter's moments at its first step and count the step per parameter group. PPO's policy saves before its
first step (the value warm-up), as do ``training.train_iters=0`` and a preemption before step 1. Here a
stand-in with FusedAdam's state layout runs inside megatron-core's distributed optimizer on a CPU rank, with
megatron-core told it is FusedAdam (as it is on an image with TE or apex).
"""

from __future__ import annotations

import pytest
import torch

SEQ, VOCAB = 16, 1024


class LazyAdam(torch.optim.Optimizer):
    """AdamW with FusedAdam's state layout: no state before the first step, then exp_avg and exp_avg_sq per
    parameter and the step count in each group (apex's and Transformer Engine's FusedAdam), with their
    constructor's ``adam_w_mode``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=adam_w_mode))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            (beta1, beta2), t = group["betas"], group["step"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                grad = p.grad
                if group["adam_w_mode"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                else:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**t))


@pytest.fixture
def fused_adam(monkeypatch):
    """megatron-core building and handling its optimizer as it does where TE's or apex's FusedAdam imports."""
    from megatron.core import optimizer
    from megatron.core.optimizer import distrib_optimizer

    monkeypatch.setattr(optimizer, "USING_PYTORCH_OPTIMIZER", False)
    monkeypatch.setattr(optimizer, "Adam", LazyAdam)
    monkeypatch.setattr(distrib_optimizer, "Adam", LazyAdam)
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    monkeypatch.setattr(distrib_optimizer, "USING_APEX_OPTIMIZER", True)


def _unit(seed: int):
    from megatron_qwen.config import load_config
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.training.units import build_unit

    cfg = load_config("configs/tiny.yaml", [
        f"model.padded_vocab_size={VOCAB}", "model.num_layers=2", f"model.seq_length={SEQ}", f"training.seed={seed}",
        "parallel.use_distributed_optimizer=true", "training.global_batch_size=2", "training.weight_decay=0.1",
    ])
    return build_unit(cfg, Runtime.cpu(), "model")


def _step(unit, data_seed: int) -> None:
    from megatron_qwen.training.forward_backward import forward_backward

    tokens = torch.randint(0, VOCAB, (2, 1, SEQ + 1), generator=torch.Generator().manual_seed(data_seed))
    unit.set_lr(1e-3)
    unit.zero_grad()
    batches = [{"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(1, SEQ)} for t in tokens]
    forward_backward(unit.chunks, iter(batches), 2, SEQ, 1)
    assert unit.step()[1]


def _inner(unit):
    (opt,) = unit.optimizer.chained_optimizers
    assert isinstance(opt.optimizer, LazyAdam)
    return opt.optimizer


@pytest.mark.usefixtures("single_rank", "fused_adam")
def test_never_stepped_lazy_optimizer_saves_and_resumes_with_zero_moments(tmp_path):
    from megatron_qwen.checkpoint import io as checkpointing

    source = _unit(seed=1)
    assert not _inner(source).state  # lazily created: nothing before the first step
    path = checkpointing.save_checkpoint(tmp_path, 0, [source], {"consumed_samples": 0}, keep_last=1)

    # The file holds what a first step would start from: zero moments, the model's own weights as main weights.
    saved = checkpointing.read_full_state_dict(path)
    weights = {k: v for k, v in saved.items() if not k.startswith("optimizer.")}
    moment_keys = ("optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq.")
    moments = {k: v for k, v in saved.items() if k.startswith(moment_keys)}
    assert len(moments) == 2 * len(weights) and all(not v.any() for v in moments.values())
    for key, weight in weights.items():
        assert torch.equal(saved[f"optimizer.state.param.{key}"], weight.float()), key

    # Resumed into a unit of other initial weights that has stepped (non-zero moments, a step count): its state
    # becomes the saved one, and its next step is the source's first step.
    resumed = _unit(seed=2)
    _step(resumed, data_seed=5)
    assert any(s["exp_avg"].any() for s in _inner(resumed).state.values())
    checkpointing.load_checkpoint(path, [resumed], restore_rng=False)
    inner = _inner(resumed)
    assert all("step" not in group for group in inner.param_groups)  # never stepped: TE's FusedAdam starts at 1
    for group, source_group in zip(inner.param_groups, _inner(source).param_groups):
        for p, q in zip(group["params"], source_group["params"]):
            assert torch.equal(p, q)
            assert not inner.state[p]["exp_avg"].any() and not inner.state[p]["exp_avg_sq"].any()
    for unit in (source, resumed):
        _step(unit, data_seed=9)
    for group, source_group in zip(inner.param_groups, _inner(source).param_groups):
        assert group["step"] == source_group["step"] == 1
        for p, q in zip(group["params"], source_group["params"]):
            assert torch.equal(p, q)
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(inner.state[p][key], _inner(source).state[q][key]), key
