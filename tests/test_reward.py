"""The reward stage on gloo CPU ranks: the pairwise loss, starting from a language model, learning a
synthetic preference, layout equivalence, and export to transformers' Qwen2ForSequenceClassification.

The preference: replies are four words from a small set and the chosen reply holds more kind words than
the rejected one. The reward model is started from a language-model checkpoint (training.init_from),
trained through `python -m megatron_qwen.stages.reward`, exported, and scored by transformers on
held-out pairs it never saw. Measured: 100 % held-out accuracy after 40 steps of 8 pairs (chance is 50 %).
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spawn import REPO, run_torchrun
from test_sft import densify, write_jsonl

STAGE = ["-m", "megatron_qwen.stages.reward", "configs/tiny.yaml"]
SEQ, STEPS = 48, 40
MODEL = ["model.num_layers=2", "model.hidden_size=128", "model.ffn_hidden_size=256", f"model.seq_length={SEQ}"]
KIND, UNKIND = ["good", "great", "nice", "kind"], ["bad", "poor", "rude", "sad"]
PROMPTS = ["How was the film?", "Describe the food.", "What do you think of the hotel?"]


def preference_task(rng: np.random.Generator, count: int, exclude: set = frozenset()) -> list[dict]:
    """`count` distinct pairs of four-word replies; the chosen one holds more words from KIND."""
    records, seen = [], set(exclude)
    while len(records) < count:
        kind = sorted(rng.choice(5, size=2, replace=False))  # kind-word counts of (rejected, chosen)
        replies = []
        for n in (kind[1], kind[0]):
            words = list(rng.choice(KIND, n)) + list(rng.choice(UNKIND, 4 - n))
            replies.append(" ".join(rng.permutation(words)))
        key = (str(rng.choice(PROMPTS)), *replies)
        if key in seen:
            continue
        seen.add(key)
        records.append({"prompt": key[0], "chosen": key[1], "rejected": key[2]})
    return records


def metrics(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def overrides(data, run_dir, *extra) -> list[str]:
    dense, _, vocab = data
    return [
        f"data.paths=[{dense / 'train'}]", f"model.padded_vocab_size={vocab}", *MODEL, "data.split=100,0,0",
        "training.micro_batch_size=4", "training.global_batch_size=16", f"training.train_iters={STEPS}",
        "training.lr=1e-3", "training.min_lr=1e-4", "training.lr_warmup_iters=10", "training.lr_decay_style=cosine",
        "logging.log_interval=1", f"logging.run_dir={run_dir}", *extra,
    ]


def test_pairwise_loss_against_hand_computed_values():
    from megatron_qwen.stages.reward import pairwise_loss

    rewards = torch.tensor([[0.0, 2.0, 9.0], [0.0, 0.5, 9.0], [1.0, 9.0, 9.0], [3.0, 9.0, 9.0]])
    read_at = torch.tensor([[0, 1, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0]])
    loss, pairs, report = pairwise_loss(read_at, rewards)
    # Margins 2.0 - 0.5 = 1.5 and 1.0 - 3.0 = -2.0; -log sigmoid(m) = log(1 + exp(-m)).
    expected = math.log(1 + math.exp(-1.5)) + math.log(1 + math.exp(2.0))
    assert loss.item() == pytest.approx(expected, rel=1e-6) and int(pairs) == 2
    assert report["reward loss"].tolist() == pytest.approx([expected, 2])
    assert report["accuracy"].tolist() == [1, 2] and report["margin"].tolist() == pytest.approx([-0.5, 2])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Train and held-out preference pairs as shards with a dense vocabulary: (dir, {old: new id}, vocab)."""
    from megatron_qwen.data import preprocess as pp

    root = tmp_path_factory.mktemp("preference")
    rng = np.random.default_rng(0)
    heldout = preference_task(rng, 200)
    train = preference_task(rng, 3000, exclude={(r["prompt"], r["chosen"], r["rejected"]) for r in heldout})
    for name, records in (("train", train), ("heldout", heldout)):
        pp.preprocess([str(write_jsonl(root / f"{name}.jsonl", records))], str(root / name), mode="preference",
                      max_length=SEQ)
    dense = root / "dense"
    dense.mkdir()
    names = [f"{n}_{side}_document" for n in ("train", "heldout") for side in ("chosen", "rejected")]
    remap, vocab = densify({name: str(root / name) for name in names}, dense)
    return dense, remap, vocab


