"""The Hugging Face layouts of the Qwen family: transformers' Qwen2 and Qwen3 classes and the Qwen v1 release.

One table serves both conversion directions: every Hugging Face tensor name with its shape, the
config.json keys of each layout and how they map onto the project's `ModelConfig`.

| Qwen v1 release (remote code)              | transformers Qwen2 (Qwen1.5, 2, 2.5) / Qwen3     |
|--------------------------------------------|--------------------------------------------------|
| transformer.wte                            | model.embed_tokens                               |
| transformer.h.N.ln_1 / ln_2                | input_layernorm / post_attention_layernorm       |
| attn.c_attn rows [Q; K; V] (weight, bias)  | self_attn.q_proj / k_proj / v_proj (Qwen3: no bias) |
| -                                          | Qwen3: self_attn.q_norm / k_norm (head_dim wide) |
| attn.c_proj                                | self_attn.o_proj                                 |
| mlp.w2 (gate) / mlp.w1 (up) / mlp.c_proj   | mlp.gate_proj / up_proj / down_proj              |
| transformer.ln_f, lm_head                  | model.norm, lm_head (absent when tied)           |
| intermediate_size = 2 x per-branch width   | intermediate_size = per-branch width             |

The mixture-of-experts classes (Qwen2MoeForCausalLM: Qwen1.5-MoE, Qwen2-MoE; Qwen3MoeForCausalLM) are Qwen2 /
Qwen3 with, in each MoE layer, `mlp.gate` (the router, [experts, hidden]), the routed experts fused as transformers
5 stores them (`mlp.experts.gate_up_proj` [experts, 2 x width, hidden], rows [gate; up], and `mlp.experts.down_proj`
[experts, hidden, width]) and, for Qwen2-MoE, `mlp.shared_expert.{gate,up,down}_proj` with the sigmoid gate
`mlp.shared_expert_gate` ([1, hidden]). Released checkpoints store each expert on its own
(`mlp.experts.{e}.gate_proj` ...); both are read, the fused form is written. Dense layers among MoE layers
(`decoder_sparse_step`, `mlp_only_layers`) keep the plain MLP of `intermediate_size`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

from megatron_qwen.config import TOKENIZER_VOCAB_SIZES, ModelConfig
from megatron_qwen.errors import ConversionError
from megatron_qwen.tokenizer import FAMILIES, FAMILY_DEFAULT_SYSTEM, FAMILY_SPECIAL_TOKENS, check_vocabulary

QWEN2 = "qwen2"
QWEN3 = "qwen3"
QWEN = "qwen"
QWEN2_MOE = "qwen2_moe"
QWEN3_MOE = "qwen3_moe"
LAYOUTS = (QWEN2, QWEN3, QWEN, QWEN2_MOE, QWEN3_MOE)
# The dense layout whose attention, norms and dense MLPs a mixture-of-experts layout shares.
BASE_LAYOUT = {QWEN2: QWEN2, QWEN3: QWEN3, QWEN: QWEN, QWEN2_MOE: QWEN2, QWEN3_MOE: QWEN3}
MOE_LAYOUTS = (QWEN2_MOE, QWEN3_MOE)

# Qwen's <|endoftext|>: the release uses it as BOS, EOS and padding.
QWEN_ENDOFTEXT_ID = 151643

# The transformers class (config.json `architectures`) and `model_type` of each layout.
ARCHITECTURES = {QWEN2: "Qwen2ForCausalLM", QWEN3: "Qwen3ForCausalLM", QWEN: "QWenLMHeadModel",
                 QWEN2_MOE: "Qwen2MoeForCausalLM", QWEN3_MOE: "Qwen3MoeForCausalLM"}
MODEL_TYPES = {QWEN2: "qwen2", QWEN3: "qwen3", QWEN: "qwen", QWEN2_MOE: "qwen2_moe", QWEN3_MOE: "qwen3_moe"}
# Qwen relatives that are not these causal language models, refused by name with what to do instead.
_NEXT = ("Qwen3-Next (hybrid linear attention, gated attention, multi-token prediction) is not modelled; convert "
         "a Qwen2-MoE or Qwen3-MoE model")
_NOT_LM = ("not a causal language model this converts (it has a vision/audio encoder or another head); convert "
           "the text-only causal LM of the same release (Qwen2ForCausalLM / Qwen3ForCausalLM / Qwen2MoeForCausalLM / "
           "Qwen3MoeForCausalLM)")
REFUSED_MODEL_TYPES = {"qwen3_next": _NEXT}

GLOBAL_NAMES = {
    QWEN2: {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"},
    QWEN: {"embed": "transformer.wte.weight", "final_norm": "transformer.ln_f.weight", "lm_head": "lm_head.weight"},
}
GLOBAL_NAMES[QWEN3] = GLOBAL_NAMES[QWEN2_MOE] = GLOBAL_NAMES[QWEN3_MOE] = GLOBAL_NAMES[QWEN2]

# Per-layer tensors other than the attention input projection, by role.
LAYER_NAMES = {
    QWEN2: {
        "input_norm": "model.layers.{i}.input_layernorm.weight",
        "post_norm": "model.layers.{i}.post_attention_layernorm.weight",
        "proj": "model.layers.{i}.self_attn.o_proj.weight",
        "gate": "model.layers.{i}.mlp.gate_proj.weight",
        "up": "model.layers.{i}.mlp.up_proj.weight",
        "down": "model.layers.{i}.mlp.down_proj.weight",
    },
    QWEN: {
        "input_norm": "transformer.h.{i}.ln_1.weight",
        "post_norm": "transformer.h.{i}.ln_2.weight",
        "proj": "transformer.h.{i}.attn.c_proj.weight",
        "gate": "transformer.h.{i}.mlp.w2.weight",  # v1's w2 is the gate (silu) branch
        "up": "transformer.h.{i}.mlp.w1.weight",
        "down": "transformer.h.{i}.mlp.c_proj.weight",
    },
}
LAYER_NAMES[QWEN3] = {
    **LAYER_NAMES[QWEN2],
    "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
}
# A mixture-of-experts layer's MLP (transformers 5 names; the per-expert names are the released checkpoints').
MOE_NAMES = {
    "router": "model.layers.{i}.mlp.gate.weight",
    "experts_gate_up": "model.layers.{i}.mlp.experts.gate_up_proj",
    "experts_down": "model.layers.{i}.mlp.experts.down_proj",
    "expert_gate": "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
    "expert_up": "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
    "expert_down": "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
    "shared_gate": "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
    "shared_up": "model.layers.{i}.mlp.shared_expert.up_proj.weight",
    "shared_down": "model.layers.{i}.mlp.shared_expert.down_proj.weight",
    "shared_expert_gate": "model.layers.{i}.mlp.shared_expert_gate.weight",
}
LAYER_NAMES[QWEN2_MOE] = {**LAYER_NAMES[QWEN2], **MOE_NAMES}
LAYER_NAMES[QWEN3_MOE] = {**LAYER_NAMES[QWEN3], **MOE_NAMES}

# Buffers some exports carry that are not weights (recomputed by every implementation).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def qkv_source(layout: str, layer: int, part: int, kind: str, m: ModelConfig) -> tuple[str, int]:
    """Where part `part` (0 = Q, 1 = K, 2 = V) of a layer's attention input projection starts:
    (Hugging Face tensor name, first row). `kind` is "weight" or "bias"."""
    if layout != QWEN:
        return f"model.layers.{layer}.self_attn.{'qkv'[part]}_proj.{kind}", 0
    return f"transformer.h.{layer}.attn.c_attn.{kind}", part * m.num_attention_heads * m.head_dim


def layer_name(layout: str, role: str, layer: int, expert: int | None = None) -> str:
    """The Hugging Face name of role `role` (see LAYER_NAMES) in layer `layer` (of expert `expert`)."""
    return LAYER_NAMES[layout][role].format(i=layer, e=expert)


def fused_experts(names) -> bool:
    """Whether a mixture-of-experts checkpoint stores its experts fused (transformers 5) rather than one by one."""
    return any(name.endswith("mlp.experts.gate_up_proj") for name in names)


def _moe_tensors(layout: str, m: ModelConfig, i: int, fused: bool) -> dict[str, tuple]:
    """The tensors of MoE layer `i` with their shapes: experts fused (transformers 5) or one by one."""
    H, E, I = m.hidden_size, m.num_experts, m.moe_ffn_hidden_size
    out = {layer_name(layout, "router", i): (E, H)}
    if fused:
        out[layer_name(layout, "experts_gate_up", i)] = (E, 2 * I, H)
        out[layer_name(layout, "experts_down", i)] = (E, H, I)
    else:
        for e in range(E):
            out[layer_name(layout, "expert_gate", i, e)] = (I, H)
            out[layer_name(layout, "expert_up", i, e)] = (I, H)
            out[layer_name(layout, "expert_down", i, e)] = (H, I)
    S = m.moe_shared_expert_ffn_hidden_size
    if S is not None:
        out[layer_name(layout, "shared_gate", i)] = (S, H)
        out[layer_name(layout, "shared_up", i)] = (S, H)
        out[layer_name(layout, "shared_down", i)] = (H, S)
        if m.moe_shared_expert_gate:
            out[layer_name(layout, "shared_expert_gate", i)] = (1, H)
    return out


def expected_tensors(layout: str, m: ModelConfig, vocab_size: int, include_lm_head: bool = True,
                     fused: bool = False) -> dict[str, tuple]:
    """Every Hugging Face tensor of the model with its shape, in the order checkpoints list them.
    `lm_head` is listed when `include_lm_head` and the embeddings are not tied; a mixture-of-experts layer's
    experts are listed `fused` (transformers 5) or one by one (the released checkpoints)."""
    H, F, d = m.hidden_size, m.ffn_hidden_size, m.head_dim
    q_rows, kv_rows = m.num_attention_heads * d, m.kv_heads * d
    names = GLOBAL_NAMES[layout]
    kinds = ("weight", "bias") if m.qkv_bias else ("weight",)
    out: dict[str, tuple] = {names["embed"]: (vocab_size, H)}
    for i in range(m.num_layers):
        out[layer_name(layout, "input_norm", i)] = (H,)
        if layout == QWEN:
            out[qkv_source(layout, i, 0, "weight", m)[0]] = (q_rows + 2 * kv_rows, H)
            out[qkv_source(layout, i, 0, "bias", m)[0]] = (q_rows + 2 * kv_rows,)
        else:
            for part, rows in enumerate((q_rows, kv_rows, kv_rows)):
                for kind in kinds:
                    out[qkv_source(layout, i, part, kind, m)[0]] = (rows, H) if kind == "weight" else (rows,)
        if m.qk_layernorm:
            out[layer_name(layout, "q_norm", i)] = (d,)
            out[layer_name(layout, "k_norm", i)] = (d,)
        out[layer_name(layout, "proj", i)] = (H, q_rows)
        out[layer_name(layout, "post_norm", i)] = (H,)
        if m.moe_layers[i]:
            out.update(_moe_tensors(layout, m, i, fused))
            continue
        out[layer_name(layout, "gate", i)] = (F, H)
        out[layer_name(layout, "up", i)] = (F, H)
        out[layer_name(layout, "down", i)] = (H, F)
    out[names["final_norm"]] = (H,)
    if include_lm_head and not m.tie_word_embeddings:
        out[names["lm_head"]] = (vocab_size, H)
    return out


def detect_layout(config: dict, tensor_names: Iterable[str], where: str) -> str:
    """qwen2, qwen3 or qwen, from config.json's architectures/model_type, checked against the tensor names.
    Any other architecture is refused by name."""
    names = set(tensor_names)
    model_type = config.get("model_type")
    architectures = list(config.get("architectures") or [])
    by_arch = {arch: layout for layout, arch in ARCHITECTURES.items()}
    for arch in architectures:
        if arch not in by_arch:
            reason = REFUSED_MODEL_TYPES.get(model_type) or _NOT_LM
            raise ConversionError(
                f"{where}: architecture {arch} (model_type={model_type!r}) is {reason}; this converter reads "
                f"{', '.join(ARCHITECTURES.values())}"
            )
    if model_type in REFUSED_MODEL_TYPES:
        raise ConversionError(f"{where}: model_type={model_type!r}: {REFUSED_MODEL_TYPES[model_type]}")
    by_model_type = {t: layout for layout, t in MODEL_TYPES.items()}
    if model_type is not None and model_type not in by_model_type:
        raise ConversionError(
            f"{where}: model_type={model_type!r} is not a Qwen causal LM this converter reads; supported: "
            f"{', '.join(MODEL_TYPES.values())} ({', '.join(ARCHITECTURES.values())})"
        )
    by_config = {by_arch[a] for a in architectures} | ({by_model_type[model_type]} if model_type else set())
    if len(by_config) > 1:
        raise ConversionError(
            f"{where}: architectures={architectures} and model_type={model_type!r} describe different models; "
            "fix config.json so both name the same one"
        )
    by_keys = QWEN if "transformer.wte.weight" in names else QWEN2 if "model.embed_tokens.weight" in names else None
    if by_keys == QWEN2 and any(".mlp.gate.weight" in name for name in names):
        by_keys = QWEN3_MOE if any(".self_attn.q_norm." in name for name in names) else QWEN2_MOE
    if not by_config and by_keys is None:
        raise ConversionError(
            f"{where}: cannot tell the checkpoint layout: config.json has model_type={model_type!r} and "
            f"architectures={architectures!r}, and neither transformer.wte.weight (Qwen v1) nor "
            "model.embed_tokens.weight (transformers Qwen2/Qwen3) is among the tensors; point --hf at a Qwen checkpoint"
        )
    layout = by_config.pop() if by_config else by_keys
    if by_keys is not None and (by_keys == QWEN) != (layout == QWEN):
        raise ConversionError(
            f"{where}: config.json describes a {layout!r} model but the tensors are named in the {by_keys!r} layout "
            f"({'transformer.wte.weight' if by_keys == QWEN else 'model.embed_tokens.weight'}); fix config.json's "
            "model_type and architectures"
        )
    return layout


def _require(config: dict, key: str, where: str):
    if key not in config or config[key] is None:
        raise ConversionError(f"{where}: config.json has no {key!r}; it is needed to lay out the model")
    return config[key]


@dataclasses.dataclass(frozen=True)
class Rope:
    """RoPE settings of a Hugging Face config, in ModelConfig's terms."""

    theta: float
    scaling: str | None = None  # "yarn" or None
    factor: float = 1.0
    original_max_positions: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0


