"""The sbatch templates on a local two-node Slurm cluster (tests/slurm_cluster.py): pretraining on 4 ranks over
2 nodes, preemption by USR1 with requeue and resume, and MPI preprocessing across the nodes.

Each training job is compared with an uninterrupted 4-rank torchrun run at the same layout (launch_runs.py):
the loop is bit-exact at a fixed layout, so equal losses and weights mean Slurm gave every rank the right
identity and rendezvous, and that a requeued job resumed exactly where it saved.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

import launch_runs as runs
import slurm_cluster as cluster_fixtures
from spawn import REPO, cpu_env

pytestmark = pytest.mark.parallel

TEMPLATES = REPO / "slurm"
# The session fixture, bound here so that the tests below can name it.
slurm_cluster = cluster_fixtures.slurm_cluster


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return runs.corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return runs.torchrun_reference(tmp_path_factory)


def test_sbatch_pretrain_runs_four_ranks_on_two_nodes(slurm_cluster, corpus, reference, tmp_path):
    """`sbatch [options] slurm/pretrain.sbatch OVERRIDES`: GPUs requested per node (the fake ones), one task per
    GPU, 2 per node; the ranks themselves run on CPU (MEGATRON_QWEN_DEVICE=cpu in the exported environment)."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = cpu_env(CONFIG="configs/tiny.yaml", RUN_DIR=str(run_dir))
    job = slurm_cluster.submit(
        ["sbatch", "--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", f"--output={log}",
         str(TEMPLATES / "pretrain.sbatch"), *runs.overrides(corpus)],
        env,
    )
    info = slurm_cluster.wait(job, timeout=400, log=log)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert (info["NodeList"], info["NumTasks"]) == ("node[1-2]", "4")
    assert info["JOB_GRES"] == "gpu:4", info  # 2 fake GPUs on each node
    assert f"launch: job {job} restart 0, stage pretrain on 2 nodes (node[1-2]), 4 tasks, device gpu" in text, text
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{runs.STEPS:07d}"
    assert (run_dir / f"slurm-{job}.out").resolve() == log.resolve()  # the job log, linked into the run directory

    got, ref = runs.losses(run_dir), runs.losses(reference)
    assert sorted(got) == list(range(1, runs.STEPS + 1))
    assert got[runs.STEPS] < got[1] - 0.5, got  # it learns (measured: 8.5 -> 6.8)
    assert got == ref, {s: (got[s], ref[s]) for s in ref if got.get(s) != ref[s]}
    runs.assert_same_weights(runs.final_weights(run_dir), runs.final_weights(reference))


@pytest.mark.slow  # two starts of 4 ranks and Slurm's wait before a requeued job starts again
def test_usr1_saves_requeues_and_resumes_to_the_same_weights(slurm_cluster, corpus, reference, tmp_path):
    """The template executed directly (it submits itself) with DEVICE=cpu; `scancel --signal=USR1 --batch`
    mid-run stands in for the time-limit warning of `#SBATCH --signal=B:USR1@120`."""
    env = cpu_env(
        NODES="2", TASKS_PER_NODE="2", DEVICE="cpu", RUN_ROOT=str(tmp_path), CONFIG="configs/tiny.yaml",
        OVERRIDES=" ".join(runs.overrides(corpus)),
    )
    job = slurm_cluster.submit([str(TEMPLATES / "pretrain.sbatch")], env)
    run_dir, log = tmp_path / f"qwen-pretrain-{job}", tmp_path / f"qwen-pretrain-{job}.out"

    # Signal once steps are being logged: the loop's handler is installed before the first step.
    deadline = time.time() + 400
    while not ((run_dir / "metrics.jsonl").is_file() and len(runs.losses(run_dir)) >= 2):
        info = slurm_cluster.job(job)
        assert info["JobState"] in ("PENDING", "RUNNING") and time.time() < deadline, \
            (info, log.read_text() if log.is_file() else "")
        time.sleep(0.2)
    slurm_cluster.cluster.run("scancel", "--signal=USR1", "--batch", str(job))

    info = slurm_cluster.wait(job, timeout=400, log=log)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    assert info.get("JOB_GRES", "(null)") == "(null)", info  # DEVICE=cpu asks for no GPUs
    saved = re.search(r"signal received: saved at step (\d+), exiting with 75", text)
    assert saved, text
    step = int(saved.group(1))
    assert 2 <= step < runs.STEPS, f"the signal came after the last step ({step}); the requeue was not exercised"
    for line in (
        "launch: got SIGUSR1", f"launch: checkpoint saved, requeueing job {job}",
        f"launch: job {job} restart 1, stage pretrain on 2 nodes (node[1-2]), 4 tasks, device cpu",
        f"resumed from {run_dir}/checkpoints/iter_{step:07d} at step {step}",
    ):
        assert line in text, f"{line!r} not in the job log:\n{text}"

    got, ref = runs.losses(run_dir), runs.losses(reference)
    assert sorted(got) == list(range(1, runs.STEPS + 1))
    assert got == ref, {s: (got[s], ref[s]) for s in ref if got.get(s) != ref[s]}
    runs.assert_same_weights(runs.final_weights(run_dir), runs.final_weights(reference))


