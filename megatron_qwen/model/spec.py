"""The Qwen transformer layer as a megatron-core ModuleSpec: local torch modules or Transformer Engine.

Qwen in megatron-core terms: pre-norm RMSNorm, fused QKV projection (with bias up to Qwen2.5: the config's
``add_qkv_bias``; grouped-query rows by ``num_query_groups``), Qwen3's per-head query/key RMSNorm when asked, no
bias on the attention output or the MLP, SwiGLU with fc1 = [gate; up], rotate-half RoPE (set on the model), SDPA
core attention. The Transformer Engine spec fuses each RMSNorm into the following linear layer; both specs
keep the same checkpoint keys. FP8 runs in either: Transformer Engine's own, or (local spec) the same
tensor-parallel linears with their GEMMs in FP8 through torchao (`megatron_qwen.model.fp8`).
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_qwen.model.attention import SDPAttention
from megatron_qwen.model.norm import QwenRMSNorm


def qwen_layer_spec(use_transformer_engine: bool = False, local_fp8_recipe: str | None = None,
                    qk_layernorm: bool = False) -> ModuleSpec:
    """One Qwen decoder layer; `local_fp8_recipe` (local spec only) runs its four linears' GEMMs in FP8;
    `qk_layernorm` (Qwen3) adds an RMSNorm over head_dim on every query and key head, before RoPE."""
    if use_transformer_engine:
        # Imported only for the TE spec: the module needs Transformer Engine, which is optional.
        from megatron.core.extensions.transformer_engine import (
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        qkv, proj, fc1, fc2 = (TELayerNormColumnParallelLinear, TERowParallelLinear,
                               TELayerNormColumnParallelLinear, TERowParallelLinear)
        input_norm = pre_mlp_norm = IdentityOp  # fused into qkv / fc1
        head_norm = TENorm
        keys_map = {}
    else:
        qkv, proj, fc1, fc2 = ColumnParallelLinear, RowParallelLinear, ColumnParallelLinear, RowParallelLinear
        if local_fp8_recipe is not None:
            # Imported only with FP8 on: torchao is needed for nothing else.
            from megatron_qwen.model.fp8 import float8_parallel_linear_specs

            qkv, proj, fc1, fc2 = float8_parallel_linear_specs(local_fp8_recipe)
        input_norm = pre_mlp_norm = head_norm = QwenRMSNorm
        # Store the norms under Transformer Engine's fused names so both specs share checkpoints.
        keys_map = {
            "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
        }
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv,
                    core_attention=SDPAttention,
                    linear_proj=proj,
                    q_layernorm=head_norm if qk_layernorm else IdentityOp,
                    k_layernorm=head_norm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def qwen_block_spec(
    num_layers: int, use_transformer_engine: bool = False, local_fp8_recipe: str | None = None,
    qk_layernorm: bool = False,
) -> TransformerBlockSubmodules:
    """`num_layers` Qwen layers (this pipeline stage's share) and the final RMSNorm."""
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm  # optional, as above

        final_norm = TENorm
    else:
        final_norm = QwenRMSNorm
    layer = qwen_layer_spec(use_transformer_engine, local_fp8_recipe, qk_layernorm)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)
