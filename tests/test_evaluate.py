"""`megatron-qwen evaluate`: lm-evaluation-harness in process on a checkpoint, against lm-eval's own Hugging Face
backend on the exported model.

Three local tasks over JSONL files (no download): multiple choice (`loglikelihood`), a rolling perplexity
(`loglikelihood_rolling`) and a generation task (`generate_until`). The reference is lm-eval's `HFLM` on the
checkpoint exported by `megatron-qwen convert mcore-to-hf`, with a transformers tokenizer built from the same
`qwen.tiktoken` (checked to tokenize the tasks' texts identically). TP=2 x PP=2 (the command on 4 ranks) must
give TP=1's per-item answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spawn import REPO, cpu_env, free_port

MODEL = ["model.hidden_size=128", "model.ffn_hidden_size=256", "model.family=qwen2.5",
         "model.max_position_embeddings=512"]
QUESTIONS = [
    ("The sky on a clear day is", [" blue", " green", " loud", " square"], 0),
    ("Two plus two equals", [" four", " five", " seven", " nine"], 0),
    ("The opposite of hot is", [" warm", " cold", " red", " tall"], 1),
    ("A baby cat is called a", [" puppy", " calf", " kitten", " foal"], 2),
    ("Water freezes at zero degrees", [" Fahrenheit", " Kelvin", " Celsius", " Rankine"], 2),
    ("The first letter of the alphabet is", [" B", " A", " Z", " Q"], 1),
]
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Scores of a rolling window sum over every token.",
         "def add(a, b):\n    return a + b\n"]
GENERATION = [("Count: 1, 2, 3,", " 4"), ("Hello", " world"), ("Q: capital of France?\nA:", " Paris"),
              ("x = ", "1")]
TASKS = ["local_mc", "local_rolling", "local_gen"]
MOE_TASKS = ["local_mc", "local_gen"]  # scoring and generation; the rolling task scores as local_mc does


def write_tasks(folder: Path) -> Path:
    """Three lm-eval task YAMLs over JSONL files in `folder`."""
    rows = {
        "mc": [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS],
        "rolling": [{"text": t} for t in TEXTS],
        "gen": [{"prompt": p, "target": t} for p, t in GENERATION],
    }
    for name, records in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    common = "dataset_path: json\ntest_split: train\n"
    (folder / "local_mc.yaml").write_text(
        f"task: local_mc\n{common}dataset_kwargs:\n  data_files: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (folder / "local_rolling.yaml").write_text(
        f"task: local_rolling\n{common}dataset_kwargs:\n  data_files: {folder / 'rolling.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (folder / "local_gen.yaml").write_text(
        f"task: local_gen\n{common}dataset_kwargs:\n  data_files: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, single_rank):
    import yaml

    from megatron_qwen.checkpoint.io import save_model
    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    root = tmp_path_factory.mktemp("evaluate")
    ckpt = root / "ckpt"
    cfg = load_config("configs/tiny.yaml", MODEL)
    torch.manual_seed(0)
    save_model(build_model(cfg, Runtime.cpu()), ckpt)
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    export = root / "hf"
    subprocess.run([sys.executable, "tools/convert_checkpoint.py", "mcore-to-hf", "--ckpt", str(ckpt), "--out",
                    str(export), "--layout", "qwen2"], cwd=REPO, env=cpu_env(), check=True, capture_output=True,
                   timeout=600)
    return ckpt, export, write_tasks(root)


def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def hf_tokenizer():
    """transformers' tokenizer over the same BPE ranks and pattern (for lm-eval's Hugging Face backend)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from megatron_qwen.tokenizer import PAT_STR, default_tokenizer_file

    converted = TikTokenConverter(vocab_file=str(default_tokenizer_file()), pattern=PAT_STR).converted()
    return PreTrainedTokenizerFast(tokenizer_object=converted, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def per_item(results: dict) -> dict:
    """task -> per document: the filtered responses (log-likelihoods, rolling sums or generated text)."""
    return {task: [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in results["samples"].items()}


def assert_same(ours: dict, reference: dict, atol: float, tasks: list[str] = TASKS) -> None:
    for task in tasks:
        for mine, theirs in zip(ours[task], reference[task], strict=True):
            if task == "local_gen":
                assert mine == theirs
            else:
                a = np.array([r[0] if isinstance(r, (list, tuple)) else r for r in mine], dtype=float)
                b = np.array([r[0] if isinstance(r, (list, tuple)) else r for r in theirs], dtype=float)
                np.testing.assert_allclose(a, b, atol=atol, rtol=0)
                if task == "local_mc":  # is_greedy agrees too
                    assert [r[1] for r in mine] == [r[1] for r in theirs]


@pytest.mark.parallel
def test_in_process_lm_equals_lm_eval_huggingface_backend_and_tp2_pp2(setup, monkeypatch, tmp_path):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    from megatron_qwen.evaluation import harness
    from megatron_qwen.evaluation.lm import QwenLM
    from megatron_qwen.inference import forward as inference
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.tokenizer import load_tokenizer

    ckpt, export, tasks = setup
    offline(monkeypatch)
    ours_tok, theirs_tok = load_tokenizer(family="qwen2.5"), hf_tokenizer()
    for text in [q + c for q, cs, _ in QUESTIONS for c in cs] + TEXTS + [p for p, _ in GENERATION]:
        assert ours_tok.encode(text) == theirs_tok.encode(text), text
    manager = harness.task_manager([str(tasks)])

    plan = inference.prepare(ckpt, 1, precision="fp32")
    lm = QwenLM(inference.load_chunks(plan, ckpt, Runtime.cpu()), plan, ours_tok, batch_size=4)
    ours = harness.run_tasks(lm, TASKS, manager, log_samples=True)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    reference = harness.run_tasks(HFLM(pretrained=model, tokenizer=theirs_tok, batch_size=4, device="cpu"), TASKS,
                                  manager, log_samples=True)
    assert_same(per_item(ours), per_item(reference), atol=1e-4)
    for task, metric in (("local_mc", "acc,none"), ("local_gen", "exact_match,none")):
        assert ours["results"][task][metric] == reference["results"][task][metric]
    np.testing.assert_allclose(ours["results"]["local_rolling"]["word_perplexity,none"],
                               reference["results"]["local_rolling"]["word_perplexity,none"], rtol=1e-4)

    # The command at TP=2 x PP=2 on 4 ranks: the same per-item answers, results.json and metrics written.
    out = tmp_path / "eval"
    env = cpu_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--nproc", "4", "--ckpt", str(ckpt), "--tasks",
                           ",".join(TASKS), "--include-path", str(tasks), "--tp", "2", "--pp", "2", "--out", str(out),
                           "--log-samples", "--batch-size", "3"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    wide = {task: [json.loads(line)["filtered_resps"] for line in sorted(
        (out / f"samples_{task}.jsonl").read_text().splitlines(), key=lambda line: json.loads(line)["doc_id"])]
        for task in TASKS}
    assert_same(wide, per_item(ours), atol=1e-5)
    summary = json.loads((out / "results.json").read_text())
    assert summary["results"]["local_mc"]["acc,none"] == ours["results"]["local_mc"]["acc,none"]
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["eval/local_mc/acc"] == ours["results"]["local_mc"]["acc,none"]
    assert "local_mc" in proc.stdout


@pytest.mark.parallel
def test_a_moe_evaluated_at_ep2_answers_as_the_model_at_ep1(monkeypatch, tmp_path, single_rank):
    """The command at --ep 2 (2 ranks, each with half of every MoE layer's experts) on a tiny Qwen2-MoE: the
    per-item answers of the saved model evaluated in this process (EP=1), on the scoring and the generation task."""
    from moe_reference import save_moe_checkpoint

    from megatron_qwen.evaluation import harness
    from megatron_qwen.evaluation.lm import QwenLM
    from megatron_qwen.inference import forward as inference
    from megatron_qwen.tokenizer import load_tokenizer

    tasks = write_tasks(tmp_path)
    offline(monkeypatch)
    ckpt = tmp_path / "moe"
    chunks = save_moe_checkpoint(ckpt)
    lm = QwenLM(chunks, inference.prepare(ckpt, 1, precision="fp32"), load_tokenizer(family="qwen1.5"), batch_size=4)
    ours = per_item(harness.run_tasks(lm, MOE_TASKS, harness.task_manager([str(tasks)]), log_samples=True))
    out = tmp_path / "eval"
    env = cpu_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--nproc", "2", "--ckpt", str(ckpt), "--tasks",
                           ",".join(MOE_TASKS), "--include-path", str(tasks), "--ep", "2", "--out", str(out),
                           "--log-samples", "--batch-size", "3"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    wide = {task: [json.loads(line)["filtered_resps"] for line in sorted(
        (out / f"samples_{task}.jsonl").read_text().splitlines(), key=lambda line: json.loads(line)["doc_id"])]
        for task in MOE_TASKS}
    assert_same(wide, ours, atol=1e-5, tasks=MOE_TASKS)
    assert json.loads((out / "results.json").read_text())["layout"] == {"tp": 1, "pp": 1, "vpp": 1, "ep": 2}


def test_unknown_task_is_refused_before_loading(setup, monkeypatch):
    ckpt, _, tasks = setup
    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--ckpt", str(ckpt), "--tasks", "local_mc,nonesuch",
                           "--include-path", str(tasks)], cwd=REPO, env=cpu_env(HF_DATASETS_OFFLINE="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown task(s) nonesuch" in proc.stderr, proc.stderr[-2000:]


def test_flat_metrics_name_each_task_and_metric():
    from megatron_qwen.evaluation.harness import flat_metrics

    results = {"results": {"arc": {"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": "arc"},
                           "gsm8k": {"exact_match,strict-match": 0.25}}}
    assert flat_metrics(results) == {"eval/arc/acc": 0.5, "eval/gsm8k/exact_match_strict-match": 0.25}


@pytest.mark.parallel
def test_tasks_during_training_equal_the_command_on_the_saved_checkpoint(setup, tmp_path):
    from corpus import write_dense_corpus
    from spawn import run_torchrun

    _, _, tasks = setup
    prefix = tmp_path / "corpus" / "text_document"
    prefix.parent.mkdir()
    write_dense_corpus(prefix)
    run_dir = tmp_path / "run"
    env = cpu_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    run_torchrun(2, ["-m", "megatron_qwen.stages.pretrain", "configs/tiny.yaml", *MODEL, f"data.paths=[{prefix}]",
                     "model.seq_length=64", "parallel.tp=2", "training.train_iters=4", "training.micro_batch_size=2",
                     "training.global_batch_size=4", "training.lr_warmup_iters=1", "logging.log_interval=1",
                     f"logging.run_dir={run_dir}", "evaluation.tasks=[local_mc, local_rolling]",
                     "evaluation.interval=2", f"evaluation.include_path=[{tasks}]", "evaluation.batch_size=3"],
                 timeout=900, env=env)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if "eval/local_mc/acc" in r}
    assert sorted(logged) == [2, 4]
    assert logged[2]["eval/local_rolling/word_perplexity"] != logged[4]["eval/local_rolling/word_perplexity"]
    # The saved step-4 checkpoint, loaded fresh by the command at TP=1, gives the same figures.
    out = tmp_path / "eval"
    saved = run_dir / "checkpoints" / "iter_0000004"
    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--ckpt", str(saved), "--tasks",
                           "local_mc,local_rolling", "--include-path", str(tasks), "--out", str(out)], cwd=REPO,
                          env={**env, "MASTER_PORT": str(free_port())}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads((out / "results.json").read_text())["results"]
    during = json.loads((run_dir / "eval" / "step_4.json").read_text())["results"]
    assert during["local_mc"]["acc,none"] == fresh["local_mc"]["acc,none"] == logged[4]["eval/local_mc/acc"]
    np.testing.assert_allclose(during["local_rolling"]["word_perplexity,none"],
                               fresh["local_rolling"]["word_perplexity,none"], rtol=1e-5)
