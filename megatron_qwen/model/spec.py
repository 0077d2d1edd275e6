"""The Qwen transformer layer as a megatron-core ModuleSpec: local torch modules or Transformer Engine.

Qwen in megatron-core terms: pre-norm RMSNorm, fused QKV projection (with bias up to Qwen2.5: the config's
``add_qkv_bias``; grouped-query rows by ``num_query_groups``), Qwen3's per-head query/key RMSNorm when asked, no
bias on the attention output or the MLP, SwiGLU with fc1 = [gate; up], rotate-half RoPE (set on the model), SDPA
core attention (Transformer Engine's when its context parallelism runs). The Transformer Engine spec fuses each
RMSNorm into the following linear layer; both specs
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
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_qwen.model.attention import SDPAttention
from megatron_qwen.model.moe import QwenTopKRouter
from megatron_qwen.model.norm import QwenRMSNorm


def qwen_layer_spec(use_transformer_engine: bool = False, local_fp8_recipe: str | None = None,
                    qk_layernorm: bool = False, moe: bool = False, shared_expert: bool = False,
                    te_core_attention: bool = False) -> ModuleSpec:
    """One Qwen decoder layer; `local_fp8_recipe` (local spec only) runs its four linears' GEMMs in FP8;
    `qk_layernorm` (Qwen3) adds an RMSNorm over head_dim on every query and key head, before RoPE; `moe` makes
    the MLP a mixture of experts, with a shared expert beside the routed ones when `shared_expert`;
    `te_core_attention` (TE spec only) makes the core attention Transformer Engine's, whose context parallelism
    is megatron-core's own (`megatron_qwen.model.qwen.te_context_parallel` decides), instead of SDPAttention."""
    core_attention = SDPAttention
    if use_transformer_engine:
        # Imported only for the TE spec: the module needs Transformer Engine, which is optional.
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        if te_core_attention:
            core_attention = TEDotProductAttention

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
    if moe:
        if use_transformer_engine:
            # The router and the experts read the normed input separately: the norm is a TENorm of its own, and the
            # experts' fc1 a plain TE linear (a fused-norm one would normalise a second time).
            pre_mlp_norm, fc1 = head_norm, TEColumnParallelLinear
        mlp = moe_mlp_spec(fc1, fc2, shared_expert)
        keys_map = {k: v for k, v in keys_map.items() if k != "pre_mlp_layernorm."}
    else:
        mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2))
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv,
                    core_attention=core_attention,
                    linear_proj=proj,
                    q_layernorm=head_norm if qk_layernorm else IdentityOp,
                    k_layernorm=head_norm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def moe_mlp_spec(fc1, fc2, shared_expert: bool) -> ModuleSpec:
    """megatron-core's MoELayer whose routed experts (and shared expert, when asked) are SwiGLU MLPs of the
    given column/row-parallel linears. Whether the shared expert is gated is the config's
    (``moe_shared_expert_gate``, read by MoELayer)."""
    expert = MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2)
    return ModuleSpec(
        module=MoELayer,
        submodules=MoESubmodules(
            router=QwenTopKRouter,
            experts=ModuleSpec(module=SequentialMLP, submodules=expert),
            shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=expert) if shared_expert else None,
        ),
    )


def qwen_block_spec(
    num_layers: int, use_transformer_engine: bool = False, local_fp8_recipe: str | None = None,
    qk_layernorm: bool = False, moe_layers: list[bool] | None = None, shared_expert: bool = False,
    te_core_attention: bool = False,
) -> TransformerBlockSubmodules:
    """`num_layers` Qwen layers (this pipeline stage's share) and the final RMSNorm; `moe_layers` (one flag per
    layer of this share) marks the mixture-of-experts layers, `shared_expert` gives them a shared expert;
    `te_core_attention`: Transformer Engine's core attention (see `qwen_layer_spec`)."""
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm  # optional, as above

        final_norm = TENorm
    else:
        final_norm = QwenRMSNorm
    flags = moe_layers if moe_layers is not None else [False] * num_layers
    if len(flags) != num_layers:
        raise ValueError(f"moe_layers has {len(flags)} flags for {num_layers} layers")
    specs = {moe: qwen_layer_spec(use_transformer_engine, local_fp8_recipe, qk_layernorm, moe, shared_expert,
                                  te_core_attention)
             for moe in set(flags)}
    return TransformerBlockSubmodules(layer_specs=[specs[moe] for moe in flags], layer_norm=final_norm)
