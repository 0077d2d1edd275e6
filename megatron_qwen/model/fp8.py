"""FP8 GEMMs for the local spec's tensor-parallel linears, built on torchao's float8 training blocks.

The four linears of a Qwen layer (QKV, attention output, SwiGLU fc1, fc2) stay megatron-core's
ColumnParallelLinear / RowParallelLinear: the same parameters, sharded_state_dict and TP/SP communication,
so FP8 and high-precision checkpoints are interchangeable. Only their matrix products change. Each operand
is cast to float8 with a dynamic scale (torchao's amax/scale functions and `Float8TrainingTensor`) and the
product is torchao's float8 mm, i.e. `torch._scaled_mm`:

    forward       y  = x @ w.T       x, w: e4m3
    input grad    dx = dy @ w        dy: e5m2, w: e4m3
    weight grad   dw = dy.T @ x      dy: e5m2, x: e4m3

Recipes: ``tensorwise`` scales each operand by one number (torchao's default recipe); ``rowwise`` scales each
row of the left operand and each column of the right one over the contraction dimension, with scales rounded
down to powers of two (torchao's rowwise recipe; here with e5m2 gradients like the tensorwise one).

The same scales at every layout: a scale is that of the whole logical tensor (tensorwise) or of the whole
row/column (rowwise), never of this rank's shard. Where the extent a scale is taken over is split across the
tensor-parallel group, its amax is all-reduced (MAX) over the group first (`amax_needs_tp_reduction`): the
sharded weights, the row-parallel inputs, the column-parallel output gradients and, under sequence
parallelism, the activations cast to e4m3 before their all-gather (tensorwise; the all-gather then moves one
byte per element). So each rank's float8 operand is exactly its slice of the TP=1 operand, and the layouts
differ only in fp32 summation order. torchtitan gets the same from DTensor; here it is explicit.

Routed experts (megatron-core's SequentialMLP builds each expert's MLP from the same two linears, ``is_expert``)
take however many tokens the router sends them, and FP8 GEMMs need row counts in multiples of 16. An expert's
linear pads its token rows with zero rows to the next multiple (at least one: an expert that got no tokens still
runs its GEMMs, so that its weight gradient exists and the expert-TP group's amax all-reduces line up) and drops
the padded outputs. Zero rows change no amax and add nothing to the weight gradient, so the padded GEMMs give the
unpadded products exactly (Transformer Engine's grouped GEMMs pad the same way; megatron-core's SequentialMLP pads
only for Transformer Engine's ``config.fp8``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Raise these loggers to ERROR for the duration: torchao's import reports the CUDA-only kernels it cannot
    load on a CPU build and torch's pytree deprecation of one of its enums; FP8 training uses neither."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


with _quiet("torchao", "torch.utils._pytree"):
    from torchao.float8.config import CastConfig, Float8LinearConfig, ScalingGranularity, e4m3_dtype, e5m2_dtype
    from torchao.float8.float8_scaling_utils import get_maybe_axiswise_dim
    from torchao.float8.float8_training_tensor import (
        Float8TrainingTensor,
        GemmInputRole,
        LinearMMConfig,
        ScaledMMConfig,
        hp_tensor_and_scale_to_float8,
    )
    from torchao.float8.float8_utils import amax_to_scale, tensor_to_amax

RECIPES = ("tensorwise", "rowwise")
FP8_ROW_MULTIPLE = 16  # torch._scaled_mm's (and Transformer Engine's) multiple for every GEMM dimension


def float8_linear_config(recipe: str) -> Float8LinearConfig:
    """torchao's `Float8LinearConfig` for a `model.fp8` recipe: e4m3 inputs and weights, e5m2 output gradients."""
    if recipe == "tensorwise":
        return Float8LinearConfig()  # torchao's default: dynamic tensorwise scaling, e4m3 / e4m3 / e5m2
    if recipe == "rowwise":
        e4m3 = CastConfig(scaling_granularity=ScalingGranularity.AXISWISE, target_dtype=e4m3_dtype)
        e5m2 = CastConfig(scaling_granularity=ScalingGranularity.AXISWISE, target_dtype=e5m2_dtype)
        return Float8LinearConfig(
            cast_config_input=e4m3, cast_config_weight=e4m3, cast_config_grad_output=e5m2,
            round_scales_to_power_of_2=True
        )
    raise ValueError(
        f"FP8 recipe {recipe!r} is not one of the local layers' {RECIPES} (delayed is Transformer Engine's)"
    )


