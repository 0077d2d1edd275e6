"""What a checkpoint directory holds: the file names, the completeness rule and the state-dict keys.

A checkpoint is a megatron-core ``dist_checkpointing`` directory (``metadata.json``, ``.metadata``,
``*.distcp``, ``common.pt``) plus the project's own files:

- ``model_config.yaml``: the `Config` the model was built with; readers use its ``model`` section only,
  so checkpoints written by older versions (whose other sections differ) keep loading;
- ``hf_source.json``: for a model converted from Hugging Face, the source config and vocabulary size;
- ``train_state.json``: the loop's position (step, consumed samples, layout, config, W&B run id), in
  training checkpoints; older ones kept it in megatron-core's ``common.pt``;
- ``rng/rankNNNNN.pt``: each rank's RNG states as tensors (training checkpoints).

What may be unpickled from any of these files is `megatron_qwen.checkpoint.safety`'s allowlist.

A training run's save directory holds ``iter_NNNNNNN`` checkpoints and ``latest``, a one-line file naming
the current one, written last. In the sharded state dict a model's chunks sit under ``model`` (``model0``,
``model1``, ... with virtual pipeline stages) and its optimizer under ``optimizer``. A checkpoint of several
model units keeps the root unit there and nests every other unit under its name, its tensors' global keys
prefixed with ``NAME.``, so names never collide.

Every writer and reader (the loop, conversion, the forward and generate tools) goes through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_qwen.config import ModelConfig, load_model_section
from megatron_qwen.errors import CheckpointError, ConfigError

MODEL_CONFIG_FILE = "model_config.yaml"
HF_SOURCE_FILE = "hf_source.json"
TRAIN_STATE_FILE = "train_state.json"
LATEST_FILE = "latest"
RNG_DIR = "rng"
COMPLETE_MARKER = "metadata.json"  # megatron-core writes it with every checkpoint
TRAIN_STATE_KEY = "train_state"  # the loop's state inside common.pt, in checkpoints older than train_state.json
OPTIMIZER_KEY = "optimizer"


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint saved after optimizer step `step`."""
    return f"iter_{step:07d}"


def rng_file(path: str | os.PathLike, rank: int) -> Path:
    """Rank `rank`'s RNG state in checkpoint `path`."""
    return Path(path) / RNG_DIR / f"rank{rank:05d}.pt"


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a complete megatron-core checkpoint."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def require_checkpoint(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if it is a complete checkpoint, else CheckpointError naming `what` (e.g. ``--ckpt DIR``)."""
    path = Path(path)
    if not is_checkpoint(path):
        raise CheckpointError(f"{what} is not a megatron-core checkpoint (no {COMPLETE_MARKER}); check the path")
    return path


def chunk_keys(num_chunks: int) -> list[str]:
    """The state-dict keys of a model's chunks: ``model``, or ``model0``, ``model1``, ... with virtual stages."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def unit_prefix(namespace: str) -> str:
    """The global-key prefix of a unit's tensors: none for the root unit (namespace ""), else ``NAME.``."""
    return f"{namespace}." if namespace else ""


def read_model_config(path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> ModelConfig:
    """The model section of a checkpoint's ``model_config.yaml`` (or of `config_path`)."""
    file = Path(config_path) if config_path is not None else Path(path) / MODEL_CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{file} does not exist; the model's shape comes from its config: pass --config CONFIG.yaml"
        )
    try:
        return load_model_section(file)
    except ConfigError as exc:
        raise CheckpointError(f"{file}: {exc}") from exc


def read_hf_source(path: str | os.PathLike) -> dict | None:
    """The ``hf_source.json`` a converted checkpoint carries (None for others)."""
    file = Path(path) / HF_SOURCE_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def latest_checkpoint(save_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``SAVE_DIR/latest`` points at, None when there is none yet."""
    save_dir = Path(save_dir)
    pointer = save_dir / LATEST_FILE
    if not pointer.is_file():
        return None
    path = save_dir / pointer.read_text().strip()
    if not is_checkpoint(path):
        raise CheckpointError(
            f"{pointer} points at {path}, which is not a complete checkpoint; point it at an existing iter_* "
            "directory or delete it to start from scratch"
        )
    return path


def set_latest(save_dir: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make `path` (a checkpoint inside `save_dir`) the current one, atomically."""
    save_dir = Path(save_dir)
    pointer = save_dir / (LATEST_FILE + ".tmp")
    pointer.write_text(Path(path).name + "\n")
    pointer.replace(save_dir / LATEST_FILE)


def saved_checkpoints(save_dir: str | os.PathLike) -> list[Path]:
    """The complete ``iter_*`` checkpoints of a save directory, oldest first (temporaries excluded)."""
    return sorted(p for p in Path(save_dir).glob("iter_*") if p.is_dir() and "." not in p.name)
