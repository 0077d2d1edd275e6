"""Loading a checkpoint never runs code from it.

A real checkpoint (the committed 2-step tiny-model checkpoint of tests/fixtures/legacy_checkpoint) is copied
and a pickle planted in one place of it: the DCP metadata, a DCP byte item (an ``_extra_state`` object),
a rank's RNG file, megatron-core's ``common.pt``. Unpickling the plant would create a canary directory.
Every loader (resume, ``training.init_from``, the conversion reader, the forward tool) must refuse it with
a message naming the file, the type and ``training.trust_checkpoint=true``, and the canary must stay
absent; the same load with trust does create it, which shows the plant is live. A trusted run loads a
checkpoint holding a type outside the allowlist; a checkpoint written now holds no pickled object at all.
The upstream sites the loaders work around are checked to still read as listed, and to still run a plant.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import json
import os
import pathlib
import pickle
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spawn import REPO, cpu_env, free_port

FIXTURE = REPO / "tests" / "fixtures" / "legacy_checkpoint"
LEGACY = FIXTURE / "checkpoints" / "iter_0000002"
TINY = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.ffn_hidden_size=64",
    "model.padded_vocab_size=128", "model.seq_length=16", "training.micro_batch_size=2", "training.global_batch_size=4",
    "training.lr=1e-2", "training.min_lr=1e-3", "training.lr_warmup_iters=1", "training.lr_decay_iters=4",
    "data.split=100,0,0", "logging.log_interval=1",
]
PLANTED = f"{os.mkdir.__module__}.mkdir"  # what the canary's pickle names: posix.mkdir on Linux


class Canary:
    """Unpickling this creates the directory `path` (and nothing else)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def copy_checkpoint(tmp_path: Path, name: str = "ckpt") -> Path:
    return Path(shutil.copytree(LEGACY, tmp_path / name))


def _metadata(ckpt: Path):
    with open(ckpt / ".metadata", "rb") as f:
        return pickle.load(f)  # the committed fixture's own metadata: trusted


def plant_metadata(ckpt: Path, payload) -> None:
    """The DCP metadata, real in every field, with `payload` pickled into one of them."""
    metadata = _metadata(ckpt)
    metadata.planner_data = payload
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))


