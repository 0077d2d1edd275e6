"""PPO's statistics against plain-torch references on inputs that exercise their edge cases: the entropy of fp32
logits that the cross entropy has read first, GRPO's k3 term where log-probabilities fall below exp's fp32 range,
and GRPO's advantages of groups whose samples tie. One rank in this process (TP=1)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

V = 64


class FixedLogits(torch.nn.Module):
    """A stand-in model whose forward returns given logits: the forward steps read exactly these."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # the device `model_inputs` reads
        self.logits = logits

    def forward(self, tokens, position_ids, attention_mask):
        return self.logits + self.anchor


def reference_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_collected_entropy_and_logprobs_match_plain_torch(temperature):
    """The collect step reads log-probabilities (megatron-core's vocab-parallel cross entropy, which works in place)
    and then the entropy from the same fp32 logits; with nothing masked at temperature 1 they are the model's own
    tensor, so the entropy must not see what the cross entropy wrote into it."""
    from megatron_qwen.rl import steps as ppo_steps

    gen = torch.Generator().manual_seed(0)
    # Peaked rows (low entropy) next to flat ones: an overwritten input reads as about log V everywhere.
    logits = torch.randn(2, 5, V, generator=gen) * torch.tensor([0.5, 8.0]).view(2, 1, 1)
    labels = torch.randint(0, V, (2, 5), generator=gen)
    batch = {"tokens": labels, "position_ids": torch.arange(5).expand(2, 5), "labels": labels, "mask": torch.ones(2, 5)}
    step = ppo_steps.steps(V, temperature, 0.2, 0.15, 0.0).logprobs
    output, collect = step(iter([batch]), FixedLogits(logits.clone()))
    got = collect(output)
    expected = reference_entropy(logits, temperature)
    assert expected.min() < 0.5 * expected.max()  # the rows differ: a constant answer cannot pass
    torch.testing.assert_close(got["entropy"].double(), expected, rtol=1e-5, atol=1e-5)
    logp = torch.log_softmax(logits.double() / temperature, dim=-1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(got["logprobs"].double(), logp, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("single_rank")
def test_policy_step_entropy_report_matches_plain_torch():
    """The policy update's entropy report reads the logits after the (in-place) cross entropy too."""
    from megatron_qwen.rl import steps as ppo_steps

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, V, generator=gen) * 4
    labels = torch.randint(0, V, (2, 4), generator=gen)
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    batch = {"kind": "rollout", "weight": 1.0, "tokens": labels, "position_ids": torch.arange(4).expand(2, 4),
             "labels": labels, "mask": mask, "old_logprobs": torch.zeros(2, 4), "ref_logprobs": torch.zeros(2, 4),
             "advantages": torch.zeros(2, 4)}
    step = ppo_steps.steps(V, 1.0, 0.2, 0.15, 0.0).policy
    output, loss = step(iter([batch]), FixedLogits(logits.clone()))
    _, _, reports = loss(output)
    total, count = reports["policy_entropy"].tolist()
    expected = (reference_entropy(logits, 1.0) * mask).sum() / mask.sum()
    assert total / count == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.usefixtures("single_rank")
def test_grpo_kl_term_stays_finite_below_exp_range():
    """GRPO's policy loss with log-probabilities under -89 (exp overflows fp32 beyond 88.7): outside the response
    the reference's are 0 and the policy's about -100, inside one reference log-probability is -95. The loss and
    its gradient are finite and equal a plain-torch loss over the response tokens alone."""
    from megatron_qwen.rl import steps as ppo_steps

    coef, clip = 0.1, 0.2
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, V, (1, 6), generator=gen)
    logits = torch.randn(1, 6, V, generator=gen)
    logits[0, :2] = 0.0
    logits[0, :2].scatter_(-1, labels[0, :2, None], -100.0)  # the prompt's labels: log p about -100
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0, -95.0, -3.0, -4.0, -120.0]])
    old = torch.tensor([[0.0, 0.0, -4.0, -4.5, -3.5, 0.0]])
    advantages = torch.tensor([[0.0, 0.0, 0.5, -1.0, 2.0, 0.0]])
    batch = {"kind": "rollout", "weight": 1.0, "tokens": labels, "position_ids": torch.arange(6)[None],
             "labels": labels, "mask": mask, "old_logprobs": old, "ref_logprobs": ref, "advantages": advantages}
    step = ppo_steps.steps(V, 1.0, clip, 0.15, coef).policy
    model = FixedLogits(logits.clone().requires_grad_(True))
    output, loss_fn = step(iter([batch]), model)
    loss, _, _ = loss_fn(output)
    loss.backward()
    grad = model.logits.grad

    # Plain torch over the response positions only.
    keep = mask[0] > 0
    ref_logits = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(ref_logits[0], dim=-1).gather(-1, labels[0, :, None])[:, 0][keep]
    ratio = torch.exp(logp - old[0][keep])
    a = advantages[0][keep]
    surrogate = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    log_ratio = ref[0][keep] - logp
    expected = (surrogate + coef * (torch.exp(log_ratio) - log_ratio - 1)).sum()
    expected.backward()
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad, ref_logits.grad, rtol=1e-5, atol=1e-6)
    assert grad[0, :2].abs().max() == 0 and grad[0, 5].abs().max() == 0  # nothing flows from outside the response


