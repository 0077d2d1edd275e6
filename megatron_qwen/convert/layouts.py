"""The two Hugging Face layouts of a Qwen v1 model: transformers' Qwen2 classes and the Qwen v1 release.

One table serves both conversion directions: every Hugging Face tensor name with its shape, the
config.json keys of each layout and how they map onto the project's `ModelConfig`.

| Qwen v1 release (remote code)              | transformers Qwen2                               |
|--------------------------------------------|--------------------------------------------------|
| transformer.wte                            | model.embed_tokens                               |
| transformer.h.N.ln_1 / ln_2                | input_layernorm / post_attention_layernorm       |
| attn.c_attn rows [Q; K; V] (weight, bias)  | self_attn.q_proj / k_proj / v_proj               |
| attn.c_proj                                | self_attn.o_proj                                 |
| mlp.w2 (gate) / mlp.w1 (up) / mlp.c_proj   | mlp.gate_proj / up_proj / down_proj              |
| transformer.ln_f, lm_head                  | model.norm, lm_head                              |
| intermediate_size = 2 x per-branch width   | intermediate_size = per-branch width             |
"""

from __future__ import annotations

from typing import Iterable

from megatron_qwen.config import TOKENIZER_VOCAB_SIZE, ModelConfig
from megatron_qwen.errors import ConversionError

QWEN2 = "qwen2"
QWEN = "qwen"
LAYOUTS = (QWEN2, QWEN)

# Qwen's <|endoftext|>: the release uses it as BOS, EOS and padding.
QWEN_ENDOFTEXT_ID = 151643

