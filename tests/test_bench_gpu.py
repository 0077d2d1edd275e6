"""tools/bench_gpu.py runs where it must: a bare GPU machine without the compiled extension of csrc/ and
without the project's other dependencies. Its checks need a GPU for their figures; here they run their
plumbing on CPU (a small model, fp32), so a one-shot GPU session does not fail on a typo."""

from __future__ import annotations

import subprocess
import sys

from spawn import REPO, cpu_env

BARE = [sys.executable, str(REPO / "tests" / "bare_machine.py")]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)


def test_training_imports_without_the_compiled_extension(tmp_path):
    script = tmp_path / "imports.py"
    script.write_text(
        "import megatron_qwen.stages.pretrain, megatron_qwen.stages.sft, megatron_qwen.stages.reward\n"
        "import megatron_qwen.training.units, megatron_qwen.inference.forward\n"
        "print('imported')\n"
    )
    proc = _run(BARE + ["--also-block", "torchao", str(script)])
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-3000:]
    # The data tools do use it: the same run stops there, so the blocking is real.
    script.write_text("import megatron_qwen.data.indexed\n")
    proc = _run(BARE + [str(script)])
    assert proc.returncode != 0 and "megatron_qwen._C is not available on a bare GPU machine" in proc.stderr


def test_bench_gpu_checks_run_on_cpu():
    proc = _run(BARE + ["tools/bench_gpu.py", "--device", "cpu", "--config", "configs/tiny.yaml", "--precision", "fp32",
                        "--micro-batch", "1", "--override", "model.padded_vocab_size=1024", "--layers", "2", "--seq", "64",
                        "--steps", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("\ncheck "):]
    print(table)
    rows = [line for line in table.splitlines()[2:] if line.strip() and not line.endswith("in all")]
    assert {row.split()[0] for row in rows} == set(_bench().CHECKS), table
    assert not any("error:" in row for row in rows), proc.stderr[-3000:]
    assert "x BF16 tokens/s" in table and "mean loss of steps" in table and "same next token" in table
    # tools/gpu_checks.py imports on the bare machine too, and each of its checks has its row
    assert all(f"{name}: not run on CPU" in table for name in _gpu_checks_names()), table


def _gpu_checks_names() -> list[str]:
    source = (REPO / "tools" / "gpu_checks.py").read_text()
    block = source[source.index("CHECKS: dict"):]
    return [line.split('"')[1] for line in block[: block.index("}")].splitlines()[1:] if '"' in line]


def _bench():
    """tools/bench_gpu.py as a module (a fresh copy each time)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "tools" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_check_is_one_function():
    bench = _bench()
    assert list(bench.CHECKS) == ["readiness", "bf16-mfu", "fp8-torchao", "fp8-te", "logits", "sdpa"]

    @bench.check("extra", "a check added by one function")
    def extra(_):
        return [bench.Row("extra", "42", "= 42", True)]

    assert bench.CHECKS["extra"][1] is extra and bench.main(["--list"]) == 0
