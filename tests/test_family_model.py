"""Every Qwen architecture the one model class builds (Qwen1.5, Qwen2.5, Qwen3, tied and untied) against
independent references: transformers' Qwen2ForCausalLM / Qwen3ForCausalLM in fp32 (logits at TP=1, YaRN logits,
greedy generation), the single-process run (10 training steps at TP x PP with SP, interleaved PP and the
distributed optimizer, tied embeddings at PP > 1 included), and the deterministic initialisation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from parallel.generate_worker import NEW_TOKENS, PROMPTS, family_tokens
from qwen_reference import FAMILY_ARCHS, YARN, arch_overrides, hf_family_model, megatron_to_qwen2, randomize_weights
from spawn import run_torchrun

VOCAB = 1024
ATOL = 1e-4


def family_cfg(arch: str, *overrides):
    from megatron_qwen.config import load_config

    return load_config("configs/tiny.yaml", [*FAMILY_ARCHS[arch], f"model.padded_vocab_size={VOCAB}", *overrides])


def build(cfg):
    """The TP=1 model with weights larger than initialisation, non-zero biases and non-unit norms, so that every
    mapping (q/k/v rows per group, biases, q/k norms, the tied head) changes the logits."""
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    (model,) = build_model(cfg, Runtime.cpu())
    randomize_weights(model)
    return model.eval()


def reference(model, cfg):
    m = cfg.model
    weights = megatron_to_qwen2(model.state_dict(), m.num_layers, m.num_attention_heads, m.head_dim, m.kv_heads,
                                tied=m.tie_word_embeddings)
    return hf_family_model(m, weights)


def compare(model, hf, tokens) -> float:
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        ours = model(tokens, positions, None).float()
        ref = hf(input_ids=tokens).logits.float()
    assert ours.shape == ref.shape == (*tokens.shape, VOCAB)
    return (ours - ref).abs().max().item()


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("arch", list(FAMILY_ARCHS))
def test_logits_equal_transformers(arch):
    cfg = family_cfg(arch)
    model = build(cfg)
    m = cfg.model
    # The architecture really is what the config asks for.
    attn = model.decoder.layers[0].self_attention
    qkv_rows = (m.num_attention_heads + 2 * m.kv_heads) * m.head_dim
    assert attn.linear_qkv.weight.shape == (qkv_rows, m.hidden_size)
    assert (attn.linear_qkv.bias is not None) == m.qkv_bias
    assert (type(attn.q_layernorm).__name__ == "QwenRMSNorm") == m.qk_layernorm
    assert (model.output_layer.weight is None) == m.tie_word_embeddings
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    diff = compare(model, reference(model, cfg), tokens)
    assert diff < ATOL, f"{arch}: max |logit difference| {diff:.3e} against transformers"


@pytest.mark.usefixtures("single_rank")
def test_initialisation_of_the_new_weights():
    """q/k norms start at 1 and a tied model has one embedding matrix, drawn as the untied model's embedding is
    (init.py draws each tensor from its checkpoint key: the tied output layer is stored under the embedding's)."""
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    (tied,) = build_model(family_cfg("qwen3"), Runtime.cpu())
    (untied,) = build_model(family_cfg("qwen3-untied"), Runtime.cpu())
    sd = tied.state_dict()
    for i in range(len(tied.decoder.layers)):
        for norm in ("q_layernorm", "k_layernorm"):
            weight = sd[f"decoder.layers.{i}.self_attention.{norm}.weight"]
            assert weight.shape == (64,) and torch.equal(weight, torch.ones(64))
    assert "output_layer.weight" not in sd and tied.output_layer.weight is None
    assert torch.equal(sd["embedding.word_embeddings.weight"], untied.state_dict()["embedding.word_embeddings.weight"])
    assert not any(k.endswith("linear_qkv.bias") for k in sd)


@pytest.mark.usefixtures("single_rank")
def test_fp8_local_spec_builds_with_qk_norm():
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    cfg = family_cfg("qwen3", "model.fp8=tensorwise", "model.fp8_backend=torchao")
    (model,) = build_model(cfg, Runtime.cpu())
    attn = model.decoder.layers[0].self_attention
    assert type(attn.q_layernorm).__name__ == "QwenRMSNorm"
    assert "Float8" in type(attn.linear_qkv).__name__, type(attn.linear_qkv).__name__
    tokens = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(tokens, torch.arange(32)[None], None)
    assert logits.shape == (1, 32, VOCAB) and torch.isfinite(logits).all()


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("arch", ["qwen2.5", "qwen3"])
def test_yarn_logits_equal_transformers(arch):
    """YaRN (rope_scaling as Qwen2.5's 128K recipe, scaled down): blended inverse frequencies and the attention
    factor on cos/sin, over a sequence longer than the original context."""
    cfg = family_cfg(arch, *YARN)
    model = build(cfg)
    hf = reference(model, cfg)
    assert hf.model.rotary_emb.attention_scaling > 1.1  # the factor is really there to get wrong
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(4))
    diff = compare(model, hf, tokens)
    assert diff < ATOL, f"{arch} YaRN: max |logit difference| {diff:.3e} against transformers"
    # The scaled model really differs from the unscaled one on these tokens.
    plain = reference(build(family_cfg(arch)), family_cfg(arch))
    with torch.no_grad():
        assert (plain(input_ids=tokens).logits - hf(input_ids=tokens).logits).abs().max() > 1e-2