def rope_from_hf(config: dict, where: str) -> Rope:
    """RoPE base and scaling of a Qwen2/Qwen3 config.json, as transformers reads it: transformers 4's
    `rope_theta` + `rope_scaling`, or 5's `rope_parameters` (`rope_scaling`, when set, wins). Only YaRN scales."""
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise ConversionError(f"{where}: rope_parameters differ per layer type ({sorted(params)}); Qwen uses one RoPE")
    theta = float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return Rope(theta)
    if rope_type != "yarn":
        raise ConversionError(
            f"{where}: config.json asks for RoPE scaling {rope_type!r}; only 'yarn' (Qwen2.5's and Qwen3's "
            "long-context recipe) is supported: remove the scaling or use YaRN"
        )
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if params.get(key) is not None:
            raise ConversionError(
                f"{where}: YaRN's {key}={params[key]} is not modelled (the attention factor follows from `factor` "
                f"alone, as in Qwen's configs); remove {key}"
            )
    if params.get("truncate") is False:
        raise ConversionError(f"{where}: YaRN with truncate=false is not modelled; remove it (Qwen truncates)")
    max_positions = int(config.get("max_position_embeddings", 32768))
    original = int(params.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
                   or max_positions)
    factor = float(params.get("factor") or max_positions / original)
    return Rope(theta, "yarn", factor, original, float(params.get("beta_fast") or 32.0),
                float(params.get("beta_slow") or 1.0))


