"""Independent references for the Qwen network, written for the tests from the Qwen v1 facts alone.

`megatron_to_qwen2` maps a TP=1 megatron-core state dict onto transformers' Qwen2/Qwen3 names by the
Qwen / Qwen2 layout table (grouped-query rows, bias, q/k norms, tied embeddings); `hf_family_model` builds the
matching transformers model; `qwen_v1_forward` is a plain-torch Qwen v1 forward pass (fp32) including the
inference-only dynamic NTK and LogN scaling, for lengths transformers' Qwen2 does not model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# Tiny shapes of every Qwen architecture the model class builds (config overrides over configs/tiny.yaml), each
# exercising its features: Qwen1.5 (MHA, q/k/v bias, untied), Qwen2.5 (GQA, bias, tied), Qwen3 (GQA, q/k norm, no
# bias, head_dim 64 with hidden 128 / 4 heads, tied) and an untied Qwen3.
_TINY = ["model.hidden_size=128", "model.num_attention_heads=4", "model.ffn_hidden_size=256"]
FAMILY_ARCHS = {
    "qwen1.5": [*_TINY, "model.family=qwen1.5", "model.rotary_base=1000000"],
    "qwen2.5": [*_TINY, "model.family=qwen2.5", "model.num_query_groups=2", "model.tie_word_embeddings=true",
                "model.rotary_base=1000000"],
    "qwen3": [*_TINY, "model.family=qwen3", "model.num_query_groups=2", "model.kv_channels=64",
              "model.qkv_bias=false", "model.qk_layernorm=true", "model.tie_word_embeddings=true",
              "model.rotary_base=1000000"],
    "qwen3-untied": [*_TINY, "model.family=qwen3", "model.num_query_groups=2", "model.kv_channels=64",
                     "model.qkv_bias=false", "model.qk_layernorm=true", "model.rotary_base=1000000"],
}


# YaRN as Qwen2.5's 128K recipe sets it, scaled down to tiny lengths (factor 4 over 16 positions).
YARN = ["model.rope_scaling=yarn", "model.rope_scaling_factor=4.0", "model.rope_original_max_position_embeddings=16"]


def randomize_weights(model: torch.nn.Module) -> None:
    """Weights larger than initialisation, non-zero biases and non-unit norms (from a fixed generator), so that every
    tensor mapping changes the logits; names containing "norm" are the norms in transformers and megatron-core."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if name.endswith("bias") else 0.05))


def arch_overrides(name: str) -> list[str]:
    """Config overrides of a FAMILY_ARCHS name, with YaRN added for a ``+yarn`` suffix (``qwen2.5+yarn``)."""
    arch, _, extra = name.partition("+")
    return [*FAMILY_ARCHS[arch], *(YARN if extra == "yarn" else [])]


