"""The Qwen network as megatron-core GPTModel chunks for this rank's pipeline stage(s).

`transformer_config()` maps the project's `Config` onto megatron-core's TransformerConfig (the single
source of truth for shape and numerics once a run starts); `build_model()` returns one `QwenModel` per
virtual pipeline stage held by this rank, each with its share of the layers.

The Qwen release (v1 to Qwen3) is the config's (`model.*`): multi-head or grouped-query attention
(`num_query_groups`), the head width (`kv_channels`), q/k/v bias, per-head query/key RMSNorm (`qk_layernorm`,
Qwen3), tied input/output embeddings and YaRN RoPE scaling.

One model class serves every stage; two choices are made at construction:
- the head of the last stage: ``"lm"`` (logits over the vocabulary, or per-token losses given labels) or
  ``"scalar"`` (one value per token: reward and value models; transformers' Qwen2ForSequenceClassification
  ``score``, Linear(hidden, 1) without bias). A scalar-head model never builds the LM output layer.
- whether RoPE is taken at each token's ``position_ids`` (packed SFT rows, left-padded prompts) or at its
  index in the row (megatron-core's default, pretraining).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from megatron_qwen.config import Config
from megatron_qwen.model.context_parallel import cp_size, thd_layout, thd_multiple, thd_packed_seq_params
from megatron_qwen.model.init import initialize_weights
from megatron_qwen.model.lora import add_adapters
from megatron_qwen.model.rotary import QwenRotaryEmbedding, yarn_settings
from megatron_qwen.model.spec import qwen_block_spec
from megatron_qwen.packed_rows import PackedRows
from megatron_qwen.platform.runtime import Runtime

Head = Literal["lm", "scalar"]
SCALAR_HEAD_KEY = "reward_head.weight"  # the scalar head's global key in checkpoints (reward and value models)


@dataclasses.dataclass
class QwenTransformerConfig(TransformerConfig):
    """TransformerConfig plus the inference-time Qwen features the core attention needs, the FP8 recipe
    of the local spec's linears (torchao; Transformer Engine's FP8 is megatron-core's own ``fp8`` fields), and
    the YaRN factor."""

    qwen_seq_length: int = 2048
    use_logn_attn: bool = False
    attention_windows: tuple = ()  # one per layer, inference only (megatron_qwen.model.window)
    local_fp8_recipe: str | None = None
    # megatron-core's attention multiplies RoPE's cos/sin by YaRN's attention factor (0.1 ln(factor) + 1, as
    # transformers does) for a config with this attribute; 1.0 (no YaRN) gives the factor 1.
    yarn_rotary_scaling_factor: float = 1.0
    # Context parallelism in Transformer Engine's core attention (`te_context_parallel`): the spec takes TE's core
    # attention, and packed rows travel in the THD layout.
    te_context_parallel: bool = False


def te_fp8_settings(recipe: str | None) -> dict:
    """megatron-core's TransformerConfig FP8 fields for a `model.fp8` recipe run by Transformer Engine.

    The hybrid format (e4m3 forward, e5m2 gradients) with current per-tensor scaling (``tensorwise``) or
    delayed scaling from an amax history of 1024 steps, taking its maximum, as Megatron-LM's FP8 examples do.
    """
    if recipe is None:
        return {"fp8": None}
    settings = {"fp8": "hybrid", "fp8_recipe": recipe}
    if recipe == "delayed":
        settings.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    return settings


def te_context_parallel(cfg: Config, runtime: Runtime) -> bool:
    """Whether context parallelism runs in Transformer Engine's core attention (megatron-core's own CP, with
    ``parallel.cp_comm_type`` and packed rows in the THD layout) rather than in SDPAttention's all-gather.

    Only on the TE spec, and only where TE's attention computes what the model asks: it has neither Qwen's LogN
    scaling nor per-layer windows, so a model with ``model.use_logn_attn`` or ``model.attention_windows`` keeps
    SDPAttention's exact CP on the TE spec too (config validation notes it).
    """
    m = cfg.model
    return runtime.use_te and cfg.parallel.cp > 1 and not m.use_logn_attn and not any(m.attention_windows)


def context_parallel_settings(cfg: Config, runtime: Runtime) -> dict:
    """megatron-core's context-parallel fields: the size always; with Transformer Engine's CP (`te_context_parallel`)
    the comm type (p2p ring, all_gather, or a2a: heads scattered over the CP group, DeepSpeed-Ulysses style) and,
    for pipelines, variable sequence lengths (THD micro-batches of packed rows differ in length)."""
    p = cfg.parallel
    settings = {"context_parallel_size": p.cp}
    if te_context_parallel(cfg, runtime):
        settings.update(te_context_parallel=True, cp_comm_type=p.cp_comm_type,
                        hierarchical_context_parallel_sizes=None)
        if p.pp > 1:
            settings["variable_seq_lengths"] = True
            if not cfg.model.is_moe:  # megatron-core refuses its default (allgather) dispatcher with it, unused here
                settings["moe_token_dispatcher_type"] = "alltoall"
    return settings


def transformer_config(cfg: Config, runtime: Runtime) -> QwenTransformerConfig:
    """megatron-core's config for this Qwen model at this run's parallel layout."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    dtype = runtime.params_dtype
    # megatron-core's bias-activation and bias-dropout fusions are torch.compile'd kernels: GPUs only, and only
    # where a C compiler and Python's headers are there to build them (`Runtime.fused_kernels_off`).
    fused = runtime.fused_kernels_off is None
    local_fp8 = None if runtime.use_te else m.fp8
    recompute = {} if t.recompute == "none" else {"recompute_granularity": t.recompute}
    if t.recompute == "full":
        recompute.update(recompute_method="uniform", recompute_num_layers=t.recompute_num_layers)
    elif t.recompute == "selective":
        recompute.update(recompute_modules=["core_attn"])
    return QwenTransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        qk_layernorm=m.qk_layernorm,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        rotary_interleaved=False,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp if p.vpp > 1 else None,
        sequence_parallel=p.sp,
        # megatron-core reads the size for its CP groups, the rotary's split and the schedules' tensor shapes; the
        # core attention is Transformer Engine's (its own CP, `cp_comm_type`) or SDPAttention (`te_context_parallel`).
        **context_parallel_settings(cfg, runtime),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        autocast_dtype=dtype,
        use_cpu_initialization=runtime.on_cpu,
        # Batched p2p posts both directions to the same peer in one call; with interleaving on two
        # pipeline ranks the peer is the same for "prev" and "next", so send/recv pairs would match
        # out of order. Separate isend/irecv keep each direction on its own channel.
        batch_p2p_comm=p.vpp == 1,
        # megatron-core synchronises the whole device after each batched send/recv by default (a workaround for
        # a batch_isend_irecv race that torch fixed in 1.13, pytorch/pytorch#82450); it would stall the gradient
        # reduce overlapped with the 1F1B schedule. Waiting on the requests suffices. (A no-op on CPU ranks.)
        batch_p2p_sync=runtime.on_cpu,
        # GPUs overlap the interleaved schedule's sends and receives with compute (megatron-core allows it only
        # with unbatched p2p); CPU ranks wait for each transfer.
        overlap_p2p_comm=p.vpp > 1 and not runtime.on_cpu,
        # Gradients are summed per token and divided by the global token count once, so the loss
        # is the same per-token mean at every TP/PP/DP layout.
        calculate_per_token_loss=True,
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        # Needs apex's fused_weight_gradient_mlp_cuda (megatron-core's ColumnParallelLinear, the output layer in
        # both specs, refuses to build without it) and linears that all support it (`Runtime.wgrad_fusion_off`).
        gradient_accumulation_fusion=runtime.wgrad_fusion_off(local_fp8=local_fp8 is not None) is None,
        **te_fp8_settings(m.fp8 if runtime.use_te else None),
        local_fp8_recipe=local_fp8,
        cuda_graph_scope=[],  # the whole layer; megatron-core's default ("full") is deprecated and warns
        qwen_seq_length=m.seq_length,
        use_logn_attn=m.use_logn_attn,
        attention_windows=tuple(m.attention_windows),
        yarn_rotary_scaling_factor=m.rope_scaling_factor if m.rope_scaling == "yarn" else 1.0,
        **recompute,
        **moe_settings(cfg, runtime),
    )


