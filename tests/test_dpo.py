"""The DPO stage on gloo CPU ranks: the loss against hand-computed values, the response span, ln 2 at the first
step of a policy that starts from its reference, learning a hidden preference, layout equivalence of one update,
bit-exact resume, and the config's refusals.

The preference is the reward-model test's: replies are four words and the chosen one holds more kind words. The
policy and its frozen reference start from one language model; after DPO the policy's implicit reward
beta x log(pi / pi_ref), computed here from its logits, ranks held-out pairs it never saw.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spawn import REPO, cpu_env, run_torchrun
import test_reward
from test_reward import STEPS, metrics, overrides, padded, seeded

# The reward test's module-scoped fixtures: its preference pairs and language models, made here once as well.
data = test_reward.data
language_model_at = test_reward.language_model_at

STAGE = ["-m", "megatron_qwen.stages.dpo", "configs/tiny.yaml"]
REPORTS = ("loss", "chosen_reward", "rejected_reward", "accuracy", "margin")


def dpo_overrides(data, run_dir, init_from, *extra) -> list[str]:
    return overrides(data, run_dir, f"training.init_from={init_from}", "training.weight_decay=0.0", *extra)


@pytest.fixture(scope="module")
def start_at(language_model_at):
    """start_at(seed): the language model the runs at training.seed=seed start from (policy and reference). It is
    made at another seed than the run's: a model that failed to load would start from the run seed's fresh weights
    and differ from it."""
    return lambda seed: language_model_at(1000 if seed is None else 1000 + seed)


# --------------------------------------------------------------------------- the math


def test_dpo_losses_against_hand_computed_values():
    from megatron_qwen.training.preference import dpo_losses

    policy_c, policy_r = torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -4.0])
    ref_c, ref_r = torch.tensor([-5.5, -6.0]), torch.tensor([-5.0, -5.0])
    # h = (pc - rc) - (pr - rr): pair 0 (0.5) - (-1.0) = 1.5; pair 1 (-1.0) - (1.0) = -2.0.
    beta = 0.1
    losses, chosen, rejected = dpo_losses(policy_c, policy_r, ref_c, ref_r, beta)
    expected = [math.log(1 + math.exp(-0.15)), math.log(1 + math.exp(0.2))]  # -log sigmoid(beta h)
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert chosen.tolist() == pytest.approx([0.05, -0.1]) and rejected.tolist() == pytest.approx([-0.1, 0.1])
    # cDPO: (1 - eps) (-log sigmoid(beta h)) + eps (-log sigmoid(-beta h)).
    eps = 0.2
    smoothed, _, _ = dpo_losses(policy_c, policy_r, ref_c, ref_r, beta, eps)
    expected = [0.8 * math.log(1 + math.exp(-0.15)) + 0.2 * math.log(1 + math.exp(0.15)),
                0.8 * math.log(1 + math.exp(0.2)) + 0.2 * math.log(1 + math.exp(-0.2))]
    assert smoothed.tolist() == pytest.approx(expected, rel=1e-6)
    # IPO: (h - 1 / (2 beta))^2 = (1.5 - 5)^2, (-2 - 5)^2.
    ipo, _, _ = dpo_losses(policy_c, policy_r, ref_c, ref_r, beta, loss="ipo")
    assert ipo.tolist() == pytest.approx([12.25, 49.0], rel=1e-6)
    # A policy equal to its reference: every pair's loss is ln 2, with or without smoothing.
    same, _, _ = dpo_losses(policy_c, policy_r, policy_c, policy_r, beta, eps)
    assert same.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)


def test_response_starts_where_the_sides_differ():
    from megatron_qwen.training.preference import response_start

    assert response_start(np.array([1, 2, 3, 4, 9]), np.array([1, 2, 3, 5, 6, 9])) == 3
    assert response_start(np.array([1, 2, 7, 9]), np.array([1, 2, 8, 9])) == 2
    assert response_start(np.array([1, 2, 9]), np.array([1, 2, 9, 4, 9])) == 3  # a side that is a prefix


def test_response_rows_mask_the_labels_of_the_response():
    from megatron_qwen.stages.dpo import ResponseRows

    def side(ids):
        tokens = np.zeros(8, dtype=np.int64)
        tokens[: len(ids)] = ids
        mask = np.zeros(8, dtype=np.float32)
        mask[len(ids) - 1] = 1
        return {"tokens": tokens, "loss_mask": mask}

    rows = ResponseRows([side([1, 2, 3, 4, 9]), side([1, 2, 3, 5, 6, 9])])
    chosen, rejected = rows[0], rows[1]
    # The responses start at position 3 (4 and 5): their tokens are the labels of positions 2.. (length - 2).
    assert chosen["loss_mask"].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert rejected["loss_mask"].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert chosen["labels"][:4].tolist() == [2, 3, 4, 9] and rejected["labels"][2:5].tolist() == [5, 6, 9]


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def trained_at(data, start_at, tmp_path_factory):
    """trained_at(seed): the run directory of STEPS DPO steps at training.seed=seed from that seed's language
    model (policy and reference); made once per seed."""
    import functools

    @functools.cache
    def make(seed):
        run_dir = tmp_path_factory.mktemp("dpo")
        run_torchrun(1, STAGE + dpo_overrides(data, run_dir, start_at(seed), "training.save_interval=1",
                                              "training.keep_last=100", *seeded(seed)))
        return run_dir

    return make


@pytest.fixture(scope="module")
def trained(trained_at):
    return trained_at(None)


def test_first_step_loss_is_ln2_from_the_reference(trained):
    first = metrics(trained)[1]
    # Policy and reference are the same weights: identical log-probabilities, margin exactly 0.
    assert first["chosen_reward"] == 0.0 and first["rejected_reward"] == 0.0 and first["margin"] == 0.0, first
    assert abs(first["loss"] - math.log(2)) < 1e-7, first["loss"]
    assert first["accuracy"] == 0.0
    assert first["prepare_seconds"] > 0  # the reference's forward is timed


def sequence_logprobs(model, rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over each row's tokens after the first, from the model's logits."""
    with torch.no_grad():
        logits = model(rows, None, None).float()
    logprobs = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, rows[:, 1:, None])[..., 0]
    keep = torch.arange(rows.shape[1] - 1)[None, :] < (lengths[:, None] - 1)
    return (logprobs * keep).sum(dim=-1)