def plant_object(ckpt: Path, payload) -> str:
    """Point the first ``_extra_state`` byte item at a new data file holding ``torch.save([payload])``, as
    megatron-core stores a ShardedObject; returns the item's key. The metadata stays genuine."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    metadata = _metadata(ckpt)
    index = next(i for i in metadata.storage_data if "_extra_state" in i.fqn)
    buffer = io.BytesIO()
    torch.save([payload], buffer)
    (ckpt / "__planted.distcp").write_bytes(buffer.getvalue())
    metadata.storage_data[index] = _StorageInfo("__planted.distcp", 0, len(buffer.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    return index.fqn


def plant_rng(ckpt: Path, payload) -> Path:
    file = ckpt / "rng" / "rank00000.pt"
    torch.save({"python": payload}, file)
    return file


def plant_common(ckpt: Path, payload) -> Path:
    file = ckpt / "common.pt"
    common = torch.load(file, weights_only=True)
    common["train_state"]["note"] = payload
    torch.save(common, file)
    return file


def assert_refused(exc_info, *where: str, names: str = PLANTED) -> None:
    message = str(exc_info.value)
    for part in (*where, names, "training.trust_checkpoint=true", "--trust-checkpoint"):
        assert part in message, (part, message)


@pytest.fixture(scope="module")
def tiny_cfg():
    from megatron_qwen.config import load_config, resolve

    cfg, _, _ = resolve(load_config("configs/tiny.yaml", TINY), 1)
    return cfg


def tiny_unit(cfg):
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.training.units import build_unit

    return build_unit(cfg, Runtime.cpu(), "pretrain")


# --------------------------------------------------------------------------- every place, every loader


@pytest.mark.usefixtures("single_rank")
def test_planted_metadata_is_refused_by_every_reader(tmp_path, tiny_cfg):
    from megatron_qwen.checkpoint.safety import UnsafeCheckpointError
    from megatron_qwen.checkpoint.dcp_io import read_chunks, tensor_metadata
    from megatron_qwen.convert.to_hf import mcore_to_hf
    from megatron_qwen.inference.forward import prepare
    from megatron_qwen.checkpoint import io as checkpointing

    ckpt, canary = copy_checkpoint(tmp_path), tmp_path / "canary"
    plant_metadata(ckpt, Canary(canary))
    unit = tiny_unit(tiny_cfg)
    loaders = {
        "resume": lambda: checkpointing.load_checkpoint(ckpt, [unit], restore_rng=True),
        "init_from": lambda: checkpointing.load_weights(unit.modules, ckpt, "training.init_from"),
        "tensor_metadata": lambda: tensor_metadata(ckpt),
        "read_chunks": lambda: read_chunks(ckpt,
                                           {"embedding.word_embeddings.weight": ((0, 0), (1, 32), torch.float32)}),
        "read_full_state_dict": lambda: checkpointing.read_full_state_dict(ckpt),
        "mcore_to_hf": lambda: mcore_to_hf(ckpt, tmp_path / "hf"),
        "forward prepare": lambda: prepare(ckpt, 1),
    }
    for name, load in loaders.items():
        with pytest.raises(UnsafeCheckpointError) as exc_info:
            load()
        assert_refused(exc_info, str(ckpt / ".metadata"))
        assert not canary.exists(), name
    assert not (tmp_path / "hf").exists()
    # The plant is live: torch's own reader, as trust uses it, runs it.
    tensor_metadata(ckpt, trust=True)
    assert canary.is_dir()


@pytest.mark.usefixtures("single_rank")
def test_planted_object_rng_and_common_state_are_refused(tmp_path, tiny_cfg):
    from megatron_qwen.checkpoint.safety import UnsafeCheckpointError
    from megatron_qwen.checkpoint import io as checkpointing

    unit = tiny_unit(tiny_cfg)
    # A DCP byte item: read when resuming (starting from the weights reads tensors only).
    ckpt, canary = copy_checkpoint(tmp_path, "object"), tmp_path / "canary-object"
    key = plant_object(ckpt, Canary(canary))
    with pytest.raises(UnsafeCheckpointError) as exc_info:
        checkpointing.load_checkpoint(ckpt, [unit], restore_rng=False)
    assert_refused(exc_info, str(ckpt / "__planted.distcp"), key)
    checkpointing.load_weights(unit.modules, ckpt, "training.init_from")
    assert not canary.exists()
    checkpointing.load_checkpoint(ckpt, [unit], restore_rng=False, trust=True)
    assert canary.is_dir()
    # Any type outside the allowlist is refused by name, harmless or not (trusted runs load it: see below).
    ckpt = copy_checkpoint(tmp_path, "custom")
    plant_object(ckpt, pathlib.PurePosixPath("/a/custom/type"))
    with pytest.raises(UnsafeCheckpointError) as exc_info:
        checkpointing.load_checkpoint(ckpt, [unit], restore_rng=False)
    assert_refused(exc_info, str(ckpt / "__planted.distcp"), names="pathlib.PurePosixPath")

    # This rank's RNG file: read when resuming at the layout that wrote it.
    ckpt, canary = copy_checkpoint(tmp_path, "rng"), tmp_path / "canary-rng"
    rng_file = plant_rng(ckpt, Canary(canary))
    with pytest.raises(UnsafeCheckpointError) as exc_info:
        checkpointing.load_checkpoint(ckpt, [unit], restore_rng=True)
    assert_refused(exc_info, str(rng_file))
    assert not canary.exists()
    with pytest.raises(KeyError):  # what the unrestricted read did: ran the plant, then failed
        checkpointing.load_checkpoint(ckpt, [unit], restore_rng=True, trust=True)
    assert canary.is_dir()

    # megatron-core's common state (which older checkpoints keep the loop's state in).
    ckpt, canary = copy_checkpoint(tmp_path, "common"), tmp_path / "canary-common"
    common_file = plant_common(ckpt, Canary(canary))
    for load in (lambda: checkpointing.saved_train_state(ckpt),
                 lambda: checkpointing.load_checkpoint(ckpt, [unit], restore_rng=False)):
        with pytest.raises(UnsafeCheckpointError) as exc_info:
            load()
        assert_refused(exc_info, str(common_file))
        assert not canary.exists()
    assert checkpointing.saved_train_state(ckpt, trust=True)["step"] == 2
    assert canary.is_dir()


@pytest.mark.usefixtures("single_rank")
def test_extra_state_bytes_are_screened_before_transformer_engine_unpickles_them(tmp_path):
    from megatron_qwen.checkpoint.safety import UnsafeCheckpointError, screen_extra_states

    def as_bytes(obj) -> torch.Tensor:  # Transformer Engine's format: a uint8 tensor of pickle bytes
        return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)

    fp8_state = {"scale_fwd": torch.tensor([1.5, 2.0]), "amax_history_fwd": torch.zeros(4, 3),
                 "extra_fp8_variables": {"num_gemms": 3, "fp8_max_fwd": 448.0, "name": "fc1"}}
    state = {"linear_fc1._extra_state": as_bytes(fp8_state),
             "linear_fc2._extra_state": torch.empty(0, dtype=torch.uint8),
             "linear_proj._extra_state": None, "weight": torch.ones(2)}
    screen_extra_states(state, "CKPT")
    screened = pickle.loads(state["linear_fc1._extra_state"].numpy().tobytes())
    for key in ("scale_fwd", "amax_history_fwd"):
        assert torch.equal(screened[key], fp8_state[key])
    assert screened["extra_fp8_variables"] == fp8_state["extra_fp8_variables"]
    assert state["linear_fc2._extra_state"].numel() == 0 and state["linear_proj._extra_state"] is None

    canary = tmp_path / "canary"
    planted = {"decoder": {"linear_fc1._extra_state": as_bytes({"recipe": Canary(canary)})}}
    with pytest.raises(UnsafeCheckpointError) as exc_info:
        screen_extra_states(planted, "CKPT")
    assert_refused(exc_info, "CKPT (linear_fc1._extra_state)")
    assert not canary.exists()
    screen_extra_states(planted, "CKPT", trust=True)  # left for Transformer Engine to unpickle as it likes
    pickle.loads(planted["decoder"]["linear_fc1._extra_state"].numpy().tobytes())
    assert canary.is_dir()


# Transformer Engine's recipe classes under their own class paths, for writing pickles as TE writes them (a
# dataclass instance pickles as its class and its fields, an Enum member as its class and value): pydantic
# dataclasses there, plain ones here, which pickle alike. Only ever in sys.modules while a pickle is written.
TE_RECIPE_SOURCE = """
import dataclasses, enum, typing

