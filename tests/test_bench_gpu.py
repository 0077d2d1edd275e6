"""tools/bench_gpu.py runs where it must: a bare GPU machine without the compiled extension of csrc/ and
without the project's other dependencies. Its checks need a GPU for their figures; here they run their
plumbing on CPU (a small model, fp32), so a one-shot GPU session does not fail on a typo."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

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
    # Preprocessing does use it (training only reads shards): importing it stops there, so the blocking is real.
    script.write_text("from megatron_qwen import _C\n")
    proc = _run(BARE + [str(script)])
    assert proc.returncode != 0 and "megatron_qwen._C is not available on a bare GPU machine" in proc.stderr


def test_gpu_checks_pretrain_stage_runs_on_a_bare_machine(tmp_path):
    """tools/gpu_checks.py's stage check, its command run on a CPU rank: it writes its shards and tokenizer
    file without the compiled extension or the dashscope wheel, and its torchrun ranks are bare too."""
    script = tmp_path / "stage.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(REPO / 'tools')!r})\nimport gpu_checks\n"
        "status, detail = gpu_checks.check_pretrain_stage('cpu')\nprint('RESULT', status, detail)\n"
    )
    proc = _run(BARE + [str(script)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    # On CPU no MFU is logged, so the status is FAIL; everything the stage does is checked here instead.
    assert "kept ['iter_0000006', 'latest']" in result and "running on" in result, result
    first, last = (float(x) for x in re.search(r"loss ([\d.]+) -> ([\d.]+)", result).groups())
    assert last < first, result


def test_stand_in_tokenizer_loads_and_subprocess_limits_follow_the_deadline(tmp_path):
    checks = _gpu_checks()
    from megatron_qwen.tokenizer import N_VOCAB, load_tokenizer

    tokenizer = load_tokenizer(checks.write_stand_in_tokenizer(tmp_path / "t.tiktoken"))
    assert (tokenizer.n_vocab, tokenizer.eod_id) == (N_VOCAB, 151643)
    checks.DEADLINE = None
    assert checks.subprocess_timeout(240) == 240
    checks.DEADLINE = time.monotonic() + 100
    assert 99 <= checks.subprocess_timeout(240) <= 100 and checks.subprocess_timeout(30) == 30
    checks.DEADLINE = time.monotonic() - 5
    assert checks.subprocess_timeout(240) == 1.0


def _gpu_checks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_checks", REPO / "tools" / "gpu_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_checks_run_on_cpu():
    proc = _run(BARE + ["tools/bench_gpu.py", "--device", "cpu", "--config", "configs/tiny.yaml", "--precision", "fp32",
                        "--micro-batch", "1", "--override", "model.padded_vocab_size=1024", "--layers", "2",
                        "--seq", "64", "--steps", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("\ncheck "):]
    print(table)
    rows = [line for line in table.splitlines()[2:] if line.strip() and " s in all (" not in line]
    assert {row.split()[0] for row in rows} == set(_bench().CHECKS), table
    assert not any("error:" in row for row in rows), proc.stderr[-3000:]
    assert "x BF16 tokens/s" in table and "mean loss of steps" in table and "same next token" in table
    assert "layer GEMMs" in table and "s meant for one H100)" in table
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


def test_sdpa_accepts_flash_or_cudnn_on_hopper_with_new_torch():
    bench = _bench()
    assert bench.sdpa_expected("2.11.0+cu130", (9, 0)) == ("flash", "cudnn")
    assert bench.sdpa_expected("2.10.1", (9, 0)) == ("flash",) and bench.sdpa_expected("2.13.0", (8, 0)) == ("flash",)
    cudnn = bench.sdpa_row({"cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "gemm"}, ("flash", "cudnn"))
    assert cudnn.ok and cudnn.result.startswith("cudnn, flash: cudnn_generated") and cudnn.target == "flash or cudnn"
    assert bench.sdpa_row({"flash_fwd_kernel"}, ("flash", "cudnn")).ok
    assert not bench.sdpa_row({"fmha_cutlassF_bf16_aligned_64x128_rf_sm80"}, ("flash", "cudnn")).ok
    math = bench.sdpa_row({"aten::bmm"}, ("flash",))
    assert not math.ok and math.result == "math (no fused attention kernel)"
    assert not bench.sdpa_row({"cudnn_sdpa"}, ("flash",)).ok  # cuDNN where flash is expected


def test_fp8_targets_follow_the_flop_shares():
    from megatron_qwen.config import load_config

    bench = _bench()
    h, f, v, s = 2048, 5504, 151936, 2048
    # By hand, forward FLOPs per token: layer linears 2 (4 h^2 + 3 h f), attention 4 s h (QK^T and AV), output 2 h v.
    layer, attention, head = 2 * (4 * h * h + 3 * h * f), 4 * s * h, 2 * h * v
    for layers in (8, 24):
        cfg = load_config("configs/qwen-1_8b.yaml", [f"model.num_layers={layers}", f"model.seq_length={s}"])
        expected = layers * layer / (layers * (layer + attention) + head)
        assert bench.layer_gemm_share(cfg) == pytest.approx(expected, rel=1e-12)
    assert bench.amdahl_speedup(0.5, 2.0) == pytest.approx(4 / 3) and bench.amdahl_speedup(0.7, 1.0) == 1.0
