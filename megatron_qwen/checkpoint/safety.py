"""Loading a checkpoint never runs code from it: what may be unpickled, and the readers that hold to it.

Unpickling calls whatever functions a pickle names, so a checkpoint that is unpickled freely is a program.
A checkpoint of this project holds pickles in these places:

- the DCP metadata (``.metadata``, a plain pickle of torch's metadata classes);
- the DCP byte items: megatron-core ShardedObjects (``_extra_state``, the distributed optimizer's
  per-replica state), each a ``torch.save`` of a list;
- megatron-core's common state (``common.pt``, a ``torch.save``: the optimizer's parameter groups, and the
  loop's state in checkpoints written before it moved to ``train_state.json``);
- the per-rank RNG files (``rng/rankNNNNN.pt``, tensors; older ones held numpy's state as an array);
- with Transformer Engine layers, their ``_extra_state`` bytes, which TE itself unpickles when the
  module loads them.

Each is read here through an allowlist of exactly the types those files hold. ``torch.save`` files go
through ``torch.load(weights_only=True)``: tensors, containers, numbers, strings, torch sizes, dtypes and
devices, plus numpy's array for the older RNG files (`LEGACY_RNG_GLOBALS`). The DCP metadata and TE's bytes
go through a `pickle.Unpickler` whose ``find_class`` admits only the listed classes (`DCP_METADATA_TYPES`,
`TE_RECIPE_TYPES` with a tensor's parts). Anything else raises `UnsafeCheckpointError` naming the file, the
type and how to load a checkpoint one trusts: ``trust=True`` (``training.trust_checkpoint=true``,
``--trust-checkpoint``) reads everything as torch and megatron-core do by themselves.

megatron-core 0.16.1's torch_dist strategy builds its DCP reader and load planner inside its own methods,
with no parameter for either (`MEGATRON_SITES`); `AllowlistLoadStrategy` rebinds those two names in
megatron-core's module while one of its loads runs, and restores them after. The unrestricted reads this
replaces are listed in `UNRESTRICTED_SITES`; tests/test_checkpoint_safety.py checks every site still reads
as listed and that each upstream read still runs a planted pickle, so an upgrade shows what can go.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch_strategy
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from megatron.core.dist_checkpointing.strategies.torch import MCoreLoadPlanner, TorchDistLoadShardedStrategy
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from megatron_qwen.errors import CheckpointError

TRUST_HINT = (
    "if you trust where this checkpoint comes from, load it with training.trust_checkpoint=true "
    "(tools: --trust-checkpoint), which unpickles everything in it"
)
TRUST_WARNING = (
    "checkpoints are loaded without the allowlist: any object pickled in them is unpickled, "
    "and unpickling can run code on this machine"
)


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds a pickled object outside the allowlist; the object was not unpickled."""


def refused(where: str, names: list[str] | str) -> UnsafeCheckpointError:
    """The error for a pickle in `where` (a file, and the item in it) that names `names`."""
    names = [names] if isinstance(names, str) else names
    return UnsafeCheckpointError(
        f"{where}: refused to unpickle {', '.join(names)}: checkpoints of this project hold no such type, and "
        f"unpickling it could run code; {TRUST_HINT}"
    )


# --------------------------------------------------------------------------- allowlists

_DTYPE_NAMES = tuple(sorted(name for name, value in vars(torch).items() if isinstance(value, torch.dtype)))

# Every class and function the DCP metadata (``.metadata``) of this project's checkpoints names, as torch 2.13
# writes it, by module (recorded from real checkpoints; the tests check them at several layouts).
DCP_METADATA_TYPES: dict[str, tuple[str, ...]] = {
    "torch.distributed.checkpoint.metadata": (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    ),
    "torch.distributed.checkpoint.planner": ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
    "torch.serialization": ("_get_layout",),  # torch.layout by name (torch.strided)
    "torch": ("Size", *_DTYPE_NAMES),
    "pathlib": ("PosixPath",),  # StorageMeta.checkpoint_id of checkpoints the converter writes
}

# The numpy types of the RNG files written before RNG states were stored as tensors: numpy's
# Mersenne-Twister key, a uint32 array. torch.load(weights_only=True) admits them for those files only.
LEGACY_RNG_GLOBALS = (np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)))


def _load_storage_weights_only(data: bytes):
    """What ``torch.storage._load_from_bytes`` returns (a tensor's storage inside a plain pickle), read
    with weights_only=True instead of torch's unrestricted load."""
    return torch.load(io.BytesIO(data), weights_only=True)


