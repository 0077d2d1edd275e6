"""Independent references for the Qwen network, written for the tests from the Qwen v1 facts alone.

`megatron_to_qwen2` maps a TP=1 megatron-core state dict onto transformers' Qwen2 names by the
Qwen v1 / Qwen2 layout table; `qwen_v1_forward` is a plain-torch Qwen v1 forward pass (fp32) including the
inference-only dynamic NTK and LogN scaling, for lengths transformers' Qwen2 does not model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def megatron_to_qwen2(sd: dict, num_layers: int, heads: int, head_dim: int) -> dict:
    """Qwen2 (transformers) tensors from a single-rank megatron-core GPTModel state dict."""
    out = {
        "model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
        "model.norm.weight": sd["decoder.final_layernorm.weight"],
        "lm_head.weight": sd["output_layer.weight"],
    }
    for i in range(num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        # linear_qkv rows are [q_h; k_h; v_h] for each head h in turn.
        w = sd[src + "self_attention.linear_qkv.weight"].view(heads, 3, head_dim, -1)
        b = sd[src + "self_attention.linear_qkv.bias"].view(heads, 3, head_dim)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[dst + f"self_attn.{name}.weight"] = w[:, j].reshape(heads * head_dim, -1)
            out[dst + f"self_attn.{name}.bias"] = b[:, j].reshape(heads * head_dim)
        out[dst + "self_attn.o_proj.weight"] = sd[src + "self_attention.linear_proj.weight"]
        gate, up = sd[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[dst + "mlp.gate_proj.weight"] = gate
        out[dst + "mlp.up_proj.weight"] = up
        out[dst + "mlp.down_proj.weight"] = sd[src + "mlp.linear_fc2.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "pre_mlp_layernorm.weight"]
    return {k: v.clone() for k, v in out.items()}


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