@pytest.mark.parallel
@pytest.mark.usefixtures("single_rank")
def test_dpo_learns_a_hidden_preference(data, start_at, trained_at, training_seed):
    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.checkpoint.io import load_model

    dense, _, vocab = data
    run_dir = trained_at(training_seed)
    cfg = load_config("configs/tiny.yaml", overrides(data, run_dir))
    models = {}
    for name, ckpt in (("policy", run_dir / "checkpoints" / f"iter_{STEPS:07d}"),
                       ("reference", start_at(training_seed))):
        (models[name],) = build_model(cfg, Runtime.cpu())
        load_model([models[name]], ckpt)
        models[name].eval()
    ratios = {}
    for side in ("chosen", "rejected"):
        rows = padded(str(dense / f"heldout_{side}_document"), vocab - 1)
        lengths = (rows != vocab - 1).sum(dim=1)
        policy, reference = (sequence_logprobs(models[name], rows, lengths) for name in ("policy", "reference"))
        ratios[side] = policy - reference
    # The prompt's tokens are alike in both sides and cancel: the sign of the margin is the implicit rewards' order.
    accuracy = (ratios["chosen"] > ratios["rejected"]).float().mean().item()
    curve = metrics(run_dir)
    print(f"held-out reward accuracy {accuracy:.3f}; loss {curve[1]['loss']:.3f} -> {curve[STEPS]['loss']:.3f}")
    assert accuracy > 0.9, accuracy