def _write_jsonl_corpus(directory: Path) -> list[Path]:
    """Two JSONL files of Python standard-library sources (real text with code, unicode and long documents)."""
    sources = sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").rglob("*.py"))
    sources += sorted((Path(sysconfig.get_paths()["stdlib"]) / "email").rglob("*.py"))
    files = []
    for part in range(2):
        path = directory / f"part{part}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for source in sources[part::2]:
                f.write(json.dumps({"text": source.read_text(errors="replace")}) + "\n")
        files.append(path)
    return files


def test_preprocess_over_two_nodes_equals_one_process(slurm_cluster, tmp_path):
    """slurm/preprocess.sbatch: 4 MPI ranks (mpirun inside the allocation) over both nodes write the same shard
    bytes as a single process."""
    files = _write_jsonl_corpus(tmp_path)
    single = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", *map(str, files), "--output-prefix",
         str(tmp_path / "single"),
         "--append-eod"],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300,
    )
    assert single.returncode == 0, single.stderr

    env = cpu_env(
        NODES="2", TASKS_PER_NODE="2", RUN_ROOT=str(tmp_path / "runs"), INPUT=str(tmp_path / "part*.jsonl"),
        OUTPUT_PREFIX=str(tmp_path / "mpi"), PREPROCESS_ARGS="--append-eod",
    )
    job = slurm_cluster.submit([str(TEMPLATES / "preprocess.sbatch")], env)
    log = tmp_path / "runs" / f"qwen-preprocess-{job}.out"
    info = slurm_cluster.wait(job, timeout=300, log=log)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["NodeList"], info["NumTasks"]) == ("COMPLETED", "0:0", "node[1-2]",
                                                                                        "4"), text
    assert re.search(r"launch: \S*mpirun -n 4 .*tools/preprocess_data\.py --mpi", text), text
    for ext in ("bin", "idx"):
        assert ((tmp_path / f"mpi_text_document.{ext}").read_bytes()
                == (tmp_path / f"single_text_document.{ext}").read_bytes()), ext