GLOBAL_NAMES = {
    QWEN2: {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"},
    QWEN: {"embed": "transformer.wte.weight", "final_norm": "transformer.ln_f.weight", "lm_head": "lm_head.weight"},
}

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

# Buffers some exports carry that are not weights (recomputed by every implementation).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def qkv_source(layout: str, layer: int, part: int, kind: str, hidden: int) -> tuple[str, int]:
    """Where part `part` (0 = Q, 1 = K, 2 = V) of a layer's attention input projection starts:
    (Hugging Face tensor name, first row). `kind` is "weight" or "bias"."""
    if layout == QWEN2:
        return f"model.layers.{layer}.self_attn.{'qkv'[part]}_proj.{kind}", 0
    return f"transformer.h.{layer}.attn.c_attn.{kind}", part * hidden


def layer_name(layout: str, role: str, layer: int) -> str:
    """The Hugging Face name of role `role` (see LAYER_NAMES) in layer `layer`."""
    return LAYER_NAMES[layout][role].format(i=layer)


def expected_tensors(layout: str, m: ModelConfig, vocab_size: int, include_lm_head: bool = True) -> dict[str, tuple]:
    """Every Hugging Face tensor of the model with its shape, in the order checkpoints list them."""
    H, F = m.hidden_size, m.ffn_hidden_size
    names = GLOBAL_NAMES[layout]
    out: dict[str, tuple] = {names["embed"]: (vocab_size, H)}
    for i in range(m.num_layers):
        out[layer_name(layout, "input_norm", i)] = (H,)
        if layout == QWEN2:
            for part in range(3):
                out[qkv_source(layout, i, part, "weight", H)[0]] = (H, H)
                out[qkv_source(layout, i, part, "bias", H)[0]] = (H,)
        else:
            out[qkv_source(layout, i, 0, "weight", H)[0]] = (3 * H, H)
            out[qkv_source(layout, i, 0, "bias", H)[0]] = (3 * H,)
        out[layer_name(layout, "proj", i)] = (H, H)
        out[layer_name(layout, "post_norm", i)] = (H,)
        out[layer_name(layout, "gate", i)] = (F, H)
        out[layer_name(layout, "up", i)] = (F, H)
        out[layer_name(layout, "down", i)] = (H, F)
    out[names["final_norm"]] = (H,)
    if include_lm_head:
        out[names["lm_head"]] = (vocab_size, H)
    return out


def detect_layout(config: dict, tensor_names: Iterable[str], where: str) -> str:
    """qwen2 or qwen, from config.json's model_type/architectures, checked against the tensor names."""
    names = set(tensor_names)
    by_keys = QWEN if "transformer.wte.weight" in names else QWEN2 if "model.embed_tokens.weight" in names else None
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type == "qwen2" or "Qwen2ForCausalLM" in architectures:
        by_config = QWEN2
    elif model_type == "qwen" or "QWenLMHeadModel" in architectures:
        by_config = QWEN
    else:
        by_config = None
    if by_config is None and by_keys is None:
        raise ConversionError(
            f"{where}: cannot tell the checkpoint layout: config.json has model_type={model_type!r} and "
            f"architectures={architectures!r}, and neither transformer.wte.weight (Qwen v1) nor "
            "model.embed_tokens.weight (transformers Qwen2) is among the tensors; point --hf at a Qwen checkpoint"
        )
    if by_config is not None and by_keys is not None and by_config != by_keys:
        raise ConversionError(
            f"{where}: config.json describes a {by_config!r} model but the tensors are named in the {by_keys!r} layout "
            f"({'transformer.wte.weight' if by_keys == QWEN else 'model.embed_tokens.weight'}); fix config.json's "
            "model_type"
        )
    return by_config or by_keys


def _require(config: dict, key: str, where: str):
    if key not in config or config[key] is None:
        raise ConversionError(f"{where}: config.json has no {key!r}; it is needed to lay out the model")
    return config[key]


def _rope_theta(config: dict, where: str) -> float:
    """The RoPE base of a Qwen2 config (transformers 4 `rope_theta` or 5 `rope_parameters`), refusing scaling."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConversionError(
            f"{where}: config.json asks for RoPE scaling {rope_type!r}; Qwen v1 uses plain RoPE "
            "(its long-context dynamic NTK is the v1 layout's use_dynamic_ntk); remove the scaling"
        )
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def model_from_hf(config: dict, layout: str, where: str) -> tuple[ModelConfig, int, bool]:
    """(ModelConfig, vocabulary size, tied embeddings) of a Hugging Face Qwen config.json.

    The ModelConfig's padded_vocab_size is the Hugging Face vocab_size; padding for tensor
    parallelism is added later by `megatron_qwen.config.resolve`.
    """
    hidden = int(_require(config, "hidden_size", where))
    heads = int(_require(config, "num_attention_heads", where))
    layers = int(_require(config, "num_hidden_layers", where))
    vocab = int(_require(config, "vocab_size", where))
    intermediate = int(_require(config, "intermediate_size", where))
    if heads < 1 or hidden % heads:
        raise ConversionError(f"{where}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    head_dim = hidden // heads

    if layout == QWEN2:
        kv_heads = int(config.get("num_key_value_heads") or heads)
        if kv_heads != heads:
            raise ConversionError(
                f"{where}: num_key_value_heads={kv_heads} differs from num_attention_heads={heads}: that is "
                "grouped-query attention (Qwen2 and later), not Qwen v1; only Qwen v1 models (full multi-head "
                "attention) convert"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise ConversionError(f"{where}: hidden_act={config['hidden_act']!r}; Qwen v1's SwiGLU needs 'silu'")
        if config.get("use_sliding_window"):
            raise ConversionError(
                f"{where}: use_sliding_window=true; Qwen v1 attends to the full context, set it to false"
            )
        if config.get("head_dim") not in (None, head_dim):
            raise ConversionError(
                f"{where}: head_dim={config['head_dim']} but hidden_size / num_attention_heads = {head_dim}"
            )
        max_positions = int(config.get("max_position_embeddings", 32768))
        model = ModelConfig(
            num_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            ffn_hidden_size=intermediate,
            padded_vocab_size=vocab,
            # transformers' Qwen2 has no training context of its own: NTK and LogN are off, so
            # seq_length only sets the default training length.
            seq_length=max_positions,
            max_position_embeddings=max_positions,
            rotary_base=_rope_theta(config, where),
            norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
            init_method_std=float(config.get("initializer_range", 0.02)),
        )
        return model, vocab, bool(config.get("tie_word_embeddings", False))

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
    return model, vocab, bool(config.get("tie_word_embeddings", False))


def hf_config(layout: str, m: ModelConfig, vocab_size: int, dtype_name: str, base: dict | None = None) -> dict:
    """config.json for the model in `layout`. `base` (the source checkpoint's config.json, same layout)
    keeps keys this project does not model, e.g. token ids; the model's shape always comes from `m`."""
    qwen_vocab = vocab_size >= TOKENIZER_VOCAB_SIZE
    out = dict(base or {})
    if layout == QWEN2:
        out.update(
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            vocab_size=vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_attention_heads,
            hidden_act="silu",
            max_position_embeddings=m.max_position_embeddings,
            rms_norm_eps=m.norm_epsilon,
            rope_theta=m.rotary_base,
            rope_scaling=None,
            tie_word_embeddings=False,
            use_sliding_window=False,
            sliding_window=None,
            attention_dropout=0.0,
            initializer_range=m.init_method_std,
        )
        if isinstance(out.get("rope_parameters"), dict):
            out["rope_parameters"] = {**out["rope_parameters"], "rope_type": "default", "rope_theta": m.rotary_base}
        out.pop("head_dim", None)
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
