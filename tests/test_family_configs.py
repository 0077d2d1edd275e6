"""The family configs (configs/qwen1.5-*, qwen2.5-*, qwen3-*) against the published Hugging Face config.json
of each release, field by field; the size of the network each describes against transformers' own model of
that config.json; and each one's layout against the trainer's validation."""

from __future__ import annotations

import pytest
import torch
from spawn import REPO

from megatron_qwen.config import load_config, main as config_main, resolve
from megatron_qwen.plan.memory import ModelShape

# The published config.json values (huggingface.co/Qwen/<model>/blob/main/config.json; base checkpoints for
# Qwen1.5/2.5, the released post-trained ones for Qwen3, whose -Base configs differ only in
# max_position_embeddings 32768), copied literally. Every key listed is one the published file holds: Qwen2
# configs have no head_dim (transformers uses hidden_size / num_attention_heads) and no attention_bias (its
# Qwen2 attention always has q/k/v bias), see `published_value`.
_QWEN2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "rope_theta": 1000000.0}
_QWEN3 = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_act": "silu", "rope_theta": 1000000,
          "attention_bias": False, "head_dim": 128, "rms_norm_eps": 1e-06, "max_position_embeddings": 40960}
HF_CONFIGS = {
    "qwen1.5-7b": {**_QWEN2, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 151936,
                   "tie_word_embeddings": False, "rms_norm_eps": 1e-06, "max_position_embeddings": 32768},
    "qwen2.5-0.5b": {**_QWEN2, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True, "rms_norm_eps": 1e-06, "max_position_embeddings": 32768},
    "qwen2.5-1.5b": {**_QWEN2, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True, "rms_norm_eps": 1e-06, "max_position_embeddings": 131072},
    "qwen2.5-3b": {**_QWEN2, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                   "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                   "tie_word_embeddings": True, "rms_norm_eps": 1e-06, "max_position_embeddings": 32768},
    "qwen2.5-7b": {**_QWEN2, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "tie_word_embeddings": False, "rms_norm_eps": 1e-06, "max_position_embeddings": 131072},
    "qwen2.5-14b": {**_QWEN2, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48,
                    "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
                    "tie_word_embeddings": False, "rms_norm_eps": 1e-05, "max_position_embeddings": 131072},
    "qwen2.5-32b": {**_QWEN2, "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
                    "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
                    "tie_word_embeddings": False, "rms_norm_eps": 1e-05, "max_position_embeddings": 131072},
    "qwen2.5-72b": {**_QWEN2, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
                    "tie_word_embeddings": False, "rms_norm_eps": 1e-05, "max_position_embeddings": 131072},
    "qwen3-0.6b": {**_QWEN3, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 151936,
                   "tie_word_embeddings": True},
    "qwen3-1.7b": {**_QWEN3, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 151936,
                   "tie_word_embeddings": True},
    "qwen3-4b": {**_QWEN3, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 151936,
                 "tie_word_embeddings": True},
    "qwen3-8b": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 151936,
                 "tie_word_embeddings": False},
    "qwen3-14b": {**_QWEN3, "hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 40,
                  "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 151936,
                  "tie_word_embeddings": False},
    "qwen3-32b": {**_QWEN3, "hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64,
                  "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 151936,
                  "tie_word_embeddings": False},
}
# Totals the model cards publish ("Number of Parameters"), in billions. They are rounded (Qwen2.5-32B's card
# says 32.5B for 32.76B, Qwen3-1.7B 1.7B for 1.72B), so they are a sanity band of 1.5 %, not the check;
# transformers' count is.
PUBLISHED_BILLIONS = {
    "qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09, "qwen2.5-7b": 7.62, "qwen2.5-14b": 14.7,
    "qwen2.5-32b": 32.5, "qwen2.5-72b": 72.7, "qwen3-0.6b": 0.6, "qwen3-1.7b": 1.7, "qwen3-4b": 4.0,
    "qwen3-8b": 8.19, "qwen3-14b": 14.8, "qwen3-32b": 32.8,
}
FAMILY = {"qwen1.5-7b": "qwen1.5"}  # the rest: the name's prefix (qwen2.5, qwen3)