def moe_settings(cfg: Config, runtime: Runtime) -> dict:
    """megatron-core's mixture-of-experts fields for the model (none for a dense one).

    transformers' Qwen2-MoE / Qwen3-MoE router takes the softmax over all experts, then the top k, renormalised
    to sum to 1 when ``norm_topk_prob``: without renormalisation that is megatron-core's pre-softmax routing, with
    it the softmax over the top k logits (megatron-core's default). Routing is dropless unless a capacity
    factor is set; tokens travel by all-to-all; each expert is its own SwiGLU MLP (grouped GEMMs need GPU kernels).
    """
    m, p = cfg.model, cfg.parallel
    if not m.is_moe:
        return {}
    if m.fp8 is not None and runtime.use_te:
        # The local layers pad each expert's rows for FP8 (model.fp8); Transformer Engine's MoE FP8 is not tested here.
        raise ValueError(
            f"model.fp8={m.fp8} with a mixture-of-experts model (model.num_experts={m.num_experts}) runs on the local "
            "layers' torchao FP8, not Transformer Engine's; set model.fp8_backend=torchao (or model.fp8=null)"
        )
    return dict(
        num_moe_experts=m.num_experts,
        moe_router_topk=m.moe_router_topk,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_router_pre_softmax=not m.moe_norm_topk_prob,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_ffn_hidden_size,
        moe_shared_expert_gate=m.moe_shared_expert_gate,
        moe_layer_freq=[int(moe) for moe in m.moe_layers],
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        moe_z_loss_coeff=m.moe_z_loss_coeff,
        moe_expert_capacity_factor=m.moe_capacity_factor,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.tp if p.etp is None else p.etp,
    )


