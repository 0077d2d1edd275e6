"""Checkpoints written by earlier versions of the trainer keep loading and resuming.

`tests/fixtures/legacy_checkpoint/` was written by the trainer as it stood before checkpoints could hold
several model units (one model, one optimizer, per-rank RNG files): a 2-layer Qwen (hidden 32, 2 heads,
SwiGLU 64, vocabulary 128, sequence 16) pretrained for 2 steps on one CPU rank on the shard beside it
(40 arithmetic token sequences), with

    torchrun --nproc-per-node 1 -m megatron_qwen.stages.pretrain configs/tiny.yaml <OVERRIDES below> \\
        training.train_iters=2

`expected.json` holds what that same code logged when it resumed the checkpoint to step 4 (loss, gradient
norm and learning rate of steps 3 and 4): the reference the current code must reproduce.
"""

from __future__ import annotations

import json
import shutil

import pytest

from spawn import REPO, run_torchrun

FIXTURE = REPO / "tests" / "fixtures" / "legacy_checkpoint"
OVERRIDES = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.ffn_hidden_size=64",
    "model.padded_vocab_size=128", "model.seq_length=16", "training.micro_batch_size=2", "training.global_batch_size=4",
    "training.lr=1e-2", "training.min_lr=1e-3", "training.lr_warmup_iters=1", "training.lr_decay_iters=4",
    "data.split=100,0,0", "logging.log_interval=1",
]


@pytest.mark.parallel
def test_legacy_checkpoint_resumes_as_the_code_that_wrote_it(tmp_path):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(FIXTURE / "checkpoints", ckpts)
    out = run_torchrun(1, [
        "-m", "megatron_qwen.stages.pretrain", "configs/tiny.yaml", *OVERRIDES,
        f"data.paths=[{FIXTURE / 'data_text_document'}]", "training.train_iters=4",
        f"logging.run_dir={tmp_path}", f"training.save={ckpts}", f"data.cache_dir={tmp_path / 'cache'}",
    ])
    assert "resumed from" in out.stdout and "at step 2" in out.stdout, out.stdout
    expected = json.loads((FIXTURE / "expected.json").read_text())["resumed_steps"]
    got = {str(r["step"]): r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert sorted(got) == ["3", "4"]
    for step, ref in expected.items():
        # Same code path, same CPU: bit-exact here; the margin covers other CPUs' float kernels.
        assert got[step]["lr"] == pytest.approx(ref["lr"], rel=1e-12)
        assert got[step]["loss"] == pytest.approx(ref["loss"], rel=1e-5), (step, got[step]["loss"], ref["loss"])
        assert got[step]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), (step, got[step]["grad_norm"])
    assert (ckpts / "latest").read_text().strip() == "iter_0000004"
