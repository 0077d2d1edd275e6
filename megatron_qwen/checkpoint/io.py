"""Checkpoints of model units in megatron-core's `dist_checkpointing` format, reshardable on load.

A checkpoint written at one TP/PP/VPP layout loads at any other: tensors are stored under global keys
and shapes (layers stacked on a leading axis), and each rank reads only its own slices. One checkpoint
holds any number of named units (each with its optimizer when trained), the loop's state (JSON) and every
rank's RNG state (tensors); the directory layout and names are `megatron_qwen.checkpoint.directory`'s. Directories
are written under a temporary name and renamed when complete, and ``latest`` moves only after, so an
interrupted save never replaces a good checkpoint.

Every read goes through `megatron_qwen.checkpoint.safety`: nothing outside its allowlist is unpickled
unless the caller passes ``trust=True`` (``training.trust_checkpoint``).
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterable, Protocol

import numpy as np
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_qwen.checkpoint import directory as ckdir
from megatron_qwen.checkpoint import safety
from megatron_qwen.checkpoint.adapters import (ADAPTER_BASE_FILE, base_fingerprint, check_base, is_adapter_key,
                                               read_adapter_base)
from megatron_qwen.checkpoint.dcp_io import read_chunks, tensor_metadata
from megatron_qwen.errors import CheckpointError

# The distributed optimizer's state in megatron-core's fully reshardable format (loads at any TP/PP/DP), saved
# memory-efficiently: only data-parallel rank 0 of each model-parallel group gathers the state of its TP x PP
# shard (over gloo) to write it; without the flag every DP rank all-gathers all of it.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                      "distrib_optim_fully_reshardable_mem_efficient": True}


class ModelUnit(Protocol):
    """What a checkpoint saves and loads of a model unit (`megatron_qwen.training.units.ModelUnit` is one):
    the chunks without their wrappers, the optimizer when trained, the namespace its keys go under."""

    namespace: str
    optimizer: object | None
    adapters: bool  # trained with low-rank adapters: only the adapter tensors are saved (and loaded) with it

    @property
    def modules(self) -> list[torch.nn.Module]: ...

    def finish_param_sync(self) -> None: ...


def finish_param_sync(chunks: list[torch.nn.Module]) -> None:
    """Gather the weights other data-parallel ranks updated, now. With ``parallel.overlap_param_gather`` an
    optimizer step updates only this rank's share of the weights and the rest arrives during the next forward;
    anything that reads the weights before (a checkpoint save) calls this first. A no-op otherwise."""
    for chunk in chunks:
        if getattr(chunk, "use_forward_hook", False):  # megatron-core's DDP with overlap_param_gather
            chunk.start_param_sync(force_sync=True)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _is_rank0() -> bool:
    return _rank() == 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def chunks_state(modules: list[torch.nn.Module], namespace: str = "") -> dict:
    """The sharded state dict of model chunks under their chunk keys, global keys prefixed for `namespace`."""
    prefix = ckdir.unit_prefix(namespace)
    return {key: module.sharded_state_dict(prefix=prefix)
            for key, module in zip(ckdir.chunk_keys(len(modules)), modules)}


# megatron-core 0.16.1's distributed optimizer over torch's Adam/AdamW (what runs without Transformer Engine
# or apex, e.g. on CPU ranks; their FusedAdam keeps the step per group instead) cannot resume as it stands:
# it reads the step from the per-parameter state, which torch creates only at the first step, and it copies
# every key of that state, 'step' included, from the checkpoint's parameter state, which has no 'step'
# (DistributedOptimizer.state_dict and _set_main_param_and_optimizer_states), and its load_state_dict gives
# every parameter one shared step tensor. `_create_optimizer_state` and `_load_optimizer` bridge all three;
# tests/test_checkpoint_memory.py shows the plain calls fail.


def _torch_adams(optimizer) -> list:
    """(megatron-core distributed optimizer, its torch Adam/AdamW) pairs inside `optimizer`."""
    pairs = [(opt, getattr(opt, "optimizer", None)) for opt in getattr(optimizer, "chained_optimizers", [optimizer])]
    return [(opt, inner) for opt, inner in pairs
            if isinstance(opt, DistributedOptimizer) and isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))]


def _create_optimizer_state(optimizer) -> None:
    """Give every distributed optimizer in `optimizer` the per-parameter state it otherwise creates at its first
    step (zero moments: what that step would start from), so that one that has not stepped yet can build its
    state dict, to save or to load into.

    The state is made by each megatron-core optimizer's own ``init_state_fn`` (what megatron-core itself calls
    before loading), which matches its inner optimizer: torch's Adam, or Transformer Engine's / apex's
    FusedAdam, which create their state lazily at their first step and keep the step count per group.
    torch's Adam/AdamW also keep a per-parameter step, which that function leaves out: step 0 is added."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init_state = getattr(opt, "init_state_fn", None)
        if not isinstance(opt, DistributedOptimizer) or init_state is None:
            continue
        inner = opt.optimizer
        init_state(inner, opt.config)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for state in inner.state.values():
                state.setdefault("step", torch.tensor(0.0))


