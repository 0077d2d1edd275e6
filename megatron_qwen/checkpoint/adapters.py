"""Adapter-only checkpoints: which tensors are adapters, and which base checkpoint a set of adapters belongs to.

A model trained with low-rank adapters (``peft.method``) saves only its adapter tensors (global keys containing
``.adapter.``, see `megatron_qwen.model.lora`) with their optimizer state and the loop's state; the frozen base
weights stay where they were loaded from. ``adapter_base.json`` in the checkpoint directory names that base:

    {"base": "<path of the base checkpoint>", "fingerprint": "<hex>"}

The fingerprint (`base_fingerprint`) identifies the base weights without reading them all: a SHA-256 over the
checkpoint's model section (``model_config.yaml``), the global key, shape and dtype of every base tensor, and the
bytes of each base tensor's first row (for a stacked layer tensor: layer 0's first row). Two checkpoints of one
model shape that differ in their weights (another seed, more training) differ in those rows; the fingerprint does
not depend on the layout the base was saved at, and costs one small read per tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import yaml

from megatron_qwen.checkpoint import directory as ckdir
from megatron_qwen.checkpoint.dcp_io import read_chunks, tensor_metadata
from megatron_qwen.errors import CheckpointError

ADAPTER_KEY = ".adapter."  # every adapter tensor's checkpoint key contains it
ADAPTER_BASE_FILE = "adapter_base.json"
# The first component of a root model's tensor keys (optimizer state and other units' tensors are not the base).
MODEL_KEY_ROOTS = ("embedding", "decoder", "output_layer", "reward_head")


def is_adapter_key(key: str) -> bool:
    """Whether checkpoint key `key` (global, or a module's local name) is an adapter tensor's."""
    return ADAPTER_KEY in key


def base_keys(stored: dict) -> list[str]:
    """The root model's non-adapter tensor keys among a checkpoint's `stored` keys, sorted."""
    return sorted(key for key in stored if key.split(".", 1)[0] in MODEL_KEY_ROOTS and not is_adapter_key(key))


def base_fingerprint(path: str | os.PathLike, trust: bool = False) -> str:
    """The hex fingerprint of the base weights in checkpoint `path` (see the module docstring)."""
    path = ckdir.require_checkpoint(path, str(path))
    stored = tensor_metadata(path, trust)
    keys = base_keys(stored)
    if not keys:
        raise CheckpointError(f"{path} holds no model weights to fingerprint (it is an adapter-only checkpoint?): "
                              "name the base checkpoint the adapters were trained on")
    digest = hashlib.sha256()
    config = path / ckdir.MODEL_CONFIG_FILE
    if config.is_file():
        digest.update(json.dumps(yaml.safe_load(config.read_text()).get("model", {}), sort_keys=True).encode())
    rows = read_chunks(path, {key: ((0,) * len(stored[key].shape),
                                    tuple(1 for _ in stored[key].shape[:-1]) + stored[key].shape[-1:],
                                    stored[key].dtype) for key in keys}, trust)
    for key in keys:
        info = stored[key]
        digest.update(f"{key}:{tuple(info.shape)}:{info.dtype}\n".encode())
        digest.update(rows[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_adapter_base(path: str | os.PathLike) -> dict | None:
    """The ``adapter_base.json`` of checkpoint `path` ({"base", "fingerprint"}), None when it has none."""
    file = Path(path) / ADAPTER_BASE_FILE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc}); the checkpoint is damaged") from exc
    if not isinstance(record, dict) or not {"base", "fingerprint"} <= set(record):
        raise CheckpointError(f"{file} must hold {{\"base\": PATH, \"fingerprint\": HEX}}; it holds {record!r}")
    return record


def adapter_base_record(base: str | os.PathLike, fingerprint: str) -> str:
    """The text of an ``adapter_base.json`` naming base checkpoint `base` and its fingerprint."""
    return json.dumps({"base": str(base), "fingerprint": fingerprint}, indent=1) + "\n"


def check_base(adapters: str | os.PathLike, record: dict, base: str | os.PathLike, fingerprint: str,
               key: str) -> None:
    """CheckpointError unless the base checkpoint `base` (fingerprint `fingerprint`, named by config key `key`) is
    the one the adapters in `adapters` were trained on (`record`: their ``adapter_base.json``)."""
    if record["fingerprint"] != fingerprint:
        raise CheckpointError(
            f"the adapters in {adapters} were trained on the base {record['base']} (fingerprint "
            f"{record['fingerprint'][:16]}), but the base loaded here, {base}, has fingerprint {fingerprint[:16]}: "
            f"set {key} to the base checkpoint the adapters were trained on"
        )
