"""Build the Qwen network as megatron-core GPTModel chunks for this rank's pipeline stage(s).

`transformer_config()` maps the project's `Config` onto megatron-core's TransformerConfig (the single
source of truth for shape and numerics once a run starts); `build_model()` returns one GPTModel per
virtual pipeline stage held by this rank, each with its share of the layers.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import get_num_layers_to_build

from megatron_qwen.config import Config
from megatron_qwen.model.rotary import QwenRotaryEmbedding
from megatron_qwen.model.spec import qwen_block_spec, transformer_engine_available


@dataclasses.dataclass
class QwenTransformerConfig(TransformerConfig):
    """TransformerConfig plus the two inference-time Qwen features the core attention needs."""

    qwen_seq_length: int = 2048
    use_logn_attn: bool = False


def use_transformer_engine(cfg: Config, on_cpu: bool) -> bool:
    """Whether to build the Transformer Engine spec: asked for, or `auto` with TE importable on GPU."""
    impl = cfg.model.transformer_impl
    if impl == "transformer_engine":
        if not transformer_engine_available():
            raise RuntimeError(
                "model.transformer_impl=transformer_engine but transformer_engine does not import; "
                "install Transformer Engine or set model.transformer_impl=local"
            )
        return True
    return impl == "auto" and not on_cpu and transformer_engine_available()


def params_dtype(cfg: Config, on_cpu: bool) -> torch.dtype:
    """bf16 on GPU and fp32 on CPU unless `training.precision` says otherwise."""
    precision = cfg.training.precision
    if precision == "auto":
        precision = "fp32" if on_cpu else "bf16"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def transformer_config(cfg: Config, on_cpu: bool) -> QwenTransformerConfig:
    """megatron-core's config for this Qwen model at this run's parallel layout."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    dtype = params_dtype(cfg, on_cpu)
    te = use_transformer_engine(cfg, on_cpu)
    fused = not on_cpu  # megatron-core's fused kernels are CUDA (or torch.compile) kernels
    recompute = {} if t.recompute == "none" else {"recompute_granularity": t.recompute}
    if t.recompute == "full":
        recompute.update(recompute_method="uniform", recompute_num_layers=t.recompute_num_layers)
    elif t.recompute == "selective":
        recompute.update(recompute_modules=["core_attn"])
    return QwenTransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        rotary_interleaved=False,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp if p.vpp > 1 else None,
        sequence_parallel=p.sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        autocast_dtype=dtype,
        use_cpu_initialization=on_cpu,
        # Batched p2p posts both directions to the same peer in one call; with interleaving on two
        # pipeline ranks the peer is the same for "prev" and "next", so send/recv pairs would match
        # out of order. Separate isend/irecv keep each direction on its own channel.
        batch_p2p_comm=p.vpp == 1,
        # Gradients are summed per token and divided by the global token count once, so the loss
        # is the same per-token mean at every TP/PP/DP layout.
        calculate_per_token_loss=True,
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=te,
        fp8=m.fp8 if te else None,
        qwen_seq_length=m.seq_length,
        use_logn_attn=m.use_logn_attn,
        **recompute,
    )


def build_model_chunk(cfg: Config, config: QwenTransformerConfig, vp_stage: int | None, te: bool) -> GPTModel:
    """One GPTModel holding this pipeline rank's layers of virtual stage `vp_stage`."""
    m = cfg.model
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    n_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=qwen_block_spec(n_layers, te),
        vocab_size=m.padded_vocab_size,
        max_sequence_length=m.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=m.rotary_base,
        vp_stage=vp_stage,
    )
    model.rotary_pos_emb = QwenRotaryEmbedding(
        kv_channels=config.kv_channels,
        rotary_percent=1.0,
        rotary_interleaved=False,
        rotary_base=m.rotary_base,
        use_cpu_initialization=config.use_cpu_initialization,
        seq_length=m.seq_length,
        use_dynamic_ntk=m.use_dynamic_ntk,
    )
    return model


def build_model(cfg: Config, on_cpu: bool) -> list[GPTModel]:
    """This rank's model chunks: one per virtual pipeline stage (a single chunk without VPP).

    Needs megatron-core's parallel state (see `megatron_qwen.platform.launch.init_distributed`).
    """
    config = transformer_config(cfg, on_cpu)
    te = use_transformer_engine(cfg, on_cpu)
    vpp = cfg.parallel.vpp
    stages = list(range(vpp)) if vpp > 1 else [None]
    chunks = [build_model_chunk(cfg, config, stage, te) for stage in stages]
    if not on_cpu:
        chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in chunks]
    return chunks
