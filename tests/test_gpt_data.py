"""Pretraining datasets: the weighted blend through megatron-core's builder, the offline cache tool,
and the per-rank global-batch layout that makes resume exact."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from corpus import write_dense_corpus
from megatron_qwen.config import load_config
from megatron_qwen.data.gpt import parse_blend
from megatron_qwen.training.sampler import GlobalBatches
from spawn import REPO


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    write_dense_corpus(root / "email_text_document", "email")
    write_dense_corpus(root / "asyncio_text_document", "asyncio")
    return root


def cfg_for(root, cache, *extra):
    return load_config("configs/tiny.yaml", [
        f"data.paths=[0.7, {root}/email_text_document, 0.3, {root}/asyncio_text_document]",
        f"data.cache_dir={cache}", "data.allow_repeat=true", "model.seq_length=64",
        "training.train_iters=50", "training.global_batch_size=8", *extra,
    ])


@pytest.mark.usefixtures("single_rank")
def test_cache_tool_then_blend_reuses_it(two_corpora, tmp_path):
    from megatron_qwen.data.gpt import build_gpt_datasets

    cache = tmp_path / "cache"
    args = [f"data.paths=[0.7, {two_corpora}/email_text_document, 0.3, {two_corpora}/asyncio_text_document]",
            f"data.cache_dir={cache}", "data.allow_repeat=true", "model.seq_length=64",
            "training.train_iters=50", "training.global_batch_size=8"]
    proc = subprocess.run([sys.executable, "tools/build_dataset_cache.py", "configs/tiny.yaml", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "train: 400 samples" in proc.stdout
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")}
    assert files, "the tool wrote no index files"

    from megatron_qwen.tokenizer import load_tokenizer

    tok = load_tokenizer()  # the tool keys its cache on the Qwen tokenizer
    train, valid, test = build_gpt_datasets(cfg_for(two_corpora, cache), eod=tok.eod_id, vocab_size=tok.n_vocab)
    assert len(train) == 400
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")} == files  # read, not rebuilt
    # The blend draws from each corpus in proportion to its weight.
    share = np.bincount(np.asarray(train.dataset_index), minlength=2) / len(train)
    assert share[0] == pytest.approx(0.7, abs=0.01) and share[1] == pytest.approx(0.3, abs=0.01)
    sample = train[0]
    assert sample["tokens"].shape == (64,) and torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert sample["loss_mask"].sum() == 64


def test_blend_errors(two_corpora):
    with pytest.raises(FileNotFoundError, match="missing_text_document.bin does not exist"):
        parse_blend([f"{two_corpora}/missing_text_document"])
    with pytest.raises(ValueError, match="must alternate weight and prefix"):
        parse_blend([0.5, f"{two_corpora}/email_text_document", 0.5])
    assert parse_blend([f"{two_corpora}/email_text_document"]) == ([f"{two_corpora}/email_text_document"], None)


@pytest.mark.usefixtures("single_rank")
def test_empty_split_is_reported(two_corpora, tmp_path):
    from megatron_qwen.data.gpt import build_gpt_datasets

    cfg = cfg_for(two_corpora, tmp_path, "training.eval_interval=10", "data.split=999,1,0")
    with pytest.raises(ValueError, match="the valid split of .* holds no sequence"):
        build_gpt_datasets(cfg, eod=0, vocab_size=5000)
    cfg = cfg_for(two_corpora, tmp_path, "training.eval_interval=10", "data.split=100,0,0")
    with pytest.raises(ValueError, match="needs a valid split"):
        build_gpt_datasets(cfg, eod=0, vocab_size=5000)


class Numbered:
    def __len__(self):
        return 10**6

    def __getitem__(self, idx):
        return {"tokens": torch.tensor([idx]), "labels": torch.tensor([idx]), "loss_mask": torch.ones(1)}


def test_global_batches_cover_each_sample_once_and_resume_exactly():
    dp, micro, global_batch = 2, 2, 8
    ranks = [GlobalBatches(Numbered(), 16, global_batch, micro, r, dp) for r in range(dp)]
    assert ranks[0].num_microbatches == 2
    first = [[b["tokens"].view(-1).tolist() for b in r.next_global_batch()] for r in ranks]
    # Micro-batch i of rank r: samples start + i*(micro*dp) + r*micro, as Megatron-LM's sampler.
    assert first == [[[16, 17], [20, 21]], [[18, 19], [22, 23]]]
    resumed = GlobalBatches(Numbered(), 24, global_batch, micro, 0, dp)
    assert [b["tokens"].view(-1).tolist() for b in ranks[0].next_global_batch()] == \
           [b["tokens"].view(-1).tolist() for b in resumed.next_global_batch()]
