"""The family configs (configs/qwen1.5-*, qwen2-*, qwen2.5-*, qwen3-*, dense and mixture-of-experts) against the
published Hugging Face config.json of each release, field by field; the size of the network each describes against
transformers' own model of that config.json and the model cards' totals; and each one's layout against the
trainer's validation (and, for the MoE configs, the planner's memory model)."""

from __future__ import annotations

import pytest
import torch
from spawn import REPO

from megatron_qwen.config import load_config, main as config_main, resolve
from megatron_qwen.plan.hardware import find_gpu
from megatron_qwen.plan.memory import ModelShape
from megatron_qwen.plan.search import Layout, Request, base_config, evaluate

# The published config.json values (huggingface.co/Qwen/<model>/blob/main/config.json; base checkpoints for
# Qwen1.5/2.5, the released post-trained ones for Qwen3, whose -Base configs differ only in
# max_position_embeddings 32768), copied literally. Every key listed is one the published file holds: Qwen2
# configs have no head_dim (transformers uses hidden_size / num_attention_heads) and no attention_bias (its
# Qwen2 attention always has q/k/v bias), see `published_value`.
_QWEN2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "rope_theta": 1000000.0}
_QWEN2_MOE = {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], "hidden_act": "silu",
              "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "vocab_size": 151936, "tie_word_embeddings": False,
              "decoder_sparse_step": 1, "norm_topk_prob": False, "router_aux_loss_coef": 0.001}
_QWEN3_MOE = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_act": "silu",
              "rope_theta": 1000000.0, "attention_bias": False, "head_dim": 128, "rms_norm_eps": 1e-06,
              "max_position_embeddings": 40960, "vocab_size": 151936, "tie_word_embeddings": False,
              "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "router_aux_loss_coef": 0.001,
              "num_experts": 128, "num_experts_per_tok": 8}
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
    # The MoE releases. Their max_position_embeddings and intermediate_size (the width of a dense layer, which none
    # of them has) are not in QWEN.md's table: Qwen2-57B-A14B's come from TensorRT-LLM's verbatim copy of its
    # config.json, Qwen3-30B-A3B's and Qwen3-235B-A22B's from published copies (Qwen3MoeConfig tables, slime's
    # and Megatron argument lists of both models); Qwen1.5-MoE-A2.7B's 32768 is the -Chat config.json's, as a
    # stored copy gives it (the base checkpoint's could not be read here).
    "qwen1.5-moe-a2.7b": {**_QWEN2_MOE, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 32768,
                          "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                          "shared_expert_intermediate_size": 5632},
    "qwen2-57b-a14b": {**_QWEN2_MOE, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                       "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 131072,
                       "num_experts": 64, "num_experts_per_tok": 8, "moe_intermediate_size": 2560,
                       "shared_expert_intermediate_size": 20480},
    "qwen3-30b-a3b": {**_QWEN3_MOE, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "moe_intermediate_size": 768},
    "qwen3-235b-a22b": {**_QWEN3_MOE, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 94,
                        "num_attention_heads": 64, "num_key_value_heads": 4, "moe_intermediate_size": 1536},
}
MOE = {name for name, hf in HF_CONFIGS.items() if hf["model_type"].endswith("_moe")}
# Totals the model cards publish ("Number of Parameters"), in billions. They are rounded (Qwen2.5-32B's card
# says 32.5B for 32.76B, Qwen3-1.7B 1.7B for 1.72B), so they are a sanity band of 1.5 %, not the check;
# transformers' count is.
PUBLISHED_BILLIONS = {
    "qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09, "qwen2.5-7b": 7.62, "qwen2.5-14b": 14.7,
    "qwen2.5-32b": 32.5, "qwen2.5-72b": 72.7, "qwen3-0.6b": 0.6, "qwen3-1.7b": 1.7, "qwen3-4b": 4.0,
    "qwen3-8b": 8.19, "qwen3-14b": 14.8, "qwen3-32b": 32.8,
    "qwen1.5-moe-a2.7b": 14.3, "qwen2-57b-a14b": 57, "qwen3-30b-a3b": 30.5, "qwen3-235b-a22b": 235,
}
# Activated parameters per token the MoE model cards publish (the name's A2.7B / A14B, Qwen3's "3.3B activated"),
# rounded to two digits: a band of 2 % (Qwen2-57B-A14B counts 14.25B, Qwen3-30B-A3B 3.35B, embeddings included).
PUBLISHED_ACTIVATED_BILLIONS = {"qwen1.5-moe-a2.7b": 2.7, "qwen2-57b-a14b": 14, "qwen3-30b-a3b": 3.3,
                                "qwen3-235b-a22b": 22}
# The number of H100s each MoE config's layout is planned for (the comment above its parallel section).
MOE_WORLD = {"qwen1.5-moe-a2.7b": 8, "qwen2-57b-a14b": 32, "qwen3-30b-a3b": 16, "qwen3-235b-a22b": 128}
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
    # Mixture of experts (a dense config has none of these keys).
    "num_experts": lambda m: m.num_experts,
    "num_experts_per_tok": lambda m: m.moe_router_topk,
    "moe_intermediate_size": lambda m: m.moe_ffn_hidden_size,
    "shared_expert_intermediate_size": lambda m: m.moe_shared_expert_ffn_hidden_size,
    "norm_topk_prob": lambda m: m.moe_norm_topk_prob,
    "decoder_sparse_step": lambda m: m.moe_decoder_sparse_step,
    "mlp_only_layers": lambda m: m.moe_mlp_only_layers,
    "router_aux_loss_coef": lambda m: m.moe_aux_loss_coeff,
}
MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
            "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef")


def config_path(name: str):
    return REPO / "configs" / f"{name}.yaml"