@pytest.mark.parametrize("group_size", [3, 5, 6, 8, 16])
def test_grpo_tied_groups_get_exactly_zero(group_size):
    from megatron_qwen.rl.ppo_math import group_advantages

    gen = torch.Generator().manual_seed(group_size)
    values = torch.cat([torch.tensor([0.1, 10.3, -7.77, 1e3, 1 / 3]), torch.randn(200, generator=gen) * 20])
    scores = values.float().repeat_interleave(group_size)  # every group's samples tie
    assert scores.dtype == torch.float32
    advantages = group_advantages(scores, group_size)
    assert advantages.dtype == torch.float32
    assert torch.equal(advantages, torch.zeros_like(scores)), advantages.abs().max()
    # A group that does not tie still gets its z-scores.
    mixed = group_advantages(torch.tensor([1.0, 2.0, 3.0] + [4.0] * (group_size - 3)), group_size)
    x = torch.tensor([1.0, 2.0, 3.0] + [4.0] * (group_size - 3), dtype=torch.float64)
    torch.testing.assert_close(mixed.double(), (x - x.mean()) / (x.std(unbiased=False) + 1e-6), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- frozen models between their forwards


def frozen_unit(on_cpu: bool):
    """A frozen unit of one linear layer on a runtime that says it is (not) on CPU ranks; its "device" is the CPU."""
    from types import SimpleNamespace

    from megatron_qwen.training.units import ModelUnit

    layer = torch.nn.Linear(3, 2)
    layer.register_buffer("scale", torch.ones(2))
    layer.requires_grad_(False)
    return ModelUnit("reference", [layer], SimpleNamespace(on_cpu=on_cpu, device=torch.device("cpu")))


def storages(unit) -> list[int]:
    return [t.data_ptr() for t in unit._tensors()]


def test_offload_keeps_weights_in_host_buffers_copied_once():
    unit = frozen_unit(on_cpu=False)
    weights = [t.clone() for t in unit._tensors()]
    unit.offload()
    host = unit.host_copies
    assert storages(unit) == [t.data_ptr() for t in host]  # the model now reads its host copies
    assert all(torch.equal(a, b) for a, b in zip(unit._tensors(), weights))
    unit.onload()
    assert not set(storages(unit)) & {t.data_ptr() for t in host}  # fresh tensors on the device
    assert all(torch.equal(a, b) for a, b in zip(unit._tensors(), weights))
    unit.offload()  # frozen weights: the host copies made the first time are still right
    assert unit.host_copies is host and storages(unit) == [t.data_ptr() for t in host]
    with pytest.raises(ValueError, match="only frozen units move"):
        dataclasses.replace(unit, optimizer=object()).offload()  # a trained unit's optimizer holds its weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning host memory needs CUDA (torch refuses without it)")
def test_offloaded_weights_are_pinned():
    unit = frozen_unit(on_cpu=False)
    unit.offload()
    assert all(t.is_pinned() for t in unit.host_copies)


def test_nothing_moves_on_cpu_ranks_or_with_offload_off():
    from types import SimpleNamespace

    from megatron_qwen.training.loop import Trainer

    unit = frozen_unit(on_cpu=True)
    before = storages(unit)
    unit.offload()
    unit.onload()
    assert storages(unit) == before and unit.host_copies is None

    calls = []
    spy = SimpleNamespace(onload=lambda: calls.append("onload"), offload=lambda: calls.append("offload"))
    for offload_frozen, expected in ((False, ["forward"]), (True, ["onload", "forward", "offload"])):
        calls.clear()
        trainer = SimpleNamespace(cfg=SimpleNamespace(training=SimpleNamespace(offload_frozen=offload_frozen)),
                                  frozen={"reference": spy}, base_views=set())
        with Trainer.frozen_model(trainer, "reference") as unit:
            assert unit is spy
            calls.append("forward")
        assert calls == expected, (offload_frozen, calls)