def seeded(seed: int | None) -> list[str]:
    return [] if seed is None else [f"training.seed={seed}"]


@pytest.fixture(scope="module")
def language_model_at(data, single_rank, tmp_path_factory):
    """language_model_at(seed): a language model's weights as training.seed=seed (None: its default) gives
    them, saved; the runs at that seed start from them (training.init_from). Made once per seed."""
    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.checkpoint.io import save_model

    @functools.cache
    def make(seed: int | None) -> Path:
        root = tmp_path_factory.mktemp("lm")
        save_model(build_model(load_config("configs/tiny.yaml", overrides(data, root, *seeded(seed))), Runtime.cpu()),
                   root / "lm")
        return root / "lm"

    return make


@pytest.fixture(scope="module")
def initial(data, single_rank, tmp_path_factory):
    """A language model and the reward stage's initial checkpoint made from it (training.train_iters=0 saves
    it). The language model is training.seed's default with noise added to every tensor, norms and biases
    included: the reward stage's own build at that seed holds other weights, so only a load can match."""
    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.checkpoint.io import save_model

    root = tmp_path_factory.mktemp("initial")
    (model,) = build_model(load_config("configs/tiny.yaml", overrides(data, root)), Runtime.cpu())
    noise = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=noise) * 0.05)
    save_model([model], root / "lm")
    run_torchrun(1, STAGE + overrides(data, root, "training.train_iters=0", f"training.init_from={root / 'lm'}"))
    return root / "lm", root / "checkpoints" / "iter_0000000"


@pytest.fixture(scope="module")
def trained_at(data, language_model_at, tmp_path_factory):
    """trained_at(seed): the run directory of STEPS reward steps at training.seed=seed from that seed's
    language model; made once per seed."""

    @functools.cache
    def make(seed: int | None) -> Path:
        run_dir = tmp_path_factory.mktemp("trained")
        run_torchrun(1,
                     STAGE + overrides(data, run_dir, f"training.init_from={language_model_at(seed)}", *seeded(seed)))
        return run_dir

    return make


@pytest.fixture(scope="module")
def trained(trained_at):
    """The reference run of the layout check (training.seed's default)."""
    return trained_at(None)


@pytest.mark.usefixtures("single_rank")
def test_reward_model_starts_from_the_language_model(initial):
    from megatron_qwen.checkpoint.io import read_full_state_dict

    lm, reward = (read_full_state_dict(path) for path in initial)
    lm = {k: v for k, v in lm.items() if not k.startswith("optimizer")}
    reward = {k: v for k, v in reward.items() if not k.startswith("optimizer")}
    assert set(reward) == set(lm) - {"output_layer.weight"} | {"reward_head.weight"}
    assert all(torch.equal(reward[k], lm[k]) for k in reward if k != "reward_head.weight")
    norm = lm["decoder.final_layernorm.weight"]
    assert not torch.equal(norm, torch.ones_like(norm))  # perturbed: an ignored load could not pass
    std = reward["reward_head.weight"].std().item()
    assert reward["reward_head.weight"].shape == (1, 128) and 0.015 < std < 0.025  # fresh, init_method_std 0.02


@pytest.mark.parallel
def test_reward_training_logs_loss_accuracy_and_margin(trained_at, training_seed):
    curve = metrics(trained_at(training_seed))
    assert sorted(curve) == list(range(1, STEPS + 1))
    for record in curve.values():
        assert {"loss", "accuracy", "margin"} <= set(record)
    first = np.mean([curve[s]["loss"] for s in (1, 2, 3)])
    last = np.mean([curve[s]["loss"] for s in range(STEPS - 9, STEPS + 1)])
    accuracy = np.mean([curve[s]["accuracy"] for s in range(STEPS - 9, STEPS + 1)])
    print(f"loss {first:.3f} -> {last:.3f}, training accuracy {accuracy:.3f} over the last 10 steps")
    assert first == pytest.approx(math.log(2), abs=0.1)  # a fresh head: r_chosen ~ r_rejected
    # Measured: loss 0.10 and accuracy 1.0 over the last 10 steps; at training seeds 1-5 the worst were 0.115
    # and 0.988 (seed 4).
    assert last < 0.2 and accuracy > 0.9, (last, accuracy)


