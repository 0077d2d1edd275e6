"""LR schedule and FLOP count against hand-computed values."""

from __future__ import annotations

import pytest

from megatron_qwen.training.flops import hardware_flops_per_token, model_flops_per_token, peak_flops, utilisation
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
        # megatron-core's groups: a scaled LR (e.g. a head trained faster), norms and biases without decay,
        # and a group that names no multipliers (1.0 then).
        param_groups = [{"lr_mult": 2.5, "wd_mult": 1.0}, {"lr_mult": 0.5, "wd_mult": 0.0},
                        {"lr_mult": 1.0, "wd_mult": 0.25}, {}]

    opt = Opt()
    set_lr(opt, 2e-4, 0.1)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 1e-4, 2e-4, 2e-4], rel=1e-15)
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([0.1, 0.0, 0.025, 0.1], rel=1e-15)


def test_flops_by_hand():
    hidden, layers, ffn, vocab, seq = 4, 1, 6, 10, 3
    qkv = 2 * hidden * 3 * hidden  # 96
    scores = 2 * seq * hidden  # QK^T over 3 keys: 24
    weighted_values = 2 * seq * hidden  # 24
    out_proj = 2 * hidden * hidden  # 32
    swiglu = 3 * 2 * hidden * ffn  # gate, up, down: 144
    logits = 2 * hidden * vocab  # 80
    layer = qkv + scores + weighted_values + out_proj + swiglu  # 320
    forward = layers * layer + logits  # 400
    shape = (hidden, layers, ffn, vocab, seq)
    # Model FLOPs: forward + backward (2x forward), whatever recomputation does.
    assert model_flops_per_token(*shape) == 3 * forward == 1200
    # Hardware FLOPs: full recomputation runs each layer's forward again (not the output layer), selective
    # recomputation the attention core (scores and weighted values) only.
    assert hardware_flops_per_token(*shape, recompute="none") == 1200
    assert hardware_flops_per_token(*shape, recompute="full") == 1200 + layer == 1520
    assert hardware_flops_per_token(*shape, recompute="selective") == 1200 + scores + weighted_values == 1248


def test_reward_model_counts_its_scalar_head_not_an_output_layer():
    hidden, layers, ffn, vocab, seq = 4, 1, 6, 10, 3
    layer, head = 320, 2 * hidden * 1  # one output instead of 10
    assert model_flops_per_token(hidden, layers, ffn, vocab, seq, head="scalar") == 3 * (layer + head) == 984
    assert hardware_flops_per_token(hidden, layers, ffn, vocab, seq, head="scalar", recompute="full") == 984 + layer


def test_qwen_7b_is_near_six_n():
    flops = model_flops_per_token(4096, 32, 11008, 151936, 2048)
    assert flops == pytest.approx(45.8e9, rel=0.01)  # 6 x ~7.1B parameters plus attention


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989),  # SXM5
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H800", 989),
        ("NVIDIA H800 PCIe", 756),
        ("NVIDIA H200", 989),
        ("NVIDIA H200 NVL", 835),
        ("NVIDIA GH200 480GB", 989),
        ("NVIDIA B200", 2250),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA A800-SXM4-80GB", 312),
        ("NVIDIA A10", 125),
        ("NVIDIA L40S", 362),
        ("NVIDIA L40", 181),
        ("NVIDIA L4", 121),
        ("Tesla V100-SXM2-32GB", 125),  # fp16: V100 has no bf16 (the trainer runs fp32 there)
        ("Tesla V100-PCIE-16GB", 112),
        ("Tesla T4", 65),
    ],
)
def test_peak_per_sku(name, tflops):
    assert peak_flops(name) == tflops * 1e12


def test_unknown_devices_and_override():
    assert peak_flops(None) is None and peak_flops("cpu") is None
    assert peak_flops("NVIDIA A10G") is None  # not in the table: set logging.peak_tflops
    assert peak_flops("anything", override_tflops=500) == 500e12


def test_mfu_and_hfu():
    # 10,000 tokens/s per GPU of Qwen-7B (45.8 GFLOP/token) with full recomputation on an H100 SXM.
    model, hardware = model_flops_per_token(4096, 32, 11008, 151936, 2048), hardware_flops_per_token(
        4096, 32, 11008, 151936, 2048, recompute="full")
    assert utilisation(10_000, model, 989e12) == pytest.approx(10_000 * model / 989e12)
    assert utilisation(10_000, hardware, 989e12) > utilisation(10_000, model, 989e12)
    assert utilisation(10_000, model, None) is None
