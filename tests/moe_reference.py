"""Tiny Qwen mixture-of-experts models built by transformers, for the MoE tests.

Qwen2-MoE: grouped-query attention with q/k/v bias, a shared expert with its sigmoid gate, layer 1 a dense MLP
among MoE layers (``mlp_only_layers``), top-2 of 4 experts without renormalisation. Qwen3-MoE: query/key norms, a
head width (32) apart from hidden / heads (16), top-2 of 4 with renormalised weights, every layer MoE.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qwen_reference import randomize_weights

VOCAB, HIDDEN, HEADS, KV_HEADS, LAYERS, FFN, MAX_POS = 256, 64, 4, 2, 4, 96, 64
EXPERTS, TOPK, EXPERT_FFN, SHARED_FFN = 4, 2, 32, 48
ARCHS = {
    "qwen2_moe": ("Qwen2Moe", dict(shared_expert_intermediate_size=SHARED_FFN, mlp_only_layers=[1],
                                   norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3Moe", dict(head_dim=32, norm_topk_prob=True, num_hidden_layers=2)),
}


def make_moe_model(kind: str, directory: Path | None = None):
    """A randomised fp32 transformers model of `kind` (see ARCHS), saved with save_pretrained when `directory`."""
    import transformers

    prefix, extra = ARCHS[kind]
    settings = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5, max_position_embeddings=MAX_POS,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0}, num_experts=EXPERTS,
        num_experts_per_tok=TOPK, moe_intermediate_size=EXPERT_FFN, router_aux_loss_coef=0.02,
        tie_word_embeddings=False,
    )
    settings.update(extra)
    config = getattr(transformers, f"{prefix}Config")(**settings)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    randomize_weights(model)
    if directory is not None:
        model.save_pretrained(directory)
    return model
