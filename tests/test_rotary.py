"""Dynamic-NTK and LogN formulas against hand-computed values (the Qwen v1 release's definitions)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_qwen.model.rotary import inv_freq, logn_scale, ntk_alpha, ntk_base


@pytest.mark.parametrize(
    "length, alpha",
    [(1, 1), (2048, 1), (2049, 3), (4096, 3), (4097, 7), (8192, 7), (8193, 15), (16384, 15)],
)
def test_ntk_alpha(length, alpha):
    assert ntk_alpha(length, 2048) == alpha


def test_ntk_base_by_hand():
    # 10000 * 3 ** (128 / 126)
    assert ntk_base(10000.0, 3, 128) == pytest.approx(10000.0 * 3 ** (128 / 126), rel=1e-12)
    assert ntk_base(10000.0, 3, 128) == pytest.approx(30527.74, rel=1e-6)
    assert ntk_base(10000.0, 1, 128) == 10000.0


def test_inv_freq_by_hand():
    f = inv_freq(10000.0, 8)
    assert f.dtype == torch.float32
    expected = torch.tensor([1.0, 10000.0 ** -0.25, 10000.0 ** -0.5, 10000.0 ** -0.75])
    assert torch.allclose(f, expected, rtol=1e-6)


def test_logn_scale_by_hand():
    scale = logn_scale(torch.arange(6), seq_length=4)
    # positions 0..3 are within the context (p + 1 <= 4): scale 1; then log(5)/log(4), log(6)/log(4).
    expected = torch.tensor([1, 1, 1, 1, math.log(5) / math.log(4), math.log(6) / math.log(4)], dtype=torch.float32)
    assert torch.allclose(scale, expected)
    assert scale[4].item() == pytest.approx(1.160964, rel=1e-6)