@dataclass(frozen=True)
class Float8Scaling:
    """A recipe's casts (`config`) and the `_scaled_mm` settings of its three GEMMs (`mm_config`)."""

    recipe: str
    config: Float8LinearConfig
    mm_config: LinearMMConfig

    @classmethod
    def for_recipe(cls, recipe: str) -> "Float8Scaling":
        config = float8_linear_config(recipe)
        gemm = lambda g: ScaledMMConfig(config.emulate, g.use_fast_accum, False, config.pad_inner_dim)  # noqa: E731
        mm = LinearMMConfig(
            gemm(config.gemm_config_output), gemm(config.gemm_config_grad_input), gemm(config.gemm_config_grad_weight)
        )
        return cls(recipe, config, mm)


def amax_needs_tp_reduction(split_dim: int | None, axiswise_dim: int | None) -> bool:
    """Whether a 2-D operand's amax must be all-reduced (MAX) over the tensor-parallel group.

    `split_dim`: the dimension this rank holds a shard of (None: the rank holds the whole tensor).
    `axiswise_dim`: the dimension a rowwise scale is taken over (None: tensorwise, over everything). The local
    amax is the global one unless the scale's extent crosses the split.
    """
    if split_dim is None:
        return False
    return axiswise_dim is None or axiswise_dim % 2 == split_dim % 2


@dataclass
class _Operand:
    """A 2-D high-precision GEMM operand and how to cast it."""

    tensor: torch.Tensor
    cast: CastConfig
    role: GemmInputRole
    axiswise_dim: int  # the contraction dimension: where a rowwise scale is taken
    split_dim: int | None  # the dimension split over the TP group on this rank, None if whole


def _to_float8(operands: list[_Operand], scaling: Float8Scaling, group) -> list[Float8TrainingTensor]:
    """Cast `operands` to float8, their amaxes reduced over `group` where a shard would give another scale
    (one all-reduce for all of them)."""
    dims = [get_maybe_axiswise_dim(op.axiswise_dim, op.cast.scaling_granularity) for op in operands]
    amaxes = [
        tensor_to_amax(op.tensor, scaling_granularity=op.cast.scaling_granularity, axiswise_dim=dim).float()
        for op, dim in zip(operands, dims)
    ]
    shared = [
        i for i, (op, dim) in enumerate(zip(operands, dims))
        if group is not None and group.size() > 1 and amax_needs_tp_reduction(op.split_dim, dim)
    ]
    if shared:
        flat = torch.cat([amaxes[i].reshape(-1) for i in shared])
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
        for i, part in zip(shared, flat.split([amaxes[i].numel() for i in shared])):
            amaxes[i] = part.view_as(amaxes[i])
    out = []
    for op, dim, amax in zip(operands, dims, amaxes):
        scale = amax_to_scale(amax, op.cast.target_dtype, scaling.config.round_scales_to_power_of_2)
        out.append(hp_tensor_and_scale_to_float8(op.tensor, scale, op.cast.target_dtype, scaling.mm_config, op.role,
                                                 dim))
    return out


def _all_gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    out = tensor.new_empty((tensor.shape[0] * group.size(), *tensor.shape[1:]))
    dist.all_gather_into_tensor(out, tensor.contiguous(), group=group)
    return out


def _all_gather_float8(t: Float8TrainingTensor, group) -> Float8TrainingTensor:
    """All-gather a tensorwise-scaled float8 shard along dim 0: one byte per element travels."""
    data = _all_gather_rows(t._data.view(torch.uint8), group).view(t._data.dtype)
    return Float8TrainingTensor(data, t._scale, t._orig_dtype, t._linear_mm_config, t._gemm_input_role, t._axiswise_dim)