# A tensor inside a plain pickle (TE's extra state holds its FP8 scales and amax histories so).
_TENSOR_PICKLE_TYPES = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _load_storage_weights_only,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
    **{("torch", name): getattr(torch, name) for name in _DTYPE_NAMES},
}
# What Transformer Engine 2.x pickles into a layer's extra state besides tensors: its FP8 recipe object
# (`TE_RECIPE_SITES`), one of TE's recipe dataclasses or, for model.fp8=delayed, megatron-core's TEDelayedScaling
# (a DelayedScaling subclass), whose fields hold the Format enum (its values are _FormatHelper tuples), QParams,
# MMParams, numbers, strings and None. TE's CustomRecipe is left out: it holds a quantizer factory, i.e. code.
# Listed from TE's transformer_engine/common/recipe/__init__.py, v2.0 to v2.18.
TE_RECIPE_TYPES: dict[str, tuple[str, ...]] = {
    "transformer_engine.common.recipe": (
        "_FormatHelper", "Format", "MMParams", "QParams", "DelayedScaling", "Float8CurrentScaling",
        "MXFP8BlockScaling", "Float8BlockScaling", "NVFP4BlockScaling",
    ),
    "megatron.core.extensions.transformer_engine": ("TEDelayedScaling",),
}


class _Absent:
    """Stands in, while extra state is screened, for an admitted class that does not import in this process
    (no Transformer Engine here): takes whatever arguments and state the pickle gives it, and runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


@functools.lru_cache(maxsize=None)
def _absent(module: str, name: str) -> type:
    return type(name, (_Absent,), {"__qualname__": f"_Absent[{module}.{name}]"})


class TEExtraStateTypes:
    """What a Transformer Engine layer's extra state may name: a tensor's parts, or a `TE_RECIPE_TYPES` class.

    An admitted class resolves to itself where its module imports; elsewhere (no Transformer Engine: its recipe
    module does not import, and megatron-core's TEDelayedScaling is then no class) to an inert stand-in, and
    `stood_in` records that it did."""

    def __init__(self):
        self.stood_in = False

    def __call__(self, module: str, name: str):
        if (module, name) in _TENSOR_PICKLE_TYPES:
            return _TENSOR_PICKLE_TYPES[(module, name)]
        if name not in TE_RECIPE_TYPES.get(module, ()):
            return None
        try:
            value = getattr(importlib.import_module(module), name, None)
        except Exception:  # TE missing, or an install that does not import: nothing here will unpickle TE's bytes
            value = None
        if isinstance(value, type):
            return value
        self.stood_in = True
        return _absent(module, name)


def te_extra_state_type(module: str, name: str):
    """The object a Transformer Engine layer's extra state may name, or None (see `TEExtraStateTypes`)."""
    return TEExtraStateTypes()(module, name)


def dcp_metadata_type(module: str, name: str):
    """The object a DCP ``.metadata`` pickle may name, or None."""
    if name in DCP_METADATA_TYPES.get(module, ()):
        return getattr(importlib.import_module(module), name)
    return None


class _Refused(pickle.UnpicklingError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _AllowlistUnpickler(pickle.Unpickler):
    """Python's unpickler resolving only the names `resolve` admits (it returns None for the others)."""

    def __init__(self, file, resolve: Callable[[str, str], Any]):
        super().__init__(file)
        self.resolve = resolve

    def find_class(self, module: str, name: str):
        value = self.resolve(module, name)
        if value is None:
            raise _Refused(f"{module}.{name}")
        return value


def unpickle_allowlisted(data: bytes, resolve: Callable[[str, str], Any], where: str):
    """Unpickle `data` (a plain pickle) admitting only the names `resolve` gives an object for."""
    try:
        return _AllowlistUnpickler(io.BytesIO(data), resolve).load()
    except _Refused as exc:
        raise refused(where, exc.name) from None
    except Exception as exc:
        raise CheckpointError(
            f"{where}: not a readable pickle ({type(exc).__name__}: {exc}); the file is damaged"
        ) from None


# --------------------------------------------------------------------------- torch.save files


def _unsafe_globals(source) -> list[str]:
    """The globals of a torch.save file that weights_only refuses, by name (empty if it cannot tell)."""
    try:
        if isinstance(source, io.IOBase):
            source.seek(0)
        return torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception:
        return []


def load_torch_file(source, where: str, trust: bool, extra_globals: tuple = (), map_location=None):
    """``torch.load`` of `source` (a path or a seekable file object) with weights_only=True, admitting
    `extra_globals` besides torch's own allowlist; unrestricted when `trust`."""
    if trust:
        return torch.load(source, map_location=map_location, weights_only=False)
    with torch.serialization.safe_globals(list(extra_globals)):
        try:
            return torch.load(source, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            names = _unsafe_globals(source)
            if names:
                raise refused(where, names) from None
            raise refused(where, str(exc).splitlines()[-1]) from None


# --------------------------------------------------------------------------- DCP reading


class AllowlistFileSystemReader(FileSystemReader):
    """DCP's file-system reader whose ``.metadata`` goes through the allowlist (read once, then cached).

    Tensor data needs nothing more: DCP reads it with weights_only=True. Unrestricted when `trust`.
    """

    def __init__(self, path: str | os.PathLike, trust: bool = False):
        super().__init__(path)
        self.trust = trust
        self._metadata: Metadata | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        if rank is None and self._metadata is not None:
            return self._metadata
        if self.trust:
            metadata = super().read_metadata(*args, **kwargs)
        else:
            path = Path(self._get_metadata_path(rank))
            metadata = unpickle_allowlisted(path.read_bytes(), dcp_metadata_type, str(path))
            if not isinstance(metadata, Metadata):
                raise CheckpointError(
                    f"{path} holds a {type(metadata).__name__}, not DCP metadata; the checkpoint is damaged"
                )
            # As torch's reader does: each load gets its own id.
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
        if rank is None:
            self._metadata = metadata
        return metadata


class _AllowlistLoadPlanner(MCoreLoadPlanner):
    """megatron-core's load planner whose byte items (ShardedObjects) load with weights_only=True."""

    def __init__(self, *args, checkpoint_dir: str | os.PathLike, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpoint_dir = Path(checkpoint_dir)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        stored = self.metadata.storage_data[read_item.storage_index]
        where = f"{self.checkpoint_dir / stored.relative_path} (object {fqn})"
        loaded = load_torch_file(value, where, trust=False)
        # Placed where DefaultLoadPlanner.load_bytes places what it loads.
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


@dataclass(frozen=True)
class UpstreamSite:
    """Where upstream code does what a workaround here relies on: `snippet` occurs in `qualname` of `module`."""

    module: str
    qualname: str
    snippet: str


# The names `AllowlistLoadStrategy` rebinds in megatron-core's torch strategy module while it loads, and
# where megatron-core calls them.
MEGATRON_SITES = (
    UpstreamSite("megatron.core.dist_checkpointing.strategies.torch", "TorchDistLoadShardedStrategy.load",
                 "_get_filesystem_reader(checkpoint_dir, cache_metadata=True)"),
    UpstreamSite("megatron.core.dist_checkpointing.strategies.torch", "TorchDistLoadShardedStrategy.load",
                 "planner=MCoreLoadPlanner("),
    UpstreamSite("megatron.core.dist_checkpointing.strategies.torch",
                 "TorchDistLoadShardedStrategy.load_sharded_metadata",
                 "_get_filesystem_reader(checkpoint_dir)"),
)
# The unrestricted reads the allowlist replaces.
UNRESTRICTED_SITES = (
    UpstreamSite("torch.distributed.checkpoint.filesystem", "FileSystemReader.read_metadata",
                 "pickle.load(metadata_file)"),
    UpstreamSite("torch.distributed.checkpoint.default_planner", "DefaultLoadPlanner.load_bytes", "weights_only=False"),
    # torch.load without weights_only: safe by torch's default, unrestricted under $TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.
    UpstreamSite("megatron.core.dist_checkpointing.strategies.common", "TorchCommonLoadStrategy.load_common",
                 "torch.load(load_path, map_location='cpu')"),
)


# Where Transformer Engine's FP8 recipe objects come from and are pickled, for `TE_RECIPE_TYPES`: megatron-core
# builds TE's recipe per model.fp8 (TEDelayedScaling for delayed, TE's Float8CurrentScaling for tensorwise), TE
# pickles it into each layer's extra state and unpickles that without restriction when a layer loads it.
# Defined only where Transformer Engine imports; tests/test_checkpoint_safety.py reads them from the source.
TE_RECIPE_SITES = (
    UpstreamSite("megatron.core.fp8_utils", "get_fp8_recipe", "fp8_recipe = TEDelayedScaling("),
    UpstreamSite("megatron.core.fp8_utils", "get_fp8_recipe", "transformer_engine.common.recipe.Float8CurrentScaling("),
    UpstreamSite("megatron.core.extensions.transformer_engine", "TEDelayedScaling",
                 "class TEDelayedScaling(te.common.recipe.DelayedScaling)"),
    UpstreamSite("transformer_engine.pytorch.module.base", "TransformerEngineBaseModule.get_extra_state",
                 'state["recipe"] = '),
    UpstreamSite("transformer_engine.pytorch.module.base", "TransformerEngineBaseModule.get_extra_state",
                 "pickle.dumps(state)"),
    UpstreamSite("transformer_engine.pytorch.module.base", "TransformerEngineBaseModule.set_extra_state",
                 "pickle.loads(state_bytes)"),
)


@contextlib.contextmanager
def _megatron_reads_through(reader: FileSystemReader, planner: Callable) -> Iterator[None]:
    """While the block runs, megatron-core's torch strategy reads with `reader` and plans with `planner`.
    (A process runs one load at a time: loads are collective calls of its main thread.)"""
    module = mcore_torch_strategy
    saved = module._get_filesystem_reader, module.MCoreLoadPlanner
    module._get_filesystem_reader = lambda checkpoint_dir, cache_metadata=False: reader
    module.MCoreLoadPlanner = planner
    try:
        yield
    finally:
        module._get_filesystem_reader, module.MCoreLoadPlanner = saved


@contextlib.contextmanager
def refusals_raised() -> Iterator[None]:
    """Raise a refusal on any rank as itself, on every rank: DCP wraps the failures of a collective load in a
    CheckpointException (a BaseException that would pass every ``except UserError``)."""
    try:
        yield
    except CheckpointException as exc:
        for error, _trace in exc.failures.values():
            if isinstance(error, CheckpointError):
                raise error from None
        raise


class AllowlistLoadStrategy(TorchDistLoadShardedStrategy):
    """megatron-core's torch_dist load strategy reading metadata and objects through the allowlist."""

    def __init__(self, trust: bool = False):
        super().__init__()
        self.trust = trust

    @contextlib.contextmanager
    def _reading(self, checkpoint_dir) -> Iterator[None]:
        reader = AllowlistFileSystemReader(checkpoint_dir, self.trust)
        reader.read_metadata()  # refused here, on every rank alike, before any collective
        planner = MCoreLoadPlanner if self.trust else functools.partial(_AllowlistLoadPlanner,
                                                                        checkpoint_dir=checkpoint_dir)
        with _megatron_reads_through(reader, planner), refusals_raised():
            yield

    def load(self, sharded_state_dict, checkpoint_dir):
        with self._reading(checkpoint_dir):
            return super().load(sharded_state_dict, checkpoint_dir)

    def load_tensors_metadata(self, checkpoint_dir, metadata=None):
        if metadata is None:
            metadata = AllowlistFileSystemReader(checkpoint_dir, self.trust).read_metadata()
        return super().load_tensors_metadata(checkpoint_dir, metadata)

    def load_sharded_metadata(self, checkpoint_dir):
        with self._reading(checkpoint_dir):
            return super().load_sharded_metadata(checkpoint_dir)


class AllowlistCommonStrategy(TorchCommonLoadStrategy):
    """megatron-core's common-state strategy reading ``common.pt`` with weights_only=True (stated, not left to
    torch's default, which an environment variable turns off)."""

    def __init__(self, trust: bool = False):
        super().__init__()
        self.trust = trust

    def load_common(self, checkpoint_dir):
        path = Path(checkpoint_dir) / COMMON_STATE_FNAME
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist; the checkpoint is incomplete")
        return load_torch_file(path, str(path), self.trust, map_location="cpu")


def load_strategies(trust: bool = False) -> dict:
    """Keyword arguments for ``dist_checkpointing.load`` that read through the allowlist (all of it
    unrestricted when `trust`)."""
    return {"sharded_strategy": AllowlistLoadStrategy(trust), "common_strategy": AllowlistCommonStrategy(trust)}


def read_common_state(path: str | os.PathLike, trust: bool = False) -> dict:
    """A checkpoint's common (non-sharded) state, ``common.pt``, through the allowlist."""
    return AllowlistCommonStrategy(trust).load_common(path)


# --------------------------------------------------------------------------- module extra state


def screen_extra_states(state: dict, where: str, trust: bool = False) -> None:
    """Make every Transformer Engine extra state in `state` (nested dicts, as loaded) safe for TE to unpickle.

    TE stores a layer's FP8 state as a uint8 tensor of pickle bytes and unpickles it without restriction in
    ``set_extra_state``. Each such tensor is unpickled here through `TEExtraStateTypes` and replaced by a fresh
    pickle of what that gave, so TE unpickles only bytes made here from admitted types. Where an admitted class
    does not import (no Transformer Engine in this process, so no layer here unpickles the bytes), the bytes stay
    as they are, now known to name admitted classes only. Other extra states (None, an empty tensor: no FP8
    state) are left alone; nothing is done when `trust`.
    """
    if trust:
        return
    for key, value in state.items():
        if isinstance(value, dict):
            screen_extra_states(value, where, trust)
        elif (key.endswith("_extra_state") and isinstance(value, torch.Tensor) and value.dtype == torch.uint8
              and value.numel()):
            types = TEExtraStateTypes()
            obj = unpickle_allowlisted(value.detach().cpu().numpy().tobytes(), types, f"{where} ({key})")
            if not types.stood_in:
                state[key] = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
