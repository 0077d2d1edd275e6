"""Model checkpoints in megatron-core's `dist_checkpointing` format, reshardable on load.

A checkpoint written at one TP/PP/VPP layout loads at any other: tensors are stored under global
keys and shapes (layers stacked on a leading axis), and each rank reads only its own slices.
Directories are written under a temporary name and renamed when complete, so an interrupted save
never replaces a good checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
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


def save_sharded(sharded_state_dict: dict, path: str | os.PathLike, write_extra=None) -> Path:
    """Save a sharded state dict to `path` atomically (all ranks call this).

    Everything is written into ``PATH.tmp`` (``write_extra(tmp_dir)``, if given, runs on every rank
    to add files of its own) and the directory is renamed to `path` only when all ranks are done.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(sharded_state_dict, str(tmp))
    if write_extra is not None:
        write_extra(tmp)
    if os.environ.get("MEGATRON_QWEN_FAULT") == f"kill_during_save:{path.name}":
        # Fault injection for the crash-safety test: die with the checkpoint written but not yet current.
        os.kill(os.getpid(), signal.SIGKILL)
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


# --------------------------------------------------------------------------- training checkpoints

LATEST_FILE = "latest"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}  # reshardable across TP/PP/DP


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def _rng_state() -> dict:
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    state["tracker"] = get_cuda_rng_tracker().get_states()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def save_checkpoint(
    save_dir: str | os.PathLike, step: int, model, optimizer, train_state: dict, keep_last: int, files: dict | None = None
) -> Path:
    """Save model, optimizer, the loop's state (step, consumed samples, ...) and every rank's RNG
    state as ``SAVE_DIR/iter_NNNNNNN``, then point ``SAVE_DIR/latest`` at it (written last, atomically)
    and delete all but the `keep_last` newest checkpoints. `files` ({name: text}) are written beside
    the tensors by rank 0 (e.g. model_config.yaml for the converter). All ranks call this."""
    save_dir = Path(save_dir)
    state = model_sharded_state_dict(model)
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_METADATA)
    state["train_state"] = dict(train_state, step=step)
    rng = _rng_state()

    def write_extra(tmp: Path) -> None:
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng, tmp / "rng" / f"rank{_rank():05d}.pt")
        if _is_rank0():
            for name, text in (files or {}).items():
                (tmp / name).write_text(text)

    path = save_sharded(state, save_dir / checkpoint_name(step), write_extra=write_extra)
    if _is_rank0():
        pointer = save_dir / (LATEST_FILE + ".tmp")
        pointer.write_text(path.name + "\n")
        pointer.replace(save_dir / LATEST_FILE)
        complete = sorted(p for p in save_dir.glob("iter_*") if p.is_dir() and "." not in p.name)
        for old in complete[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def latest_checkpoint(load_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``LOAD_DIR/latest`` points at, None when there is none yet."""
    load_dir = Path(load_dir)
    pointer = load_dir / LATEST_FILE
    if not pointer.is_file():
        return None
    path = load_dir / pointer.read_text().strip()
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(
            f"{pointer} points at {path}, which is not a complete checkpoint; point it at an existing iter_* "
            "directory or delete it to start from scratch"
        )
    return path


def load_checkpoint(path: str | os.PathLike, model, optimizer, same_layout: bool) -> dict:
    """Load a training checkpoint saved at any layout into `model` and `optimizer`; returns the
    loop's saved state. RNG states are restored only when `same_layout` (one file per rank)."""
    path = Path(path)
    state = model_sharded_state_dict(model)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=OPTIMIZER_METADATA)
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(model):
        key = "model" if len(model) == 1 else f"model{i}"
        getattr(chunk, "module", chunk).load_state_dict(loaded[key], strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
    rng_file = path / "rng" / f"rank{_rank():05d}.pt"
    if same_layout and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return dict(loaded["train_state"])


def saved_train_state(path: str | os.PathLike) -> dict:
    """The loop state stored in a training checkpoint (step, consumed samples, layout, config), read
    without loading any tensor."""
    common = dist_checkpointing.load_common_state_dict(str(path))
    if "train_state" not in common:
        raise ValueError(f"{path} holds model weights only (no train_state); use training.init_from to start from it")
    return dict(common["train_state"])