# config.json key -> the ModelConfig value it must equal.
FIELDS = {
    "hidden_size": lambda m: m.hidden_size,
    "intermediate_size": lambda m: m.ffn_hidden_size,  # per-branch SwiGLU width in both
    "num_hidden_layers": lambda m: m.num_layers,
    "num_attention_heads": lambda m: m.num_attention_heads,
    "num_key_value_heads": lambda m: m.kv_heads,
    "head_dim": lambda m: m.head_dim,
    "vocab_size": lambda m: m.padded_vocab_size,
    "tie_word_embeddings": lambda m: m.tie_word_embeddings,
    "rope_theta": lambda m: m.rotary_base,
    "rms_norm_eps": lambda m: m.norm_epsilon,
    "max_position_embeddings": lambda m: m.max_position_embeddings,
    "attention_bias": lambda m: m.qkv_bias,
}


def config_path(name: str):
    return REPO / "configs" / f"{name}.yaml"


def published_value(hf: dict, key: str):
    """A config.json value, or what transformers takes when the published file has no such key."""
    if key in hf:
        return hf[key]
    implicit = {"head_dim": hf["hidden_size"] // hf["num_attention_heads"], "attention_bias": True}
    assert hf["model_type"] == "qwen2" and key in implicit, (hf["model_type"], key)
    return implicit[key]


def test_every_family_config_is_checked():
    names = {path.stem for path in (REPO / "configs").glob("qwen*.yaml") if not path.stem.startswith("qwen-")}
    assert names == set(HF_CONFIGS)


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_config_equals_the_published_config_json(name):
    hf, m = HF_CONFIGS[name], load_config(config_path(name)).model
    mismatches = {key: (published_value(hf, key), get(m)) for key, get in FIELDS.items()
                  if published_value(hf, key) != get(m)}
    assert not mismatches, f"{name}: config.json value vs configs/{name}.yaml: {mismatches}"
    assert m.qk_layernorm == (hf["model_type"] == "qwen3")  # transformers' Qwen3 always has q_norm and k_norm
    # Written only where they differ from the default, so that a reader sees which models need them.
    assert m.num_query_groups == (None if hf["num_key_value_heads"] == hf["num_attention_heads"]
                                  else hf["num_key_value_heads"])
    head_dim = published_value(hf, "head_dim")
    assert m.kv_channels == (None if head_dim * hf["num_attention_heads"] == hf["hidden_size"] else head_dim)
    assert (m.family, m.name) == (FAMILY.get(name, name.split("-")[0]), name)
    assert m.rope_scaling is None and m.seq_length <= m.max_position_embeddings


def transformers_parameter_count(hf: dict) -> int:
    """Parameters of transformers' model for `hf`, built on the meta device (a tied embedding counted once)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    keys = {k: v for k, v in hf.items() if k not in ("model_type", "architectures")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf["model_type"], **keys))
    assert type(model).__name__ == hf["architectures"][0]
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_parameter_count_equals_transformers(name):
    """The planner's count of the network a config describes = transformers' count of the published one."""
    expected = transformers_parameter_count(HF_CONFIGS[name])
    counted = ModelShape.from_config(load_config(config_path(name)).model).num_parameters()
    assert counted == expected, f"{name}: planner {counted:,} vs transformers {expected:,}"
    if name in PUBLISHED_BILLIONS:
        assert counted / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.015), name


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_config_validates_at_its_layout_on_eight_replicas(name):
    """`python -m megatron_qwen.config configs/X.yaml --world-size N` accepts each config's own TP x PP with 8
    data-parallel replicas (TP dividing the key/value heads), and the 4M-token batch splits over them."""
    cfg = load_config(config_path(name))
    world = cfg.parallel.tp * cfg.parallel.pp * 8
    assert config_main([str(config_path(name)), "--world-size", str(world)]) == 0
    resolved, layout, _ = resolve(cfg, world)
    assert layout.dp == 8 and cfg.model.kv_heads % layout.tp == 0
    assert resolved.model.seq_length * resolved.training.global_batch_size == 4096 * 1024
