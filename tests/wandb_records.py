"""Read the records of an offline W&B run file (``run-ID.wandb``) for tests.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0) then
LevelDB-log framing (32 KiB blocks; each chunk: crc32c (4), length (2, little-endian), type (1:
full, 2: first, 3: middle, 4: last), data) around serialized ``wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HEADER = 7
BLOCK = 32 * 1024
CHUNK_HEADER = 7


def raw_records(path: str | Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < CHUNK_HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        payload = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            records.append(payload)
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            records.append(pending + payload)
            pending = b""
    return records


def history_and_config(path: str | Path) -> tuple[list[dict], dict]:
    """The logged history rows and the run config of an offline run file."""
    from wandb.proto import wandb_internal_pb2

    history, config = [], {}
    for raw in raw_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "config" or kind == "run":
            items = record.config.update if kind == "config" else record.run.config.update
            config.update({item.key: json.loads(item.value_json) for item in items})
    return history, config
