"""Initial weights that do not depend on the parallel layout.

Each tensor is drawn as a whole from its place in the model, never from a rank's random stream: its global
checkpoint key (``decoder.layers.mlp.linear_fc1.weight``) and, for a layer's tensor, the layer's global
index seed the generator, and a rank copies out the region of that whole tensor its shard holds (the same
region dist_checkpointing saves). A model initialised at any TP/PP/VPP layout therefore holds exactly the
weights of the single-process model, and no two layers start alike. megatron-core would instead seed each
pipeline stage alike and, on GPUs, draw each tensor-parallel shard from its own stream.

The distribution is Qwen v1's: normal(0, init_method_std) for weights, init_method_std / sqrt(2 L) for the
output projections of attention and MLP, biases 0, norms 1.
"""

from __future__ import annotations

import hashlib
import math

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

# Whole tensors are drawn in blocks of rows of at most this many elements, each block from its own seed:
# a rank draws only the blocks its rows need, and never holds more than a block beyond its shard.
BLOCK_ELEMENTS = 1 << 22
# Also every expert's fc2 (routed: ``mlp.experts.experts.linear_fc2``, shared: ``mlp.shared_experts.linear_fc2``).
OUTPUT_PROJECTIONS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight", "experts.linear_fc2.weight")


def initial_distribution(key: str, std: float, num_layers: int) -> tuple[float, float]:
    """(mean, standard deviation) of Qwen v1's initialisation of the tensor stored under `key`: biases 0,
    norm weights 1 (standard deviation 0: constants), output projections of attention and MLP normal with
    `std` / sqrt(2 `num_layers`), every other weight normal with `std`."""
    parts = key.split(".")
    name, owner = parts[-1], parts[-2] if len(parts) > 1 else ""
    if name == "bias" or name.endswith("_bias"):
        return 0.0, 0.0
    if "norm" in name or "norm" in owner:  # RMSNorm weights, also under Transformer Engine's fused names
        return 1.0, 0.0
    if key.endswith(OUTPUT_PROJECTIONS):
        return 0.0, std / math.sqrt(2 * num_layers)
    return 0.0, std


def block_seed(seed: int, key: str, layer: tuple[int, ...], block: int) -> int:
    """The generator seed of one block of rows of the whole tensor `key` of layer `layer` (() outside layers)."""
    digest = hashlib.blake2b(f"{seed}/{key}/{layer}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw_region(shape: tuple[int, ...], region: tuple[slice, ...], std: float, seed: int, key: str,
                layer: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """`region` (one slice per dimension) of the whole fp32 tensor of `shape` that (`seed`, `key`, `layer`)
    defines, drawing only the blocks of rows the region covers."""
    row_numel = math.prod(shape[1:])
    rows_per_block = max(1, BLOCK_ELEMENTS // max(1, row_numel))
    first, stop = region[0].start, region[0].stop
    parts = []
    for block in range(first // rows_per_block, -(-stop // rows_per_block)):
        lo = block * rows_per_block
        rows = min(rows_per_block, shape[0] - lo)
        generator = torch.Generator(device=device).manual_seed(block_seed(seed, key, layer, block))
        values = torch.empty((rows, *shape[1:]), dtype=torch.float32, device=device).normal_(
            0.0, std, generator=generator)
        parts.append(values[max(first, lo) - lo : min(stop, lo + rows) - lo][(slice(None), *region[1:])])
    return torch.cat(parts)


def initialize_weights(module: torch.nn.Module, seed: int, std: float, num_layers: int) -> None:
    """Set every parameter of a model chunk (a megatron-core module with ``sharded_state_dict``) from its
    place in the whole model; see the module docstring. Raises if a parameter is left out."""
    params = {p.untyped_storage().data_ptr(): p for p in module.parameters()}
    done = set()
    sharded = module.sharded_state_dict()
    apply_factories(sharded)  # SwiGLU's fc1 becomes its gate and up halves, views of the parameter
    with torch.no_grad():
        for item in nested_values(sharded):
            if not isinstance(item, ShardedTensor):
                continue  # e.g. Transformer Engine's _extra_state
            ptr = item.data.untyped_storage().data_ptr()
            if ptr not in params:
                continue  # a buffer, not a weight
            axes = item.prepend_axis_num
            layer = tuple(item.global_offset[:axes])
            whole = tuple(item.global_shape[axes:])
            region = tuple(slice(o, o + n) for o, n in zip(item.global_offset[axes:], item.local_shape))
            mean, tensor_std = initial_distribution(item.key, std, num_layers)
            if tensor_std == 0.0:
                item.data.fill_(mean)
            else:
                item.data.copy_(draw_region(whole, region, tensor_std, seed, item.key, layer, item.data.device))
            done.add(ptr)
    missing = [name for name, p in module.named_parameters() if p.untyped_storage().data_ptr() not in done]
    if missing:
        raise RuntimeError(
            f"no layout-independent initialisation for {missing}: they are not in the sharded state dict"
        )