class _FormatHelper(typing.NamedTuple):
    max_fwd: float
    max_bwd: float

class Format(enum.Enum):
    E4M3 = _FormatHelper(max_fwd=448, max_bwd=448)
    E5M2 = _FormatHelper(max_fwd=57344, max_bwd=57344)
    HYBRID = _FormatHelper(max_fwd=448, max_bwd=57344)

@dataclasses.dataclass(frozen=True)
class MMParams:
    use_split_accumulator: bool = True

@dataclasses.dataclass(frozen=True)
class QParams:
    power_2_scale: bool = False
    amax_epsilon: float = 0.0

class Recipe:
    pass

@dataclasses.dataclass
class DelayedScaling(Recipe):
    margin: int = 0
    fp8_format: Format = Format.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: typing.Any = "max"
    scaling_factor_compute_algo: typing.Any = None
    reduce_amax: bool = True
    fp8_dpa: bool = False
    fp8_mha: bool = False
    backward_override: typing.Any = None

@dataclasses.dataclass
class Float8CurrentScaling(Recipe):
    fp8_format: Format = Format.HYBRID
    fp8_quant_fwd_inp: QParams = QParams()
    fp8_quant_fwd_weight: QParams = QParams()
    fp8_quant_bwd_grad: QParams = QParams()
    fp8_gemm_fprop: MMParams = MMParams(use_split_accumulator=False)
    fp8_gemm_dgrad: MMParams = MMParams()
    fp8_gemm_wgrad: MMParams = MMParams()
    fp8_dpa: bool = False
    fp8_mha: bool = False