def _load_optimizer(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``; for a distributed optimizer over torch's Adam, with each
    parameter's 'step' set aside while megatron-core copies the parameter state in."""
    adams = _torch_adams(optimizer)
    if len(adams) != 1 or "param_state" not in state:
        optimizer.load_state_dict(state)
        return
    opt, inner = adams[0]
    param_state = {k: state[k] for k in ("param_state", "param_state_sharding_type")}
    opt.load_state_dict({k: v for k, v in state.items() if k not in param_state})  # groups, and the step
    steps = {param: inner.state[param].pop("step") for param in list(inner.state)}
    loaders = {"fully_reshardable": opt.load_parameter_state_from_fully_reshardable,
               "dp_reshardable": opt.load_parameter_state_from_dp_reshardable}
    kind = param_state["param_state_sharding_type"]
    if kind not in loaders:
        raise CheckpointError(
            f"the distributed optimizer's state is stored as {kind!r}, which this trainer does not read"
        )
    try:
        loaders[kind](param_state["param_state"])
    finally:
        # One tensor each: megatron-core hands every parameter the same step tensor, which torch's AdamW would
        # then advance once per parameter at every step.
        for param, step in steps.items():
            inner.state[param]["step"] = step.clone()


# megatron-core chains one optimizer per parameter kind and prefixes each one's tensors with its place in the
# chain (``chained_1.optimizer.state.exp_avg.<parameter>``); with a single optimizer there is no prefix.
_CHAIN_PREFIX = re.compile(r"^chained_\d+\.")


def _match_regrouped_keys(optimizer_state: dict, stored: set[str]) -> bool:
    """Point every optimizer tensor of `optimizer_state` (a sharded state dict to load) that the checkpoint lacks
    at the key the checkpoint stores the same parameter's state under with another chain prefix; True when any
    moved. This happens when the parameters were grouped into other optimizers when it was saved: megatron-core
    gives a MoE model's experts an optimizer of their own only at EP > 1, so the chain is one optimizer at EP = 1
    and two (dense, experts) above."""
    by_parameter = {_CHAIN_PREFIX.sub("", key): key for key in stored}
    moved = False
    for item in nested_values(optimizer_state):
        if not isinstance(item, (ShardedTensor, ShardedTensorFactory)) or item.key in stored:
            continue
        saved_key = by_parameter.get(_CHAIN_PREFIX.sub("", item.key))
        if saved_key is not None:
            item.key, moved = saved_key, True
    return moved


def _saved_optimizer_step(loaded: object) -> float:
    """The optimizer step count in the common (non-tensor) part of a loaded optimizer state, whatever optimizers
    saved it: the distributed optimizer keeps it in each parameter group, the others as ``common_step`` (absent
    before the first step)."""
    steps: set[float] = set()

    def walk(value: object) -> None:
        if isinstance(value, dict):
            if "common_step" in value:
                steps.add(float(value["common_step"]))
            for group in value.get("param_groups", []) if isinstance(value.get("param_groups"), list) else []:
                if isinstance(group, dict) and group.get("step") is not None:
                    steps.add(float(group["step"]))
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(loaded)
    if len(steps) > 1:
        raise CheckpointError(f"the saved optimizers disagree on their step count ({sorted(steps)})")
    return steps.pop() if steps else 0.0


def _load_regrouped_optimizer(optimizer, loaded: dict) -> None:
    """Load optimizer state saved with the parameters grouped into other megatron-core optimizers (see
    `_match_regrouped_keys`). Each optimizer of this run takes its parameters' tensors (moments, main weights) from
    the checkpoint, its parameter groups from this run (their learning rate and weight decay are set from the
    schedule at every step) and the saved step count."""
    step = _saved_optimizer_step(loaded)
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    shares = [loaded[i] for i in range(len(optimizers))] if len(optimizers) > 1 else [loaded]
    for opt, share in zip(optimizers, shares):
        own = copy.copy(opt.state_dict())
        if isinstance(opt, DistributedOptimizer):
            own["optimizer"] = copy.deepcopy(own["optimizer"])
            for group in own["optimizer"]["param_groups"]:
                group["step"] = step
            _load_optimizer(opt, {**own, "param_state": share["param_state"],
                                  "param_state_sharding_type": share.get("param_state_sharding_type",
                                                                         "fully_reshardable")})
            continue
        # megatron-core's optimizers over whole parameters: Float16OptimizerWithFloat16Params keeps the torch
        # optimizer's state under "optimizer" beside its fp32 main weights; FP32Optimizer is that state itself.
        nested = "optimizer" in own
        inner, saved = (own["optimizer"], share["optimizer"]) if nested else (own, share)
        state = {index: value for index, value in saved["state"].items() if isinstance(index, int)}
        state["common_step"] = torch.tensor(step, dtype=torch.float32)
        inner = {"state": state, "param_groups": copy.deepcopy(inner["param_groups"])}
        if nested:
            own["optimizer"] = inner
            own["fp32_from_fp16_params"] = share["fp32_from_fp16_params"]
            opt.load_state_dict(own)
        else:
            opt.load_state_dict(inner)


def adapters_only(state: dict) -> dict:
    """A chunks' sharded state dict (`chunks_state`) with only the adapter tensors (the base weights left out)."""
    return {key: {name: item for name, item in chunk.items() if is_adapter_key(name)} for key, chunk in state.items()}


def units_state(units: Iterable[ModelUnit], loading: bool = False) -> dict:
    """The sharded state dict of several units: the root unit at the top, the others under their namespace. A
    unit with adapters contributes only its adapter tensors (and their optimizer state): its base is frozen and
    stays in the checkpoint it came from (`megatron_qwen.checkpoint.adapters`)."""
    state: dict = {}
    for unit in units:
        unit_state = chunks_state(unit.modules, unit.namespace)
        if getattr(unit, "adapters", False):
            unit_state = adapters_only(unit_state)
        if unit.optimizer is not None:
            # Loading needs the state to load into; saving an optimizer that has not stepped yet (PPO's policy
            # during the value warm-up, training.train_iters=0) needs it too.
            _create_optimizer_state(unit.optimizer)
            unit_state[ckdir.OPTIMIZER_KEY] = unit.optimizer.sharded_state_dict(
                unit_state, is_loading=loading, metadata=OPTIMIZER_METADATA
            )
        if unit.namespace:
            state[unit.namespace] = unit_state
        else:
            state.update(unit_state)
    return state


def _unprefixed(state: dict, prefix: str) -> dict:
    """A loaded unit's state with the namespace prefix taken off its keys (the module's own names)."""
    return {name[len(prefix):] if prefix and name.startswith(prefix) else name: value for name, value in state.items()}


def _load_into(modules: list[torch.nn.Module], loaded: dict, namespace: str, where: str, trust: bool,
               adapters: bool = False) -> None:
    # Transformer Engine modules carry an _extra_state (FP8 scaling history) that checkpoints of the local spec
    # and of the converter lack; such a module keeps its fresh one. A unit with adapters loads only those (its
    # base weights were loaded from their own checkpoint).
    prefix = ckdir.unit_prefix(namespace)
    for key, module in zip(ckdir.chunk_keys(len(modules)), modules):
        safety.screen_extra_states(loaded[key], where, trust)
        missing, unexpected = module.load_state_dict(_unprefixed(loaded[key], prefix), strict=False)
        missing = [name for name in missing if not name.endswith("_extra_state")
                   and (is_adapter_key(name) or not adapters)]
        if missing or unexpected:
            raise CheckpointError(
                f"{where}: weights do not fit this model (missing {missing}, unexpected {unexpected})"
            )


def save_sharded(sharded_state_dict: dict, path: str | os.PathLike, write_extra=None, before_commit=None) -> Path:
    """Save a sharded state dict to `path` atomically (all ranks call this).

    Everything is written into ``PATH.tmp`` (``write_extra(tmp_dir)``, if given, runs on every rank
    to add files of its own) and the directory is renamed to `path` only when all ranks are done.
    ``before_commit(path)`` runs on every rank between the two (fault injection in tests).
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
    if before_commit is not None:
        before_commit(path)
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
    """Save model weights alone (all ranks call this), e.g. to start other runs from them."""
    finish_param_sync(chunks)
    return save_sharded(chunks_state([getattr(c, "module", c) for c in chunks]), path)


def load_weights(
    modules: list[torch.nn.Module], path: str | os.PathLike, what: str, namespace: str = "",
    fresh: tuple[str, ...] = (),
    trust: bool = False,
    select: Callable[[str], bool] | None = None,
    optional: Callable[[str], bool] | None = None,
) -> list[str]:
    """Load a checkpoint's weights (saved at any layout) into this rank's model chunks; all ranks call this.

    The weights are read from the unit at `namespace` of the checkpoint. Tensors the checkpoint has and the
    model lacks (a language model's output layer, for a reward model) are left out; tensors the model has
    and the checkpoint lacks are allowed only when their local names start with one of `fresh` (a scalar
    head started anew), or when `optional(name)` holds, and keep their initialisation. Returns those names.
    `select(name)`, when given, picks the tensors to load by local name (the others are left as they are: the base
    weights or the adapters of a model with adapters). `what` names the checkpoint in errors (e.g.
    ``training.init_from=DIR``). `trust` lifts the unpickling allowlist.
    """
    path = ckdir.require_checkpoint(path, what)
    stored = set(dist_checkpointing.load_tensors_metadata(str(path), safety.AllowlistLoadStrategy(trust)))
    prefix = ckdir.unit_prefix(namespace)
    request, started_fresh = {}, []
    for key, module in zip(ckdir.chunk_keys(len(modules)), modules):
        sharded = module.sharded_state_dict(prefix=prefix)
        if select is not None:
            sharded = {name: item for name, item in sharded.items() if select(name[len(prefix):])}
        absent = {name for name, item in sharded.items()
                  if getattr(item, "key", None) is not None and item.key not in stored}
        local = [name[len(prefix):] for name in absent if not name.endswith("_extra_state")]
        unexpected = [name for name in local if not name.startswith(fresh) and not (optional and optional(name))]
        if unexpected:
            raise CheckpointError(
                f"{what}: the checkpoint has no {prefix}{unexpected[0]} ({len(unexpected)} tensor(s) of this model "
                "missing); it holds another kind or size of model: check the path and the model.* sizes"
            )
        started_fresh += local
        request[key] = {name: item for name, item in sharded.items() if name not in absent}
    loaded = dist_checkpointing.load(request, str(path), **safety.load_strategies(trust))
    for key, module in zip(ckdir.chunk_keys(len(modules)), modules):
        missing, unexpected = module.load_state_dict(_unprefixed(loaded[key], prefix), strict=False)
        missing = [name for name in missing if not name.endswith("_extra_state") and (select is None or select(name))]
        if unexpected or set(missing) - set(started_fresh):
            raise CheckpointError(f"{what}: weights do not fit this model (missing {missing}, unexpected {unexpected})")
    return sorted(set(started_fresh))


def load_model(chunks: list[torch.nn.Module], path: str | os.PathLike, trust: bool = False) -> None:
    """Load a model checkpoint's weights, every one of them, into this rank's chunks (all ranks call this). An
    adapter-only checkpoint (``adapter_base.json``) loads its base first, refused when the base's fingerprint is not
    the recorded one; the chunks must then have adapters (`megatron_qwen.model.qwen.build_model`). Chunks with
    adapters take a checkpoint without any as their base, the adapters kept as initialised (B = 0: the base)."""
    modules = [getattr(c, "module", c) for c in chunks]
    record = read_adapter_base(path) if ckdir.is_checkpoint(path) else None
    if record is None:
        load_weights(modules, path, str(path), trust=trust, optional=is_adapter_key)
        return
    if not any(is_adapter_key(name) for module in modules for name, _ in module.named_parameters()):
        raise CheckpointError(
            f"{path} holds LoRA adapters alone, and this model has none: merge them into their base first (see "
            "docs/conversion.md), or build the model with the checkpoint's peft.* settings"
        )
    base = record["base"]
    load_adapter_base(modules, path, record, base, f"the base {base} of {path}",
                      f'"base" in {Path(path) / ADAPTER_BASE_FILE}', trust)
    load_weights(modules, path, str(path), trust=trust, select=is_adapter_key)


def load_adapter_base(modules: list[torch.nn.Module], adapters: str | os.PathLike, record: dict,
                      base: str | os.PathLike, what: str, key: str, trust: bool = False) -> str:
    """Load into `modules` the base weights of the adapters in checkpoint `adapters` from checkpoint `base` (named
    `what` in errors), refused unless its fingerprint is the one `record` (their ``adapter_base.json``) holds, the
    fix named as setting `key`; the adapters are left as they are. Returns the base's fingerprint."""
    ckdir.require_checkpoint(base, what)
    fingerprint = base_fingerprint(base, trust)
    check_base(adapters, record, base, fingerprint, key)
    load_weights(modules, base, what, trust=trust, select=lambda name: not is_adapter_key(name))
    return fingerprint


def read_full_state_dict(path: str | os.PathLike, trust: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint at its full (unsharded) shape, keyed by its global name.

    Runs in a single process without any process group, e.g. for conversion or inspection. Layer
    tensors are stacked on a leading axis (``decoder.layers.mlp.linear_fc1.weight``: [L, 2F, H]).
    """
    stored = tensor_metadata(path, trust)
    return read_chunks(path, {key: ((0,) * len(info.shape), info.shape, info.dtype) for key, info in stored.items()},
                       trust)


# --------------------------------------------------------------------------- training checkpoints


def _rng_state() -> dict:
    """This process's RNG states as tensors and numbers, nothing that unpickles as code: Python's and numpy's
    Mersenne-Twister keys, torch's generator, megatron-core's tracked streams (and CUDA's generator)."""
    version, key, gauss_next = random.getstate()
    bit_generator, np_key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "key": torch.tensor(key, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"bit_generator": bit_generator, "key": torch.from_numpy(np_key.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    """Restore states saved by `_rng_state`, or by earlier versions (Python's tuple and numpy's array as such)."""
    python, numpy_state = state["python"], state["numpy"]
    if isinstance(python, dict):
        python = (python["version"], tuple(python["key"].tolist()), python["gauss_next"])
        numpy_state = (numpy_state["bit_generator"], numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _read_rng_state(path: Path, trust: bool) -> dict | None:
    """This rank's saved RNG states (None when it has no file). A rank that cannot read its file (refused,
    say) raises its error and every other rank raises one naming it, so the job ends instead of waiting."""
    file = ckdir.rng_file(path, _rank())
    state, error = None, None
    try:
        if file.is_file():
            # Files written before the states became tensors hold numpy's key as an array.
            state = safety.load_torch_file(file, str(file), trust, extra_globals=safety.LEGACY_RNG_GLOBALS)
    except Exception as exc:  # noqa: BLE001 - raised below, once every rank knows
        error = exc
    mine = None if error is None else f"{type(error).__name__}: {error}"
    messages = [mine]
    if torch.distributed.is_initialized():
        messages = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(messages, mine)
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(messages) if message]
    if failed:
        rank, message = failed[0]
        raise CheckpointError(f"rank {rank} could not read its RNG state: {message}")
    return state


def save_checkpoint(
    save_dir: str | os.PathLike,
    step: int,
    units: list[ModelUnit],
    train_state: dict,
    keep_last: int,
    files: dict | None = None,
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Save the units (with their optimizers), the loop's state (step, consumed samples, ...; JSON-serialisable)
    and every rank's RNG state as ``SAVE_DIR/iter_NNNNNNN``, then point ``SAVE_DIR/latest`` at it (written
    last, atomically) and delete all but the `keep_last` newest checkpoints. `files` ({name: text}) are
    written beside the tensors by rank 0 (e.g. model_config.yaml for the converter). All ranks call this."""
    save_dir = Path(save_dir)
    for unit in units:
        unit.finish_param_sync()
    state = units_state(units)
    rng = _rng_state()

    def write_extra(tmp: Path) -> None:
        rng_path = ckdir.rng_file(tmp, _rank())
        rng_path.parent.mkdir(exist_ok=True)
        torch.save(rng, rng_path)
        if _is_rank0():
            (tmp / ckdir.TRAIN_STATE_FILE).write_text(json.dumps(dict(train_state, step=step), indent=1) + "\n")
            for name, text in (files or {}).items():
                (tmp / name).write_text(text)

    path = save_sharded(state, save_dir / ckdir.checkpoint_name(step), write_extra, before_commit)
    if _is_rank0():
        ckdir.set_latest(save_dir, path)
        delete_in_background(ckdir.saved_checkpoints(save_dir)[:-keep_last] if keep_last > 0 else [])
    _barrier()
    return path


DELETING_SUFFIX = ".deleting"
_deletions: list[threading.Thread] = []


def delete_in_background(checkpoints: list[Path]) -> None:
    """Delete old checkpoints without holding up the run: each is renamed at once (it stops being a
    checkpoint: names with a dot are not) and removed by a thread, while the other ranks, which wait for
    rank 0 in the next collective, would otherwise wait for a deletion that takes minutes at scale.
    Leftovers of a deletion a crash interrupted go too. The interpreter waits for the thread at exit."""
    if not checkpoints:
        return
    save_dir = checkpoints[0].parent
    doomed = [old.rename(old.with_name(old.name + DELETING_SUFFIX)) for old in checkpoints]
    doomed += [p for p in save_dir.glob(f"*{DELETING_SUFFIX}") if p not in doomed]

    def delete() -> None:
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)

    thread = threading.Thread(target=delete, name="delete-old-checkpoints")
    thread.start()
    _deletions.append(thread)


def finish_deletions() -> None:
    """Wait until the background deletions have removed every old checkpoint."""
    while _deletions:
        _deletions.pop().join()


def load_checkpoint(path: str | os.PathLike, units: list[ModelUnit], restore_rng: bool, trust: bool = False) -> dict:
    """Load a training checkpoint saved at any layout into the units and their optimizers; returns the loop's
    saved state. RNG states are restored only when `restore_rng` (one file per rank, same layout). `trust`
    lifts the unpickling allowlist."""
    path = Path(path)
    requested = units_state(units, loading=True)
    # Only a mixture-of-experts model's optimizers are grouped differently at another layout (EP = 1 against EP > 1):
    # the checkpoint's key list is read for those alone, sparing every other resume a second metadata read.
    moe = [unit for unit in units if unit.optimizer is not None
           and getattr(getattr(unit.modules[0], "config", None), "num_moe_experts", None)]
    stored = set(tensor_metadata(path, trust)) if moe else set()
    regrouped = {unit.namespace for unit in moe if _match_regrouped_keys(
        (requested[unit.namespace] if unit.namespace else requested)[ckdir.OPTIMIZER_KEY], stored)}
    loaded, _, absent = dist_checkpointing.load(requested, str(path), strict=StrictHandling.RETURN_UNEXPECTED,
                                                **safety.load_strategies(trust))
    absent = sorted(key for key in absent if not key.endswith("_extra_state"))  # see _load_into
    if absent:
        raise CheckpointError(f"{path} has no {absent[0]} ({len(absent)} tensor(s) of this run missing): it holds "
                              "another kind or size of model; check training.load and the model.* sizes")
    for unit in units:
        unit_loaded = loaded[unit.namespace] if unit.namespace else loaded
        _load_into(unit.modules, unit_loaded, unit.namespace, str(path), trust, getattr(unit, "adapters", False))
        if unit.namespace in regrouped:
            _load_regrouped_optimizer(unit.optimizer, unit_loaded[ckdir.OPTIMIZER_KEY])
        elif unit.optimizer is not None:
            _load_optimizer(unit.optimizer, unit_loaded[ckdir.OPTIMIZER_KEY])
    if restore_rng:
        rng = _read_rng_state(path, trust)
        if rng is not None:
            _set_rng_state(rng)
    return saved_train_state(path, trust)


def saved_train_state(path: str | os.PathLike, trust: bool = False) -> dict:
    """The loop state stored in a training checkpoint (step, consumed samples, layout, config, W&B run id),
    read without loading any tensor."""
    path = Path(path)
    file = path / ckdir.TRAIN_STATE_FILE
    if file.is_file():
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{file} is not valid JSON ({exc}); the checkpoint is damaged") from exc
    # Checkpoints written before train_state.json kept the loop's state in megatron-core's common state.
    common = safety.read_common_state(path, trust)
    if ckdir.TRAIN_STATE_KEY not in common:
        raise CheckpointError(
            f"{path} holds model weights only (no train_state); use training.init_from to start from it"
        )
    return dict(common[ckdir.TRAIN_STATE_KEY])