def test_yarn_inv_freq_equals_transformers_truncated_and_not():
    """The frequency blend itself, including transformers' ``truncate`` (rounding the ramp's ends outwards)."""
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_qwen.model.rotary import YarnSettings, yarn_inv_freq

    for truncate in (True, False):
        rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768,
                "truncate": truncate}
        hf_cfg = Qwen2Config(hidden_size=1024, num_attention_heads=8, rope_parameters=rope)
        ref, factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
        ours = yarn_inv_freq(1e6, 128, YarnSettings(4.0, 32768, truncate=truncate))
        assert torch.equal(ours, ref), (truncate, (ours - ref).abs().max())
        assert factor == pytest.approx(0.1 * math.log(4.0) + 1.0)


EQUIVALENCE_WORKER = str(Path(__file__).parent / "parallel" / "equivalence_worker.py")
# Ten training steps against the TP=1 run of the same architecture (4 gloo ranks; DP takes what TP x PP leaves):
# the tied GQA Qwen3 at TP=2 x PP=2 with SP, PP=2 x VPP=2 and with the distributed optimizer at PP=2 x DP=2; the
# tied Qwen2.5 (GQA, q/k/v bias), the untied Qwen3 and the Qwen1.5 (multi-head, q/k/v bias) at TP=2 x PP=2 with SP.
TRAIN_RUNS = ["qwen3@tp2-pp2-vpp1-sp1", "qwen3@tp1-pp2-vpp2-sp0", "qwen3@tp1-pp2-vpp1-sp0-dopt",
              "qwen2.5@tp2-pp2-vpp1-sp1", "qwen3-untied@tp2-pp2-vpp1-sp1", "qwen1.5@tp2-pp2-vpp1-sp1"]
TRAIN_RTOL = 1e-5