@pytest.mark.parallel
def test_tp2_pp2_update_equals_one_rank(data, start_at, trained, tmp_path):
    from megatron_qwen.checkpoint.io import read_full_state_dict

    run_torchrun(4, STAGE + dpo_overrides(data, tmp_path, start_at(None), "training.train_iters=2",
                                          "training.save_interval=1", "parallel.tp=2", "parallel.pp=2",
                                          "parallel.sp=true"))
    ref, got = metrics(trained), metrics(tmp_path)
    for step in (1, 2):  # step 2's loss is that of the weights after one update
        for key in (*REPORTS, "grad_norm"):
            assert abs(got[step][key] - ref[step][key]) < 1e-5, (step, key, got[step][key], ref[step][key])
    mine = read_full_state_dict(tmp_path / "checkpoints" / "iter_0000001")
    theirs = read_full_state_dict(trained / "checkpoints" / "iter_0000001")
    weights = [k for k in theirs if not k.startswith("optimizer") and isinstance(theirs[k], torch.Tensor)]
    assert weights and set(weights) <= set(mine)
    start = read_full_state_dict(start_at(None))
    assert all(not torch.equal(theirs[k], start[k]) for k in weights)  # the update moved every weight
    worst = max((mine[k].float() - theirs[k].float()).abs().max().item() for k in weights)
    assert worst < 1e-5, worst


@pytest.mark.parallel
def test_resume_is_bit_exact(data, start_at, trained, tmp_path):
    """A job restarted from its step-2 checkpoint (what a kill -9 after that save leaves) continues the run's
    curve and weights exactly: the reference is loaded again, the data resumes at the next pair."""
    from megatron_qwen.checkpoint.io import read_full_state_dict

    save = tmp_path / "checkpoints"
    save.mkdir()
    shutil.copytree(trained / "checkpoints" / "iter_0000002", save / "iter_0000002")
    (save / "latest").write_text("iter_0000002\n")
    out = run_torchrun(1, STAGE + dpo_overrides(data, tmp_path, start_at(None), "training.train_iters=4",
                                                f"training.lr_decay_iters={STEPS}"))
    assert "resumed from" in out.stdout and "at step 2" in out.stdout, out.stdout
    ref, got = metrics(trained), metrics(tmp_path)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert all(got[step][key] == ref[step][key] for key in REPORTS), (step, got[step], ref[step])
    mine = read_full_state_dict(save / "iter_0000004")
    theirs = read_full_state_dict(trained / "checkpoints" / "iter_0000004")
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs if isinstance(theirs[k], torch.Tensor))


def test_config_refused_before_start(tmp_path):
    proc = subprocess.run([sys.executable, *STAGE, f"logging.run_dir={tmp_path}", "dpo.beta=0", "dpo.loss=ipo",
                           "dpo.label_smoothing=0.5"], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    for message in ("training.init_from is not set", "dpo.beta=0.0 must be > 0", "0 <= label_smoothing < 0.5",
                    "dpo.label_smoothing=0.5 applies to the sigmoid loss only"):
        assert message in proc.stderr, (message, proc.stderr)
    assert "Traceback" not in proc.stderr


def test_dpo_config_holds_the_recipe():
    from megatron_qwen.config import load_config

    cfg = load_config("configs/stage/dpo.yaml")
    d, t = cfg.dpo, cfg.training
    assert (d.beta, d.label_smoothing, d.loss, d.epochs, d.reference_from) == (0.1, 0.0, "sigmoid", 1, None)
    assert (t.lr, t.min_lr, t.lr_decay_style, t.weight_decay) == (5e-7, 0.0, "linear", 0.0)
    assert t.global_batch_size == 2 * 64 and t.micro_batch_size % 2 == 0 and t.init_from is None
    assert cfg.model.hidden_dropout == cfg.model.attention_dropout == 0.0 and cfg.model.name == "qwen-7b"