def rope_to_hf(m: ModelConfig) -> tuple[dict | None, dict]:
    """(transformers 4 `rope_scaling`, transformers 5 `rope_parameters`) of the model's RoPE."""
    if m.rope_scaling is None:
        return None, {"rope_type": "default", "rope_theta": m.rotary_base}
    scaling = {"rope_type": "yarn", "factor": m.rope_scaling_factor,
               "original_max_position_embeddings": m.rope_original_max_position_embeddings,
               "beta_fast": m.yarn_beta_fast, "beta_slow": m.yarn_beta_slow}
    return scaling, {**scaling, "rope_theta": m.rotary_base}


def detect_family(layout: str, vocab: int, added_tokens: Mapping[int, str] | None, chat_template: str | None,
                  explicit: str | None, where: str) -> tuple[str, str | None]:
    """(tokenizer family, note) of a checkpoint: `explicit` (--family) if given, else the family whose added
    tokens the checkpoint's tokenizer files list, else the newest family of the architecture (qwen2 -> qwen2.5,
    qwen3 -> qwen3, v1 -> qwen). A family whose vocabulary does not fit the checkpoint is refused."""
    if explicit is None and added_tokens is not None:
        added = {int(i): str(t) for i, t in added_tokens.items()}
        matches = [f for f in FAMILIES if {i: t for t, i in FAMILY_SPECIAL_TOKENS[f].items()} == added]
        if not matches:
            raise ConversionError(
                f"{where}: the tokenizer's {len(added)} added tokens match no tokenizer family "
                f"({', '.join(FAMILIES)}); pass --family with the family of the release it was fine-tuned from"
            )
        # Qwen1.5 and Qwen2 add the same three tokens; their chat templates differ in the default system prompt.
        by_template = [f for f in matches if f"{FAMILY_DEFAULT_SYSTEM[f]}<|im_end|>" in (chat_template or "")]
        explicit = (by_template or matches)[-1]
    if explicit is not None:
        try:
            check_vocabulary(explicit, vocab, added_tokens)
        except ValueError as exc:
            raise ConversionError(f"{where}: {exc}") from None
        return explicit, None
    family = {QWEN2: "qwen2.5", QWEN3: "qwen3", QWEN: "qwen"}[BASE_LAYOUT[layout]]
    if TOKENIZER_VOCAB_SIZES[family] > vocab:
        return family, (f"model.family={family} (from the architecture; no tokenizer files) has "
                        f"{TOKENIZER_VOCAB_SIZES[family]:,} tokens but the vocabulary {vocab:,}: the Qwen tokenizer "
                        "cannot drive this model; pass --family if that is wrong")
    return family, None