def max_relative_difference(a, b) -> float:
    """max |a - b| / max |b| over one tensor."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_train")
    references = sorted({run.split("@")[0] + "@tp1-pp1-vpp1-sp0" for run in TRAIN_RUNS})
    run_torchrun(1, [EQUIVALENCE_WORKER, "--workdir", str(root), "--train", ",".join(references)])
    run_torchrun(4, [EQUIVALENCE_WORKER, "--workdir", str(root), "--train", ",".join(TRAIN_RUNS)])
    return root


@pytest.mark.parallel
@pytest.mark.parametrize("run", TRAIN_RUNS)
def test_training_steps_equal_single_process(trained, run):
    from megatron_qwen.checkpoint.io import read_full_state_dict

    arch = run.split("@")[0]
    ref_dir = trained / f"{arch}@tp1-pp1-vpp1-sp0"
    ref_losses = json.loads((ref_dir / "losses.json").read_text())["losses"]
    ref_final, initial = read_full_state_dict(ref_dir / "final"), read_full_state_dict(ref_dir / "initial")
    # Training moved every tensor, so equal final weights are not equal initial weights.
    assert all(not torch.equal(ref_final[k], initial[k]) for k in ref_final), \
        [k for k in ref_final if torch.equal(ref_final[k], initial[k])]
    tied = "model.tie_word_embeddings=true" in FAMILY_ARCHS[arch]
    assert ("output_layer.weight" in ref_final) != tied  # tied: one stored embedding

    losses = json.loads((trained / run / "losses.json").read_text())["losses"]
    final = read_full_state_dict(trained / run / "final")
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    assert len(losses) == len(ref_losses) == 10 and loss_diff <= TRAIN_RTOL, (run, losses, ref_losses)
    assert final.keys() == ref_final.keys(), run
    diffs = {k: max_relative_difference(final[k], ref_final[k]) for k in ref_final}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TRAIN_RTOL, f"{run}: {worst} differs by {diffs[worst]:.2e} (relative)"
    # The last stage's own copy of the tied embedding (the output layer) stayed equal to the embedding.
    copies = sorted((trained / run).glob("output_copy_tp*.pt"))
    if tied:
        assert copies, f"{run}: no tied output-layer copy on the last stage"
        copy = torch.cat([torch.load(path) for path in copies])
        embedding = ref_final["embedding.word_embeddings.weight"]
        assert max_relative_difference(copy, embedding) <= TRAIN_RTOL, run
    print(f"{run}: max loss rel diff {loss_diff:.2e}, max weight rel diff {diffs[worst]:.2e} ({worst})")


GENERATE_WORKER = str(Path(__file__).parent / "parallel" / "generate_worker.py")
# Greedy generation and forward logits at TP=2 (the KV heads split: one per rank for the GQA shapes), PP=2 (tied:
# the last stage's copy of the embedding is the output layer), TP=2 x PP=2 with SP and PP=2 x VPP=2; Qwen2.5 with
# YaRN at inference.
GENERATE_ARCHS = ["qwen3", "qwen2.5+yarn", "qwen1.5", "qwen3-untied"]
GENERATE_LAYOUTS = {"tp2": (2, 1, 1, 0), "pp2": (1, 2, 1, 0), "tp2pp2sp": (2, 2, 1, 1), "pp2vpp2": (1, 2, 2, 0)}


def checkpoint_state_dict(full: dict, num_layers: int) -> dict:
    """A TP=1 model's state-dict names for a checkpoint's full tensors (layer tensors stacked on the first axis,
    norms under Transformer Engine's fused names)."""
    fused = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
    out = {}
    for key, tensor in full.items():
        if not key.startswith("decoder.layers."):
            out[key] = tensor
            continue
        name = key.removeprefix("decoder.layers.")
        for i in range(num_layers):
            out[f"decoder.layers.{i}.{fused.get(name, name)}"] = tensor[i]
    return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_generate")
    layouts = ";".join(f"{name}:{','.join(map(str, sizes))}" for name, sizes in GENERATE_LAYOUTS.items())
    run_torchrun(4, [GENERATE_WORKER, "--workdir", str(root), "--families", ",".join(GENERATE_ARCHS),
                     "--layouts", layouts])
    return root


@pytest.mark.parallel
@pytest.mark.parametrize("arch", GENERATE_ARCHS)
def test_generation_and_logits_equal_transformers_at_every_layout(generated, arch):
    from megatron_qwen.checkpoint.io import read_full_state_dict
    from megatron_qwen.config import load_config

    m = load_config("configs/tiny.yaml", [*arch_overrides(arch), f"model.padded_vocab_size={VOCAB}"]).model
    sd = checkpoint_state_dict(read_full_state_dict(generated / arch / "weights"), m.num_layers)
    hf = hf_family_model(m, megatron_to_qwen2(sd, m.num_layers, m.num_attention_heads, m.head_dim, m.kv_heads,
                                              tied=m.tie_word_embeddings))
    expected = []
    tokens = family_tokens()
    with torch.no_grad():
        ref_logits = hf(input_ids=tokens).logits.float()
        for prompt in PROMPTS:
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              min_new_tokens=NEW_TOKENS, pad_token_id=0)
            expected.append(out[0, len(prompt):].tolist())
    for layout, (tp, _, _, _) in GENERATE_LAYOUTS.items():
        result = json.loads((generated / arch / f"{layout}.json").read_text())
        assert result["greedy"] == expected, (arch, layout, result["greedy"], expected)
        # The cache holds this rank's key/value heads only: kv_heads / tp of head_dim, not heads / tp.
        shapes = result["kv_cache"]
        assert shapes, (arch, layout)
        for keys, values in shapes.values():
            assert keys[2:] == values[2:] == [m.kv_heads // tp, m.head_dim], (arch, layout, keys, values)
        logits = torch.load(generated / arch / f"{layout}.logits.pt")
        assert logits.shape == ref_logits.shape == (*tokens.shape, VOCAB)
        diff = (logits - ref_logits).abs().max().item()
        assert diff < ATOL, f"{arch} at {layout}: max |logit difference| {diff:.3e} against transformers"


@pytest.mark.usefixtures("single_rank")
def test_inference_plan_of_a_tied_family_checkpoint(tmp_path):
    """A tied checkpoint (no output layer stored) is a language model, and greedy decoding stops at the family's
    tokenizer size (Qwen2.5: 151,665 tokens in 151,936 rows), not v1's 151,851."""
    import yaml

    from megatron_qwen.checkpoint.io import read_full_state_dict, save_model
    from megatron_qwen.config import TOKENIZER_VOCAB_SIZES, load_config
    from megatron_qwen.inference.forward import prepare
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    cfg = load_config("configs/tiny.yaml", [*FAMILY_ARCHS["qwen2.5"], "model.num_layers=1"])
    path = tmp_path / "ckpt"
    save_model(build_model(cfg, Runtime.cpu()), path)
    (path / "model_config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert "output_layer.weight" not in read_full_state_dict(path)
    plan = prepare(path, world_size=1)
    assert plan.vocab_size == 151936
    assert plan.generate_vocab == TOKENIZER_VOCAB_SIZES["qwen2.5"] == 151665


@pytest.mark.usefixtures("single_rank")
def test_scalar_head_model_of_a_tied_config_never_ties():
    """A reward/value model of a tied architecture has no LM output layer to share the embedding with."""
    from megatron_qwen.model.qwen import SCALAR_HEAD_KEY, build_model
    from megatron_qwen.platform.runtime import Runtime

    (model,) = build_model(family_cfg("qwen3"), Runtime.cpu(), head="scalar")
    assert not model.share_embeddings_and_output_weights
    keys = set(model.state_dict())
    assert SCALAR_HEAD_KEY in keys and "embedding.word_embeddings.weight" in keys
    assert not any(k.startswith("output_layer") for k in keys)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        values = model(tokens, torch.arange(16)[None].expand(2, 16), None)
    assert values.shape == (2, 16)
