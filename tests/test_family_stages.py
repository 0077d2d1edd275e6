"""Every stage and tool on the later Qwen families (Qwen2.5, Qwen3): vocabulary bounds, and the stages at layouts.

(a) Vocabulary: a Qwen2.5/Qwen3 model's embedding has padding rows past its tokenizer's last id (Qwen3: 151,669
tokens in 151,936 rows), and those start below v1's 151,851. `megatron-qwen generate`, `megatron-qwen forward
--generate` and PPO's rollouts draw only the family's ids, decode with its tokenizer and stop at its stop ids.
The models here make a padding row the most likely next id (the final norm keeps one hidden unit, and two
padding rows weigh it by +-30), so a bound that lets those rows through is seen at once.

(b) Stages: on a tiny Qwen3-shaped model (4 heads of 64 at hidden 128, 2 key/value heads, q/k norms, no q/k/v
bias, tied) and a Qwen2.5-shaped one (2 key/value heads, bias, tied), each with data rendered by its family's
template, pretraining, SFT, a reward model from the tied language model, DPO, PPO (reward model) and GRPO run at
TP=1 and at TP=2 x PP=2 with SP from the same checkpoints; each stage's first steps agree within its own layout
test's tolerance. The TP=1 launch also trains the Qwen3 shape in FP8 (rowwise) against its fp32 curve. One
launch per layout runs every stage of both families (tests/parallel/family_stages_worker.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from corpus import stdlib_texts
from parallel.family_stages_worker import FAMILIES as FAMILY_SHAPES
from parallel.family_stages_worker import MODEL as MODEL_SHAPE
from parallel.family_stages_worker import PRETRAIN_STEPS, SEQ, STEPS
from spawn import run_torchrun

# The stage tests' family shapes (tied embeddings, GQA, Qwen3's q/k norms and head width) with a family's whole
# embedding, so text can be encoded and decoded.
FAMILY_ROWS = {"qwen3": 151936, "qwen2.5": 151680}  # qwen2.5: rows enough for its 151,665 tokens, fewer than v1's


def wide_model(family: str) -> list[str]:
    return MODEL_SHAPE + FAMILY_SHAPES[family] + [f"model.padded_vocab_size={FAMILY_ROWS[family]}"]


def output_weight(model) -> torch.Tensor:
    """The output layer's weight: the input embedding's in a tied model."""
    weight = model.output_layer.weight
    return model.embedding.word_embeddings.weight if weight is None else weight


def padding_rows(family: str) -> tuple[int, int]:
    """Two embedding rows past `family`'s last token and before v1's 151,851 (no tokenizer id of that family)."""
    from megatron_qwen.config import TOKENIZER_VOCAB_SIZES

    first = TOKENIZER_VOCAB_SIZES[family] + 5
    return first, first + 1


def favour_padding_rows(model, family: str) -> None:
    """Make one of `family`'s padding rows the greedy choice after any prompt: the final norm passes hidden unit 0
    alone, and the two padding rows of the output layer weigh it by +30 and -30 (one of them wins whatever its
    sign); every other row gets 0 there."""
    out = output_weight(model)
    with torch.no_grad():
        model.decoder.final_layernorm.weight.zero_()
        model.decoder.final_layernorm.weight[0] = 1.0
        out[:, 0] = 0.0
        a, b = padding_rows(family)
        out[a, 0], out[b, 0] = 30.0, -30.0


@pytest.fixture(scope="module")
def wide_checkpoints(single_rank, tmp_path_factory):
    """{family: checkpoint} of `wide_model(family)`, a padding row favoured (`favour_padding_rows`)."""
    import yaml

    from megatron_qwen.checkpoint.io import save_model
    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    out = {}
    for family in FAMILY_ROWS:
        path = tmp_path_factory.mktemp(family) / "ckpt"
        cfg = load_config("configs/tiny.yaml", wide_model(family))
        (model,) = build_model(cfg, Runtime.cpu())
        favour_padding_rows(model, family)
        save_model([model], path)
        (path / "model_config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        out[family] = path
    return out


@pytest.fixture
def cli_in_process(single_rank):
    """The CLIs' `main` tears megatron-core's groups down on exit: set them up again for the next tests."""
    from megatron_qwen.platform.launch import init_distributed

    yield
    init_distributed(1, 1, None, device="cpu")


@pytest.mark.parametrize("family", sorted(FAMILY_ROWS))
def test_generate_cli_samples_decodes_and_stops_with_the_family_tokenizer(wide_checkpoints, family, tmp_path,
                                                                          cli_in_process):
    from megatron_qwen.cli import generate
    from megatron_qwen.config import TOKENIZER_VOCAB_SIZES
    from megatron_qwen.tokenizer import load_tokenizer

    tok = load_tokenizer(family=family)
    out = tmp_path / "out.jsonl"
    assert generate.main(["--ckpt", str(wide_checkpoints[family]), "--chat", "--prompt", "Hello there",
                          "--max-new-tokens", "4", "--temperature", "0", "--out", str(out)]) == 0
    (line,) = [json.loads(text) for text in out.read_text().splitlines()]
    # The family's template: Qwen3 has no default system prompt, Qwen2.5 its own.
    assert tok.decode(line["prompt_tokens"]) == tok.render_chat_text(
        [{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
    assert all(t < TOKENIZER_VOCAB_SIZES[family] for t in line["tokens"]), line["tokens"]
    assert line["text"] == tok.decode([t for t in line["tokens"] if t not in tok.stop_ids])


def test_generate_cli_stops_at_the_family_stop_ids(wide_checkpoints, tmp_path, cli_in_process):
    """With the padding rows out of reach, <|im_end|> is made the greedy choice: the reply ends there."""
    import yaml

    from megatron_qwen.checkpoint.io import load_model, save_model
    from megatron_qwen.cli import generate
    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.tokenizer import load_tokenizer

    tok = load_tokenizer(family="qwen3")
    cfg = load_config("configs/tiny.yaml", wide_model("qwen3"))
    (model,) = build_model(cfg, Runtime.cpu())
    load_model([model], wide_checkpoints["qwen3"])
    with torch.no_grad():  # <|im_end|> and <|endoftext|> take the padding rows' weights
        out = output_weight(model)
        out[tok.im_end_id, 0], out[tok.eod_id, 0] = out[padding_rows("qwen3")[0], 0], out[padding_rows("qwen3")[1], 0]
    ckpt = tmp_path / "ckpt"
    save_model([model], ckpt)
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    result = tmp_path / "out.jsonl"
    assert generate.main(["--ckpt", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "4", "--temperature", "0",
                          "--out", str(result)]) == 0
    line = json.loads(result.read_text())
    assert line["finished"] and len(line["tokens"]) == 1 and line["tokens"][0] in (tok.im_end_id, tok.eod_id), line
    assert line["text"] == ""


@pytest.mark.parametrize("family", sorted(FAMILY_ROWS))
def test_forward_cli_greedy_tokens_are_the_family_ids_and_decode(wide_checkpoints, family, tmp_path, capsys,
                                                                 cli_in_process):
    from megatron_qwen.cli import forward
    from megatron_qwen.config import TOKENIZER_VOCAB_SIZES
    from megatron_qwen.tokenizer import load_tokenizer

    tok = load_tokenizer(family=family)
    prompt = tok.encode("Hello there")
    np.save(tmp_path / "tokens.npy", np.array([prompt]))
    assert forward.main(["--ckpt", str(wide_checkpoints[family]), "--tokens", str(tmp_path / "tokens.npy"),
                         "--out", str(tmp_path / "logits.npy"), "--generate", "3"]) == 0
    rows = np.load(tmp_path / "logits.generated.npy")
    new = rows[0, len(prompt):].tolist()
    assert len(new) == 3 and all(t < TOKENIZER_VOCAB_SIZES[family] for t in new), new
    printed = capsys.readouterr().out
    assert f"row 0: {tok.decode(prompt)!r} -> {tok.decode(new)!r}" in printed, printed


@pytest.mark.parametrize("family", sorted(FAMILY_ROWS))
def test_ppo_rollouts_draw_the_family_ids_and_rewards_read_its_text(wide_checkpoints, family, single_rank):
    from megatron_qwen.checkpoint.io import load_model
    from megatron_qwen.config import TOKENIZER_VOCAB_SIZES, load_config
    from megatron_qwen.inference.sampling import SamplingParams
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.rl.trainer import PPORun
    from megatron_qwen.training.units import ModelUnit
    from megatron_qwen.tokenizer import load_tokenizer

    cfg = load_config("configs/tiny.yaml", wide_model(family) + ["ppo.reward_fn=ppo_rewards:good_fraction",
                                                                "ppo.policy_from=unused"])
    chunks = build_model(cfg, Runtime.cpu(), rope_at_positions=True)
    load_model(chunks, wide_checkpoints[family])
    tok = load_tokenizer(family=family)
    trainer = SimpleNamespace(
        cfg=cfg, ctx=SimpleNamespace(runtime=Runtime.cpu(), layout=SimpleNamespace(dp=1), dp_rank=0),
        units={"policy": ModelUnit("policy", chunks, Runtime.cpu())}, frozen={},
        state=SimpleNamespace(stage_state={}, step=0),
        tokenizer=tok)
    run = PPORun(trainer)
    result = run.engine.generate([tok.encode("Hello there")],
                                 SamplingParams(max_new_tokens=3, temperature=0.0, stop_ids=run.stop_ids))
    assert all(t < TOKENIZER_VOCAB_SIZES[family] for t in result.tokens[0]), result.tokens
    assert run.stop_ids == (tok.im_end_id, tok.im_start_id, tok.eod_id)
    assert run.score.decode == tok.decode  # the reward function reads the rollouts' text


# --------------------------------------------------------------------------- (b) the stages at TP=1 and TP=2 x PP=2

WORKER = str(Path(__file__).parent / "parallel" / "family_stages_worker.py")
STAGE_FAMILIES = ("qwen3", "qwen2.5")


def family_records(rng: np.random.Generator) -> dict[str, list[dict]]:
    """Each stage's input records: text, conversations (the family's default system prompt, Qwen3's empty
    thinking block), preference pairs and prompts."""
    from test_reward import preference_task
    from test_sft import digit_task

    chats = [{"messages": r["messages"][1:]} for r in digit_task(rng, 64)]  # without the empty system turn
    pairs = preference_task(rng, 64)
    return {
        "corpus": [{"text": text} for text in stdlib_texts("email", 12)],
        "chat": chats,
        "pairs": pairs,
        "prompts": [{"prompt": p["prompt"] + f" ({i})"} for i, p in enumerate(pairs[:16])],
    }


def render_family(family: str, records: dict[str, list[dict]]) -> dict[str, list[np.ndarray]]:
    """Shard name -> documents, rendered as `tools/preprocess_data.py` does (text with <|endoftext|>, --chat,
    --preference, --prompts) with `family`'s tokenizer and chat template."""
    from megatron_qwen.data.chat import render_conversation, render_preference, render_prompt
    from megatron_qwen.tokenizer import load_tokenizer

    tok = load_tokenizer(family=family)
    chats = [render_conversation(tok, r, SEQ) for r in records["chat"]]
    pairs = [render_preference(tok, r, SEQ) for r in records["pairs"]]
    docs = {
        "corpus_text_document": [tok.encode(r["text"]) + [tok.eod_id] for r in records["corpus"]],
        "chat_chat_tokens_document": [c.ids for c in chats],
        "chat_chat_mask_document": [c.mask for c in chats],
        "pairs_chosen_document": [chosen for chosen, _ in pairs],
        "pairs_rejected_document": [rejected for _, rejected in pairs],
        "prompts_prompt_document": [render_prompt(tok, r, SEQ) for r in records["prompts"]],
    }
    return {name: [np.asarray(d, dtype=np.int64) for d in items] for name, items in docs.items()}


