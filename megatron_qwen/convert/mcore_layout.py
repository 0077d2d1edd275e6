"""What a megatron-core checkpoint of a Qwen model holds, asked of megatron-core itself.

The Qwen model is built on the meta device (no memory, no initialisation) in one process at TP=PP=1,
and its sharded state dict lists every stored tensor (global key, global shape, where each piece
sits) and every stored object (`_extra_state`). Writing exactly that makes the checkpoint load with
`megatron_qwen.checkpoint.io.load_model` at any layout.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

from megatron_qwen.config import Config
from megatron_qwen.model.lora import add_adapters
from megatron_qwen.model.qwen import QwenModel, transformer_config
from megatron_qwen.platform.cpu import patched_while
from megatron_qwen.platform.runtime import Runtime


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One piece of a stored tensor as megatron-core lays it out at TP=PP=1 (one layer of a stacked tensor,
    or one half of fc1's [gate; up])."""

    key: str
    global_shape: tuple
    offsets: tuple  # in the global tensor
    sizes: tuple  # the piece, with the stacked layer axis (size 1) included
    prepend: int = 0  # leading axes of size 1 in `sizes`: the stacked layer's, or a routed expert's


@contextlib.contextmanager
def single_process_model_parallel():
    """megatron-core's parallel state for one process (TP=PP=1) while the block runs.

    Reuses a state already set up with TP=PP=1 (e.g. a test's single rank); otherwise creates a
    one-process gloo group on an in-memory store (no port, no launcher) and removes it afterwards.
    """
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() != 1
                or parallel_state.get_pipeline_model_parallel_world_size() != 1):
            raise RuntimeError(
                "conversion lays out the model at TP=PP=1; call it outside a tensor/pipeline-parallel run"
            )
        yield
        return
    created_group = not torch.distributed.is_initialized()
    if created_group:
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    elif torch.distributed.get_world_size() != 1:
        raise RuntimeError("conversion runs in one process; call it outside a multi-rank run")
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created_group:
            torch.distributed.destroy_process_group()


def stored_layout(cfg: Config, adapters: bool = False) -> tuple[list[StoredTensor], dict[str, object]]:
    """(tensor pieces, {object unique key: value}) of a checkpoint of the model `cfg` describes; with `adapters`,
    of the model with its ``peft.*`` low-rank adapters (`megatron_qwen.model.lora`)."""
    # RoPE stores nothing: its scaling is left out so that no frequency table is computed on the meta device.
    model_cfg = dataclasses.replace(cfg.model, rope_scaling=None, use_dynamic_ntk=False)
    one_rank = dataclasses.replace(cfg, model=model_cfg,
                                   parallel=dataclasses.replace(cfg.parallel, tp=1, pp=1, vpp=1, sp=False))
    # A mixture-of-experts layer's token dispatcher makes a CUDA stream when it is built (see the CPU harness).
    cpu_only = () if torch.cuda.is_available() else ("moe_dispatcher_streams",)
    with single_process_model_parallel(), patched_while(cpu_only):
        config = dataclasses.replace(transformer_config(one_rank, Runtime.cpu()), perform_initialization=False)
        with torch.device("meta"):
            model = QwenModel(config, one_rank, None, use_te=False)
            if adapters:
                add_adapters(model, one_rank)
        sharded = model.sharded_state_dict()
    apply_factories(sharded)
    tensors, objects = [], {}
    for item in nested_values(sharded):
        if isinstance(item, ShardedTensor):
            prepend = (1,) * item.prepend_axis_num
            tensors.append(StoredTensor(item.key, tuple(item.global_shape), tuple(item.global_offset),
                                        prepend + tuple(item.local_shape), item.prepend_axis_num))
        elif isinstance(item, ShardedObject):
            objects[item.unique_key] = item.data
        else:
            raise AssertionError(f"unexpected sharded state entry {item!r}")
    return tensors, objects
