"""Low-rank adapters (LoRA, Hu et al. 2021) on the tensor-parallel linears of Qwen layers.

Each targeted Hugging Face projection gets its own adapter, so an adapter here is exactly one of `peft`'s:
``delta = (alpha / rank) * B @ A @ dropout(x)``, A [rank, in] and B [out, rank]. The fused megatron-core linears
hold several projections: ``linear_qkv`` = q, k, v (their rows interleaved per query group), ``linear_fc1`` =
gate, up (per tensor-parallel rank [gate; up]), ``linear_proj`` = o, ``linear_fc2`` = down. `LoRALinear` wraps
such a linear, adds the targeted projections' deltas to its output in the linear's own row layout, and leaves
the base weights and their checkpoint keys as they were.

Tensor parallelism (the adapters are sharded as the linear they wrap):
- column-parallel (qkv, fc1): A replicated, B split over output rows with the base. The rank-wide activation
  ``A x`` is computed on the whole (sequence-gathered) input; its gradient is summed over the TP group (each rank
  holds only its rows of B), so every rank keeps the same A.
- row-parallel (proj, fc2): A split over input columns with the base, B replicated. ``A x`` is summed over the TP
  group (reduce-scattered over the sequence under sequence parallelism, where B's gradient is then summed by
  megatron-core's finalize step, as for the norms).

Checkpoint keys: ``<linear prefix>.adapter.<projection>.lora_a`` / ``.lora_b`` (projection: q, k, v, o, gate, up,
down), stored at their full (unsharded) shapes: A [rank, in], B [out, rank], rows and columns in Hugging Face
order. Adapters start as `peft` starts them (A Kaiming-uniform, B zero), drawn from ``training.seed``, the layer's
global index and the projection, so every layout starts from the same adapters.

Only the local layers and Transformer Engine's are wrapped. In mixture-of-experts layers the MLP targets adapt the
shared expert (Qwen2-MoE's; its sigmoid gate stays frozen), as `peft` does on transformers' model, whose shared
expert has gate/up/down projections while the routed experts are fused parameters; the routed experts and the
router stay frozen.
"""

from __future__ import annotations

import contextlib
import hashlib
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_qwen.config import Config

# Hugging Face projection -> the short name used in checkpoint keys.
PART = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
        "down_proj": "down"}
COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")


