"""FP8 linears outside a model, and what float8 rounding predicts for their error (tests/test_fp8.py and
tests/parallel/fp8_worker.py).

One FP8 GEMM ``C = A @ B`` (A [M, K] scaled per row or as a whole, B [K, N] per column or as a whole) differs
from the exact product because each operand element is rounded to the float8 grid after scaling. For a value
``v`` scaled by ``s`` the grid spacing is ``2**(floor(log2|v s|) - m)`` (m mantissa bits), or the subnormal
step below the smallest normal; rounding to nearest errs by at most half of it: ``|dv| <= u |v| + eta / s``,
with ``u = 2**-(m+1)`` and ``eta`` half the subnormal step. Then, elementwise,

    |C' - C| <= E_A |B| + |A| E_B + E_A E_B + (g_K + u_out) (|A| + E_A)(|B| + E_B)

where g_K = K u32 / (1 - K u32) bounds the fp32 accumulation and u_out the rounding of the output (bf16 when
rowwise GEMMs write bf16, else 0). With the errors modelled as independent and uniform (variance spacing^2/12)
the expected squared error is ``sum(var_A @ B^2 + A^2 @ var_B + var_A @ var_B) + sum(var_out)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

U32 = 2.0**-24  # fp32 unit roundoff
BF16_MANTISSA = 7


@dataclass(frozen=True)
class Float8Format:
    name: str
    max: float
    mantissa_bits: int
    min_normal_exp: int

    @property
    def u(self) -> float:
        """Unit roundoff of round-to-nearest on normal numbers."""
        return 2.0 ** -(self.mantissa_bits + 1)

    @property
    def eta(self) -> float:
        """Half the subnormal step: the largest rounding error below the smallest normal number."""
        return 2.0 ** (self.min_normal_exp - self.mantissa_bits - 1)


E4M3 = Float8Format("e4m3", 448.0, 3, -6)
E5M2 = Float8Format("e5m2", 57344.0, 2, -14)


def scales(t: torch.Tensor, fmt: Float8Format, dim: int | None, pow2: bool) -> torch.Tensor:
    """The scale of each element's group: fmax / amax over everything (dim None) or over `dim`, rounded down
    to a power of two for the rowwise recipe."""
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    s = fmt.max / amax.double().clamp(min=1e-12)
    return torch.exp2(torch.floor(torch.log2(s))) if pow2 else s


def rounding_error_bound(t: torch.Tensor, fmt: Float8Format, dim: int | None, pow2: bool) -> torch.Tensor:
    """Elementwise bound on |cast(t) - t| (three fp32 roundings of the scaling added to u)."""
    return (fmt.u + 3 * U32) * t.abs().double() + fmt.eta / scales(t, fmt, dim, pow2)


def rounding_variance(t: torch.Tensor, fmt: Float8Format, dim: int | None, pow2: bool) -> torch.Tensor:
    """Elementwise variance spacing^2 / 12 of the rounding of t to the float8 grid (0 for exact zeros)."""
    s = scales(t, fmt, dim, pow2)
    scaled = (t.double() * s).abs()
    exponent = torch.floor(torch.log2(scaled.clamp(min=2.0**fmt.min_normal_exp)))
    spacing = torch.exp2(exponent - fmt.mantissa_bits) / s
    return torch.where(t == 0, 0.0, spacing**2 / 12)


def bf16_variance(t: torch.Tensor) -> torch.Tensor:
    """Variance of rounding t to bfloat16."""
    exponent = torch.floor(torch.log2(t.double().abs().clamp(min=2.0**-126)))
    return torch.exp2(exponent - BF16_MANTISSA) ** 2 / 12


def gemm_error_bound(a, ea, b, eb, k: int, bf16_out: bool) -> torch.Tensor:
    """Elementwise bound on the error of an FP8 GEMM A @ B given the operands' rounding bounds EA, EB."""
    a, b = a.double().abs(), b.double().abs()
    gamma = k * U32 / (1 - k * U32)
    u_out = 2.0 ** -(BF16_MANTISSA + 1) if bf16_out else 0.0
    return ea @ b + a @ eb + ea @ eb + (gamma + u_out * (1 + gamma)) * ((a + ea) @ (b + eb))


