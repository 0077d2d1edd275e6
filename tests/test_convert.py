"""Checkpoint conversion against transformers (multi-rank, gloo, CPU).

A random fp32 `Qwen2ForCausalLM` (and the same weights in the Qwen v1 release's layout, written here from
the layout table, independently of the converter) converted to megatron-core gives transformers' logits
and greedy continuations through tools/forward.py at TP, PP, TP x PP with SP and interleaved PP; the way
back to Hugging Face is bit-identical, also from a checkpoint megatron-core itself saved at another layout;
bad inputs are refused with messages naming the problem and leave no output behind.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen_reference import randomize_weights
from spawn import REPO, cpu_env, run_torchrun

WORKER = str(Path(__file__).parent / "parallel" / "convert_worker.py")
CONVERT = str(REPO / "tools" / "convert_checkpoint.py")
VOCAB = 1001  # odd, so TP=2 pads a zero row that must never reach logits or generations
HIDDEN, HEADS, LAYERS, FFN, MAX_POS = 256, 2, 4, 512, 128
ROPE_THETA, EPS = 50000.0, 1e-5  # not transformers' defaults, so a dropped config key changes the logits
BATCH, SEQ, NEW_TOKENS = 3, 24, 4
ATOL = 1e-4
# name: (hf-to-mcore --tp --pp --vpp, tools/forward.py layout flags); 4 ranks, DP takes the rest.
LAYOUTS = {
    "tp1": ((1, 1, 1), "--tp 1"),
    "tp2": ((2, 1, 1), "--tp 2"),
    "pp2": ((1, 2, 1), "--pp 2"),
    "tp2-pp2-sp": ((2, 2, 1), "--tp 2 --pp 2 --sequence-parallel"),
    "pp2-vpp2": ((1, 2, 2), "--pp 2 --vpp 2"),
}
# Further runs: the v1-layout source (pytorch_model.bin), its v1 export re-imported, and a bf16 source.
EXTRA_RUNS = {"v1": "--tp 2 --sequence-parallel", "v1-roundtrip": "--tp 1", "bf16": "--pp 2"}


def make_qwen2(directory: Path, tie_word_embeddings: bool = False):
    """A randomised fp32 Qwen2ForCausalLM saved with save_pretrained (safetensors); returns the model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, rms_norm_eps=EPS, max_position_embeddings=MAX_POS,
        tie_word_embeddings=tie_word_embeddings, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    randomize_weights(model)
    model.save_pretrained(directory)
    return model