def test_chained_job_waits_then_starts_from_the_latest_checkpoint_of_a_run(slurm_cluster, corpus, reference, tmp_path):
    """Stages are chained with SBATCH_ARGS=--dependency=afterok:ID and INIT_FROM=RUN_DIR. The job waits for ID,
    then starts from the run's latest checkpoint: here the torchrun reference's last (TP=2 x PP=2), loaded by one
    rank at TP=1 with 0 steps, so the job writes exactly the weights it started from."""
    first = slurm_cluster.submit(["sbatch", f"--output={tmp_path / 'first.out'}", "--wrap", "sleep 4"], cpu_env())
    env = cpu_env(
        NODES="1", TASKS_PER_NODE="1", DEVICE="cpu", RUN_ROOT=str(tmp_path), RUN_NAME="chained",
        CONFIG="configs/tiny.yaml",
        INIT_FROM=str(reference), SBATCH_ARGS=f"--dependency=afterok:{first}",
        OVERRIDES=" ".join(runs.overrides(corpus, "training.train_iters=0", "parallel.tp=1", "parallel.pp=1")),
    )
    job = slurm_cluster.submit([str(TEMPLATES / "pretrain.sbatch")], env)
    waiting = slurm_cluster.job(job)
    assert (waiting["JobState"], waiting["Reason"]) == ("PENDING", "Dependency"), waiting

    log = tmp_path / f"qwen-pretrain-{job}.out"
    info = slurm_cluster.wait(job, timeout=300, log=log)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert slurm_cluster.job(first)["JobState"] == "COMPLETED"
    assert f"initialised pretrain weights from {reference}/checkpoints/iter_{runs.STEPS:07d}" in text, text
    from megatron_qwen.checkpoint.io import read_full_state_dict

    start = {k: v for k, v in read_full_state_dict(tmp_path / "chained" / "checkpoints" / "iter_0000000").items()
             if not k.startswith("optimizer")}
    runs.assert_same_weights(start, runs.final_weights(reference))


def test_a_stage_that_does_not_exist_is_refused_before_submitting(tmp_path):
    template = tmp_path / "nosuch.sbatch"
    template.write_text((TEMPLATES / "pretrain.sbatch").read_text().replace("STAGE=pretrain", "STAGE=nosuchstage"))
    # No cluster: were the check missing, sbatch would fail to reach this non-existent one rather than submit.
    env = {k: v for k, v in cpu_env(REPO=str(REPO), SLURM_CONF=str(tmp_path / "none.conf")).items()
           if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    proc = subprocess.run(["bash", str(template)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("error: megatron_qwen.stages.nosuchstage does not exist" in proc.stderr
            and "pretrain" in proc.stderr), proc.stderr
    assert "Submitted" not in proc.stdout


def test_sbatch_ppo_from_a_policy_run(slurm_cluster, tmp_path):
    """slurm/ppo.sbatch over both nodes (one rank each, DP=2): INIT_FROM names the policy's run directory, whose
    latest checkpoint becomes ppo.policy_from; the reward is a rule (ppo.reward_fn)."""
    from test_ppo import MODEL, write_prompts

    write_prompts(tmp_path / "prompts")
    runs_root = tmp_path / "runs"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
         str(__import__("spawn").free_port()),
         "-m", "megatron_qwen.stages.pretrain", "configs/tiny.yaml", *MODEL, "data.split=100,0,0",
         f"data.paths=[{tmp_path / 'prompts_prompt_document'}]", "training.train_iters=0",
         f"logging.run_dir={tmp_path / 'sft'}"],
        cwd=REPO, env=cpu_env(), check=True, capture_output=True, timeout=300,
    )
    overrides = MODEL + [
        f"data.paths=[{tmp_path / 'prompts'}]", "ppo.reward_fn=tests.ppo_rewards:good_fraction",
        "ppo.prompts_per_step=8",
        "ppo.samples_per_prompt=2", "ppo.max_new_tokens=8", "ppo.critic_warmup_steps=0", "training.micro_batch_size=8",
        "training.train_iters=2",
    ]
    env = cpu_env(NODES="2", TASKS_PER_NODE="1", DEVICE="cpu", RUN_ROOT=str(runs_root), INIT_FROM=str(tmp_path / "sft"),
                  OVERRIDES=" ".join(overrides), PYTHONPATH=f"{REPO}")
    job = slurm_cluster.submit([str(TEMPLATES / "ppo.sbatch")], env)
    run_dir, log = runs_root / f"qwen-ppo-{job}", runs_root / f"qwen-ppo-{job}.out"
    info = slurm_cluster.wait(job, timeout=400, log=log)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["NodeList"]) == ("COMPLETED", "0:0", "node[1-2]"), text
    assert f"initialised policy weights from {tmp_path / 'sft'}/checkpoints/iter_0000000" in text, text
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