@dataclasses.dataclass
class CustomRecipe(Recipe):
    qfactory: typing.Any = None
    fp8_format: Format = Format.HYBRID
"""


@pytest.fixture
def te_class_paths(monkeypatch):
    """A context manager: inside it, TE's recipe module and megatron-core's TEDelayedScaling are importable
    under their real paths (stand-ins), as where Transformer Engine is installed."""
    import contextlib
    import types

    from megatron.core.extensions import transformer_engine as mcore_te

    recipe = types.ModuleType("transformer_engine.common.recipe")
    with monkeypatch.context() as m:  # dataclasses look their module up while they are made
        m.setitem(sys.modules, recipe.__name__, recipe)
        exec(compile(TE_RECIPE_SOURCE, "recipe", "exec"), recipe.__dict__)

    class TEDelayedScaling(recipe.DelayedScaling):  # megatron-core's: a DelayedScaling from a TransformerConfig
        pass

    TEDelayedScaling.__module__, TEDelayedScaling.__qualname__ = mcore_te.__name__, "TEDelayedScaling"
    recipe.TEDelayedScaling = TEDelayedScaling

    @contextlib.contextmanager
    def installed():
        with monkeypatch.context() as m:
            for name in ("transformer_engine", "transformer_engine.common"):
                m.setitem(sys.modules, name, types.ModuleType(name))
            m.setitem(sys.modules, recipe.__name__, recipe)
            m.setattr(mcore_te, "TEDelayedScaling", TEDelayedScaling)
            yield

    return recipe, installed


def _te_extra_state(recipe_object) -> dict:
    """What TE 2.x's get_extra_state pickles for a layer (delayed scaling adds its scales and amax histories)."""
    state = {"recipe": recipe_object, "extra_fp8_variables": {"num_gemms": 1, "fp8_max_fwd": 448.0,
                                                              "fp8_max_bwd": 57344.0, "fp8_checkpoint": True}}
    if type(recipe_object).__name__.endswith("DelayedScaling"):
        state.update(scale_fwd=torch.tensor([1.5, 2.0, 4.0]), amax_history_fwd=torch.rand(1024, 3),
                     scale_bwd=torch.tensor([0.5, 8.0]), amax_history_bwd=torch.rand(1024, 2))
    return state


def test_transformer_engine_recipes_pass_the_screen(te_class_paths):
    """model.fp8=delayed (megatron-core's TEDelayedScaling) and tensorwise (TE's Float8CurrentScaling) resume:
    their extra state passes with Transformer Engine importable (then pickled afresh) and without it (kept)."""
    from megatron_qwen.checkpoint.safety import screen_extra_states

    recipe, installed = te_class_paths
    hybrid = recipe.Format.HYBRID
    objects = {
        "delayed": recipe.TEDelayedScaling(fp8_format=hybrid, amax_history_len=1024, amax_compute_algo="max"),
        "tensorwise": recipe.Float8CurrentScaling(fp8_format=hybrid, fp8_quant_fwd_inp=recipe.QParams(True, 0.0)),
        "te_delayed": recipe.DelayedScaling(fp8_format=recipe.Format.E4M3, amax_compute_algo="most_recent"),
    }
    for name, obj in objects.items():
        with installed():
            written = pickle.dumps(_te_extra_state(obj))
        assert b"transformer_engine" in written
        # No Transformer Engine here: admitted by name, left as written.
        state = {"linear_fc1._extra_state": torch.frombuffer(bytearray(written), dtype=torch.uint8)}
        screen_extra_states(state, "CKPT")
        assert state["linear_fc1._extra_state"].numpy().tobytes() == written, name
        # Transformer Engine importable: unpickled into its classes and pickled afresh, the same state.
        with installed():
            state = {"linear_fc1._extra_state": torch.frombuffer(bytearray(written), dtype=torch.uint8)}
            screen_extra_states(state, "CKPT")
            screened = pickle.loads(state["linear_fc1._extra_state"].numpy().tobytes())
            original = pickle.loads(written)
        assert type(screened["recipe"]) is type(obj) and screened["recipe"] == obj, name
        assert screened["extra_fp8_variables"] == original["extra_fp8_variables"]
        for key in ("scale_fwd", "amax_history_fwd", "scale_bwd", "amax_history_bwd"):
            assert (key in original) == (name != "tensorwise"), (name, key)
            assert key not in original or torch.equal(screened[key], original[key]), (name, key)