def model_from_hf(config: dict, layout: str, where: str) -> tuple[ModelConfig, int, bool]:
    """(ModelConfig, vocabulary size, tied embeddings) of a Hugging Face Qwen config.json.

    The ModelConfig's padded_vocab_size is the Hugging Face vocab_size; padding for tensor
    parallelism is added later by `megatron_qwen.config.resolve`. `family` is left at its default:
    `detect_family` sets it.
    """
    hidden = int(_require(config, "hidden_size", where))
    heads = int(_require(config, "num_attention_heads", where))
    layers = int(_require(config, "num_hidden_layers", where))
    vocab = int(_require(config, "vocab_size", where))
    intermediate = int(_require(config, "intermediate_size", where))
    tied = bool(config.get("tie_word_embeddings", False))

    if layout != QWEN:
        base = BASE_LAYOUT[layout]
        kv_heads = int(config.get("num_key_value_heads") or heads)
        # transformers' Qwen3Config defaults head_dim to 128; Qwen2 takes hidden / heads unless config.json says.
        default_head_dim = 128 if layout == QWEN3 else (hidden // heads if heads else 0)
        head_dim = int(config.get("head_dim") or default_head_dim)
        if heads < 1 or kv_heads < 1 or heads % kv_heads:
            raise ConversionError(
                f"{where}: num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise ConversionError(f"{where}: hidden_act={config['hidden_act']!r}; Qwen's SwiGLU needs 'silu'")
        sliding = [t for t in config.get("layer_types") or [] if t != "full_attention"]
        if config.get("use_sliding_window") or sliding:
            raise ConversionError(
                f"{where}: use_sliding_window=true (or sliding layer_types): sliding-window attention is not "
                "supported; the released Qwen models attend to the full context, set use_sliding_window to false"
            )
        if base == QWEN3 and config.get("attention_bias"):
            raise ConversionError(
                f"{where}: attention_bias=true: {ARCHITECTURES[layout]} then also biases o_proj, which this model does "
                "not have; the released Qwen3 models use attention_bias=false"
            )
        if layout == QWEN2_MOE and config.get("qkv_bias") is False:
            raise ConversionError(f"{where}: qkv_bias=false: the released Qwen2-MoE models bias q/k/v; set it to true")
        rope = rope_from_hf(config, where)
        max_positions = int(config.get("max_position_embeddings", 32768))
        model = ModelConfig(
            num_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=kv_heads if kv_heads != heads else None,
            kv_channels=head_dim if hidden % heads or head_dim != hidden // heads else None,
            qkv_bias=base == QWEN2,  # Qwen2's q/k/v always have a bias; Qwen3's none (attention_bias=false)
            qk_layernorm=base == QWEN3,
            tie_word_embeddings=tied,
            ffn_hidden_size=intermediate,
            padded_vocab_size=vocab,
            # transformers' Qwen2/Qwen3 have no training context of their own: NTK and LogN are off, so
            # seq_length only sets the default training length.
            seq_length=max_positions,
            max_position_embeddings=max_positions,
            rotary_base=rope.theta,
            rope_scaling=rope.scaling,
            rope_scaling_factor=rope.factor,
            rope_original_max_position_embeddings=rope.original_max_positions,
            yarn_beta_fast=rope.beta_fast,
            yarn_beta_slow=rope.beta_slow,
            norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
            init_method_std=float(config.get("initializer_range", 0.02)),
            **(moe_from_hf(config, layout, where) if layout in MOE_LAYOUTS else {}),
        )
        return model, vocab, tied

    if heads < 1 or hidden % heads:
        raise ConversionError(f"{where}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    head_dim = hidden // heads
    if intermediate % 2:
        raise ConversionError(
            f"{where}: intermediate_size={intermediate} is odd; the Qwen v1 config gives twice the per-branch SwiGLU "
            "width"
        )
    if int(config.get("kv_channels", head_dim)) != head_dim:
        raise ConversionError(
            f"{where}: kv_channels={config['kv_channels']} but hidden_size / num_attention_heads = {head_dim}"
        )
    if float(config.get("rotary_pct", 1.0)) != 1.0:
        raise ConversionError(f"{where}: rotary_pct={config['rotary_pct']}; Qwen v1 rotates the whole head (1.0)")
    if config.get("no_bias", True) is not True:
        raise ConversionError(f"{where}: no_bias={config['no_bias']}; Qwen v1 has biases only on c_attn (no_bias=true)")
    if tied:
        raise ConversionError(f"{where}: tie_word_embeddings=true; the Qwen v1 release never ties, set it to false")
    seq_length = int(config.get("seq_length", 8192))
    model = ModelConfig(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=intermediate // 2,
        padded_vocab_size=vocab,
        seq_length=seq_length,
        max_position_embeddings=max(seq_length, int(config.get("max_position_embeddings", seq_length))),
        rotary_base=float(config.get("rotary_emb_base", 10000.0)),
        norm_epsilon=float(config.get("layer_norm_epsilon", 1e-6)),
        init_method_std=float(config.get("initializer_range", 0.02)),
        use_dynamic_ntk=bool(config.get("use_dynamic_ntk", True)),
        use_logn_attn=bool(config.get("use_logn_attn", True)),
    )
    return model, vocab, False


def moe_from_hf(config: dict, layout: str, where: str) -> dict:
    """ModelConfig's mixture-of-experts keys of a Qwen2-MoE / Qwen3-MoE config.json (transformers' defaults where
    the file leaves a key out)."""
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts; the releases say num_experts.
    experts = config.get("num_experts") or config.get("num_local_experts")
    if not experts:
        raise ConversionError(f"{where}: config.json has no 'num_experts' (or 'num_local_experts'); a "
                              f"{ARCHITECTURES[layout]} config gives its routed experts per MoE layer")
    experts = int(experts)
    out = dict(
        num_experts=experts,
        moe_router_topk=int(_require(config, "num_experts_per_tok", where)),
        moe_ffn_hidden_size=int(_require(config, "moe_intermediate_size", where)),
        moe_norm_topk_prob=bool(config.get("norm_topk_prob", layout == QWEN3_MOE)),
        moe_decoder_sparse_step=int(config.get("decoder_sparse_step", 1)),
        moe_mlp_only_layers=[int(i) for i in config.get("mlp_only_layers") or []],
        moe_aux_loss_coeff=float(config.get("router_aux_loss_coef", 0.001)),
    )
    if layout == QWEN2_MOE:
        # transformers' Qwen2-MoE always has the shared expert and its sigmoid gate.
        out.update(moe_shared_expert_ffn_hidden_size=int(_require(config, "shared_expert_intermediate_size", where)),
                   moe_shared_expert_gate=True)
    return out


def layout_problem(layout: str, m: ModelConfig) -> str | None:
    """Why `layout`'s Hugging Face class cannot hold model `m` (None when it can)."""
    if m.is_moe != (layout in MOE_LAYOUTS):
        return (f"transformers' {ARCHITECTURES[layout]} {'has' if layout in MOE_LAYOUTS else 'has no'} routed experts "
                f"and this model {'has' if m.is_moe else 'has none'}")
    base = BASE_LAYOUT[layout]
    if base == QWEN2 and (m.qk_layernorm or not m.qkv_bias):
        return f"transformers' {ARCHITECTURES[layout]} has q/k/v biases and no query/key norms"
    if base == QWEN3 and (not m.qk_layernorm or m.qkv_bias):
        return f"transformers' {ARCHITECTURES[layout]} has query/key norms and no q/k/v biases"
    shared = m.moe_shared_expert_ffn_hidden_size is not None
    if layout == QWEN2_MOE and not (shared and m.moe_shared_expert_gate):
        return "transformers' Qwen2MoeForCausalLM has a shared expert with a sigmoid gate in every MoE layer"
    if layout == QWEN3_MOE and shared:
        return "transformers' Qwen3MoeForCausalLM has no shared expert"
    plain_heads = m.kv_heads == m.num_attention_heads and m.head_dim * m.num_attention_heads == m.hidden_size
    if layout == QWEN and not (plain_heads and m.qkv_bias and not m.qk_layernorm and not m.tie_word_embeddings
                               and m.rope_scaling is None):
        return ("the Qwen v1 release has multi-head attention with q/k/v biases, head width hidden/heads, untied "
                "embeddings and no query/key norms or YaRN")
    return None


def default_layout(m: ModelConfig) -> str:
    """The transformers layout of a model: Qwen3 with query/key norms, else Qwen2 (their MoE classes for a
    mixture of experts)."""
    if m.is_moe:
        return QWEN3_MOE if m.qk_layernorm else QWEN2_MOE
    return QWEN3 if m.qk_layernorm else QWEN2


def hf_config(layout: str, m: ModelConfig, vocab_size: int, dtype_name: str, base: dict | None = None) -> dict:
    """config.json for the model in `layout`. `base` (the source checkpoint's config.json, same layout)
    keeps keys this project does not model, e.g. token ids; the model's shape always comes from `m`."""
    problem = layout_problem(layout, m)
    if problem:
        raise ConversionError(f"--layout {layout} cannot hold this model: {problem}; use --layout {default_layout(m)}")
    qwen_vocab = vocab_size >= TOKENIZER_VOCAB_SIZES[m.family]  # the family's tokens all have rows
    out = dict(base or {})
    if layout != QWEN:
        rope_scaling, rope_parameters = rope_to_hf(m)
        out.update(
            architectures=[ARCHITECTURES[layout]],
            model_type=MODEL_TYPES[layout],
            vocab_size=vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.kv_heads,
            head_dim=m.head_dim,
            hidden_act="silu",
            max_position_embeddings=m.max_position_embeddings,
            rms_norm_eps=m.norm_epsilon,
            # Both transformers 4's keys and 5's rope_parameters, saying the same (5 prefers rope_scaling when set).
            rope_theta=m.rotary_base,
            rope_scaling=rope_scaling,
            rope_parameters=rope_parameters,
            tie_word_embeddings=m.tie_word_embeddings,
            use_sliding_window=False,
            sliding_window=None,
            attention_dropout=0.0,
            initializer_range=m.init_method_std,
        )
        if BASE_LAYOUT[layout] == QWEN3:
            out["attention_bias"] = False
        if layout in MOE_LAYOUTS:
            out["num_local_experts" if "num_local_experts" in out else "num_experts"] = m.num_experts
            out.update(
                num_experts_per_tok=m.moe_router_topk,
                moe_intermediate_size=m.moe_ffn_hidden_size,
                norm_topk_prob=m.moe_norm_topk_prob,
                decoder_sparse_step=m.moe_decoder_sparse_step,
                mlp_only_layers=list(m.moe_mlp_only_layers),
                router_aux_loss_coef=m.moe_aux_loss_coeff,
                output_router_logits=False,
            )
            if layout == QWEN2_MOE:
                out.update(shared_expert_intermediate_size=m.moe_shared_expert_ffn_hidden_size, qkv_bias=True)
        out.pop("layer_types", None)  # derived from use_sliding_window by transformers
    else:
        out.update(
            architectures=["QWenLMHeadModel"],
            model_type="qwen",
            vocab_size=vocab_size,
            hidden_size=m.hidden_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads,
            kv_channels=m.head_dim,
            intermediate_size=2 * m.ffn_hidden_size,
            layer_norm_epsilon=m.norm_epsilon,
            rotary_emb_base=m.rotary_base,
            rotary_pct=1.0,
            seq_length=m.seq_length,
            max_position_embeddings=m.max_position_embeddings,
            use_dynamic_ntk=m.use_dynamic_ntk,
            use_logn_attn=m.use_logn_attn,
            no_bias=True,
            tie_word_embeddings=False,
            initializer_range=m.init_method_std,
        )
        for key, value in (
            ("auto_map",
             {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}),
            ("emb_dropout_prob", 0.0),
            ("attn_dropout_prob", 0.0),
            ("scale_attn_weights", True),
            ("use_cache", True),
            ("bf16", False),  # all three false: the v1 code picks the precision from the device, as released
            ("fp16", False),
            ("fp32", False),
            ("use_flash_attn", "auto"),
            ("softmax_in_fp32", False),
            ("tokenizer_class", "QWenTokenizer"),
        ):
            out.setdefault(key, value)
    if qwen_vocab:
        out.setdefault("bos_token_id", QWEN_ENDOFTEXT_ID)
        out.setdefault("eos_token_id", QWEN_ENDOFTEXT_ID)
    out.setdefault("use_cache", True)
    # transformers 4 reads torch_dtype, 5 reads dtype; keep whichever the source had, else write both.
    dtype_keys = [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype", "dtype"]
    for key in dtype_keys:
        out[key] = dtype_name
    return out
