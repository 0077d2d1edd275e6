"""Global tensor keys of a Qwen model in a megatron-core checkpoint, with their full shapes.

Layer tensors are stacked on a leading axis of size num_layers. The two norms are stored under
Transformer Engine's fused names (see `megatron_qwen.model.spec`); linear_qkv rows are per query group g
[q heads of g; k_g; v_g] (heads / groups query heads, then one key and one value head, each head_dim rows;
with multi-head attention a group is one head); linear_fc1 rows are [gate; up] over the full width
(megatron-core interleaves them per tensor-parallel shard itself when it loads). A model with tied
embeddings stores no output layer.
"""

from __future__ import annotations

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

# The scalar head of reward and value models (megatron_qwen.model.qwen.ScalarHead, held as `reward_head`).
SCALAR_HEAD = "reward_head.weight"

LAYER_KEYS = (INPUT_NORM, QKV_WEIGHT, QKV_BIAS, Q_NORM, K_NORM, PROJ, POST_NORM, FC1, FC2)


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
    return shapes


def qkv_group_rows(m) -> int:
    """Rows of linear_qkv per query group: its query heads, one key and one value head."""
    return (m.num_attention_heads // m.kv_heads + 2) * m.head_dim