class ScalarHead(torch.nn.Module):
    """Linear(hidden, 1, bias=False) over the final hidden states: one value for every token.

    The weight is replicated on every tensor-parallel rank (initialised with the rest of the model by
    `build_model`). Under sequence parallelism each rank scores its own tokens, the values are gathered,
    and the weight's gradient is summed over the TP group (the `sequence_parallel` attribute asks
    megatron-core's finalize_model_grads for that, as for the norms).
    """

    def __init__(self, config):
        super().__init__()
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.empty(1, config.hidden_size, device=device, dtype=config.params_dtype))
        self.sequence_parallel = config.sequence_parallel
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[s (/tp), b, h] hidden states -> [b, s] fp32 values (the full sequence on every TP rank)."""
        values = (hidden_states.float() @ self.weight.float().t()).squeeze(-1)
        if self.sequence_parallel:
            # Every TP rank computes the same loss from the gathered values, so backward only splits.
            values = gather_from_sequence_parallel_region(values, tensor_parallel_output_grad=False)
        return values.t()


class QwenModel(GPTModel):
    """megatron-core's GPTModel with Qwen's rotary embedding, a choice of head and of rotary positions.

    The last pipeline stage returns what the head gives: per-token losses [b, s] when labels are passed,
    else logits [s, b, vocab / tp] (``head="lm"``), or values [b, s] (``head="scalar"``). Other stages return
    hidden states. With ``rope_at_positions`` each token is rotated by the angles of its own position id; with
    an inference context, ``position_ids`` then covers every position of the sequence so far, because the
    cached keys are rotated again at each step.
    """

    def __init__(self, config: QwenTransformerConfig, cfg: Config, vp_stage: int | None, use_te: bool,
                 head: Head = "lm", rope_at_positions: bool = False):
        m = cfg.model
        num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        super().__init__(
            config=config,
            transformer_layer_spec=qwen_block_spec(
                num_layers, use_te, config.local_fp8_recipe, qk_layernorm=config.qk_layernorm,
                moe_layers=m.moe_layers[offset:offset + num_layers] if m.is_moe else None,
                shared_expert=m.moe_shared_expert_ffn_hidden_size is not None,
                te_core_attention=config.te_context_parallel,
            ),
            vocab_size=m.padded_vocab_size,
            max_sequence_length=m.max_position_embeddings,
            pre_process=pre,
            # GPTModel builds the LM output layer with the final norm; a scalar head needs the norm alone.
            post_process=post and head == "lm",
            parallel_output=True,
            # A tied model's output layer is the input embedding (with PP > 1 the last stage holds a copy that
            # megatron-core keeps equal by summing both gradients); a scalar head has no output layer to tie.
            share_embeddings_and_output_weights=m.tie_word_embeddings and head == "lm",
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=m.rotary_base,
            vp_stage=vp_stage,
        )
        self.head = head
        self.rope_at_positions = rope_at_positions
        self.rotary_pos_emb = QwenRotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=1.0,
            rotary_interleaved=False,
            rotary_base=m.rotary_base,
            use_cpu_initialization=config.use_cpu_initialization,
            seq_length=m.seq_length,
            use_dynamic_ntk=m.use_dynamic_ntk,
            yarn=yarn_settings(m),
        )
        if post and head == "scalar":
            self.post_process = self.decoder.post_process = True
            self.decoder.final_layernorm = build_module(
                self.decoder.submodules.layer_norm, config=config, hidden_size=config.hidden_size,
                eps=config.layernorm_epsilon
            )
            self.reward_head = ScalarHead(config)  # stored as SCALAR_HEAD_KEY

    def forward(self, input_ids, position_ids, attention_mask, *args, packed_seq_params=None, **kwargs):
        """GPTModel's forward; with Transformer Engine's context parallelism, packed rows (`PackedRows`, the full
        rows' boundaries) become the THD layout's PackedSeqParams: the tokens then come as this CP rank's share of
        the THD stream (`context_parallel.split_batch` with the model), [1, T / cp]."""
        if self.config.te_context_parallel and isinstance(packed_seq_params, PackedRows):
            layout = thd_layout(packed_seq_params.boundaries, cp_size(), thd_multiple(self.config))
            packed_seq_params = thd_packed_seq_params(layout, packed_seq_params.cu_seqlens_q.device)
        return super().forward(input_ids, position_ids, attention_mask, *args, packed_seq_params=packed_seq_params,
                               **kwargs)

    def _preprocess(self, input_ids, position_ids, **kwargs):
        packed = kwargs.get("packed_seq_params")
        thd = packed is not None and packed.qkv_format == "thd"
        # In the THD layout megatron-core's attention rotates each packed sequence from position 0 itself, taking
        # every CP rank's chunks of it from the angle table (rope_utils._apply_rotary_pos_emb_thd).
        if not self.rope_at_positions or position_ids is None or thd:
            return super()._preprocess(input_ids=input_ids, position_ids=position_ids, **kwargs)
        # GPTModel would build the angle table of rows 0..S-1; here each token is rotated at its own position.
        self.position_embedding_type = "none"
        try:
            out = super()._preprocess(input_ids=input_ids, position_ids=position_ids, **kwargs)
        finally:
            self.position_embedding_type = "rope"
        return (out[0], self.rotary_pos_emb.angles(position_ids), *out[2:])

    def _postprocess(self, hidden_states, **kwargs):
        if self.head == "lm" or not self.post_process:
            return super()._postprocess(hidden_states, **kwargs)
        return self.reward_head(hidden_states)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        if self.head == "lm":
            return super().sharded_state_dict(prefix, sharded_offsets, metadata)
        # GPTModel's version adjusts the LM output layer's entries, which a scalar-head model does not have.
        return MegatronModule.sharded_state_dict(self, prefix, sharded_offsets,
                                                 ensure_metadata_has_dp_cp_group(metadata))


def build_model(cfg: Config, runtime: Runtime, head: Head = "lm", rope_at_positions: bool = False,
                adapters: bool = False) -> list[QwenModel]:
    """This rank's model chunks: one per virtual pipeline stage (a single chunk without VPP), initialised from
    ``training.seed`` with the weights the single-process model has at every layout (`model.init`). With
    `adapters`, the ``peft.*`` low-rank adapters are added and every other weight is frozen (`model.lora`).

    Needs megatron-core's parallel state (see `megatron_qwen.platform.launch.init_distributed`).
    """
    config = transformer_config(cfg, runtime)
    groups_ep = parallel_state.get_expert_model_parallel_world_size()
    if cfg.model.is_moe and groups_ep != cfg.parallel.ep:
        # megatron-core would build every expert on every rank without a word.
        raise ValueError(f"parallel.ep={cfg.parallel.ep} but the process groups were made with EP={groups_ep}: pass "
                         "ep to init_distributed")
    stages = list(range(cfg.parallel.vpp)) if cfg.parallel.vpp > 1 else [None]
    chunks = [QwenModel(config, cfg, stage, runtime.use_te, head, rope_at_positions) for stage in stages]
    if not runtime.on_cpu:
        chunks = [chunk.to(runtime.device) for chunk in chunks]
    # Over megatron-core's own initialisation, which must still run: it is also where the layers mark their
    # weights tensor-parallel (perform_initialization=False leaves them unmarked, and the gradient norm then
    # counts only TP rank 0's shards).
    for chunk in chunks:
        initialize_weights(chunk, cfg.training.seed, cfg.model.init_method_std, cfg.model.num_layers)
        if adapters:
            add_adapters(chunk, cfg)
    return chunks
