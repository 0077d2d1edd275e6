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


# The MoE worker's tiny Qwen2-MoE (tests/parallel/moe_worker.py) with the real vocabulary, for the commands that
# take text (serve, evaluate).
CHECKPOINT_OVERRIDES = ["model.padded_vocab_size=151936", "model.seq_length=64", "model.max_position_embeddings=512",
                        "training.seed=7"]


def save_moe_checkpoint(path: Path) -> list:
    """A tiny Qwen2-MoE (shared expert with its gate, a dense layer among MoE layers) saved as a checkpoint of this
    project at `path` (with its model config); returns the saved model chunks, in eval mode, as the reference.
    The weights are the seed's plus noise, so a command that ignored the checkpoint would not pass. Needs
    megatron-core for one rank in this process (the `single_rank` fixture)."""
    import yaml

    from megatron_qwen.checkpoint.io import save_model
    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime
    from parallel.moe_worker import MOE_OVERRIDES

    cfg = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml", [*MOE_OVERRIDES, *CHECKPOINT_OVERRIDES])
    chunks = build_model(cfg, Runtime.cpu(), rope_at_positions=True)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in chunks[0].parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    save_model(chunks, path)
    (path / "model_config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    return [chunk.eval() for chunk in chunks]