class _Float8ParallelLinear(torch.autograd.Function):
    """``x @ w.T`` of a tensor-parallel linear with its three GEMMs in FP8, and the linear's TP/SP
    communication as megatron-core's `LinearWithGradAccumulationAndAsyncCommunication` does it: all-gather of
    a sequence-parallel input, all-reduce or reduce-scatter of the input gradient (overlapped with the weight
    gradient). Saves this rank's input, as megatron-core does, and casts again in backward."""

    @staticmethod
    def forward(ctx, x, weight, scaling: Float8Scaling, column: bool, sequence_parallel: bool, allreduce_dgrad: bool,
                group):
        ctx.save_for_backward(x, weight)
        ctx.scaling, ctx.column, ctx.sequence_parallel, ctx.allreduce_dgrad, ctx.group = (
            scaling, column, sequence_parallel, allreduce_dgrad, group
        )
        c = scaling.config
        w_split = _weight_split(column, group)
        x_op, gather = _input_operand(ctx, x.reshape(-1, x.shape[-1]), c.cast_config_input, axiswise_dim=-1)
        wt = _Operand(weight.t(), c.cast_config_weight, GemmInputRole.WEIGHT, 0,
                      None if w_split is None else 1 - w_split)
        x8, wt8 = _to_float8([x_op, wt], scaling, group)
        if gather:
            x8 = _all_gather_float8(x8, group)
        out = torch.mm(x8, wt8)
        rows = x.shape[0] * (group.size() if sequence_parallel else 1)
        return out.view(rows, *x.shape[1:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        c, group = ctx.scaling.config, ctx.group
        dy = grad_output.reshape(-1, grad_output.shape[-1])
        dy_split = 1 if ctx.column and group.size() > 1 else None
        w_split = _weight_split(ctx.column, group)
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        operands, gather = {}, False
        if want_dx:
            operands["dy"] = _Operand(dy, c.cast_config_grad_output, GemmInputRole.GRAD_OUTPUT, -1, dy_split)
            operands["w"] = _Operand(weight, c.cast_config_weight_for_grad_input, GemmInputRole.WEIGHT, 0, w_split)
        if want_dw:
            operands["x"], gather = _input_operand(
                ctx, x.reshape(-1, x.shape[-1]), c.cast_config_input_for_grad_weight, axiswise_dim=0
            )
            dy_w = _Operand(dy, c.cast_config_grad_output_for_grad_weight, GemmInputRole.GRAD_OUTPUT, 0, dy_split)
            if not (want_dx and dy_w.cast == c.cast_config_grad_output and _tensorwise(dy_w.cast)):
                operands["dy_w"] = dy_w  # else one tensorwise cast of dy serves both GEMMs
        # Every cast (and its amax all-reduce, and the e4m3 all-gather) before the input gradient's
        # collective, so that the weight-gradient GEMM runs while that collective is in flight.
        casts = dict(zip(operands, _to_float8(list(operands.values()), ctx.scaling, group)))
        if gather:
            casts["x"] = _all_gather_float8(casts["x"], group)
        dx = handle = None
        if want_dx:
            dx = torch.mm(casts["dy"], casts["w"])
            if ctx.sequence_parallel:
                full, dx = dx, dx.new_empty((dx.shape[0] // group.size(), dx.shape[1]))
                handle = dist.reduce_scatter_tensor(dx, full, group=group, async_op=True)
            elif ctx.allreduce_dgrad:
                handle = dist.all_reduce(dx, group=group, async_op=True)
        dw = None
        if want_dw:
            dw = torch.mm(casts.get("dy_w", casts.get("dy")).t(), casts["x"])
        if handle is not None:
            handle.wait()
        if dx is not None:
            dx = dx.view_as(x)
        return dx, dw, None, None, None, None, None


def _tensorwise(cast: CastConfig) -> bool:
    return cast.scaling_granularity is ScalingGranularity.TENSORWISE


def _weight_split(column: bool, group) -> int | None:
    """The weight [out, in] dimension split over TP: out for column-parallel, in for row-parallel."""
    if group is None or group.size() == 1:
        return None
    return 0 if column else 1


def _input_operand(ctx, x: torch.Tensor, cast: CastConfig, axiswise_dim: int) -> tuple[_Operand, bool]:
    """The layer input as a GEMM operand, and whether its float8 cast still has to be all-gathered.

    Row-parallel inputs are split along their features. A sequence-parallel input (column-parallel) is split
    along the tokens: tensorwise, it is cast as a shard (amax reduced) and gathered in e4m3; rowwise, it is
    gathered first (a token's row is whole on one rank, but a column's scale spans every rank's tokens).
    """
    group, tp = ctx.group, ctx.group.size()
    if not ctx.sequence_parallel:
        split = None if ctx.column or tp == 1 else 1
        return _Operand(x, cast, GemmInputRole.INPUT, axiswise_dim, split), False
    if _tensorwise(cast):
        return _Operand(x, cast, GemmInputRole.INPUT, axiswise_dim, 0), True
    return _Operand(_all_gather_rows(x, group), cast, GemmInputRole.INPUT, axiswise_dim, None), False


def _check_config(layer, config) -> None:
    if config.gradient_accumulation_fusion:
        raise ValueError(
            f"{type(layer).__name__} computes its weight gradient itself (an FP8 GEMM), so "
            "gradient_accumulation_fusion (apex's fused weight-gradient GEMM) must be off; "
            "megatron_qwen.model.qwen.transformer_config turns it "
            "off whenever model.fp8 runs on torchao, so set it off in a config built by hand"
        )


def _expert_rows_padded(gemm, x: torch.Tensor) -> torch.Tensor:
    """`gemm(x)` of an expert's input (tokens first), its tokens padded with zeros to a positive multiple of
    FP8_ROW_MULTIPLE and the padded outputs dropped (module docstring)."""
    rows = x.shape[0]
    padded = max(1, -(-rows // FP8_ROW_MULTIPLE)) * FP8_ROW_MULTIPLE
    if padded == rows:
        return gemm(x)
    return gemm(torch.nn.functional.pad(x, [0, 0] * (x.dim() - 1) + [0, padded - rows]))[:rows]


class Float8ColumnParallelLinear(ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear (QKV, SwiGLU fc1) with its GEMMs in FP8 (module docstring)."""

    def __init__(self, *args, fp8_recipe: str, **kwargs):
        super().__init__(*args, **kwargs)
        _check_config(self, self.config)
        self.fp8 = Float8Scaling.for_recipe(fp8_recipe)

    def _forward_impl(self, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                      grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None):
        def gemm(x):
            return _Float8ParallelLinear.apply(x, weight, self.fp8, True, sequence_parallel, allreduce_dgrad,
                                               self.tp_group)

        out = _expert_rows_padded(gemm, input) if self.is_expert else gemm(input)
        return out if bias is None else out + bias


class Float8RowParallelLinear(RowParallelLinear):
    """megatron-core's RowParallelLinear (attention output, SwiGLU fc2) with its GEMMs in FP8 (module docstring)."""

    def __init__(self, *args, fp8_recipe: str, **kwargs):
        super().__init__(*args, **kwargs)
        _check_config(self, self.config)
        self.fp8 = Float8Scaling.for_recipe(fp8_recipe)

    def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, tp_group=None, grad_output_buffer=None):
        # RowParallelLinear reduces (or reduce-scatters) the partial outputs itself, after this GEMM.
        def gemm(x):
            return _Float8ParallelLinear.apply(x, weight, self.fp8, False, False, False, self.tp_group)

        out = _expert_rows_padded(gemm, input) if self.is_expert else gemm(input)
        return out if bias is None else out + bias


def float8_parallel_linear_specs(recipe: str) -> tuple[ModuleSpec, ModuleSpec, ModuleSpec, ModuleSpec]:
    """(linear_qkv, linear_proj, linear_fc1, linear_fc2) of the local layer spec with FP8 GEMMs."""
    Float8Scaling.for_recipe(recipe)  # an unknown recipe fails here, when the spec is built
    column = ModuleSpec(module=Float8ColumnParallelLinear, params={"fp8_recipe": recipe})
    row = ModuleSpec(module=Float8RowParallelLinear, params={"fp8_recipe": recipe})
    return column, row, column, row
