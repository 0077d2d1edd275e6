"""Global tensor keys of a Qwen model in a megatron-core checkpoint, with their full shapes.

Layer tensors are stacked on a leading axis of size num_layers. The two norms are stored under
Transformer Engine's fused names (see `megatron_qwen.model.spec`); linear_qkv rows are per query group g
[q heads of g; k_g; v_g] (heads / groups query heads, then one key and one value head, each head_dim rows;
with multi-head attention a group is one head); linear_fc1 rows are [gate; up] over the full width
(megatron-core interleaves them per tensor-parallel shard itself when it loads). A model with tied
embeddings stores no output layer.

A mixture-of-experts model is stored layer by layer instead (megatron-core does so when layers differ): each
layer key carries its global index (``decoder.layers.3.mlp.router.weight``; `layer_key`), its MLP norm is
``pre_mlp_layernorm`` in MoE layers, and the routed experts' fc1 / fc2 are stacked on a leading axis of size
num_experts (fc1 rows [gate; up] per expert).
"""

from __future__ import annotations

import re

EMBED = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
INPUT_NORM = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
QKV_WEIGHT = "decoder.layers.self_attention.linear_qkv.weight"
QKV_BIAS = "decoder.layers.self_attention.linear_qkv.bias"
Q_NORM = "decoder.layers.self_attention.q_layernorm.weight"
K_NORM = "decoder.layers.self_attention.k_layernorm.weight"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
POST_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
FC1 = "decoder.layers.mlp.linear_fc1.weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"

# Mixture-of-experts layers (logical names: stored with the layer index after "decoder.layers.").
PRE_MLP_NORM = "decoder.layers.pre_mlp_layernorm.weight"
ROUTER = "decoder.layers.mlp.router.weight"
EXPERT_FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
EXPERT_FC2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
SHARED_FC1 = "decoder.layers.mlp.shared_experts.linear_fc1.weight"
SHARED_FC2 = "decoder.layers.mlp.shared_experts.linear_fc2.weight"
SHARED_GATE = "decoder.layers.mlp.shared_experts.gate_weight"
EXPERT_KEYS = (EXPERT_FC1, EXPERT_FC2)

# The scalar head of reward and value models (megatron_qwen.model.qwen.ScalarHead, held as `reward_head`).
SCALAR_HEAD = "reward_head.weight"

LAYER_KEYS = (INPUT_NORM, QKV_WEIGHT, QKV_BIAS, Q_NORM, K_NORM, PROJ, POST_NORM, FC1, FC2, PRE_MLP_NORM, ROUTER,
              EXPERT_FC1, EXPERT_FC2, SHARED_FC1, SHARED_FC2, SHARED_GATE)
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)")


def layer_key(key: str, layer: int) -> str:
    """The stored key of logical layer key `key` in layer `layer` of a model stored layer by layer."""
    return key.replace("decoder.layers.", f"decoder.layers.{layer}.", 1)


def split_layer_key(stored: str) -> tuple[str, int | None]:
    """(logical key, layer) of a stored key: the layer of a per-layer key, None for a stacked or global one."""
    match = _LAYER.fullmatch(stored)
    return (f"decoder.layers.{match.group(2)}", int(match.group(1))) if match else (stored, None)


def full_shapes(m, vocab_rows: int) -> dict[str, tuple]:
    """Every key's global shape for the model `m` (a ModelConfig) with `vocab_rows` embedding rows."""
    L, H, F, d = m.num_layers, m.hidden_size, m.ffn_hidden_size, m.head_dim
    q_rows, qkv_rows = m.num_attention_heads * d, (m.num_attention_heads + 2 * m.kv_heads) * d
    shapes = {EMBED: (vocab_rows, H), INPUT_NORM: (L, H), QKV_WEIGHT: (L, qkv_rows, H)}
    if m.qkv_bias:
        shapes[QKV_BIAS] = (L, qkv_rows)
    if m.qk_layernorm:
        shapes.update({Q_NORM: (L, d), K_NORM: (L, d)})
    shapes.update({PROJ: (L, H, q_rows), POST_NORM: (L, H), FC1: (L, 2 * F, H), FC2: (L, H, F), FINAL_NORM: (H,)})
    if not m.tie_word_embeddings:
        shapes[OUTPUT] = (vocab_rows, H)
    if m.is_moe:
        return _per_layer_shapes(m, shapes)
    return shapes


def _per_layer_shapes(m, stacked: dict[str, tuple]) -> dict[str, tuple]:
    """The shapes of a mixture-of-experts model, stored layer by layer (see the module docstring)."""
    H, E, I, S = m.hidden_size, m.num_experts, m.moe_ffn_hidden_size, m.moe_shared_expert_ffn_hidden_size
    out = {key: shape for key, shape in stacked.items() if key not in LAYER_KEYS}
    for i, moe in enumerate(m.moe_layers):
        layer = {key: shape[1:] for key, shape in stacked.items() if key in LAYER_KEYS}
        if moe:
            del layer[POST_NORM], layer[FC1], layer[FC2]
            layer.update({PRE_MLP_NORM: (H,), ROUTER: (E, H), EXPERT_FC1: (E, 2 * I, H), EXPERT_FC2: (E, H, I)})
            if S is not None:
                layer.update({SHARED_FC1: (2 * S, H), SHARED_FC2: (H, S)})
                if m.moe_shared_expert_gate:
                    layer[SHARED_GATE] = (1, H)
        out.update({layer_key(key, i): shape for key, shape in layer.items()})
    return out


def qkv_group_rows(m) -> int:
    """Rows of linear_qkv per query group: its query heads, one key and one value head."""
    return (m.num_attention_heads // m.kv_heads + 2) * m.head_dim
