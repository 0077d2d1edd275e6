"""The tiny pretraining run that the launcher tests (Slurm, mpirun) compare with a torchrun run.

4 ranks at TP=2 x PP=2 on the small dense corpus of `corpus.py`, 12 steps. The training loop is bit-exact at a
fixed layout, so any launcher that gives every process the right rank, world size and rendezvous trains the same
losses and weights as torchrun does. The torchrun reference runs once per test session, whichever module asks
first (this module is imported once, so its cache is shared).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from corpus import write_dense_corpus
from spawn import run_torchrun

STAGE = ["-m", "megatron_qwen.stages.pretrain", "configs/tiny.yaml"]
NPROC = 4
STEPS = 12
LAYOUT = ["parallel.tp=2", "parallel.pp=2"]

_cache: dict[str, object] = {}


def corpus(tmp_path_factory) -> tuple[str, int]:
    """(shard prefix, vocabulary size) of the session's corpus."""
    if "corpus" not in _cache:
        prefix = tmp_path_factory.mktemp("launch_corpus") / "email_text_document"
        _cache["corpus"] = (str(prefix), write_dense_corpus(prefix))
    return _cache["corpus"]


def overrides(corpus: tuple[str, int], *extra: str) -> list[str]:
    """The fast tiny run's overrides (no run directory: each launcher sets logging.run_dir its own way).
    No periodic saves: the only checkpoints are the final one and those a signal asks for."""
    prefix, vocab = corpus
    return [
        f"data.paths=[{prefix}]", f"model.padded_vocab_size={vocab}", "model.seq_length=64",
        "training.micro_batch_size=2", "training.global_batch_size=8", f"training.train_iters={STEPS}",
        "training.lr=2e-3", "training.min_lr=2e-4", "training.lr_warmup_iters=3", f"training.lr_decay_iters={STEPS}",
        "training.save_interval=0", "logging.log_interval=1", *LAYOUT, *extra,
    ]


def torchrun_reference(tmp_path_factory) -> Path:
    """Run directory of the uninterrupted 4-rank torchrun run (metrics.jsonl, checkpoints/iter_0000012)."""
    if "reference" not in _cache:
        run_dir = tmp_path_factory.mktemp("torchrun_reference")
        run_torchrun(NPROC, STAGE + overrides(corpus(tmp_path_factory), f"logging.run_dir={run_dir}"), timeout=600)
        _cache["reference"] = run_dir
    return _cache["reference"]


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl (a resumed run appends the steps after its checkpoint)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Full model tensors (no optimizer state) of the run's checkpoint after the last step."""
    from megatron_qwen.checkpoint.io import read_full_state_dict

    ckpt = Path(run_dir) / "checkpoints" / f"iter_{STEPS:07d}"
    return {k: v for k, v in read_full_state_dict(ckpt).items() if not k.startswith("optimizer")}


def assert_same_weights(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
    differ = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not differ, f"{len(differ)} of {len(ref)} tensors differ, e.g. {differ[:5]}"
