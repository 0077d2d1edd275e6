"""Long context: layer-wise window attention against a hand-written masked softmax, and the `long-ppl` tool's
perplexity table against a direct full-sequence forward with the NLL computed here, at TP=1 and TP=2, for a tiny
model pretrained in the test on real text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus import stdlib_texts
from spawn import run_torchrun

HEADS, HEAD_DIM = 2, 8


def attention(windows: tuple, layer_number: int = 1, logn: bool = False, seq_length: int = 4):
    """An SDPAttention of a 2-layer model with these windows, in eval mode, fp32."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_qwen.model.attention import SDPAttention
    from megatron_qwen.model.qwen import QwenTransformerConfig

    config = QwenTransformerConfig(num_layers=2, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                                   use_cpu_initialization=True, attention_dropout=0.0, attention_windows=windows,
                                   use_logn_attn=logn, qwen_seq_length=seq_length)
    return SDPAttention(config, layer_number, AttnMaskType.causal, "self").eval()


def reference(q, k, v, window: int | None, keep_extra=None) -> torch.Tensor:
    """Masked softmax attention written out: query i (position sk - sq + i) sees key j when 0 <= p_i - j < window.
    q: [sq, b, np, hn], k/v: [sk, b, np, hn] -> [sq, b, np * hn]."""
    sq, b, heads, hn = q.shape
    sk = k.shape[0]
    out = torch.zeros(sq, b, heads, hn, dtype=torch.float64)
    for i in range(sq):
        p = sk - sq + i
        for row in range(b):
            seen = [j for j in range(sk) if 0 <= p - j < (window or sk + 1)
                    and (keep_extra is None or keep_extra[row, i, j])]
            for h in range(heads):
                scores = torch.stack([q[i, row, h].double() @ k[j, row, h].double() for j in seen]) / math.sqrt(hn)
                weights = torch.softmax(scores, dim=0)
                out[i, row, h] = sum(w * v[j, row, h].double() for w, j in zip(weights, seen))
    return out.reshape(sq, b, heads * hn).float()


def qkv(sq: int, sk: int, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(sq, b, HEADS, HEAD_DIM, generator=g), torch.randn(sk, b, HEADS, HEAD_DIM, generator=g),
            torch.randn(sk, b, HEADS, HEAD_DIM, generator=g))


def test_window_keep_mask_by_hand():
    from megatron_qwen.model.window import layer_window, window_keep_mask

    keep = window_keep_mask(torch.arange(3, 6), torch.arange(6), 2)  # queries 3..5 of 6 keys (a KV cache)
    assert keep.int().tolist() == [[0, 0, 1, 1, 0, 0],
                                   [0, 0, 0, 1, 1, 0],
                                   [0, 0, 0, 0, 1, 1]]
    assert window_keep_mask(torch.arange(3), torch.arange(3), None).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert [layer_window([4, 0, None, 8], n) for n in (1, 2, 3, 4)] == [4, None, None, 8]
    assert layer_window([], 3) is None