def test_transformer_engine_recipes_carry_no_code(tmp_path, te_class_paths):
    """The allowlist stays one: a recipe holding a callable (a custom amax algorithm, TE's CustomRecipe and its
    factory) or a class of TE's recipe module that no recipe pickles is refused, with TE importable or not."""
    from megatron_qwen.checkpoint.safety import UnsafeCheckpointError, screen_extra_states

    recipe, installed = te_class_paths
    canary = tmp_path / "canary"
    plants = {
        f"{PLANTED}": recipe.TEDelayedScaling(amax_compute_algo=Canary(canary)),
        "transformer_engine.common.recipe.CustomRecipe": recipe.CustomRecipe(qfactory=None),
        "transformer_engine.common.recipe.Recipe": recipe.Recipe(),
    }
    for names, obj in plants.items():
        with installed():
            written = pickle.dumps(_te_extra_state(obj))
        for present in (False, True):
            state = {"linear_qkv._extra_state": torch.frombuffer(bytearray(written), dtype=torch.uint8)}
            with installed() if present else contextlib.nullcontext():
                with pytest.raises(UnsafeCheckpointError) as exc_info:
                    screen_extra_states(state, "CKPT")
            assert_refused(exc_info, "CKPT (linear_qkv._extra_state)", names=names)
    assert not canary.exists()


def _source_of(site) -> str:
    """The source of `site.qualname` in `site.module`, read from its file without importing it (megatron-core
    defines the TE sites only where Transformer Engine imports)."""
    import ast
    import importlib.util

    path = importlib.util.find_spec(site.module).origin
    source = Path(path).read_text()
    node = ast.parse(source)
    for part in site.qualname.split("."):
        node = next(n for n in ast.walk(node) if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == part)
    return ast.get_source_segment(source, node)


def test_megatron_core_builds_the_recipes_listed():
    from megatron_qwen.checkpoint.safety import TE_RECIPE_SITES

    for site in TE_RECIPE_SITES:
        if site.module.startswith("megatron."):
            assert site.snippet in _source_of(site), site


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                    reason="Transformer Engine is not installed")
def test_transformer_engine_pickles_the_recipe_as_listed():
    import transformer_engine.common.recipe as te_recipe

    from megatron_qwen.checkpoint.safety import TE_RECIPE_SITES, TE_RECIPE_TYPES

    for site in TE_RECIPE_SITES:
        assert site.snippet in _source_of(site), site
    # Every recipe class TE has is admitted, or holds code (CustomRecipe's factory).
    recipes = {name for name, value in vars(te_recipe).items()
               if isinstance(value, type) and issubclass(value, te_recipe.Recipe) and value is not te_recipe.Recipe}
    assert recipes - set(TE_RECIPE_TYPES["transformer_engine.common.recipe"]) <= {"CustomRecipe"}


def _te_fp8_available() -> bool:
    try:
        import transformer_engine.pytorch as te  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not _te_fp8_available(),
                    reason="Transformer Engine's FP8 state needs transformer_engine and an FP8 GPU")
def test_transformer_engine_fp8_extra_state_passes_the_screen():
    import transformer_engine.pytorch as te

    from megatron_qwen.checkpoint.safety import screen_extra_states

    layer = te.Linear(32, 32, params_dtype=torch.bfloat16).cuda()
    with te.fp8_autocast(enabled=True):
        layer(torch.randn(16, 32, device="cuda", dtype=torch.bfloat16))
    state = layer.state_dict()
    screen_extra_states(state, "te")
    fresh = te.Linear(32, 32, params_dtype=torch.bfloat16).cuda()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.fp8_meta["scaling_fwd"].scale, layer.fp8_meta["scaling_fwd"].scale)


# --------------------------------------------------------------------------- what the current code writes