@pytest.fixture(scope="module")
def family_data(tmp_path_factory):
    """DATA/FAMILY: each family's shards, ids renumbered densely over all of them (one small vocabulary that the
    stages' checkpoints share), and data.json: the vocabulary size, the stop ids and the renumbering."""
    from megatron_qwen.data.indexed import IndexedShardWriter
    from megatron_qwen.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("family-data")
    records = family_records(np.random.default_rng(0))
    for family in STAGE_FAMILIES:
        docs = render_family(family, records)
        ids = np.unique(np.concatenate([d for name, items in docs.items() if "_mask_" not in name for d in items]))
        lookup = np.zeros(int(ids.max()) + 1, dtype=np.int64)
        lookup[ids] = np.arange(len(ids))
        vocab = -(-len(ids) // 128) * 128
        (root / family).mkdir()
        for name, items in docs.items():
            mask = "_mask_" in name
            with IndexedShardWriter(root / family / name, 2 if mask else vocab) as writer:
                for doc in items:
                    writer.add_document(doc if mask else lookup[doc])
        stops = [int(lookup[t]) for t in load_tokenizer(family=family).stop_ids if t in set(ids.tolist())]
        (root / family / "data.json").write_text(json.dumps({"vocab": vocab, "stop_ids": stops,
                                                             "ids": ids.tolist()}))
    return root


@pytest.fixture(scope="module")
def stage_runs(family_data, tmp_path_factory):
    """The worker's runs: the reference at TP=1 (one rank), then TP=2 x PP=2 with SP from its checkpoints."""
    root = tmp_path_factory.mktemp("family-stages")
    common = [WORKER, "--data", str(family_data), "--workdir", str(root)]
    # Generous: measured 1-1.5 min each with the machine's load average at 25.
    run_torchrun(1, common + ["--name", "tp1", "--layout", "1,1,0", "--reference"], timeout=900)
    run_torchrun(4, common + ["--name", "tp2pp2", "--layout", "2,2,1", "--starts", str(root / "tp1")], timeout=900)
    return root


def stage_metrics(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "step" in r}


def test_chat_data_holds_each_family_template(family_data):
    """The SFT shards are the family's rendering (Qwen2.5: its default system prompt; Qwen3: none, and the empty
    thinking block of the final reply), with the assistant replies trained."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_qwen.tokenizer import load_tokenizer

    records = family_records(np.random.default_rng(0))
    for family in STAGE_FAMILIES:
        tok = load_tokenizer(family=family)
        ids = np.asarray(json.loads((family_data / family / "data.json").read_text())["ids"])
        tokens = IndexedDataset(str(family_data / family / "chat_chat_tokens_document"))
        mask = IndexedDataset(str(family_data / family / "chat_chat_mask_document"))
        text = tok.decode(ids[tokens[0]])
        expected, trained = tok.render_chat(records["chat"][0]["messages"])
        assert ids[tokens[0]].tolist() == expected and mask[0].astype(bool).tolist() == trained
        if family == "qwen3":
            assert text.startswith("<|im_start|>user\n") and "<think>\n\n</think>\n\n" in text, text
        else:
            assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud."), text


@pytest.mark.parallel
def test_reward_model_starts_from_the_tied_language_model(stage_runs):
    """The reward model's initial weights are the tied language model's, less nothing (a tied model stores no
    output layer) plus a fresh head; the model has no output layer of its own."""
    from megatron_qwen.checkpoint.io import read_full_state_dict

    for family in STAGE_FAMILIES:
        runs = stage_runs / "tp1" / family
        lm, reward = (
            {k: v for k, v in read_full_state_dict(path).items() if not k.startswith("optimizer")}
            for path in (runs / "pretrain" / "checkpoints" / f"iter_{PRETRAIN_STEPS:07d}",
                         runs / "reward0" / "checkpoints" / "iter_0000000"))
        assert "output_layer.weight" not in lm and "output_layer.weight" not in reward
        assert set(reward) == set(lm) | {"reward_head.weight"}, set(reward) ^ set(lm)
        assert all(torch.equal(reward[k], lm[k]) for k in lm), family
        norm = lm["decoder.final_layernorm.weight"]
        assert not torch.equal(norm, torch.ones_like(norm))  # trained: a load that did not happen could not pass


# Per stage: the compared reports and the tolerance the stage's own layout test uses.
LM_TOLERANCE = dict(rel=1e-4)  # test_pretrain: relative, fp32 reduction order over Adam steps
COMPARED = {
    "pretrain": (("loss",), LM_TOLERANCE),
    "sft": (("loss",), LM_TOLERANCE),
    "reward": (("loss", "accuracy", "margin"), dict(abs=1e-5)),  # test_reward
    "dpo": (("loss", "chosen_reward", "rejected_reward", "accuracy", "margin", "grad_norm"), dict(abs=1e-5)),
    "ppo": (("reward_mean", "response_length", "policy_loss", "value_loss", "kl_to_reference"),
            dict(rel=1e-4, abs=1e-5)),  # test_ppo
    "grpo": (("reward_mean", "response_length", "policy_loss", "kl_to_reference"), dict(rel=1e-4, abs=1e-5)),
}


@pytest.mark.parallel
@pytest.mark.parametrize("family", STAGE_FAMILIES)
def test_every_stage_at_tp2_pp2_gives_the_metrics_of_one_rank(stage_runs, family):
    """Pretraining, SFT, the reward model (from the tied language model), DPO (frozen reference), PPO (policy,
    reference, value and reward model, all GQA and tied) and GRPO at TP=2 x PP=2 with SP against TP=1."""
    for stage, (keys, tolerance) in COMPARED.items():
        ref, got = (stage_metrics(stage_runs / name / family / stage) for name in ("tp1", "tp2pp2"))
        assert sorted(got) == list(range(1, STEPS[stage] + 1)), (stage, sorted(got))
        for step in got:
            for key in keys:
                assert got[step][key] == pytest.approx(ref[step][key], **tolerance), \
                    (stage, step, key, got[step][key], ref[step][key])
        # Something moved: the stage's reports change between its first and last step.
        assert any(got[1][key] != got[STEPS[stage]][key] for key in keys), (stage, got)
        # The frozen references loaded: the policy starts as its reference (DPO: loss ln 2; PPO, GRPO: no KL).
        for run in (ref, got):
            if stage == "dpo":
                assert run[1]["loss"] == pytest.approx(math.log(2), abs=1e-7) and run[1]["margin"] == 0.0, run[1]
            if stage in ("ppo", "grpo"):
                assert abs(run[1]["kl_to_reference"]) < 1e-7, (stage, run[1]["kl_to_reference"])


@pytest.mark.parallel
def test_fp8_rowwise_follows_the_fp32_curve_on_qwen3(stage_runs):
    """As test_fp8 checks for v1: FP8 (rowwise scaling) on the Qwen3-shaped model (q/k norms, a head width apart
    from hidden / heads, tied embeddings) follows its fp32 curve, window by window, from the same weights."""
    fp32, fp8 = (stage_metrics(stage_runs / "tp1" / "qwen3" / name) for name in ("pretrain", "fp8"))
    fp32, fp8 = ({step: r["loss"] for step, r in curve.items()} for curve in (fp32, fp8))
    assert sorted(fp32) == sorted(fp8) == list(range(1, PRETRAIN_STEPS + 1))
    windows = [range(s, s + 10) for s in range(1, PRETRAIN_STEPS + 1, 10)]
    mean = lambda curve, steps: sum(curve[s] for s in steps) / len(steps)  # noqa: E731
    rel = [abs(mean(fp8, w) - mean(fp32, w)) / mean(fp32, w) for w in windows]
    print("\nFP8 rowwise vs fp32 (Qwen3-shaped), mean loss per 10 steps: "
          + ", ".join(f"{mean(fp32, w):.3f}/{mean(fp8, w):.3f}" for w in windows))
    # The curve has a shape to follow: measured 7.79 -> 6.63 over the four windows, FP8 within 1e-3 of it.
    assert mean(fp32, windows[0]) - mean(fp32, windows[-1]) > 0.8
    assert max(rel) <= 0.03, rel  # test_fp8's bound
    # FP8 ran: the first step (same weights, same batch) already differs by FP8's own rounding.
    assert abs(fp8[1] - fp32[1]) / fp32[1] >= 1e-6 and all(fp8[s] != fp32[s] for s in fp32), (fp32[1], fp8[1])


def test_model_flops_count_the_gqa_and_head_width_weights(single_rank):
    """The logged TFLOP/s and MFU count the layers' GEMMs from the real weights: 2 FLOPs per weight and token in
    the forward, read here off a built Qwen3-shaped model (4 heads of 64 at hidden 128, 2 key/value heads)."""
    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.training.flops import forward_flops_per_token

    cfg = load_config("configs/tiny.yaml", MODEL_SHAPE + FAMILY_SHAPES["qwen3"] + ["model.padded_vocab_size=256"])
    (model,) = build_model(cfg, Runtime.cpu())
    linears = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")
    weights = sum(p.numel() for name, p in model.named_parameters() if name.endswith(linears))
    m = cfg.model
    gemm, attention, head = forward_flops_per_token(
        m.hidden_size, m.num_layers, m.ffn_hidden_size, m.padded_vocab_size, m.seq_length,
        query_width=m.num_attention_heads * m.head_dim, kv_width=m.kv_heads * m.head_dim)
    assert gemm == 2 * weights
    assert attention == m.num_layers * 4 * m.seq_length * 4 * 64 and head == 2 * 128 * 256