def qwen_v1_state_dict(sd: dict) -> dict:
    """The Qwen v1 release's names for Qwen2-named weights, by the layout table."""
    out = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(LAYERS):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        out[dst + "ln_1.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "ln_2.weight"] = sd[src + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            out[dst + f"attn.c_attn.{kind}"] = torch.cat([sd[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
        out[dst + "attn.c_proj.weight"] = sd[src + "self_attn.o_proj.weight"]
        out[dst + "mlp.w1.weight"] = sd[src + "mlp.up_proj.weight"]
        out[dst + "mlp.w2.weight"] = sd[src + "mlp.gate_proj.weight"]
        out[dst + "mlp.c_proj.weight"] = sd[src + "mlp.down_proj.weight"]
    return {k: v.detach().clone() for k, v in out.items()}


V1_CONFIG = {
    "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "vocab_size": VOCAB, "hidden_size": HIDDEN,
    "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "kv_channels": HIDDEN // HEADS,
    "intermediate_size": 2 * FFN, "layer_norm_epsilon": EPS, "rotary_emb_base": ROPE_THETA, "rotary_pct": 1.0,
    "seq_length": MAX_POS, "max_position_embeddings": MAX_POS, "use_dynamic_ntk": True, "use_logn_attn": True,
    "no_bias": True, "tie_word_embeddings": False,
}


def greedy(model, tokens: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.cat([tokens, model(input_ids=tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def convert_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CONVERT, *args], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)


def load_safetensors_dir(directory: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


# The 4-rank worker spawn: ~60 s on an idle machine, several times that on a loaded CI runner. Ranks still running
# at HANG_DUMP_S print their stacks, so a hang shows where each one waits before the timeout ends the launch.
WORKER_TIMEOUT_S, HANG_DUMP_S = 600, 300


def run_worker(argv: list[str]) -> None:
    """Run the 4-rank convert worker; on a timeout, fail with the ranks' stacks (see HANG_DUMP_S)."""
    try:
        run_torchrun(4, [*argv, "--hang-dump", str(HANG_DUMP_S)], timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise AssertionError(f"the convert worker ran past {WORKER_TIMEOUT_S} s; its ranks' stderr (stacks "
                             f"dumped at {HANG_DUMP_S} s):\n{stderr[-20000:]}") from None


def no_output(out: Path) -> bool:
    return not out.exists() and not out.with_name(out.name + ".tmp").exists()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Everything the tests compare, built once: models, conversions, one multi-rank run of tools/forward.py."""
    from megatron_qwen.convert import hf_to_mcore, mcore_to_hf

    root = tmp_path_factory.mktemp("convert")
    model = make_qwen2(root / "hf")
    v1 = qwen_v1_state_dict(model.state_dict())
    (root / "hf_v1").mkdir()
    torch.save(v1, root / "hf_v1" / "pytorch_model.bin")
    (root / "hf_v1" / "config.json").write_text(json.dumps(V1_CONFIG))

    # The released Qwen weights are bf16: the same model saved in bf16, computed in fp32 on both sides.
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(root / "hf-bf16")
    rounded = type(model).from_pretrained(root / "hf-bf16", dtype=torch.float32, attn_implementation="eager").eval()

    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    np.save(root / "tokens.npy", tokens.numpy())
    with torch.no_grad():
        expected = {"fp32": (model(input_ids=tokens).logits.numpy(), greedy(model, tokens, NEW_TOKENS).numpy()),
                    "bf16": (rounded(input_ids=tokens).logits.numpy(), greedy(rounded, tokens, NEW_TOKENS).numpy())}

    ckpts = {name: root / f"ck-{name}" for name in LAYOUTS}
    for name, ((tp, pp, vpp), _) in LAYOUTS.items():
        if name == "tp2-pp2-sp":  # the command line, as users run it
            proc = convert_cli("hf-to-mcore", "--hf", str(root / "hf"), "--out", str(ckpts[name]), "--tp", "2", "--pp",
                               "2")
            assert proc.returncode == 0, proc.stdout + proc.stderr
        else:
            hf_to_mcore(root / "hf", ckpts[name], tp=tp, pp=pp, vpp=vpp)
    ckpts["v1"] = hf_to_mcore(root / "hf_v1", root / "ck-v1", tp=2)
    ckpts["bf16"] = hf_to_mcore(root / "hf-bf16", root / "ck-bf16", pp=2)

    proc = convert_cli("mcore-to-hf", "--ckpt", str(ckpts["tp2-pp2-sp"]), "--out", str(root / "hf-roundtrip"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Small shards: the v1 export is written as an indexed, sharded checkpoint and read back as one.
    mcore_to_hf(ckpts["v1"], root / "hf-v1-export", layout="qwen", max_shard_bytes=3 << 20)
    ckpts["v1-roundtrip"] = hf_to_mcore(root / "hf-v1-export", root / "ck-v1-roundtrip")

    runs = [(name, flags) for name, (_, flags) in LAYOUTS.items()] + list(EXTRA_RUNS.items())

    def forward_args(name, flags):
        out = root / f"logits-{name}.npy"
        return (f"--ckpt {ckpts[name]} --tokens {root / 'tokens.npy'} --out {out} {flags} "
                f"--generate {NEW_TOKENS}").split()

    # One layout through the command line as users launch it; the others in one 4-rank worker, which
    # calls the same tools/forward.py main() layout after layout to save the start-up of each launch.
    run_torchrun(2, [str(REPO / "tools" / "forward.py"), *forward_args("tp2", LAYOUTS["tp2"][1])], timeout=300)
    argv = [WORKER]
    for name, flags in runs:
        if name != "tp2":
            argv += ["--forward", " ".join(forward_args(name, flags))]
    argv += ["--resave", str(ckpts["tp2-pp2-sp"]), str(root / "ck-resaved"), "2", "1"]
    run_worker(argv)
    mcore_to_hf(root / "ck-resaved", root / "hf-resaved", config_path=ckpts["tp2-pp2-sp"] / "model_config.yaml")

    return {
        "root": root, "model": model, "v1": v1, "tokens": tokens, "ckpts": ckpts,
        "expected": {name: expected["bf16" if name == "bf16" else "fp32"] for name, _ in runs},
    }


@pytest.mark.parallel
def test_logits_match_transformers_at_every_layout(work):
    report = []
    for name, (reference, _) in work["expected"].items():
        logits = np.load(work["root"] / f"logits-{name}.npy")
        assert logits.dtype == np.float32 and logits.shape == (BATCH, SEQ, VOCAB), (name, logits.shape)
        diff = float(np.abs(logits - reference).max())
        report.append(f"{name}: max |logit - transformers| = {diff:.2e}")
        assert diff < ATOL, report[-1]
    print("\n" + "\n".join(report))


@pytest.mark.parallel
def test_greedy_continuations_match_transformers(work):
    for name, (_, reference) in work["expected"].items():
        generated = np.load(work["root"] / f"logits-{name}.generated.npy")
        assert generated.shape == (BATCH, SEQ + NEW_TOKENS)
        assert np.array_equal(generated, reference), (name, generated[:, SEQ:], reference[:, SEQ:])


@pytest.mark.parallel
def test_model_config_records_the_layout_and_the_model(work):
    from megatron_qwen.config import load_config

    for name, ((tp, pp, vpp), _) in LAYOUTS.items():
        cfg = load_config(work["ckpts"][name] / "model_config.yaml")
        assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp) == (tp, pp, vpp)
        m = cfg.model
        assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size) == (LAYERS, HIDDEN, HEADS, FFN)
        assert (m.rotary_base, m.norm_epsilon, m.max_position_embeddings) == (ROPE_THETA, EPS, MAX_POS)
        assert m.padded_vocab_size == (VOCAB + 1 if tp == 2 else VOCAB)
    v1 = load_config(work["ckpts"]["v1"] / "model_config.yaml").model
    assert (v1.ffn_hidden_size, v1.seq_length, v1.use_dynamic_ntk, v1.use_logn_attn) == (FFN, MAX_POS, True, True)


@pytest.mark.parallel
def test_round_trip_is_bit_identical(work):
    from transformers import Qwen2ForCausalLM

    original = load_safetensors_dir(work["root"] / "hf")
    back = load_safetensors_dir(work["root"] / "hf-roundtrip")
    assert back.keys() == original.keys()
    unequal = [k for k in original if not torch.equal(back[k], original[k])]
    assert not unequal, unequal
    reloaded = Qwen2ForCausalLM.from_pretrained(work["root"] / "hf-roundtrip", attn_implementation="eager").eval()
    assert reloaded.config.vocab_size == VOCAB and reloaded.config.rms_norm_eps == EPS
    assert reloaded.config.rope_parameters["rope_theta"] == ROPE_THETA
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=work["tokens"]).logits, work["model"](input_ids=work["tokens"]).logits)


@pytest.mark.parallel
def test_export_from_a_checkpoint_megatron_saved_at_another_layout(work):
    # Saved by megatron-core at TP=2 x DP=2 with no conversion record: every stored row is kept (the
    # zero row TP=2 padded on included) and config.json says so.
    original = load_safetensors_dir(work["root"] / "hf")
    exported = load_safetensors_dir(work["root"] / "hf-resaved")
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert exported[name].shape == (VOCAB + 1, HIDDEN)
            assert torch.count_nonzero(exported[name][VOCAB:]) == 0
            assert torch.equal(exported[name][:VOCAB], tensor), name
        else:
            assert torch.equal(exported[name], tensor), name
    assert json.loads((work["root"] / "hf-resaved" / "config.json").read_text())["vocab_size"] == VOCAB + 1


@pytest.mark.parallel
def test_qwen_v1_export_has_the_release_names_and_config(work):
    root = work["root"] / "hf-v1-export"
    exported = load_safetensors_dir(root)
    assert exported.keys() == work["v1"].keys()
    unequal = [k for k in exported if not torch.equal(exported[k], work["v1"][k])]
    assert not unequal, unequal
    assert (root / "model.safetensors.index.json").is_file()
    config = json.loads((root / "config.json").read_text())
    for key, value in V1_CONFIG.items():
        assert config[key] == value, (key, config[key], value)


def test_conversion_refuses_bad_checkpoints_and_leaves_nothing(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from megatron_qwen.convert import ConversionError, hf_to_mcore
    from megatron_qwen.convert.hf_io import HFCheckpoint

    base = tmp_path / "hf"
    make_qwen2(base)
    weights = load_file(base / "model.safetensors")
    config = json.loads((base / "config.json").read_text())

    def variant(name, tensors, **changes):
        directory = tmp_path / name
        directory.mkdir()
        save_file(tensors, directory / "model.safetensors")
        (directory / "config.json").write_text(json.dumps({**config, **changes}))
        return directory

    missing = variant("missing", {k: v for k, v in weights.items() if k != "model.layers.2.mlp.up_proj.weight"})
    cases = [
        (missing, {}, r"tensor model\.layers\.2\.mlp\.up_proj\.weight is missing"),
        (variant("shape", weights, intermediate_size=640), {},
         r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \[512, 256\], but .*needs \[640, 256\]"),
        (variant("gqa", weights, num_key_value_heads=1), {},
         r"tensor model\.layers\.0\.self_attn\.k_proj\.weight has shape \[256, 256\], but .*needs \[128, 256\]"),
        (base, {"tp": 4}, r"parallel\.tp=4 does not divide model\.num_attention_heads=2"),
        (base, {"pp": 3}, r"parallel\.pp=3 x parallel\.vpp=1 = 3 does not divide model\.num_layers=4"),
    ]
    for i, (source, layout, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(ConversionError, match=message):
            hf_to_mcore(source, out, **layout)
        assert no_output(out)

    # A failure while writing (a read error half-way) removes the partial output too.
    calls = {"n": 0}
    real_read = HFCheckpoint.read

    def failing_read(self, *args):
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError("disk read error")
        return real_read(self, *args)

    monkeypatch.setattr(HFCheckpoint, "read", failing_read)
    with pytest.raises(OSError, match="disk read error"):
        hf_to_mcore(base, tmp_path / "out-io")
    assert calls["n"] == 10 and no_output(tmp_path / "out-io")

    # The command line reports the same refusal with exit status 2.
    proc = convert_cli("hf-to-mcore", "--hf", str(missing), "--out", str(tmp_path / "out-cli"), "--tp", "2")
    assert proc.returncode == 2 and "model.layers.2.mlp.up_proj.weight is missing" in proc.stderr, proc.stderr
    assert no_output(tmp_path / "out-cli")


@pytest.mark.parallel
def test_forward_refuses_bad_requests(work, tmp_path, capsys):
    from megatron_qwen.cli import forward

    ckpt = work["ckpts"]["tp2"]
    good = tmp_path / "tokens.npy"
    np.save(good, work["tokens"].numpy())
    outside = tmp_path / "outside.npy"
    bad = work["tokens"].numpy().copy()
    bad[1, 5] = VOCAB  # the zero padding row TP=2 added: not a token of the model
    np.save(outside, bad)
    cases = [
        (["--ckpt", str(tmp_path / "nowhere")], good, "is not a megatron-core checkpoint (no metadata.json)"),
        (["--ckpt", str(ckpt), "--tp", "4"], good, "parallel.tp=4 does not divide model.num_attention_heads=2"),
        (["--ckpt", str(ckpt), "--pp", "3"], good, "does not divide model.num_layers=4"),
        (["--ckpt", str(ckpt)], outside, f"id {VOCAB} at [1, 5] is outside the model's vocabulary [0, {VOCAB})"),
    ]
    for args, tokens, message in cases:
        out = tmp_path / "logits.npy"
        assert forward.main([*args, "--tokens", str(tokens), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_tied_embeddings_store_one_copy(tmp_path):
    from megatron_qwen.config import load_config
    from megatron_qwen.convert import hf_to_mcore
    from megatron_qwen.checkpoint.io import read_full_state_dict

    model = make_qwen2(tmp_path / "hf", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_safetensors_dir(tmp_path / "hf")
    hf_to_mcore(tmp_path / "hf", tmp_path / "ck")
    stored = read_full_state_dict(tmp_path / "ck")
    embedding = model.model.embed_tokens.weight.detach()
    assert torch.equal(stored["embedding.word_embeddings.weight"], embedding)
    # megatron-core rebuilds the output layer from the embedding (and keeps the last stage's copy equal).
    assert "output_layer.weight" not in stored
    assert load_config(tmp_path / "ck" / "model_config.yaml").model.tie_word_embeddings