@pytest.mark.parallel
def test_tp2_pp2_sp_gives_the_loss_of_one_rank(data, language_model_at, trained, tmp_path):
    # From the language model the one-rank reference run starts from (`initial`'s is perturbed).
    run_torchrun(4, STAGE + overrides(
        data, tmp_path, f"training.init_from={language_model_at(None)}", "training.train_iters=3",
        "parallel.tp=2", "parallel.pp=2", "parallel.sp=true",
    ))
    ref, got = metrics(trained), metrics(tmp_path)
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "accuracy", "margin"):
            assert abs(got[step][key] - ref[step][key]) < 1e-5, (step, key, got[step][key], ref[step][key])


def padded(shard_prefix: str, pad: int) -> torch.Tensor:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    shard = IndexedDataset(shard_prefix)
    rows = torch.full((len(shard), SEQ), pad, dtype=torch.long)
    for i in range(len(shard)):
        rows[i, : len(shard[i])] = torch.as_tensor(shard[i].astype(np.int64))
    return rows


@pytest.mark.parallel
@pytest.mark.usefixtures("single_rank")
def test_export_scores_like_our_model_and_ranks_heldout_pairs(data, trained_at, training_seed, tmp_path):
    from transformers import Qwen2ForSequenceClassification

    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.checkpoint.io import load_model

    dense, remap, vocab = data
    ckpt = trained_at(training_seed) / "checkpoints" / f"iter_{STEPS:07d}"
    pad = vocab - 1  # an id no sequence holds; transformers scores each row at its last other token
    proc = subprocess.run(
        [sys.executable, "tools/convert_checkpoint.py", "mcore-to-hf", "--task", "reward", "--ckpt", str(ckpt),
         "--out", str(tmp_path / "hf"), "--pad-token-id", str(pad)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    hf = Qwen2ForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.pad_token_id == pad and hf.score.bias is None

    cfg = load_config("configs/tiny.yaml", overrides(data, tmp_path))
    (ours,) = build_model(cfg, Runtime.cpu(), head="scalar")
    load_model([ours], ckpt)
    ours.eval()
    scores = {}
    for side in ("chosen", "rejected"):
        rows = padded(str(dense / f"heldout_{side}_document"), pad)
        last = (rows != pad).sum(dim=1) - 1
        with torch.no_grad():
            theirs = hf(input_ids=rows).logits[:, 0]
            mine = ours(rows, None, None)[torch.arange(len(rows)), last]
        assert (mine - theirs).abs().max().item() < 1e-4
        assert (rows[torch.arange(len(rows)), last] == remap[151645]).all()  # read at the final <|im_end|>
        scores[side] = theirs
    accuracy = (scores["chosen"] > scores["rejected"]).float().mean().item()
    print(f"held-out accuracy {accuracy:.3f}")
    assert accuracy >= 0.9, accuracy  # measured 1.0 at training seeds 1-5 and the default


def test_reward_configs_hold_the_qwen_recipe():
    from megatron_qwen.config import load_config

    pmp, finetune = load_config("configs/stage/reward_pmp.yaml"), load_config("configs/stage/reward.yaml")
    for cfg in (pmp, finetune):
        t = cfg.training
        # Qwen report: constant LR 3e-6, 64 comparisons per batch, sequence 2048, one epoch.
        assert (t.lr, t.min_lr, t.lr_decay_style, t.lr_warmup_iters) == (3e-6, 3e-6, "constant", 0)
        assert t.global_batch_size == 2 * 64 and t.micro_batch_size % 2 == 0
        assert cfg.model.seq_length == 2048 and cfg.reward.epochs == 1 and cfg.model.name == "qwen-7b"
        assert t.init_from is None
    assert pmp.logging.run_dir != finetune.logging.run_dir