class LoRALinear(torch.nn.Module):
    """A megatron-core linear (``base``, unchanged) plus low-rank adapters on some of the projections it holds.

    `linear`: which megatron-core linear `base` is (``linear_qkv``, ...: column- or row-parallel); `shapes`:
    projection -> (in features, out features) of the full (unsharded) projection (a ``linear_qkv``'s rows interleave
    q, k, v per query group of its config).
    """

    def __init__(self, base: torch.nn.Module, linear: str, shapes: dict[str, tuple[int, int]], rank: int,
                 alpha: float, dropout: float, seed: int, layer: int):
        super().__init__()
        self.base = base
        self.linear = linear
        self.column = linear in COLUMN_PARALLEL
        self.parts = tuple(shapes)
        self.rank = rank
        self.scale = alpha / rank
        self.dropout = dropout
        self.enabled = True
        config = base.config
        self.sequence_parallel = config.sequence_parallel
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.rows = next(iter(shapes.values()))[1] // self.tp  # this rank's output rows of each projection
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        dtype = config.params_dtype
        device = next(base.parameters()).device
        # Module names equal the checkpoint keys (``adapter.<part>.lora_a``); the base's own entries are renamed by
        # the state-dict hooks below, so that `state_dict` and `load_state_dict` use the checkpoint's names too.
        self.adapter = torch.nn.ModuleDict()
        for part, (fan_in, fan_out) in shapes.items():
            # peft's start: A ~ Kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0 (the adapter is off).
            generator = torch.Generator().manual_seed(_adapter_seed(seed, layer, part))
            bound = 1.0 / math.sqrt(fan_in)
            a = torch.empty(rank, fan_in).uniform_(-bound, bound, generator=generator)
            b = torch.zeros(fan_out, rank)
            if self.column:
                b = b.chunk(self.tp, dim=0)[tp_rank]
            else:
                a = a.chunk(self.tp, dim=1)[tp_rank]
            self.adapter[part] = _Adapter(torch.nn.Parameter(a.to(device=device, dtype=dtype)),
                                          torch.nn.Parameter(b.to(device=device, dtype=dtype).contiguous()))
            split, dim = (self.lora_b[part], 0) if self.column else (self.lora_a[part], 1)
            set_tensor_model_parallel_attributes(split, True, dim, 1)
            if not self.column:
                # Under sequence parallelism each rank sees its share of the sequence: B's gradient is summed
                # over the TP group by megatron-core's finalize step (the attribute the norms carry).
                self.lora_b[part].sequence_parallel = config.sequence_parallel
        # A Transformer Engine linear with a fused input norm normalises inside the GEMM; the adapters read the
        # same normalised input.
        self.norm_eps = config.layernorm_epsilon if hasattr(base, "layer_norm_weight") else None
        self._register_state_dict_hook(_base_names_out)
        self._register_load_state_dict_pre_hook(_base_names_in)

    @property
    def lora_a(self) -> dict[str, torch.nn.Parameter]:
        """Each adapted projection's A ([rank, in], this rank's columns for a row-parallel linear)."""
        return {part: adapter.lora_a for part, adapter in self.adapter.items()}

    @property
    def lora_b(self) -> dict[str, torch.nn.Parameter]:
        """Each adapted projection's B ([out, rank], this rank's rows for a column-parallel linear)."""
        return {part: adapter.lora_b for part, adapter in self.adapter.items()}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "adapter"):
                raise
            return getattr(self.base, name)  # weight, bias, config, ... of the wrapped linear

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        if not self.enabled:
            return out
        output, bias = out if isinstance(out, tuple) else (out, None)
        delta = self._delta(x).to(output.dtype)
        return (output + delta, bias) if isinstance(out, tuple) else output + delta

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_eps is not None:
            xf = x.float()
            x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.norm_eps)).type_as(x)
            x = x * self.base.layer_norm_weight
        if self.dropout:
            x = F.dropout(x, self.dropout, self.training)
        return x

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.cat([self.lora_a[part] for part in self.parts], dim=0)
        if self.column:
            if self.sequence_parallel:
                # Every rank needs the whole sequence; the gradient of the gathered input is already complete on
                # each rank (see below), so its backward keeps this rank's share instead of summing.
                x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
            h = copy_to_tensor_model_parallel_region(F.linear(self._input(x), a))
        else:
            h = F.linear(self._input(x), a)
            h = (reduce_scatter_to_sequence_parallel_region(h) if self.sequence_parallel
                 else reduce_from_tensor_model_parallel_region(h))
        deltas = [F.linear(h_part, self.lora_b[part]) * self.scale
                  for part, h_part in zip(self.parts, h.split(self.rank, dim=-1))]
        if self.linear == "linear_qkv":
            return self._interleave_qkv(dict(zip(self.parts, deltas)))
        if self.linear == "linear_fc1":
            return self._fc1_rows(dict(zip(self.parts, deltas)))
        return deltas[0]

    def _interleave_qkv(self, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        """q/k/v deltas (an untargeted one is zero) in the fused layout: per query group [its q heads; k; v]."""
        config = self.base.config
        groups = config.num_query_groups // self.tp
        kv = config.kv_channels  # one key (value) head per group
        q = config.num_attention_heads // config.num_query_groups * kv
        ref = next(iter(deltas.values()))
        lead = ref.shape[:-1]
        pieces = [ref.new_zeros(*lead, groups, rows) if deltas.get(part) is None
                  else deltas[part].view(*lead, groups, rows) for part, rows in (("q", q), ("k", kv), ("v", kv))]
        return torch.cat(pieces, dim=-1).reshape(*lead, groups * (q + 2 * kv))

    def _fc1_rows(self, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        """gate/up deltas (one may be absent: zero) in fc1's per-rank layout [gate; up]."""
        ref = next(iter(deltas.values()))
        pieces = [deltas.get(part, ref.new_zeros(*ref.shape[:-1], self.rows)) for part in ("gate", "up")]
        return torch.cat(pieces, dim=-1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """The base linear's entries under its own keys, plus the adapters' (see the module docstring)."""
        state = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        tensors, axes = {}, {}
        for part in self.parts:
            tensors[f"adapter.{part}.lora_a"] = self.lora_a[part]
            tensors[f"adapter.{part}.lora_b"] = self.lora_b[part]
            if self.column:
                axes[f"adapter.{part}.lora_b"] = 0
            else:
                axes[f"adapter.{part}.lora_a"] = 1
        # Both groups given: with only one, megatron-core takes no TP group and stores the split tensors unsplit.
        state.update(make_sharded_tensors_for_checkpoint(
            tensors, prefix, axes, sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            dp_cp_group=(metadata or {}).get("dp_cp_group") or parallel_state.get_data_parallel_group(
                with_context_parallel=True)))
        return state


class _Adapter(torch.nn.Module):
    """One projection's A and B (named as in checkpoints: ``adapter.<part>.lora_a``)."""

    def __init__(self, lora_a: torch.nn.Parameter, lora_b: torch.nn.Parameter):
        super().__init__()
        self.lora_a = lora_a
        self.lora_b = lora_b


def _base_names_out(module, state_dict, prefix, local_metadata):
    """`state_dict` hook: the base linear's entries under the linear's own names (``weight``, not ``base.weight``)."""
    for key in [k for k in state_dict if k.startswith(prefix + "base.")]:
        state_dict[prefix + key[len(prefix) + len("base."):]] = state_dict.pop(key)
    return state_dict


def _base_names_in(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """`load_state_dict` pre-hook: entries under the linear's names go to the base linear (the inverse of the above)."""
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith((prefix + "adapter.",
                                                                                     prefix + "base."))]:
        state_dict[prefix + "base." + key[len(prefix):]] = state_dict.pop(key)


def _adapter_seed(seed: int, layer: int, part: str) -> int:
    """A generator seed for one adapter, the same at every layout."""
    digest = hashlib.sha256(f"lora:{seed}:{layer}:{part}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def add_adapters(chunk: torch.nn.Module, cfg: Config) -> list[LoRALinear]:
    """Wrap the targeted linears of `chunk`'s layers in `LoRALinear` and freeze every other parameter of the
    chunk; returns the wrappers. Run after the base weights are initialised (their names change here)."""
    peft = cfg.peft
    wanted = {PART[hf] for hf in peft.projections()}
    for param in chunk.parameters():
        param.requires_grad_(False)
    config = chunk.config
    head_dim = config.kv_channels
    q_rows = config.num_attention_heads * head_dim
    kv_rows = config.num_query_groups * head_dim
    wrapped = []
    for layer in chunk.decoder.layers:
        index = layer.layer_number - 1  # global, 0-based
        owners = {"linear_qkv": layer.self_attention, "linear_proj": layer.self_attention}
        # A dense MLP, or a MoE layer's shared expert (an MLP of its own width); the routed experts stay frozen.
        mlp = layer.mlp if isinstance(layer.mlp, MLP) else getattr(layer.mlp, "shared_experts", None)
        if mlp is not None:
            owners.update(linear_fc1=mlp, linear_fc2=mlp)
        ffn = mlp.config.ffn_hidden_size if mlp is not None else None
        full = {
            "linear_qkv": {"q": (config.hidden_size, q_rows), "k": (config.hidden_size, kv_rows),
                           "v": (config.hidden_size, kv_rows)},
            "linear_proj": {"o": (q_rows, config.hidden_size)},
            "linear_fc1": {"gate": (config.hidden_size, ffn), "up": (config.hidden_size, ffn)},
            "linear_fc2": {"down": (ffn, config.hidden_size)},
        }
        for linear, owner in owners.items():
            shapes = {part: shape for part, shape in full[linear].items() if part in wanted}
            if not shapes:
                continue
            wrapper = LoRALinear(getattr(owner, linear), linear, shapes, peft.rank, peft.alpha, peft.dropout,
                                 cfg.training.seed, index)
            setattr(owner, linear, wrapper)
            wrapped.append(wrapper)
    return wrapped


def lora_modules(chunks: list[torch.nn.Module]) -> list[LoRALinear]:
    """Every `LoRALinear` in `chunks` (DDP wrappers included)."""
    return [module for chunk in chunks for module in chunk.modules() if isinstance(module, LoRALinear)]


@contextlib.contextmanager
def adapters_disabled(chunks: list[torch.nn.Module]):
    """Run `chunks` as their base model for the duration of the block: every adapter's delta left out."""
    modules = lora_modules(chunks)
    states = [module.enabled for module in modules]
    for module in modules:
        module.enabled = False
    try:
        yield
    finally:
        for module, state in zip(modules, states):
            module.enabled = state


__all__ = ["LoRALinear", "PART", "adapters_disabled", "add_adapters", "lora_modules"]