@pytest.mark.parametrize("sq, sk, window", [(10, 10, 3), (4, 10, 3), (1, 10, 4), (10, 10, 1), (6, 9, 5)])
def test_window_attention_equals_masked_softmax(sq, sk, window):
    q, k, v = qkv(sq, sk)
    layer = attention((window, 0), layer_number=1)
    got = layer(q, k, v, None)
    torch.testing.assert_close(got, reference(q, k, v, window), rtol=1e-5, atol=1e-5)
    # A window shorter than the keys changes the result (the test could not pass with the window ignored) ...
    full = reference(q, k, v, None)
    assert (got - full).abs().max() > 1e-2
    # ... and the other layer of the same model, with no window, is full causal attention.
    torch.testing.assert_close(attention((window, 0), layer_number=2)(q, k, v, None), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sq, sk", [(8, 8), (3, 8), (1, 8)])
def test_windows_at_least_the_length_are_full_attention_and_training_ignores_them(sq, sk):
    q, k, v = qkv(sq, sk, seed=1)
    full = reference(q, k, v, None)
    for window in (sk, sk + 5):
        torch.testing.assert_close(attention((window, window))(q, k, v, None), full, rtol=1e-5, atol=1e-5)
    trained = attention((2, 2)).train()  # inference only, like LogN: training sees full attention
    torch.testing.assert_close(trained(q, k, v, None), full, rtol=1e-5, atol=1e-5)


def test_window_composes_with_a_padding_mask_and_logn():
    """Left-padded rows (the generation engine's mask: True = drop) and LogN beyond seq_length, with a window."""
    sq = sk = 7
    q, k, v = qkv(sq, sk, seed=2)
    pads = [0, 2]
    index = torch.arange(sk)
    keep = torch.stack([(index[:, None] >= index[None, :]) & (index[None, :] >= pad) | torch.eye(sk, dtype=torch.bool)
                        for pad in pads])  # [b, q, k]
    layer = attention((3, 0), logn=True, seq_length=4)
    got = layer(q, k, v, ~keep[:, None])
    from megatron_qwen.model.rotary import logn_scale

    scaled = q * logn_scale(torch.arange(sk), 4)[:, None, None, None]
    torch.testing.assert_close(got, reference(scaled, k, v, 3, keep_extra=keep), rtol=1e-5, atol=1e-5)


def test_window_refuses_packed_rows():
    from megatron_qwen.packed_rows import PackedRows

    q, k, v = qkv(6, 6, b=1)
    rows = PackedRows.from_boundaries([0, 3, 6], torch.device("cpu"))
    with pytest.raises(ValueError, match="model.attention_windows takes unpacked rows"):
        attention((2, 2))(q, k, v, None, packed_seq_params=rows)
    attention((6, 6))(q, k, v, None, packed_seq_params=rows)  # a window that limits nothing is no refusal


def test_window_config_is_validated():
    from megatron_qwen.config import load_config, validate

    def errors(*overrides):
        return validate(load_config("configs/tiny.yaml", list(overrides)))[0]

    assert errors("model.attention_windows=[32,64,0,null]") == []
    assert errors("model.attention_windows=[]") == []
    (short,) = errors("model.attention_windows=[32,64]")
    assert "2 entries for model.num_layers=4" in short and "one window per layer" in short
    (negative,) = errors("model.attention_windows=[32,-1,0,0]")
    assert "model.attention_windows[1]=-1" in negative and ">= 1" in negative
    (flag,) = errors("model.attention_windows=[32,true,0,0]")
    assert "model.attention_windows[1]=True" in flag


def test_windows_and_lengths_of_the_tool():
    from megatron_qwen.cli.long_ppl import cut_windows, format_table, parse_args, usable_lengths

    assert cut_windows(np.arange(10), 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    kept, skipped = usable_lengths([4, 16, 64, 8], tokens=20, max_positions=8)
    assert kept == [4, 8] and len(skipped) == 2
    assert skipped[0].startswith("length 16") and "max_position_embeddings=8" in skipped[0]
    assert skipped[1].startswith("length 64") and "only 20 tokens" in skipped[1]
    table = format_table({"plain": {4: 12.345, 8: 100.0}, "+ dynamic NTK": {4: 12.345, 8: 20.5}}, [4, 8])
    assert table.splitlines()[2].split() == ["+", "dynamic", "NTK", "12.35", "20.50"]
    with pytest.raises(SystemExit):
        parse_args(["--ckpt", "c", "--data", "d", "--variants", "plain,+ yarn"])



@pytest.mark.usefixtures("single_rank")
def test_generation_with_windows_equals_a_full_forward_per_row():
    """Ragged prompts (left-padded into one block) continued greedily with the KV cache, windows 3 and 5 in the two
    layers: each step's log-probability equals a whole-sequence forward of that row alone with the same windows,
    and differs from the same model without windows (so the windows act while decoding)."""
    from megatron_qwen.config import load_config
    from megatron_qwen.inference.engine import GenerationEngine
    from megatron_qwen.inference.sampling import SamplingParams
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    shape = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=2", "model.ffn_hidden_size=128",
             "model.padded_vocab_size=256"]
    windowed, full = (build_model(load_config("configs/tiny.yaml", shape + extra), Runtime.cpu(),
                                  rope_at_positions=True)[0] for extra in (["model.attention_windows=[3,5]"], []))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in windowed.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    full.load_state_dict(windowed.state_dict())
    prompts = [[3, 17, 92, 45, 8, 61, 33], [5, 120], [77, 77, 12, 9, 4, 4]]
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    results = {name: GenerationEngine([model.eval()], 250).generate(prompts, params)
               for name, model in (("windowed", windowed), ("full", full))}
    ours = results["windowed"]
    for prompt, new, logprobs in zip(prompts, ours.tokens, ours.logprobs):
        row = torch.tensor([prompt + new])
        with torch.no_grad():
            logits = windowed(row, torch.arange(row.shape[1])[None], None)[0, :, :250].double()
        expected = logits.log_softmax(-1)[len(prompt) - 1:-1].gather(-1, torch.tensor(new)[:, None])[:, 0]
        np.testing.assert_allclose(logprobs, expected.numpy(), rtol=0, atol=1e-4)
    differences = [abs(a - b) for mine, theirs in zip(ours.logprobs, results["full"].logprobs)
                   for a, b in zip(mine, theirs)]
    assert max(differences) > 1e-3



@pytest.mark.usefixtures("single_rank")
def test_window_nll_scores_the_real_vocabulary_only():
    """The tool's per-token NLL in this process against log_softmax over the first `vocab_size` logits by hand: a
    checkpoint converted with fewer ids than embedding rows (rows padded for TP) must not give them probability."""
    from megatron_qwen.cli.long_ppl import window_nll
    from megatron_qwen.config import load_config, resolve
    from megatron_qwen.inference.forward import ForwardPlan
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    cfg, layout, _ = resolve(load_config("configs/tiny.yaml", [
        "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=2", "model.ffn_hidden_size=128",
        "model.padded_vocab_size=256", "training.micro_batch_size=1", "training.global_batch_size=1"]), 1)
    (model,) = build_model(cfg, Runtime.cpu(), rope_at_positions=True)
    torch.manual_seed(6)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.output_layer.weight[200:] += 1.0  # the padding rows would take probability if they were scored
    model.eval()
    windows = torch.randint(0, 200, (3, 12), generator=torch.Generator().manual_seed(1))
    got = window_nll([model], ForwardPlan(cfg, layout, vocab_size=200, generate_vocab=200), windows)
    with torch.no_grad():
        logits = model(windows, torch.arange(12).expand(3, 12), None)[:, :-1, :200].double()
    expected = -logits.log_softmax(-1).gather(-1, windows[:, 1:, None])[..., 0]
    assert got.shape == (3, 11)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


# The model of the end-to-end checks: tiny.yaml pretrained at seq_length 64, evaluated up to 16 x that.
SEQ_LENGTH = 64
LENGTHS = (64, 128, 256, 512, 1024)
WINDOWS = (64, 128, 256, 0)  # shorter windows in the lower layers, the top layer full
MAX_TOKENS = 4096
CHECKED = (64, 256)  # the lengths recomputed here: within the training length, and 4 x beyond it


def write_shards(train_prefix: Path, held_out_prefix: Path, held_out: int = 8) -> int:
    """The email package's sources as two indexed shards: the last `held_out` files apart, the rest to train on;
    token ids renumbered densely over both (as tests/corpus.py does). Returns the vocabulary size."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_qwen.tokenizer import load_tokenizer

    tok = load_tokenizer()
    docs = [tok.encode(text) + [tok.eod_id] for text in stdlib_texts("email", 40)]
    remap = {int(old): new for new, old in enumerate(np.unique(np.concatenate(docs)))}
    for prefix, part in ((train_prefix, docs[:-held_out]), (held_out_prefix, docs[-held_out:])):
        builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
        for doc in part:
            builder.add_document(torch.tensor([remap[t] for t in doc], dtype=torch.int32), [len(doc)])
        builder.finalize(str(prefix) + ".idx")
    return int(-(-len(remap) // 128) * 128)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(checkpoint, held-out shard prefix, held-out token stream): tiny.yaml pretrained for 40 steps at seq 64."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    root = tmp_path_factory.mktemp("long_context")
    vocab = write_shards(root / "train_text_document", root / "held_out_text_document")
    run_torchrun(1, ["-m", "megatron_qwen.stages.pretrain", "configs/tiny.yaml",
                     f"data.paths=[{root / 'train_text_document'}]", f"model.padded_vocab_size={vocab}",
                     f"model.seq_length={SEQ_LENGTH}", "training.micro_batch_size=2", "training.global_batch_size=8",
                     "training.train_iters=40", "training.lr=2e-3", "training.min_lr=2e-4",
                     "training.lr_warmup_iters=5", "training.lr_decay_iters=40", "training.save_interval=40",
                     "data.split=100,0,0", "logging.log_interval=10", f"logging.run_dir={root / 'run'}"])
    held_out = IndexedDataset(str(root / "held_out_text_document"))
    stream = np.concatenate([np.asarray(held_out[i], dtype=np.int64) for i in range(len(held_out))])
    return root / "run" / "checkpoints" / "iter_0000040", root / "held_out_text_document", stream


def hand_nll(logits: np.ndarray, windows: np.ndarray) -> float:
    """Mean next-token NLL of every window's positions 0..L-2, from full-vocabulary logits [n, L, V], in float64."""
    logp = torch.log_softmax(torch.from_numpy(logits).double()[:, :-1], dim=-1)
    targets = torch.from_numpy(windows[:, 1:])
    return -logp.gather(-1, targets[..., None]).mean().item()


@pytest.mark.parallel
def test_long_ppl_equals_a_direct_forward_at_tp1_and_tp2(pretrained, tmp_path):
    import yaml

    from megatron_qwen.cli.long_ppl import VARIANTS

    ckpt, held_out, stream = pretrained
    stream = stream[:MAX_TOKENS]
    common = ["--ckpt", str(ckpt), "--data", str(held_out), "--windows", ",".join(map(str, WINDOWS)),
              "--max-tokens", str(MAX_TOKENS)]
    commands = [["long-ppl", *common, "--lengths", ",".join(map(str, LENGTHS)), "--tp", "1",
                 "--out", str(tmp_path / "tp1.json"), "--plot", str(tmp_path / "tp1.png")],
                ["long-ppl", *common, "--lengths", ",".join(map(str, CHECKED)), "--tp", "2",
                 "--out", str(tmp_path / "tp2.json")],
                ["long-ppl", *common, "--lengths", ",".join(map(str, CHECKED)), "--cp", "2",
                 "--out", str(tmp_path / "cp2.json")]]
    # The reference: the project's forward pass with each variant's keys in the model config, NLL computed here.
    model = yaml.safe_load((ckpt / "model_config.yaml").read_text())
    section = model.get("model", model)
    for v, (ntk, logn, windowed) in enumerate(VARIANTS.values()):
        section.update(use_dynamic_ntk=ntk, use_logn_attn=logn, attention_windows=list(WINDOWS) if windowed else [])
        (tmp_path / f"variant{v}.yaml").write_text(yaml.safe_dump(model))
        for length in CHECKED:
            np.save(tmp_path / f"windows{length}.npy", stream[: len(stream) // length * length].reshape(-1, length))
            commands.append(["forward", "--ckpt", str(ckpt), "--config", str(tmp_path / f"variant{v}.yaml"),
                             "--tokens", str(tmp_path / f"windows{length}.npy"),
                             "--out", str(tmp_path / f"logits{v}_{length}.npy")])
    proc = run_torchrun(2, ["tests/parallel/long_context_worker.py", *map(json.dumps, commands)], timeout=600)
    print(proc.stdout)

    tp1, tp2, cp2 = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("tp1", "tp2", "cp2"))
    assert tp1["lengths"] == list(LENGTHS) and tp1["variants"] == list(VARIANTS)
    assert tp1["predictions"] == {str(n): MAX_TOKENS // n * (n - 1) for n in LENGTHS}
    for v, name in enumerate(VARIANTS):
        for length in CHECKED:
            windows = np.load(tmp_path / f"windows{length}.npy")
            expected = hand_nll(np.load(tmp_path / f"logits{v}_{length}.npy"), windows)
            assert tp1["nll"][name][str(length)] == pytest.approx(expected, rel=1e-6, abs=1e-6), (name, length)
            assert tp2["nll"][name][str(length)] == pytest.approx(expected, rel=1e-5), (name, length, "TP=2")
            assert cp2["nll"][name][str(length)] == pytest.approx(expected, rel=1e-5), (name, length, "CP=2")
    nll = {name: tp1["nll"][name] for name in VARIANTS}
    # Within the training length every variant is the plain model (windows >= 64 limit nothing at 64) ...
    assert len({round(row["64"], 9) for row in nll.values()}) == 1, nll
    # ... and beyond it each trick changes the numbers: the comparisons above would catch one left out.
    assert len({round(row["256"], 6) for row in nll.values()}) == len(VARIANTS), nll
    assert (tmp_path / "tp1.png").stat().st_size > 0


def test_documents_from_json_lines_are_tokenized_with_the_family_tokenizer(tmp_path):
    from megatron_qwen.cli.long_ppl import read_documents
    from megatron_qwen.errors import DataError
    from megatron_qwen.tokenizer import load_tokenizer

    texts = ["Hello world! 你好，世界。", "A second document.\n"]
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    docs = read_documents(path, "body", "qwen2.5", 151936)
    tok = load_tokenizer(family="qwen2.5")
    assert [d.tolist() for d in docs] == [tok.encode(t) + [tok.eod_id] for t in texts]
    assert docs[0].tolist()[:8] == [9707, 1879, 0, 220, 108386, 3837, 99489, 1773]  # QWEN.md's known encoding
    with pytest.raises(DataError, match="held_out.jsonl:1 is not a JSON object with a 'text' string"):
        read_documents(path, "text", "qwen2.5", 151936)
    with pytest.raises(DataError, match=r"token id 151643 outside the model's vocabulary \[0, 4992\)"):
        read_documents(path, "body", "qwen2.5", 4992)
