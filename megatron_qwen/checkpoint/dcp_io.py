"""megatron-core `dist_checkpointing` files written and read one chunk at a time, in a single process.

A megatron-core checkpoint (backend ``torch_dist``) is a PyTorch Distributed Checkpoint (DCP): every
tensor under its global key at its global shape (layer tensors stacked on a leading axis), stored as
chunks with their offsets, plus ``metadata.json`` (the backends) and ``common.pt`` (non-sharded state).
Any chunking is valid: readers at any TP/PP layout fetch the overlaps they need. Writing goes through
DCP's own writer with a planner that produces each chunk only when the writer asks for it; reading
goes through DCP's reader with a planner that asks for one chunk per tensor, the metadata unpickled
through `megatron_qwen.checkpoint.safety`'s allowlist (unrestricted with ``trust=True``).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata, MetadataIndex, TensorProperties, TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_qwen.checkpoint import directory as ckdir
from megatron_qwen.checkpoint.safety import AllowlistFileSystemReader
from megatron_qwen.errors import ConversionError



@dataclass(frozen=True)
class Chunk:
    """One stored piece of a global tensor: `sizes` elements from `offsets`; `load()` makes its data."""

    key: str
    global_shape: tuple
    offsets: tuple
    sizes: tuple
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


class _StreamingSavePlanner(DefaultSavePlanner):
    """DCP save planner whose write items are given up front and whose data is produced on demand.

    DCP's FileSystemWriter (one thread) resolves and writes the items one after the other, so only the
    chunk being written is in memory.
    """

    def __init__(self, chunks: list[Chunk], objects: dict[str, bytes]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.chunks = {(c.key, tuple(c.offsets)): c for c in chunks}
        self.objects = objects

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(
                index=MetadataIndex(c.key, torch.Size(c.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                    properties=TensorProperties(dtype=c.dtype),
                    size=torch.Size(c.global_shape),
                ),
            )
            for c in self.chunks.values()
        ]
        items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self.objects]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self.objects[write_item.index.fqn])
        chunk = self.chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        tensor = chunk.load()
        if tuple(tensor.shape) != tuple(chunk.sizes) or tensor.dtype != chunk.dtype:
            raise AssertionError(f"{chunk.key} at {chunk.offsets}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                                 f"planned {chunk.sizes} {chunk.dtype}")
        return tensor.contiguous()


@contextlib.contextmanager
def _single_process():
    """DCP without a process group: silence its "single process" warning, and raise a failure as the
    original exception rather than DCP's rank-keyed CheckpointException (a BaseException)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* in a single process.*")
        try:
            yield
        except CheckpointException as exc:
            failures = list(exc.failures.values())
            if len(failures) == 1:
                raise failures[0][0] from None
            raise


def serialize_object(value) -> bytes:
    """A megatron-core ShardedObject's stored bytes (torch_dist: ``torch.save`` of the list of this rank's values)."""
    buffer = io.BytesIO()
    torch.save([value], buffer)
    return buffer.getvalue()


def write_checkpoint(path: str | os.PathLike, chunks: list[Chunk], objects: dict[str, bytes]) -> None:
    """Write a megatron-core dist_checkpointing checkpoint into the (new, empty) directory `path`."""
    path = Path(path)
    with _single_process():
        dcp_save(
            {},
            storage_writer=FileSystemWriter(str(path), single_file_per_rank=True, thread_count=1),
            planner=_StreamingSavePlanner(chunks, objects),
            no_dist=True,
        )
    torch.save({}, path / COMMON_STATE_FNAME)  # a model checkpoint keeps no non-sharded state
    save_config(CheckpointingConfig(sharded_backend="torch_dist"), str(path))


@dataclass(frozen=True)
class StoredInfo:
    """A tensor of a checkpoint: global shape, dtype and the (offsets, sizes) of its stored chunks."""

    shape: tuple
    dtype: torch.dtype
    chunks: tuple

    def row_blocks(self, rows: int) -> list[tuple[int, int]]:
        """[start, stop) ranges covering rows [0, rows) along dim 0, cut where stored chunks begin, so that
        reading one range never loads a stored chunk more than once."""
        cuts = sorted({0, rows} | {offsets[0] for offsets, _ in self.chunks if 0 < offsets[0] < rows})
        return list(zip(cuts[:-1], cuts[1:]))


def tensor_metadata(path: str | os.PathLike, trust: bool = False) -> dict[str, StoredInfo]:
    """Every tensor of a dist_checkpointing checkpoint, by global key."""
    path = Path(path)
    if not ckdir.is_checkpoint(path) or not (path / ".metadata").is_file():
        raise ConversionError(
            f"{path} is not a megatron-core dist_checkpointing checkpoint (no metadata.json / .metadata)"
        )
    metadata = AllowlistFileSystemReader(path, trust).read_metadata()
    return {
        key: StoredInfo(tuple(md.size), md.properties.dtype,
                        tuple((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks))
        for key, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }


class _ChunkLoadPlanner(LoadPlanner):
    """DCP load planner filling one destination tensor per key from whatever chunks the checkpoint has."""

    def __init__(self, requests: dict[str, tuple[tuple, torch.Tensor]]):
        self.requests = requests  # key -> (offsets, destination tensor)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (offsets, dest) in self.requests.items():
            wanted = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [wanted])
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise AssertionError(f"unexpected object read {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item) -> torch.Tensor:
        dest = self.requests[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor) -> None:
        pass


def read_chunks(
    path: str | os.PathLike, requests: dict[str, tuple[tuple, tuple, torch.dtype]], trust: bool = False
) -> dict[str, torch.Tensor]:
    """For each key, the block of `sizes` elements at `offsets` ({key: (offsets, sizes, dtype)})."""
    dests = {key: (offsets, torch.empty(sizes, dtype=dtype)) for key, (offsets, sizes, dtype) in requests.items()}
    reader = AllowlistFileSystemReader(path, trust)
    reader.read_metadata()  # a refusal raised as itself (DCP would fold a failed metadata read into another error)
    with _single_process():
        dcp_load({}, storage_reader=reader, planner=_ChunkLoadPlanner(dests), no_dist=True)
    return {key: dest for key, (_, dest) in dests.items()}