@pytest.mark.usefixtures("single_rank")
def test_new_checkpoints_hold_no_pickled_objects_and_resume_exactly(tmp_path, tiny_cfg):
    from megatron_qwen.checkpoint.safety import dcp_metadata_type, unpickle_allowlisted
    from megatron_qwen.checkpoint import io as checkpointing

    unit = tiny_unit(tiny_cfg)
    unit.set_lr(0)
    unit.zero_grad()
    unit.step()  # Adam's state exists after a first step
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = checkpointing.save_checkpoint(tmp_path, 5, [unit], {"consumed_samples": 20, "layout": {"tp": 1}},
                                         keep_last=1)
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    # RNG states and common state read with torch's own allowlist alone; the loop's state is JSON.
    rng = torch.load(path / "rng" / "rank00000.pt", weights_only=True)
    assert isinstance(rng["python"]["key"], torch.Tensor) and isinstance(rng["numpy"]["key"], torch.Tensor)
    assert "train_state" not in torch.load(path / "common.pt", weights_only=True)
    assert json.loads((path / "train_state.json").read_text()) == {"consumed_samples": 20, "layout": {"tp": 1},
                                                                   "step": 5}
    assert unpickle_allowlisted((path / ".metadata").read_bytes(), dcp_metadata_type, "metadata").state_dict_metadata
    before = {k: v.clone() for k, v in unit.modules[0].state_dict().items() if isinstance(v, torch.Tensor)}

    for chunk in unit.modules:
        for param in chunk.parameters():
            param.data.add_(1.0)
    random.random(), np.random.rand(), torch.rand(1)
    saved = checkpointing.load_checkpoint(path, [unit], restore_rng=True)
    assert saved == {"consumed_samples": 20, "layout": {"tp": 1}, "step": 5}
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws
    after = unit.modules[0].state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# --------------------------------------------------------------------------- the upstream reads worked around


def test_upstream_sites_still_read_as_listed():
    import importlib

    from megatron_qwen.checkpoint.safety import MEGATRON_SITES, UNRESTRICTED_SITES

    for site in MEGATRON_SITES + UNRESTRICTED_SITES:
        owner = importlib.import_module(site.module)
        for part in site.qualname.split("."):
            owner = getattr(owner, part)
        assert site.snippet in inspect.getsource(owner), site


