"""Checkpoints move between the local layer spec and the Transformer Engine spec in both directions.

Without Transformer Engine the TE spec cannot be built here; what can be checked is checked: the local spec
stores its norms under the names megatron-core gives them for TE's fused layers, and a model whose modules
carry TE's kind of ``_extra_state`` (the final norm, as TENorm does) resumes from, and is resumed by, a model
without it (training checkpoints with their optimizer, and weights alone). The TE spec itself is exercised by
tests/test_model_reference.py on a GPU with Transformer Engine, and tools/gpu_checks.py.
"""

from __future__ import annotations

import pytest
import torch

from megatron_qwen.config import load_config

pytestmark = pytest.mark.usefixtures("single_rank")


def test_local_spec_stores_norms_under_transformer_engines_names():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.model.spec import qwen_layer_spec
    from megatron_qwen.platform.runtime import Runtime

    # megatron-core's own local GPT spec maps its norms onto TELayerNormColumnParallelLinear's parameters.
    reference = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    assert qwen_layer_spec(False).submodules.sharded_state_dict_keys_map == reference
    (model,) = build_model(load_config("configs/tiny.yaml", ["model.padded_vocab_size=1024"]), Runtime.cpu())
    keys = {item.key for item in model.sharded_state_dict().values() if hasattr(item, "key")}
    # TE's fused QKV (TELayerNormColumnParallelLinear) and fc1 hold weight, bias and layer_norm_weight; the
    # row-parallel linears (TERowParallelLinear) a weight; each of the four an _extra_state, which
    # megatron-core's local linears also store (empty). The final TENorm holds a weight and an _extra_state,
    # the local spec's RMSNorm a weight only: the one key the specs do not share.
    linears = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
    assert {k for k in keys if k.startswith("decoder.")} == {
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.self_attention.linear_qkv.weight",
        "decoder.layers.self_attention.linear_qkv.bias", "decoder.layers.self_attention.linear_proj.weight",
        "decoder.layers.mlp.linear_fc1.layer_norm_weight", "decoder.layers.mlp.linear_fc1.weight",
        "decoder.layers.mlp.linear_fc2.weight", "decoder.final_layernorm.weight",
        *(f"decoder.layers.{linear}._extra_state" for linear in linears),
    }


EXTRA_STATE = torch.tensor([3.0])  # what the source's final norm stores; TE keeps FP8 scaling metadata there


def _unit(extra_state: bool, seed: int = 1234):
    """A trained model unit (one optimizer step) built from training.seed=`seed`, on tokens drawn from `seed`;
    with `extra_state` its final norm carries an _extra_state as Transformer Engine's norms and linears do.
    A load check builds its target at another seed: two builds at one seed hold the same weights already."""
    from megatron_qwen.model.norm import QwenRMSNorm
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.training.forward_backward import forward_backward
    from megatron_qwen.training.units import build_unit

    class NormWithExtraState(QwenRMSNorm):
        def get_extra_state(self):
            return EXTRA_STATE.clone()

        def set_extra_state(self, state):
            self.loaded_extra_state = state

    cfg = load_config("configs/tiny.yaml", ["model.padded_vocab_size=1024", "model.num_layers=2", "model.seq_length=16",
                                            "training.global_batch_size=2", "training.micro_batch_size=1",
                                            f"training.seed={seed}"])
    unit = build_unit(cfg, Runtime.cpu(), "model")
    if extra_state:
        unit.modules[0].decoder.final_layernorm.__class__ = NormWithExtraState
    tokens = torch.randint(0, 1024, (2, 1, 17), generator=torch.Generator().manual_seed(seed))
    unit.zero_grad()
    forward_backward(unit.chunks,
                     iter([{"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(1, 16)} for t in tokens]),
                     2, 16, 1)
    assert unit.step()[1]
    return unit


def _assert_same_weights(source, target, loaded: bool = True):
    pairs = list(zip(source.modules[0].named_parameters(), target.modules[0].parameters(), strict=True))
    assert pairs
    if loaded:
        for (name, a), b in pairs:
            assert torch.equal(a, b), name
    else:  # the target before its load: every tensor differs, so the equalities above prove the load
        for (name, a), b in pairs:
            assert not torch.equal(a, b), name


def _optimizer_states(unit) -> list[dict]:
    (opt,) = unit.optimizer.chained_optimizers
    return [opt.optimizer.state[p] for group in opt.optimizer.param_groups for p in group["params"]]


@pytest.mark.parametrize("saved_with, loaded_by", [(False, True), (True, False), (True, True)],
                         ids=["local-to-te", "te-to-local", "te-to-te"])
def test_checkpoints_load_with_and_without_extra_state(tmp_path, saved_with, loaded_by):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from megatron_qwen.checkpoint import io as checkpointing

    source = _unit(saved_with)
    checkpointing.save_checkpoint(tmp_path, 1, [source], {"step": 1}, keep_last=1)
    path = tmp_path / "iter_0000001"
    stored = load_sharded_metadata(str(path))
    assert any(key.startswith("decoder.final_layernorm._extra_state") for key in stored) == saved_with

    target = _unit(loaded_by, seed=99)
    _assert_same_weights(source, target, loaded=False)
    if not saved_with:  # what resuming did before: the absent _extra_state failed the load
        with pytest.raises(BaseException) as failed:  # torch's CheckpointException is a BaseException
            dist_checkpointing.load(checkpointing.units_state([target], loading=True), str(path))
        assert "final_layernorm._extra_state" in str(getattr(failed.value, "failures", failed.value))
    checkpointing.load_checkpoint(path, [target], restore_rng=False)
    _assert_same_weights(source, target)
    for got, expected in zip(_optimizer_states(target), _optimizer_states(source), strict=True):
        assert all(torch.equal(got[key], expected[key]) for key in ("exp_avg", "exp_avg_sq"))
    norm = target.modules[0].decoder.final_layernorm
    if saved_with and loaded_by:  # the stored extra state reaches the loading norm
        assert torch.equal(norm.loaded_extra_state, EXTRA_STATE)
    elif loaded_by:  # nothing stored: the norm keeps its own
        assert not hasattr(norm, "loaded_extra_state")

    fresh = _unit(loaded_by, seed=7)
    _assert_same_weights(source, fresh, loaded=False)
    assert checkpointing.load_weights(fresh.modules, path, "the checkpoint") == []
    _assert_same_weights(source, fresh)


def test_a_checkpoint_of_another_model_is_refused_by_name(tmp_path):
    from megatron_qwen.errors import CheckpointError
    from megatron_qwen.checkpoint import io as checkpointing

    checkpointing.save_checkpoint(tmp_path, 1, [_unit(False)], {"step": 1}, keep_last=1)
    target = _unit(False)
    target.modules[0].decoder.final_layernorm.register_parameter("bias", torch.nn.Parameter(torch.zeros(256)))
    with pytest.raises(CheckpointError, match="has no decoder.final_layernorm.bias"):
        checkpointing.load_checkpoint(tmp_path / "iter_0000001", [target], restore_rng=False)
