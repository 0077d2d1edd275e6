"""The Qwen model built on megatron-core (TP=PP=1) against independent references: transformers'
Qwen2ForCausalLM for the network, a plain-torch Qwen v1 for NTK/LogN, and the v1 initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from qwen_reference import megatron_to_qwen2, qwen_v1_forward

VOCAB = 2048


def tiny_cfg(*overrides):
    from megatron_qwen.config import load_config

    return load_config("configs/tiny.yaml", [f"model.padded_vocab_size={VOCAB}", *overrides])


def build(cfg, randomize=True):
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    torch.manual_seed(0)
    (model,) = build_model(cfg, Runtime.cpu())
    if randomize:
        # Larger-than-init weights, non-zero biases and non-unit norms so every mapping matters.
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.data.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.data.copy_(torch.randn(p.shape, generator=gen) * (0.1 if name.endswith("bias") else 0.05))
    return model


def qwen2_from(model, cfg):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    m = cfg.model
    hf_cfg = Qwen2Config(
        vocab_size=m.padded_vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_attention_heads, rms_norm_eps=m.norm_epsilon,
        max_position_embeddings=m.max_position_embeddings, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": m.rotary_base},
    )
    hf_cfg._attn_implementation = "eager"
    hf = Qwen2ForCausalLM(hf_cfg).eval()
    weights = megatron_to_qwen2(model.state_dict(), m.num_layers, m.num_attention_heads, m.head_dim)
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf, weights


def logits_of(model, tokens):
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None).float()


@pytest.mark.usefixtures("single_rank")
def test_forward_matches_transformers_qwen2():
    cfg = tiny_cfg()
    model = build(cfg).eval()
    hf, _ = qwen2_from(model, cfg)
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(2))
    ours = logits_of(model, tokens)
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits.float()
    assert ours.shape == ref.shape == (2, 48, VOCAB)
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-4, f"max |logit difference| {diff:.3e} against transformers Qwen2"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.usefixtures("single_rank")
def test_initialisation_follows_qwen_v1():
    cfg = tiny_cfg()
    model = build(cfg, randomize=False)
    n_layers = cfg.model.num_layers
    sd = model.state_dict()
    out_std = 0.02 / math.sqrt(2 * n_layers)
    expected = {
        "embedding.word_embeddings.weight": 0.02,
        "output_layer.weight": 0.02,
        "decoder.layers.0.self_attention.linear_qkv.weight": 0.02,
        "decoder.layers.0.mlp.linear_fc1.weight": 0.02,
        "decoder.layers.0.self_attention.linear_proj.weight": out_std,
        "decoder.layers.0.mlp.linear_fc2.weight": out_std,
    }
    for name, std in expected.items():
        measured = sd[name].std().item()
        assert abs(measured - std) / std < 0.05, f"{name}: std {measured:.5f}, Qwen v1 uses {std:.5f}"
        assert abs(sd[name].mean().item()) < 0.1 * std
    assert torch.count_nonzero(sd["decoder.layers.0.self_attention.linear_qkv.bias"]) == 0
    for name in ("decoder.layers.0.input_layernorm.weight", "decoder.layers.0.pre_mlp_layernorm.weight",
                 "decoder.final_layernorm.weight"):
        assert torch.equal(sd[name], torch.ones_like(sd[name]))
    # No bias on the attention output or the MLP; fc1 is [gate; up] of the per-branch width.
    assert not any(k.endswith(("linear_proj.bias", "linear_fc1.bias", "linear_fc2.bias")) for k in sd)
    assert sd["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * cfg.model.ffn_hidden_size, cfg.model.hidden_size)


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("length", [12, 24, 40])
def test_dynamic_ntk_and_logn_beyond_seq_length(length):
    seq_length = 16
    cfg = tiny_cfg(f"model.seq_length={seq_length}", "model.use_dynamic_ntk=true", "model.use_logn_attn=true")
    model = build(cfg)
    _, weights = qwen2_from(model, cfg)
    m = cfg.model
    common = dict(num_layers=m.num_layers, heads=m.num_attention_heads, head_dim=m.head_dim, eps=m.norm_epsilon,
                  base=m.rotary_base, seq_length=seq_length)
    tokens = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(3))

    ref_long = qwen_v1_forward(weights, tokens, use_dynamic_ntk=True, use_logn_attn=True, **common)
    ref_plain = qwen_v1_forward(weights, tokens, use_dynamic_ntk=False, use_logn_attn=False, **common)
    ours_eval = logits_of(model.eval(), tokens)
    ours_train = logits_of(model.train(), tokens)

    assert (ours_eval - ref_long).abs().max().item() < 1e-4
    # Training never scales: the plain network at any length.
    assert (ours_train - ref_plain).abs().max().item() < 1e-4
    if length <= seq_length:
        assert torch.allclose(ref_long, ref_plain)
    else:  # the references really differ, so the comparisons above can fail
        assert (ref_long - ref_plain).abs().max().item() > 1e-2


def _te_missing() -> str | None:
    """Why the Transformer Engine spec cannot run here, None when it can."""
    from megatron_qwen.platform.runtime import Accelerators

    if not torch.cuda.is_available():
        return "no GPU"
    te = Accelerators.detect().transformer_engine
    return None if te is None else f"transformer_engine is {te}"


def _te_fp8_missing() -> str | None:
    """Why Transformer Engine's FP8 cannot run here, None when it can."""
    missing = _te_missing()
    if missing is None and torch.cuda.get_device_capability() < (8, 9):
        return (f"the GPU's compute capability {torch.cuda.get_device_capability()} is below 8.9 "
                "(Ada, Hopper, Blackwell)")
    return missing


@pytest.fixture(scope="module")
def te_results(tmp_path_factory):
    """The TE worker's figures: fp32 TE against local logits, and with an FP8 GPU the FP8 cases' errors."""
    from spawn import cpu_env, run_torchrun

    env = cpu_env()
    env.pop("MEGATRON_QWEN_DEVICE")
    argv = ["tests/parallel/te_worker.py", "--workdir", str(tmp_path_factory.mktemp("te"))]
    out = run_torchrun(1, argv + ([] if _te_fp8_missing() else ["--fp8"]), env=env)
    results = {}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            results["fp32"] = float(line.split()[1])
        elif line.startswith("FP8 "):
            results[line.split()[1]] = float(line.split()[2])
    return results


@pytest.mark.skipif(_te_missing() is not None, reason=f"the Transformer Engine spec needs transformer_engine and a GPU "
                    f"({_te_missing()}); without them the local spec runs and is tested above")
def test_transformer_engine_spec_matches_local_spec(te_results):
    assert te_results["fp32"] < 1e-3, f"TE and local specs differ by {te_results['fp32']} in fp32 logits"


@pytest.mark.skipif(_te_fp8_missing() is not None, reason=f"Transformer Engine's FP8 needs transformer_engine and a "
                    f"GPU with FP8 ({_te_fp8_missing()}); torchao's FP8 is tested on CPU in test_fp8.py")
def test_transformer_engine_fp8_matches_torchao_fp8(te_results):
    # FP8 engaged (far from the fp32 logits) and as close to them as torchao's FP8 with the same recipe: the
    # same roundings of the same values, so the same error statistics.
    torchao = te_results["torchao-tensorwise"]
    for name in ("te-tensorwise", "te-delayed"):
        assert 1e-3 < te_results[name] and 0.5 < te_results[name] / torchao < 2, (name, te_results)
