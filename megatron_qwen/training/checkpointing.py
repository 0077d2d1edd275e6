"""Model checkpoints in megatron-core's `dist_checkpointing` format, reshardable on load.

A checkpoint written at one TP/PP/VPP layout loads at any other: tensors are stored under global
keys and shapes (layers stacked on a leading axis), and each rank reads only its own slices.
Directories are written under a temporary name and renamed when complete, so an interrupted save
never replaces a good checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from megatron.core import dist_checkpointing


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """The sharded state dict of this rank's model chunks (``model`` or ``model0``, ``model1``, ...)."""
    chunks = [getattr(c, "module", c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_sharded(sharded_state_dict: dict, path: str | os.PathLike) -> Path:
    """Save a sharded state dict to `path` atomically (all ranks call this)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(sharded_state_dict, str(tmp))
    _barrier()
    if _is_rank0():
        if path.exists():
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    _barrier()
    return path


def save_model(chunks: list[torch.nn.Module], path: str | os.PathLike) -> Path:
    """Save this run's model weights (all ranks call this)."""
    return save_sharded(model_sharded_state_dict(chunks), path)


def load_model(chunks: list[torch.nn.Module], path: str | os.PathLike) -> None:
    """Load weights saved at any layout into this rank's chunks (all ranks call this)."""
    path = Path(path)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path} is not a dist_checkpointing checkpoint (no metadata.json); check the path")
    state = dist_checkpointing.load(model_sharded_state_dict(chunks), str(path))
    for i, chunk in enumerate(chunks):
        chunk = getattr(chunk, "module", chunk)
        key = "model" if len(chunks) == 1 else f"model{i}"
        chunk.load_state_dict(state[key], strict=True)


def read_full_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint at its full (unsharded) shape, keyed by its global name.

    Runs in a single process without any process group, e.g. for conversion or inspection. Layer
    tensors are stacked on a leading axis (``decoder.layers.mlp.linear_fc1.weight``: [L, 2F, H]).
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(path), str(out))
        state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