def test_upstream_reads_still_run_planted_pickles(tmp_path, monkeypatch):
    """Each workaround is still needed: torch's and megatron-core's own readers unpickle without restriction."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    ckpt = copy_checkpoint(tmp_path)
    plant_metadata(ckpt, Canary(tmp_path / "metadata"))
    FileSystemReader(str(ckpt)).read_metadata()
    assert (tmp_path / "metadata").is_dir()

    planner = DefaultLoadPlanner(flatten_state_dict=False)
    planner.state_dict = {}
    buffer = io.BytesIO()
    torch.save([Canary(tmp_path / "object")], buffer)
    buffer.seek(0)
    index = MetadataIndex("x")
    planner.load_bytes(ReadItem(LoadItemType.BYTE_IO, index, torch.Size([0]), index, torch.Size([0]), torch.Size([0])),
                       buffer)
    assert (tmp_path / "object").is_dir()

    plant_common(ckpt, Canary(tmp_path / "common"))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default, which megatron-core relies on, off
    TorchCommonLoadStrategy().load_common(ckpt)
    assert (tmp_path / "common").is_dir()


@pytest.mark.usefixtures("single_rank")
def test_megatron_core_names_are_restored_after_every_load(tmp_path, tiny_cfg):
    from megatron.core.dist_checkpointing.strategies import torch as strategy

    from megatron_qwen.checkpoint.safety import UnsafeCheckpointError
    from megatron_qwen.checkpoint import io as checkpointing

    own = strategy._get_filesystem_reader, strategy.MCoreLoadPlanner
    unit = tiny_unit(tiny_cfg)
    checkpointing.load_checkpoint(LEGACY, [unit], restore_rng=False)
    assert (strategy._get_filesystem_reader, strategy.MCoreLoadPlanner) == own
    ckpt = copy_checkpoint(tmp_path)
    plant_object(ckpt, Canary(tmp_path / "canary"))
    with pytest.raises(UnsafeCheckpointError):
        checkpointing.load_checkpoint(ckpt, [unit], restore_rng=False)
    assert (strategy._get_filesystem_reader, strategy.MCoreLoadPlanner) == own


# --------------------------------------------------------------------------- the command lines


def test_forward_tool_refuses_planted_metadata(tmp_path, capsys):
    from megatron_qwen.cli import forward as forward_tool

    ckpt, canary = copy_checkpoint(tmp_path), tmp_path / "canary"
    plant_metadata(ckpt, Canary(canary))
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.arange(8, dtype=np.int64).reshape(1, 8))
    status = forward_tool.main(["--ckpt", str(ckpt), "--tokens", str(tokens), "--out", str(tmp_path / "logits.npy")])
    err = capsys.readouterr().err
    assert status == 2
    assert f"error: {ckpt / '.metadata'}: refused to unpickle {PLANTED}" in err and "--trust-checkpoint" in err, err
    assert not canary.exists() and not (tmp_path / "logits.npy").exists()


def _run(argv: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    """A job on `nproc` gloo ranks: one rank as a plain process (the launcher adds nothing it needs), more with
    torchrun."""
    port = str(free_port())
    env = cpu_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                "--master-port", port] if nproc > 1 else []
    return subprocess.run([sys.executable, *launcher, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def _stage(tmp_path: Path, *extra: str) -> list[str]:
    return ["-m", "megatron_qwen.stages.pretrain", "configs/tiny.yaml", *TINY,
            f"data.paths=[{FIXTURE / 'data_text_document'}]",
            f"logging.run_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", *extra]


@pytest.mark.parallel
def test_stages_refuse_plants_on_any_rank_and_trust_on_request(tmp_path):
    # training.init_from with planted metadata: refused with the message, exit status 2, nothing run.
    planted, canary = copy_checkpoint(tmp_path, "planted"), tmp_path / "canary"
    plant_metadata(planted, Canary(canary))
    run = _run(_stage(tmp_path / "init", "training.train_iters=1", f"training.init_from={planted}"))
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"error: {planted / '.metadata'}: refused to unpickle {PLANTED}" in run.stderr, run.stderr
    assert "training.trust_checkpoint=true" in run.stderr and not canary.exists()

    # Resuming on 2 ranks at the layout that wrote the checkpoint, rank 1's RNG file planted: every rank
    # stops (none waits on the others), rank 0 reports rank 1's refusal.
    checkpoints = tmp_path / "dp2"
    ckpt = Path(shutil.copytree(LEGACY, checkpoints / LEGACY.name))
    (checkpoints / "latest").write_text(LEGACY.name + "\n")
    common = torch.load(ckpt / "common.pt", weights_only=True)
    common["train_state"]["layout"].update(world_size=2, dp=2)
    torch.save(common, ckpt / "common.pt")
    shutil.copy(ckpt / "rng" / "rank00000.pt", ckpt / "rng" / "rank00001.pt")
    torch.save({"python": Canary(canary)}, ckpt / "rng" / "rank00001.pt")
    both = _run(_stage(tmp_path / "dp2-run", "training.train_iters=3", f"training.save={checkpoints}"), nproc=2)
    assert both.returncode != 0 and re.search(r"exitcode\s*:\s*2\b", both.stderr), both.stdout + both.stderr
    assert (f"error: rank 1 could not read its RNG state: UnsafeCheckpointError: {ckpt / 'rng' / 'rank00001.pt'}"
            in both.stderr)
    assert PLANTED in both.stderr and not canary.exists()

    # A checkpoint holding a type outside the allowlist resumes when trusted, with a warning.
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(LEGACY.parent, checkpoints)
    plant_object(checkpoints / LEGACY.name, pathlib.PurePosixPath("/a/custom/type"))
    trusted = _run(_stage(tmp_path / "trusted", "training.train_iters=3", f"training.save={checkpoints}",
                          "training.trust_checkpoint=true"))
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert "warning: training.trust_checkpoint=true" in trusted.stderr
    assert "resumed from" in trusted.stdout and "at step 2" in trusted.stdout
    assert (checkpoints / "latest").read_text().strip() == "iter_0000003"