def gemm_expected_squared_error(a, va, b, vb, out: torch.Tensor | None) -> float:
    """Expected ||A' @ B' - A @ B||^2 under independent uniform rounding (plus the bf16 output's, if `out`)."""
    a2, b2 = a.double() ** 2, b.double() ** 2
    total = (va @ b2 + a2 @ vb + va @ vb).sum().item()
    return total + (bf16_variance(out).sum().item() if out is not None else 0.0)


@dataclass(frozen=True)
class GemmCheck:
    """One FP8 GEMM's result against the exact product: the worst error over its bound, the measured
    over the predicted RMS error, and the relative error (Frobenius)."""

    name: str
    worst_over_bound: float
    rms_ratio: float
    relative_error: float

    def __str__(self) -> str:
        return (f"{self.name}: rel. error {self.relative_error:.2e}, worst error / bound {self.worst_over_bound:.2f}, "
                f"RMS error / predicted {self.rms_ratio:.2f}")


def check_gemm(name, got, a, fa, dim_a, b, fb, dim_b, pow2: bool, bf16_out: bool, extra=None) -> GemmCheck:
    """Compare `got` (an FP8 GEMM's result, plus `extra` added exactly) with the exact A @ B (+ extra)."""
    exact = a.double() @ b.double() + (0 if extra is None else extra.double())
    err = (got.double() - exact).abs()
    bound = gemm_error_bound(
        a, rounding_error_bound(a, fa, dim_a, pow2), b, rounding_error_bound(b, fb, dim_b, pow2), a.shape[1], bf16_out
    ) + (0 if extra is None else U32 * (exact.abs() + extra.double().abs()))
    expected = gemm_expected_squared_error(
        a, rounding_variance(a, fa, dim_a, pow2), b, rounding_variance(b, fb, dim_b, pow2), got if bf16_out else None
    )
    return GemmCheck(
        name,
        worst_over_bound=(err / bound).max().item(),
        rms_ratio=math.sqrt((err**2).sum().item() / expected),
        relative_error=(err.norm() / exact.norm()).item(),
    )


def linear_data(tokens: int, k: int, n: int, seed: int):
    """x [T, K], w [N, K], bias [N], dy [T, N]: rows of x and dy spread over four orders of magnitude (so
    per-row scales matter and small values reach the subnormal range), a few outliers in w."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) * torch.exp(2 * torch.randn(tokens, 1, generator=g))
    w = torch.randn(n, k, generator=g) * 0.02
    w.view(-1)[torch.randint(0, n * k, (8,), generator=g)] *= 30
    bias = torch.randn(n, generator=g) * 0.1
    dy = torch.randn(tokens, n, generator=g) * torch.exp(2 * torch.randn(tokens, 1, generator=g)) * 1e-3
    return x, w, bias, dy


def build_linear(kind: str, recipe: str, k: int, n: int, config, group, bias: bool):
    """A Float8ColumnParallelLinear / Float8RowParallelLinear (k inputs, n outputs in all) on TP group `group`."""
    from megatron_qwen.model.fp8 import Float8ColumnParallelLinear, Float8RowParallelLinear

    init = torch.nn.init.zeros_
    if kind == "column":
        return Float8ColumnParallelLinear(k, n, config=config, init_method=init, bias=bias, gather_output=False,
                                          skip_bias_add=False, fp8_recipe=recipe, tp_group=group)
    return Float8RowParallelLinear(k, n, config=config, init_method=init, bias=bias, input_is_parallel=True,
                                   skip_bias_add=False, fp8_recipe=recipe, tp_group=group)


def forward_backward(layer, x: torch.Tensor, dy: torch.Tensor):
    """(y, dx, dw[, dbias]) of the layer for input x [T, K_local] and output gradient dy, as 2-D tensors."""
    x = x.detach().clone().unsqueeze(1).requires_grad_(True)  # [s, b=1, h]
    y, _ = layer(x)
    y.backward(dy.unsqueeze(1))
    return y.squeeze(1).detach(), x.grad.squeeze(1), layer.weight.grad
