"""The `megatron-qwen` command: its console script (made from setup.py's entry point the way pip makes it), the
help, each command through it, `run` (torchrun on one machine) and `plot`'s panels per stage.

The commands' own behaviour is tested in their topic's file (test_preprocess, test_convert, test_generate,
test_plan, ...); here the checks are that the command reaches them and prints only its own lines.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from corpus import write_dense_corpus
from spawn import REPO, cpu_env

COMMANDS = ("preprocess", "convert", "generate", "forward", "long-ppl", "serve", "evaluate", "plan", "plot",
            "build-cache", "run")
ACCELERATOR_NOTE = "Transformer Engine and Apex are not installed"


@pytest.fixture(scope="module")
def megatron_qwen(tmp_path_factory) -> Path:
    """The `megatron-qwen` console script, written by pip's own script maker from the entry point setup.py
    declares (what `pip install -e .` puts in the virtualenv's bin/)."""
    # setuptools first: pip's script maker imports distutils, and a later setuptools import (megatron-core's, through
    # torch.utils.cpp_extension) fails once the standard library's distutils is loaded instead of setuptools' own.
    import setuptools  # noqa: F401
    from pip._vendor.distlib.scripts import ScriptMaker

    # setup()'s entry_points argument, read without running setup.py.
    setup_call = next(node for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                      if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    entry_points = ast.literal_eval(next(k.value for k in setup_call.keywords if k.arg == "entry_points"))
    assert entry_points["console_scripts"] == ["megatron-qwen = megatron_qwen.cli.main:console"]
    bin_dir = tmp_path_factory.mktemp("bin")
    maker = ScriptMaker(None, str(bin_dir))
    maker.executable = sys.executable
    maker.variants = {""}
    maker.make(entry_points["console_scripts"][0])
    return bin_dir / "megatron-qwen"


def user_env(**extra: str) -> dict:
    """A user's environment: CPU ranks, but no PYTHONWARNINGS (the suite's usual `ignore` would hide what the
    commands must hide themselves)."""
    env = cpu_env(**extra)
    env.pop("PYTHONWARNINGS")
    return env


def start(script: Path, *args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([str(script), *map(str, args)], cwd=REPO, env=env or user_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_help_lists_every_command_on_one_line(capsys):
    from megatron_qwen.cli.main import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()
             if line.startswith("  ") and not line.startswith("  -")}
    assert tuple(lines) == COMMANDS, out
    for name, line in lines.items():
        assert len(line.split(maxsplit=1)) == 2, f"{name} has no one-line summary: {line!r}"


def test_each_command_answers_help_through_the_console_script_without_library_warnings(megatron_qwen):
    procs = {name: start(megatron_qwen, name, "--help") for name in COMMANDS}
    verbose = start(megatron_qwen, "--verbose", "generate", "--help")
    for name, proc in procs.items():
        code, out, err = finish(proc)
        assert code == 0, err
        assert out.startswith(f"usage: megatron-qwen {name} "), out
        assert err == "", f"megatron-qwen {name} --help printed more than its help:\n{err}"
    # The notes are there to hide: --verbose shows megatron-core's four.
    code, out, err = finish(verbose)
    assert code == 0 and out.startswith("usage: megatron-qwen generate ")
    assert err.count(ACCELERATOR_NOTE) == 4, err


def test_moved_commands_work_through_the_console_script(megatron_qwen, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_qwen.tokenizer import load_tokenizer

    texts = ["Hello world.", "Megatron meets Qwen."]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    np.save(tmp_path / "tokens.npy", np.zeros((1, 4), dtype=np.int64))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.5, "lr": 1e-3}) + "\n")
    nowhere = tmp_path / "nowhere"
    procs = {
        "preprocess": start(megatron_qwen, "preprocess", "--input", tmp_path / "in.jsonl", "--output-prefix",
                            tmp_path / "shards", "--append-eod"),
        "plan": start(megatron_qwen, "plan", "--config", "configs/qwen-7b.yaml", "--gpus", 16, "--gpu", "h100-80gb",
                      "--global-batch", 64, "--emit-overrides"),
        "convert": start(megatron_qwen, "convert", "mcore-to-hf", "--ckpt", nowhere, "--out", tmp_path / "hf"),
        "generate": start(megatron_qwen, "generate", "--ckpt", nowhere, "--prompt", "hi"),
        "forward": start(megatron_qwen, "forward", "--ckpt", nowhere, "--tokens", tmp_path / "tokens.npy", "--out",
                         tmp_path / "logits.npy"),
        "build-cache": start(megatron_qwen, "build-cache", "configs/tiny.yaml", "data.paths=[]"),
        "plot": start(megatron_qwen, "plot", tmp_path / "run"),
    }
    results = {name: finish(proc) for name, proc in procs.items()}

    code, _out, err = results["preprocess"]
    assert code == 0, err
    tokenizer = load_tokenizer()
    shards = IndexedDataset(str(tmp_path / "shards_text_document"))
    assert [shards[i].tolist() for i in range(len(shards))] == [tokenizer.encode(t) + [tokenizer.eod_id] for t in texts]

    code, out, err = results["plan"]
    assert code == 0 and "parallel.tp=" in out and "parallel.pp=" in out, err
    for name in ("convert", "generate", "forward"):
        code, out, err = results[name]
        assert code == 2 and f"{nowhere} is not a megatron-core checkpoint" in err, (name, out, err)
        assert "Traceback" not in err, err
    code, _out, err = results["build-cache"]
    assert code == 2 and err.startswith("error: ") and "data.paths" in err, err
    code, out, err = results["plot"]
    assert code == 0 and out == f"{tmp_path / 'run' / 'metrics.png'}\n", err
    assert (tmp_path / "run" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("verbose", [False, True])
def test_loading_a_checkpoint_shows_torch_sharded_tensor_notes_only_when_verbose(single_rank, tmp_path, verbose):
    import warnings

    from megatron_qwen.checkpoint.io import load_model, save_model
    from megatron_qwen.cli.main import show_library_warnings
    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    chunks = build_model(load_config("configs/tiny.yaml"), Runtime.cpu())
    save_model(chunks, tmp_path / "ckpt")
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()  # Python's defaults, as in a user's shell: FutureWarning shows
        show_library_warnings(verbose)
        load_model(chunks, tmp_path / "ckpt")
    notes = [w for w in seen if "deprecating ShardedTensor" in str(w.message)]
    assert bool(notes) == verbose, [str(w.message) for w in seen]


def test_run_refuses_a_bad_config_with_the_stage_error_lines_alone(megatron_qwen, tmp_path):
    code, out, err = finish(start(megatron_qwen, "run", "pretrain", "configs/tiny.yaml", "training.no_such_key=1",
                                  "--nproc", 2))
    assert code == 2
    lines = [line for line in (out + err).splitlines() if line.strip()]
    # Each rank refuses the config itself with these two lines (a rank the launcher stops first prints none; the
    # ranks' lines may interleave), and nothing of the launcher's is there.
    errors = [line for line in lines if line == "error: invalid configuration:"]
    reasons = [line for line in lines if line.startswith("  - unknown key 'training.no_such_key'; valid keys under ")]
    assert len(errors) == len(reasons) in (1, 2) and len(lines) == 2 * len(errors), out + err
    code, out, err = finish(start(megatron_qwen, "run", "pretrian", "configs/tiny.yaml"))
    assert code == 2 and "no stage 'pretrian'; the stages are " in err and "pretrain" in err, err


@pytest.mark.parallel
def test_run_trains_a_tiny_model_on_two_ranks(megatron_qwen, tmp_path):
    prefix = tmp_path / "corpus" / "email_text_document"
    prefix.parent.mkdir()
    vocab = write_dense_corpus(prefix)
    run_dir = tmp_path / "run"
    code, out, err = finish(start(
        megatron_qwen, "run", "pretrain", "configs/tiny.yaml", f"data.paths=[{prefix}]",
        f"model.padded_vocab_size={vocab}", "model.seq_length=64", "training.micro_batch_size=2",
        "training.global_batch_size=8", "training.train_iters=4", "training.save_interval=4", "logging.log_interval=1",
        f"logging.run_dir={run_dir}", "--nproc", 2, env=user_env(OMP_NUM_THREADS="1")))
    assert code == 0, out + err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values()), losses
    checkpoints = run_dir / "checkpoints"
    state = json.loads((checkpoints / (checkpoints / "latest").read_text().strip() / "train_state.json").read_text())
    assert state["step"] == 4 and state["consumed_samples"] == 32 and state["layout"]["dp"] == 2, state
    assert "torch.distributed" not in err and "OMP_NUM_THREADS" not in err, err


# --------------------------------------------------------------------------- plot: each stage's own panels

# The keys each stage logs (training/loop.py's log and evaluate, stages/reward.py's reports, rl/trainer.py's
# PPORun.metrics), written by the stages' own MetricsLogger.
LANGUAGE_MODEL_KEYS = ("loss", "lr", "grad_norm", "skipped", "tokens_per_s", "tflops_per_device", "mfu", "hfu",
                       "mem_gb", "consumed_samples")
REWARD_KEYS = LANGUAGE_MODEL_KEYS + ("accuracy", "margin")
PPO_KEYS = ("reward_mean", "reward_std", "reward_normalised_mean", "reward_normalised_std", "kl_to_reference",
            "kl_per_response", "entropy", "response_length", "finished_fraction", "sampler_trainer_logprob_gap",
            "policy_loss", "clip_fraction", "approx_kl", "value_loss", "value_clip_fraction", "generation_tokens_per_s",
            "seconds_generate", "seconds_score", "seconds_train", "policy_lr")


def write_run(run_dir: Path, keys: tuple[str, ...], valid: tuple[str, ...] = (), steps: int = 6) -> Path:
    from types import SimpleNamespace

    from megatron_qwen.training.metrics import MetricsLogger

    logger = MetricsLogger(run_dir, SimpleNamespace(mode="disabled", project=None), {}, enabled=True)
    for step in range(1, steps + 1):
        logger.log(step, {key: 1.0 / (step + i) for i, key in enumerate(keys)}, console=False)
        if valid and step % 3 == 0:
            logger.log(step, {f"valid_{key}": 0.5 / step for key in valid}, console=False)
    logger.close()
    return run_dir


@pytest.mark.parametrize("keys, valid, stage, expected", [
    (LANGUAGE_MODEL_KEYS, ("loss",), "language model",
     [("loss", ["loss", "valid_loss"]), ("lr", ["lr"]), ("tokens_per_s", ["tokens_per_s"]),
      ("grad_norm", ["grad_norm"])]),
    (REWARD_KEYS, ("loss", "accuracy", "margin"), "preference",
     [("loss", ["loss", "valid_loss"]), ("accuracy", ["accuracy", "valid_accuracy"]),
      ("margin", ["margin", "valid_margin"])]),
    (PPO_KEYS, (), "PPO",
     [("reward", ["reward_mean", "reward_normalised_mean"]), ("KL to the reference", ["kl_to_reference"]),
      ("entropy", ["entropy"]), ("loss", ["policy_loss", "value_loss"]), ("response length", ["response_length"]),
      ("seconds", ["seconds_generate", "seconds_score", "seconds_train"])]),
    # PPO's keys under other snake_case names still find their panels.
    (("reward", "reward_normalized", "kl_to_ref", "entropy", "policy_loss", "value_loss", "response_length_mean",
      "generate_seconds"), (), "PPO",
     [("reward", ["reward", "reward_normalized"]), ("KL to the reference", ["kl_to_ref"]), ("entropy", ["entropy"]),
      ("loss", ["policy_loss", "value_loss"]), ("response length", ["response_length_mean"]),
      ("seconds", ["generate_seconds"])]),
])
def test_plot_draws_the_panels_of_the_stage_that_wrote_the_file(tmp_path, keys, valid, stage, expected):
    from megatron_qwen.cli.plot import main, numeric_keys, panels, stage_of
    from megatron_qwen.training.metrics import read_metrics

    run_dir = write_run(tmp_path / "run", keys, valid)
    logged = numeric_keys(read_metrics(run_dir))
    assert stage_of(logged) == stage
    assert panels(logged) == expected
    assert main([str(run_dir), "--out", str(tmp_path / "chart.png")]) == 0
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_metrics_draws_any_logged_key_and_refuses_with_the_keys_there(tmp_path, capsys):
    from megatron_qwen.cli.plot import main, panels

    run_dir = write_run(tmp_path / "run", PPO_KEYS)
    assert panels(list(PPO_KEYS), ["approx_kl", "nope"]) == [("approx_kl", ["approx_kl"])]
    assert main([str(run_dir), "--metrics", "approx_kl,nope"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{run_dir / 'metrics.png'}\n" and "not logged, not drawn: nope" in err
    assert main([str(run_dir), "--metrics", "loss,valid_loss"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: none of --metrics loss,valid_loss was logged; the keys are reward_mean, "), err
    assert all(key in err for key in PPO_KEYS)
    assert main([str(tmp_path / "elsewhere")]) == 2
    assert "elsewhere/metrics.jsonl does not exist" in capsys.readouterr().err
