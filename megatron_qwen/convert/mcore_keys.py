"""Global tensor keys of a Qwen model in a megatron-core checkpoint, with their full shapes.

Layer tensors are stacked on a leading axis of size num_layers. The two norms are stored under
Transformer Engine's fused names (see `megatron_qwen.model.spec`); linear_qkv rows are per head
[q_h; k_h; v_h]; linear_fc1 rows are [gate; up] over the full width (megatron-core interleaves them
per tensor-parallel shard itself when it loads).
"""

from __future__ import annotations

EMBED = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
INPUT_NORM = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
QKV_WEIGHT = "decoder.layers.self_attention.linear_qkv.weight"
QKV_BIAS = "decoder.layers.self_attention.linear_qkv.bias"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
POST_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
FC1 = "decoder.layers.mlp.linear_fc1.weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"

# The scalar head of reward and value models (megatron_qwen.model.qwen.ScalarHead, held as `reward_head`).
SCALAR_HEAD = "reward_head.weight"

LAYER_KEYS = (INPUT_NORM, QKV_WEIGHT, QKV_BIAS, PROJ, POST_NORM, FC1, FC2)


def full_shapes(num_layers: int, hidden: int, ffn: int, vocab_rows: int) -> dict[str, tuple]:
    """Every key's global shape for a model of these sizes."""
    L, H, F = num_layers, hidden, ffn
    return {
        EMBED: (vocab_rows, H),
        INPUT_NORM: (L, H),
        QKV_WEIGHT: (L, 3 * H, H),
        QKV_BIAS: (L, 3 * H),
        PROJ: (L, H, H),
        POST_NORM: (L, H),
        FC1: (L, 2 * F, H),
        FC2: (L, H, F),
        FINAL_NORM: (H,),
        OUTPUT: (vocab_rows, H),
    }
