"""LR schedule and FLOP count against hand-computed values."""

from __future__ import annotations

import pytest

from megatron_qwen.training.flops import mfu, peak_flops, qwen_flops_per_token
from megatron_qwen.training.schedule import lr_at, set_lr


@pytest.mark.parametrize(
    "step, cosine, linear",
    [
        (0, 2.5e-4, 2.5e-4),  # warmup: peak * (step + 1) / 4
        (3, 1e-3, 1e-3),
        (4, 1e-3, 1e-3),  # decay starts at the peak
        (6, 1e-4 + 4.5e-4 * (1 + 0.8090169943749475), 8.2e-4),  # t = 0.2, cos(0.2 pi) = 0.809...
        (9, 5.5e-4, 5.5e-4),  # halfway
        (14, 1e-4, 1e-4),
        (100, 1e-4, 1e-4),  # stays at the minimum
    ],
)
def test_lr_schedule(step, cosine, linear):
    assert lr_at(step, 1e-3, 1e-4, 4, 14, "cosine") == pytest.approx(cosine, rel=1e-12)
    assert lr_at(step, 1e-3, 1e-4, 4, 14, "linear") == pytest.approx(linear, rel=1e-12)


def test_constant_and_no_warmup():
    assert lr_at(10, 1e-3, 1e-4, 4, 14, "constant") == 1e-3
    assert lr_at(0, 1e-3, 1e-4, 0, 10, "cosine") == 1e-3


def test_set_lr_honours_group_multipliers():
    class Opt:
        param_groups = [{"lr_mult": 1.0, "wd_mult": 1.0}, {"lr_mult": 1.0, "wd_mult": 0.0}]

    opt = Opt()
    set_lr(opt, 2e-4, 0.1)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(2e-4, 0.1), (2e-4, 0.0)]


def test_flops_by_hand():
    hidden, layers, ffn, vocab, seq = 4, 1, 6, 10, 3
    qkv = 2 * hidden * 3 * hidden  # 96
    scores = 2 * seq * hidden  # QK^T over 3 keys: 24
    weighted_values = 2 * seq * hidden  # 24
    out_proj = 2 * hidden * hidden  # 32
    swiglu = 3 * 2 * hidden * ffn  # gate, up, down: 144
    logits = 2 * hidden * vocab  # 80
    forward = layers * (qkv + scores + weighted_values + out_proj + swiglu) + logits  # 400
    assert qwen_flops_per_token(hidden, layers, ffn, vocab, seq) == 3 * forward == 1200
    assert qwen_flops_per_token(hidden, layers, ffn, vocab, seq, recompute_full=True) == 4 * forward


def test_qwen_7b_is_near_six_n():
    flops = qwen_flops_per_token(4096, 32, 11008, 151936, 2048)
    assert flops == pytest.approx(45.8e9, rel=0.01)  # 6 x ~7.1B parameters plus attention


def test_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops(None) is None and peak_flops("cpu") is None
    assert peak_flops("anything", override_tflops=500) == 500e12
    assert mfu(10_000, 45.8e9, 989e12) == pytest.approx(10_000 * 45.8e9 / 989e12)
    assert mfu(10_000, 45.8e9, None) is None