def megatron_to_qwen2(sd: dict, num_layers: int, heads: int, head_dim: int, kv_heads: int | None = None,
                      tied: bool = False) -> dict:
    """transformers' Qwen2 / Qwen3 tensors from a single-rank megatron-core GPTModel state dict.

    `kv_heads` (default: `heads`) key/value heads; the q/k/v biases and Qwen3's q_norm/k_norm are mapped when the
    state dict has them. With `tied` the state dict has no output layer and lm_head is the embedding.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    per_group = heads // kv_heads  # query heads sharing one key/value head
    embed = sd["embedding.word_embeddings.weight"]
    out = {
        "model.embed_tokens.weight": embed,
        "model.norm.weight": sd["decoder.final_layernorm.weight"],
        "lm_head.weight": embed if tied else sd["output_layer.weight"],
    }
    sizes = (per_group * head_dim, head_dim, head_dim)
    for i in range(num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        # linear_qkv rows come group by group: [the group's query heads; its key head; its value head].
        w = sd[src + "self_attention.linear_qkv.weight"].view(kv_heads, per_group + 2, head_dim, -1)
        parts = w.split((per_group, 1, 1), dim=1)
        for name, part in zip(("q_proj", "k_proj", "v_proj"), parts):
            out[dst + f"self_attn.{name}.weight"] = part.reshape(-1, w.shape[-1])
        if src + "self_attention.linear_qkv.bias" in sd:
            b = sd[src + "self_attention.linear_qkv.bias"].view(kv_heads, -1).split(sizes, dim=1)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), b):
                out[dst + f"self_attn.{name}.bias"] = part.reshape(-1)
        for ours, theirs in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")):
            if src + f"self_attention.{ours}.weight" in sd:
                out[dst + f"self_attn.{theirs}.weight"] = sd[src + f"self_attention.{ours}.weight"]
        out[dst + "self_attn.o_proj.weight"] = sd[src + "self_attention.linear_proj.weight"]
        gate, up = sd[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[dst + "mlp.gate_proj.weight"] = gate
        out[dst + "mlp.up_proj.weight"] = up
        out[dst + "mlp.down_proj.weight"] = sd[src + "mlp.linear_fc2.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "pre_mlp_layernorm.weight"]
    return {k: v.clone() for k, v in out.items()}


def hf_family_model(m, weights: dict | None = None):
    """transformers' Qwen2ForCausalLM (q/k/v bias, no q/k norm) or Qwen3ForCausalLM (qk_layernorm) in eval mode
    and fp32 for the project's `ModelConfig` `m`, with `weights` (Qwen2/Qwen3 names) loaded when given."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    rope = {"rope_type": "default", "rope_theta": m.rotary_base}
    if m.rope_scaling == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": m.rotary_base, "factor": m.rope_scaling_factor,
                "original_max_position_embeddings": m.rope_original_max_position_embeddings,
                "beta_fast": m.yarn_beta_fast, "beta_slow": m.yarn_beta_slow}
    common = dict(
        vocab_size=m.padded_vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads, num_key_value_heads=m.kv_heads,
        rms_norm_eps=m.norm_epsilon, max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=m.tie_word_embeddings, rope_parameters=rope,
    )
    if m.qk_layernorm:
        if m.qkv_bias:  # transformers' attention_bias would also put a bias on o_proj
            raise ValueError("transformers' Qwen3 has no q/k/v bias without an o_proj bias")
        hf_cfg, cls = Qwen3Config(head_dim=m.head_dim, attention_bias=False, **common), Qwen3ForCausalLM
    else:
        if not m.qkv_bias or m.head_dim * m.num_attention_heads != m.hidden_size:
            raise ValueError("transformers' Qwen2 always has q/k/v bias and head_dim = hidden / heads")
        hf_cfg, cls = Qwen2Config(**common), Qwen2ForCausalLM
    hf_cfg._attn_implementation = "eager"
    hf = cls(hf_cfg).eval()
    if weights is not None:
        missing, unexpected = hf.load_state_dict(weights, strict=False)
        assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
        if m.tie_word_embeddings:
            assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf


def _rms(x, w, eps):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def qwen_v1_forward(
    w: dict, tokens: torch.Tensor, *, num_layers: int, heads: int, head_dim: int, eps: float,
    base: float, seq_length: int, use_dynamic_ntk: bool, use_logn_attn: bool, ntk_alpha: int | None = None,
) -> torch.Tensor:
    """Logits [b, s, vocab] of Qwen v1 at inference on Qwen2-named weights `w`, in fp32.

    `ntk_alpha` pins the dynamic-NTK alpha (v1's generate computes it from the prompt at prefill and keeps
    it, ``_ntk_alpha_cached_list``); by default it follows the sequence's length.
    """
    b, s = tokens.shape
    x = w["model.embed_tokens.weight"][tokens]
    alpha = 1
    if use_dynamic_ntk:
        alpha = max(2 ** math.ceil(math.log(s / seq_length, 2) + 1) - 1, 1) if ntk_alpha is None else ntk_alpha
    rbase = base * alpha ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (rbase ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(s).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
    logn = torch.tensor([math.log(p + 1, seq_length) if p + 1 > seq_length else 1.0 for p in range(s)])
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(num_layers):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"], eps)
        q, k, v = (
            (h @ w[p + f"self_attn.{n}.weight"].T + w[p + f"self_attn.{n}.bias"]).view(b, s, heads, head_dim)
            for n in ("q_proj", "k_proj", "v_proj")
        )
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if use_logn_attn:
            q = q * logn[None, :, None, None]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        scores = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = torch.einsum("bhqk,bkhd->bqhd", scores, v).reshape(b, s, heads * head_dim)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        mlp = F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + mlp @ w[p + "mlp.down_proj.weight"].T
    x = _rms(x, w["model.norm.weight"], eps)
    return x @ w["lm_head.weight"].T
