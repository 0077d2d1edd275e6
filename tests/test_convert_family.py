"""Conversion of the later Qwen families (Qwen1.5 / 2 / 2.5: transformers' Qwen2ForCausalLM; Qwen3 dense) both ways.

Tiny random fp32 models built with transformers cover every feature: grouped-query attention, q/k/v bias or
none, query/key norms, a head width apart from hidden/heads, tied and untied embeddings. Checked against
transformers and against megatron-core's documented linear_qkv layout (built here by hand): the stored
tensors, the round trip at every layout (bit-identical), the export loading with AutoModelForCausalLM with
the source's logits and its embeddings still tied, the refusals, and (one 4-rank spawn) the logits and greedy
generation of `megatron-qwen forward` at every layout against transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen_reference import randomize_weights
from test_convert import run_worker

WORKER = str(Path(__file__).parent / "parallel" / "convert_worker.py")
VOCAB = 301  # odd: TP=2 pads a zero row that must never reach logits, generations or the export
HIDDEN, HEADS, LAYERS, FFN, MAX_POS = 128, 4, 4, 256, 64
ROPE_THETA, EPS = 20000.0, 1e-5  # not transformers' defaults: a dropped config key changes the logits
BATCH, SEQ, NEW_TOKENS = 2, 12, 4
ATOL = 1e-4
# name: (transformers class, config); every variant named in the issue.
ARCHS = {
    "qwen2.5": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),  # GQA + bias + tied
    "qwen3": ("Qwen3", dict(num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)),  # qk-norm, 64 != 128/4
    "qwen3-untied": ("Qwen3", dict(num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)),
    "qwen1.5": ("Qwen2", dict(num_key_value_heads=HEADS, tie_word_embeddings=False)),  # MHA + bias
}
# name: (hf-to-mcore --tp --pp --vpp, megatron-qwen forward layout flags); 4 ranks, DP takes the rest.
LAYOUTS = {
    "tp1": ((1, 1, 1), "--tp 1"),
    "tp2-pp2-sp": ((2, 2, 1), "--tp 2 --pp 2 --sequence-parallel"),
    "pp2-vpp2": ((1, 2, 2), "--pp 2 --vpp 2"),
    "tp2": ((2, 1, 1), "--tp 2"),
}


def make_model(kind: str, directory: Path):
    """A randomised fp32 model of variant `kind` (see ARCHS) saved with save_pretrained; returns it."""
    import transformers

    prefix, extra = ARCHS[kind]
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, rms_norm_eps=EPS, max_position_embeddings=MAX_POS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, **extra,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    randomize_weights(model)
    model.save_pretrained(directory)
    return model


def load_safetensors_dir(directory: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def no_output(out: Path) -> bool:
    return not out.exists() and not out.with_name(out.name + ".tmp").exists()


def hand_qkv(sd: dict, layer: int, kind: str, groups: int) -> torch.Tensor:
    """megatron-core's linear_qkv rows of a layer, built from the Hugging Face q/k/v by hand: per query group g,
    the group's query heads, then k_g, then v_g."""
    q, k, v = (sd[f"model.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv")
    chunks = zip(q.chunk(groups), k.chunk(groups), v.chunk(groups))
    return torch.cat([torch.cat(group) for group in chunks])


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Every variant converted at every layout and exported back, built once."""
    from megatron_qwen.convert import hf_to_mcore, mcore_to_hf

    root = tmp_path_factory.mktemp("family")
    models, ckpts = {}, {}
    for kind in ARCHS:
        models[kind] = make_model(kind, root / kind / "hf")
        for name, ((tp, pp, vpp), _) in LAYOUTS.items():
            ckpts[kind, name] = hf_to_mcore(root / kind / "hf", root / kind / f"ck-{name}", tp=tp, pp=pp, vpp=vpp)
            mcore_to_hf(ckpts[kind, name], root / kind / f"hf-{name}")
    return {"root": root, "models": models, "ckpts": ckpts}


def test_model_config_maps_every_feature(family):
    from megatron_qwen.config import load_config

    for kind, (prefix, extra) in ARCHS.items():
        for name, ((tp, pp, vpp), _) in LAYOUTS.items():
            cfg = load_config(family["ckpts"][kind, name] / "model_config.yaml")
            m = cfg.model
            assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp) == (tp, pp, vpp)
            kv = extra["num_key_value_heads"]
            assert m.num_query_groups == (None if kv == HEADS else kv), kind
            assert m.kv_channels == extra.get("head_dim"), kind  # None when hidden / heads
            assert (m.qkv_bias, m.qk_layernorm) == ((True, False) if prefix == "Qwen2" else (False, True)), kind
            assert m.tie_word_embeddings == extra["tie_word_embeddings"], kind
            assert (m.rotary_base, m.norm_epsilon, m.max_position_embeddings) == (ROPE_THETA, EPS, MAX_POS)
            assert m.rope_scaling is None and m.family == ("qwen3" if prefix == "Qwen3" else "qwen2.5")
            assert m.padded_vocab_size == (VOCAB + 1 if tp == 2 else VOCAB)


def test_stored_tensors_follow_megatron_core_layout(family):
    from megatron_qwen.checkpoint.io import read_full_state_dict

    for kind, (prefix, extra) in ARCHS.items():
        sd = {k: v.detach() for k, v in family["models"][kind].state_dict().items()}
        stored = read_full_state_dict(family["ckpts"][kind, "tp1"])
        groups = extra["num_key_value_heads"]
        for i in range(LAYERS):
            assert torch.equal(stored["decoder.layers.self_attention.linear_qkv.weight"][i],
                               hand_qkv(sd, i, "weight", groups)), (kind, i)
            if prefix == "Qwen2":
                assert torch.equal(stored["decoder.layers.self_attention.linear_qkv.bias"][i],
                                   hand_qkv(sd, i, "bias", groups)), (kind, i)
            else:
                assert "decoder.layers.self_attention.linear_qkv.bias" not in stored
                for n in "qk":
                    assert torch.equal(stored[f"decoder.layers.self_attention.{n}_layernorm.weight"][i],
                                       sd[f"model.layers.{i}.self_attn.{n}_norm.weight"]), (kind, n, i)
        # Tied: the embedding is the only copy; megatron-core rebuilds the output layer from it.
        assert ("output_layer.weight" in stored) != extra["tie_word_embeddings"], kind
        assert torch.equal(stored["embedding.word_embeddings.weight"], sd["model.embed_tokens.weight"])


def test_round_trip_is_bit_identical_at_every_layout(family):
    for kind in ARCHS:
        original = load_safetensors_dir(family["root"] / kind / "hf")
        for name in LAYOUTS:
            back = load_safetensors_dir(family["root"] / kind / f"hf-{name}")
            assert back.keys() == original.keys(), (kind, name, back.keys() ^ original.keys())
            unequal = [k for k in original if not torch.equal(back[k], original[k])]
            assert not unequal, (kind, name, unequal)


def test_export_loads_in_transformers_with_the_source_logits_and_ties(family):
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    for kind, (prefix, extra) in ARCHS.items():
        export = family["root"] / kind / "hf-tp2-pp2-sp"
        config = json.loads((export / "config.json").read_text())
        assert config["architectures"] == [f"{prefix}ForCausalLM"] and config["model_type"] == prefix.lower()
        assert (config["num_key_value_heads"], config["head_dim"]) == (extra["num_key_value_heads"],
                                                                       extra.get("head_dim", HIDDEN // HEADS))
        assert config["tie_word_embeddings"] == extra["tie_word_embeddings"]
        assert ("lm_head.weight" in load_safetensors_dir(export)) == (not extra["tie_word_embeddings"])
        model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, attn_implementation="eager").eval()
        assert type(model).__name__ == f"{prefix}ForCausalLM"
        assert model.config.rope_parameters["rope_theta"] == ROPE_THETA and model.config.rms_norm_eps == EPS
        tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert tied == extra["tie_word_embeddings"], kind
        with torch.no_grad():
            assert torch.equal(model(input_ids=tokens).logits, family["models"][kind](input_ids=tokens).logits), kind


def _variant(tmp_path: Path, base: Path, name: str, **changes) -> Path:
    """`base` (a Hugging Face directory) with config.json keys changed (None removes a key)."""
    directory = tmp_path / name
    directory.mkdir()
    for file in base.glob("*.safetensors"):
        (directory / file.name).symlink_to(file)
    config = {**json.loads((base / "config.json").read_text()), **changes}
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return directory


def test_refusals_name_the_problem_and_the_fix_and_write_nothing(family, tmp_path):
    from megatron_qwen.convert import ConversionError, hf_to_mcore

    qwen25, qwen3 = family["root"] / "qwen2.5" / "hf", family["root"] / "qwen3" / "hf"
    cases = [
        (qwen25, {"tp": 4}, r"parallel\.tp=4 does not divide model\.num_query_groups=2 .*choose tp from \[1, 2\]"),
        (_variant(tmp_path, qwen25, "moe", architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe"), {},
         r"config\.json has no 'num_experts' .*Qwen2MoeForCausalLM config gives its routed experts"),
        (_variant(tmp_path, qwen3, "next", architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next"), {},
         r"architecture Qwen3NextForCausalLM .*Qwen3-Next .* is not modelled"),
        (_variant(tmp_path, qwen25, "vl", architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl"),
         {}, r"architecture Qwen2VLForConditionalGeneration .*not a causal language model this converts"),
        (_variant(tmp_path, qwen25, "llama", architectures=["LlamaForCausalLM"], model_type="llama"), {},
         r"architecture LlamaForCausalLM .*reads Qwen2ForCausalLM, Qwen3ForCausalLM, QWenLMHeadModel"),
        (_variant(tmp_path, qwen25, "mixed", architectures=["Qwen3ForCausalLM"]), {},
         r"architectures=\['Qwen3ForCausalLM'\] and model_type='qwen2' describe different models"),
        (qwen25, {"family": "qwen3"},
         r"the qwen3 tokenizer has 151,669 tokens but the checkpoint's vocabulary has 301 rows"),
        (_variant(tmp_path, qwen25, "sliding", use_sliding_window=True), {}, r"sliding-window attention is not"),
        (_variant(tmp_path, qwen3, "o-bias", attention_bias=True), {}, r"attention_bias=true: .* biases o_proj"),
    ]
    for scaling, message in (
        ({"rope_type": "linear", "factor": 2.0}, r"RoPE scaling 'linear'; only 'yarn'"),
        ({"type": "dynamic", "factor": 2.0}, r"RoPE scaling 'dynamic'; only 'yarn'"),
        ({"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.5}, r"YaRN's attention_factor=0\.5 is not"),
    ):
        name = f"rope-{scaling.get('rope_type') or scaling['type']}-{len(cases)}"
        cases.append((_variant(tmp_path, qwen25, name, rope_scaling=scaling), {}, message))
    for i, (source, kwargs, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(ConversionError, match=message):
            hf_to_mcore(source, out, **kwargs)
        assert no_output(out), message


# Published added tokens (tokenizer_config.json `added_tokens_decoder`) of Qwen2.5 (22) and Qwen3 (26), from 151643.
QWEN25_ADDED = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
QWEN3_ADDED = QWEN25_ADDED + ["<tool_response>", "</tool_response>", "<think>", "</think>"]
QWEN15_TEMPLATE = "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
QWEN2_TEMPLATE = "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"


def test_tokenizer_family_comes_from_the_tokenizer_files(tmp_path):
    from megatron_qwen.convert import ConversionError
    from megatron_qwen.convert.hf_io import tokenizer_files
    from megatron_qwen.convert.layouts import QWEN2, QWEN3, detect_family

    def files(name, added, template=None):
        directory = tmp_path / name
        directory.mkdir()
        config = {"added_tokens_decoder": {str(151643 + i): {"content": t} for i, t in enumerate(added)}}
        if template:
            config["chat_template"] = template
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
        return tokenizer_files(directory)

    cases = [
        (QWEN2, 152064, files("q25", QWEN25_ADDED), None, "qwen2.5"),
        (QWEN3, 151936, files("q3", QWEN3_ADDED), None, "qwen3"),
        (QWEN2, 151936, files("q15", QWEN25_ADDED[:3], QWEN15_TEMPLATE), None, "qwen1.5"),
        (QWEN2, 151936, files("q2", QWEN25_ADDED[:3], QWEN2_TEMPLATE), None, "qwen2"),
        (QWEN2, 152064, (None, None), None, "qwen2.5"),  # no tokenizer files: the architecture's newest
        (QWEN3, 151936, (None, None), None, "qwen3"),
        (QWEN2, 151936, files("q15b", QWEN25_ADDED[:3]), "qwen1.5", "qwen1.5"),  # --family wins
    ]
    for layout, vocab, (added, template), explicit, expected in cases:
        assert detect_family(layout, vocab, added, template, explicit, "hf")[0] == expected, (expected, explicit)
    # Qwen2.5's 22 added tokens do not fit a Qwen2-sized vocabulary; a --family other than the files' is refused.
    with pytest.raises(ConversionError, match=r"qwen2\.5 tokenizer has 151,665 tokens but .* has 151,646 rows"):
        detect_family(QWEN2, 151646, *files("small", QWEN25_ADDED), None, "hf")
    with pytest.raises(ConversionError, match=r"not the qwen2\.5 tokenizer's 22 .*--family to qwen3"):
        detect_family(QWEN3, 151936, *files("q3b", QWEN3_ADDED), "qwen2.5", "hf")
    with pytest.raises(ConversionError, match=r"match no tokenizer family .*pass --family"):
        detect_family(QWEN2, 151936, *files("odd", QWEN25_ADDED[:5]), None, "hf")


@pytest.mark.parametrize("form", ["rope_scaling", "rope_parameters"])
def test_yarn_maps_both_ways_in_both_config_forms(family, tmp_path, form):
    from transformers import AutoConfig

    from megatron_qwen.config import load_config
    from megatron_qwen.convert import hf_to_mcore, mcore_to_hf

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    changes = ({"rope_scaling": yarn, "rope_theta": ROPE_THETA, "rope_parameters": None} if form == "rope_scaling"
               else {"rope_parameters": {**yarn, "rope_theta": ROPE_THETA}})
    source = _variant(tmp_path, family["root"] / "qwen3" / "hf", "yarn", **changes)
    hf_to_mcore(source, tmp_path / "ck")
    m = load_config(tmp_path / "ck" / "model_config.yaml").model
    assert (m.rope_scaling, m.rope_scaling_factor, m.rope_original_max_position_embeddings) == ("yarn", 4.0, 16)
    assert (m.rotary_base, m.yarn_beta_fast, m.yarn_beta_slow) == (ROPE_THETA, 32.0, 1.0)
    mcore_to_hf(tmp_path / "ck", tmp_path / "back")
    # transformers reads the same RoPE from the export as from the source.
    for config in (AutoConfig.from_pretrained(source), AutoConfig.from_pretrained(tmp_path / "back")):
        params = config.rope_parameters
        assert (params["rope_type"], params["factor"], params["rope_theta"]) == ("yarn", 4.0, ROPE_THETA)
        assert params["original_max_position_embeddings"] == 16


@pytest.mark.parallel
def test_forward_and_generation_match_transformers_for_every_family(family):
    """`megatron-qwen forward` at every layout (one 4-rank spawn) against transformers' logits and generate."""
    root = family["root"]
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    np.save(root / "tokens.npy", tokens.numpy())
    argv = [WORKER]
    for kind in ARCHS:
        for name, (_, flags) in LAYOUTS.items():
            out = root / kind / f"logits-{name}.npy"
            argv += ["--forward", f"--ckpt {family['ckpts'][kind, name]} --tokens {root / 'tokens.npy'} --out {out} "
                                  f"{flags} --generate {NEW_TOKENS}"]
    run_worker(argv)
    report = []
    for kind, model in family["models"].items():
        with torch.no_grad():
            logits = model(input_ids=tokens).logits.numpy()
            generated = model.generate(tokens, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                       eos_token_id=None, pad_token_id=0).numpy()
        for name in LAYOUTS:
            got = np.load(root / kind / f"logits-{name}.npy")
            assert got.shape == (BATCH, SEQ, VOCAB), (kind, name, got.shape)
            diff = float(np.abs(got - logits).max())
            report.append(f"{kind} {name}: max |logit - transformers| = {diff:.2e}")
            assert diff < ATOL, report[-1]
            continued = np.load(root / kind / f"logits-{name}.generated.npy")
            assert np.array_equal(continued, generated), (kind, name, continued[:, SEQ:], generated[:, SEQ:])
    print("\n" + "\n".join(report))


def test_export_names_the_end_of_text_id_for_a_family_vocabulary_below_v1s():
    """A Qwen2.5 model whose embedding holds its 151,665 tokens in 151,680 rows (fewer than v1's 151,851) is still
    Qwen's vocabulary: the export names <|endoftext|> as bos/eos, as for a v1-sized one."""
    from megatron_qwen.config import ModelConfig
    from megatron_qwen.convert.layouts import QWEN2, hf_config

    m = ModelConfig(family="qwen2.5", num_query_groups=1, padded_vocab_size=151680)
    config = hf_config(QWEN2, m, 151680, "float32")
    assert (config.get("bos_token_id"), config.get("eos_token_id")) == (151643, 151643), config
    toy = hf_config(QWEN2, ModelConfig(family="qwen2.5", padded_vocab_size=1001), 1001, "float32")
    assert "eos_token_id" not in toy  # a toy vocabulary is not Qwen's