def published_value(hf: dict, key: str):
    """A config.json value, or what transformers takes when the published file has no such key: a dense model's
    MoE keys are unset (None / the defaults of a model without experts), Qwen2-MoE has no mlp_only_layers key
    (none), Qwen3-MoE no shared expert."""
    if key in hf:
        return hf[key]
    if key in MOE_KEYS and not hf["model_type"].endswith("_moe"):
        return {"num_experts": None, "num_experts_per_tok": 2, "moe_intermediate_size": None, "norm_topk_prob": False,
                "shared_expert_intermediate_size": None, "decoder_sparse_step": 1, "mlp_only_layers": [],
                "router_aux_loss_coef": 0.001}[key]
    implicit = {"head_dim": hf["hidden_size"] // hf["num_attention_heads"], "attention_bias": True,
                "mlp_only_layers": [], "shared_expert_intermediate_size": None}
    allowed = {"qwen2": ("head_dim", "attention_bias"), "qwen2_moe": ("head_dim", "attention_bias", "mlp_only_layers"),
               "qwen3_moe": ("shared_expert_intermediate_size",)}
    assert key in allowed.get(hf["model_type"], ()), (hf["model_type"], key)
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
    # transformers' Qwen3 and Qwen3-MoE always have q_norm and k_norm; Qwen2-MoE's shared expert always its gate.
    assert m.qk_layernorm == hf["model_type"].startswith("qwen3")
    assert m.moe_shared_expert_gate == (hf["model_type"] == "qwen2_moe")
    assert m.is_moe == (name in MOE) and all(m.moe_layers) == m.is_moe
    # Written only where they differ from the default, so that a reader sees which models need them.
    assert m.num_query_groups == (None if hf["num_key_value_heads"] == hf["num_attention_heads"]
                                  else hf["num_key_value_heads"])
    head_dim = published_value(hf, "head_dim")
    assert m.kv_channels == (None if head_dim * hf["num_attention_heads"] == hf["hidden_size"] else head_dim)
    assert (m.family, m.name) == (FAMILY.get(name, name.split("-")[0]), name)
    assert m.rope_scaling is None and m.seq_length <= m.max_position_embeddings


def transformers_parameter_count(hf: dict) -> tuple[int, float]:
    """Parameters of transformers' model for `hf`, built on the meta device (a tied embedding counted once), and
    those a token runs through: the routed experts' (`mlp.experts.`, stored fused) times top-k / experts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    keys = {k: v for k, v in hf.items() if k not in ("model_type", "architectures")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf["model_type"], **keys))
    assert type(model).__name__ == hf["architectures"][0]
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    assert bool(routed) == ("num_experts" in hf)
    share = hf["num_experts_per_tok"] / hf["num_experts"] if routed else 0
    return total, total - routed + routed * share


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_parameter_count_equals_transformers(name):
    """The planner's count of the network a config describes = transformers' count of the published one; for a
    MoE model also the activated count (every routed expert's parameters scaled by top-k / experts)."""
    expected, activated = transformers_parameter_count(HF_CONFIGS[name])
    shape = ModelShape.from_config(load_config(config_path(name)).model)
    counted = shape.num_parameters()
    assert counted == expected, f"{name}: planner {counted:,} vs transformers {expected:,}"
    assert shape.num_activated_parameters() == activated, f"{name}: activated {shape.num_activated_parameters():,}"
    if name in PUBLISHED_BILLIONS:
        assert counted / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.015), name
    if name in PUBLISHED_ACTIVATED_BILLIONS:
        assert activated / 1e9 == pytest.approx(PUBLISHED_ACTIVATED_BILLIONS[name], rel=0.02), name


@pytest.mark.parametrize("name", sorted(set(HF_CONFIGS) - MOE))
def test_config_validates_at_its_layout_on_eight_replicas(name):
    """`python -m megatron_qwen.config configs/X.yaml --world-size N` accepts each config's own TP x PP with 8
    data-parallel replicas (TP dividing the key/value heads), and the 4M-token batch splits over them."""
    cfg = load_config(config_path(name))
    world = cfg.parallel.tp * cfg.parallel.pp * 8
    assert config_main([str(config_path(name)), "--world-size", str(world)]) == 0
    resolved, layout, _ = resolve(cfg, world)
    assert layout.dp == 8 and cfg.model.kv_heads % layout.tp == 0
    assert resolved.model.seq_length * resolved.training.global_batch_size == 4096 * 1024


@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_config_layout_fits_where_it_is_planned(name):
    """Each MoE config's own layout (TP, PP, EP, ETP, SP, the distributed optimizer, micro-batch 1) is valid on the
    H100 count its comment names (`MOE_WORLD`), its batch is 4M tokens, and the planner's memory model says it fits
    an H100-80GB (the default 10 % headroom and 3 GiB of buffers)."""
    cfg, world = load_config(config_path(name)), MOE_WORLD[name]
    assert f"Planned for {world} H100s" in config_path(name).read_text()
    assert config_main([str(config_path(name)), "--world-size", str(world)]) == 0
    _, layout, _ = resolve(cfg, world)
    assert layout.ep > 1 and cfg.model.num_experts % layout.ep == 0
    assert cfg.model.seq_length * cfg.training.global_batch_size == 4096 * 1024
    p, t = cfg.parallel, cfg.training
    request = Request(cfg, world, 8, find_gpu("h100-80gb"), cfg.model.seq_length, t.global_batch_size)
    planned = Layout(p.tp, p.pp, p.vpp, layout.dp, p.sp, t.recompute, p.use_distributed_optimizer,
                     t.micro_batch_size, p.cp, p.ep, p.etp)
    evaluation = evaluate(request, base_config(request), planned)
    assert evaluation.fits, f"{name}: {planned.describe()}: {evaluation.rejection}"
