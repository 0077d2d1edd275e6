"""GPU readiness in one run: training speed and numerics of a 1.8B-shaped Qwen on one GPU, printed as one table.

    python tools/bench_gpu.py [--layers 24] [--seq 2048] [--steps 50] [--budget-s 420] [--only NAME ...] [--list]
    python tools/bench_gpu.py --device cpu --config configs/tiny.yaml --precision fp32 --micro-batch 1 \
        --override model.padded_vocab_size=1024 --seq 64 --steps 3     # the plumbing alone, on CPU (tests)

The model is Qwen-1.8B (hidden 2048, 16 heads of 128, SwiGLU 5504, the full 151,936-row vocabulary, 24
layers; --layers changes the depth), at TP=1, trained with this project's own step (megatron-core's schedule, DDP and
optimizer through `build_unit` / `forward_backward`) on a synthetic corpus that can be learned (each token is
followed by a fixed successor 90 % of the time), from the same initial weights in every run. The micro-batch is
the largest of 16, 8, 4, 2, 1 that fits. Checks (`--list`):

  readiness     tools/gpu_checks.py: the CUDA/NCCL/Transformer Engine code paths run and agree (one row each)
  bf16-mfu      BF16 training-step MFU: model FLOPs (training/flops.py) over the GPU's dense BF16 peak
  fp8-torchao   FP8 through torchao (local spec): the layer GEMMs' speed-up alone, the whole step's tokens/s over
                BF16, and the loss after --steps steps
  fp8-te        the same with Transformer Engine (its spec, BF16 and FP8), where it is installed
  logits        bf16 logits against fp32 logits of the same (trained) weights
  sdpa          which scaled-dot-product-attention kernel the model's attention ran (flash, or cuDNN on Hopper
                with torch >= 2.11)

A check is a function registered with ``@check(name, description)``: it gets the shared `Bench` (the config,
the data, cached training runs) and returns table rows. A check that fails with an exception becomes an
"error" row and the others still run; each row is printed as soon as it is known, the table at the end.

It needs a CUDA GPU, torch, transformers, tiktoken, and the megatron-core, torchao and psutil wheels, and none
of the compiled extension in csrc/ (training does not use it) nor the dashscope wheel: run it from the source
tree with PYTHONPATH set to the repository (docs/fp8.md, "GPU benchmark", says how to carry the wheels to a bare
machine).
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SEED = 1234
ACTIVE_VOCAB = 2048  # ids the synthetic corpus uses at most (the output layer still spans the full vocabulary)
MICRO_BATCHES = (16, 8, 4, 2, 1)
BUDGET_S = 480  # checks and benchmark together, on one H100


@dataclass
class Row:
    check: str
    result: str
    target: str = ""
    ok: bool | None = None  # None: informational, skipped or not run

    @property
    def status(self) -> str:
        return {True: "PASS", False: "FAIL", None: "-"}[self.ok]


CHECKS: dict[str, tuple[str, Callable[["Bench"], list[Row]]]] = {}


def check(name: str, description: str):
    """Register a check: a function (Bench) -> list[Row]."""
    def register(fn):
        CHECKS[name] = (description, fn)
        return fn
    return register


@dataclass
class TrainRun:
    """One training run's figures."""

    name: str
    micro_batch: int
    tokens_per_s: float
    losses: list[float]
    peak_gib: float
    state: dict | None = field(default=None, repr=False)  # the trained weights (CPU), kept for the logits check

    def final_loss(self, last: int = 10) -> float:
        return statistics.fmean(self.losses[-last:])


class Bench:
    """What the checks share: the layout, the data, and training runs made once and reused."""

    def __init__(self, args):
        from megatron_qwen.platform.launch import init_distributed

        self.args = args
        self.deadline = time.monotonic() + args.budget_s  # time.monotonic() past which nothing new starts
        self.cuda = args.device == "cuda"
        self.device_name = torch.cuda.get_device_name() if self.cuda else "CPU"
        init_distributed(1, 1, None, device=args.device, seed=SEED)
        self._runs: dict[str, TrainRun] = {}
        self._micro_batch: int | None = args.micro_batch
        vocab = min(ACTIVE_VOCAB, self.config(1).model.padded_vocab_size)
        self.batches = synthetic_batches(args.steps + 1, args.micro_batch or max(MICRO_BATCHES), args.seq, vocab)

    def config(self, micro_batch: int, precision: str | None = None, impl: str = "local", fp8: str = "null",
               backend: str = "auto"):
        from megatron_qwen.config import load_config, resolve

        a = self.args
        cfg = load_config(a.config, [
            f"model.num_layers={a.layers}", f"model.seq_length={a.seq}", f"model.transformer_impl={impl}",
            f"model.fp8={fp8}", f"model.fp8_backend={backend}", f"training.precision={precision or a.precision}",
            f"training.micro_batch_size={micro_batch}", f"training.global_batch_size={micro_batch}",
            f"training.train_iters={a.steps}", "training.lr=3e-4", "training.min_lr=3e-5", "training.lr_warmup_iters=5",
            f"parallel.device={a.device}", *a.override,
        ])
        return resolve(cfg, 1)[0]

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def runtime(self, cfg):
        from megatron_qwen.platform.runtime import resolve_runtime

        return resolve_runtime(cfg, 0)

    def micro_batch(self) -> int:
        """The largest micro-batch of MICRO_BATCHES with which one BF16 training step fits in memory."""
        if self._micro_batch is None:
            for mb in MICRO_BATCHES:
                fits = True
                try:
                    self._train(f"probe mb={mb}", self.config(mb), steps=1)
                except torch.cuda.OutOfMemoryError:
                    fits = False
                release()  # outside the except block: the exception's frames no longer hold the tensors
                if fits:
                    self._micro_batch = mb
                    return mb
            raise RuntimeError("not even micro-batch 1 fits in GPU memory; use fewer --layers or a shorter --seq")
        return self._micro_batch

    def bf16(self) -> TrainRun:
        """The BF16 run of the local spec, its trained weights kept (the logits check uses them)."""
        return self.train("bf16", keep_state=True)

    def train(self, name: str, impl: str = "local", fp8: str = "null", backend: str = "auto",
              keep_state: bool = False) -> TrainRun:
        """--steps training steps (cached by name), from the same initial weights and data as every other run."""
        if name not in self._runs:
            cfg = self.config(self.micro_batch(), impl=impl, fp8=fp8, backend=backend)
            self._runs[name] = self._train(name, cfg, self.args.steps, keep_state)
        return self._runs[name]

    def _train(self, name: str, cfg, steps: int, keep_state: bool = False) -> TrainRun:
        from megatron_qwen.training.forward_backward import forward_backward
        from megatron_qwen.training.units import build_unit

        reseed()
        unit = build_unit(cfg, self.runtime(cfg), name)
        mb, seq = cfg.training.micro_batch_size, cfg.model.seq_length
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        try:
            for step in range(steps):
                batch = {k: v[:mb] for k, v in self.batches[step].items()}
                self.synchronize()
                start = time.perf_counter()
                unit.zero_grad()
                unit.set_lr(step)
                loss = forward_backward(unit.chunks, iter([batch]), 1, seq, mb)["lm loss"]
                unit.step()
                self.synchronize()
                times.append(time.perf_counter() - start)
                losses.append(loss.item())
            state = {k: v.detach().cpu() for k, v in unit.modules[0].state_dict().items()
                     if isinstance(v, torch.Tensor)} if keep_state else None
            warm = times[min(5, len(times) - 1):]
            peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")
            return TrainRun(name, mb, mb * seq / statistics.median(warm), losses, peak, state)
        finally:
            del unit
            release()


def reseed() -> None:
    """The RNG state init_distributed leaves, so that every model starts from the same weights."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(SEED)
    model_parallel_cuda_manual_seed(SEED)


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synthetic_batches(count: int, micro_batch: int, seq: int, vocab: int) -> list[dict]:
    """`count` batches of token rows in which each token is followed by its fixed successor (a random
    permutation of `vocab` ids) with probability 0.9, else by a uniformly drawn id."""
    g = torch.Generator().manual_seed(SEED)
    successor = torch.randperm(vocab, generator=g)
    batches = []
    for _ in range(count):
        rows = torch.empty(micro_batch, seq + 1, dtype=torch.long)
        rows[:, 0] = torch.randint(0, vocab, (micro_batch,), generator=g)
        follow = torch.rand(micro_batch, seq, generator=g) < 0.9
        noise = torch.randint(0, vocab, (micro_batch, seq), generator=g)
        for i in range(seq):
            rows[:, i + 1] = torch.where(follow[:, i], successor[rows[:, i]], noise[:, i])
        batches.append({"tokens": rows[:, :-1], "labels": rows[:, 1:], "loss_mask": torch.ones(micro_batch, seq)})
    return batches


def flops_per_token(cfg) -> float:
    from megatron_qwen.training.flops import model_flops_per_token

    m = cfg.model
    return model_flops_per_token(m.hidden_size, m.num_layers, m.ffn_hidden_size, m.padded_vocab_size, m.seq_length)


def te_missing() -> str | None:
    from megatron_qwen.platform.runtime import Accelerators

    return Accelerators.detect().transformer_engine


# --------------------------------------------------------------------------- checks


def gpu_checks():
    """tools/gpu_checks.py as a module: the correctness checks of the CUDA, NCCL and Transformer Engine paths."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_checks", REPO / "tools" / "gpu_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@check("readiness",
       "tools/gpu_checks.py's correctness checks of the CUDA paths, one row each (first: a crash matters most)")
def readiness(bench: Bench) -> list[Row]:
    checks = gpu_checks()
    checks.DEADLINE = bench.deadline  # no subprocess of the checks runs past the budget
    if not bench.cuda:
        # Their code is CUDA-only; on CPU the module must at least import on a bare machine and list them.
        return [Row("readiness", f"{name}: not run on CPU") for name in checks.CHECKS]
    rows = []
    for name in checks.CHECKS:
        try:
            status, detail = checks.CHECKS[name]()
        except Exception as exc:  # a crash is a failed check; the others still run
            status, detail = "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"
        rows.append(Row("readiness", f"{name}: {detail}", "PASS", {"PASS": True, "FAIL": False}.get(status)))
        release()
        reseed()
    return rows


@check("bf16-mfu", "BF16 training-step MFU at TP=1 (target >= 45 %)")
def bf16_mfu(bench: Bench) -> list[Row]:
    from megatron_qwen.training.flops import peak_flops, utilisation

    rows = []
    runs = [("local spec", bench.bf16())]
    if te_missing() is None:
        runs.append(("Transformer Engine spec", bench.train("bf16-te", impl="transformer_engine")))
    peak = peak_flops(bench.device_name)
    for spec, run in runs:
        cfg = bench.config(run.micro_batch)
        value = utilisation(run.tokens_per_s, flops_per_token(cfg), peak)
        result = (f"{spec}: MFU {value:.1%}" if value is not None
                  else f"{spec}: MFU unknown (no peak for this device)") + (
            f", {run.tokens_per_s:,.0f} tokens/s ({bench.args.precision}), micro-batch {run.micro_batch} x "
            f"{cfg.model.seq_length}" + (f", peak memory {run.peak_gib:.1f} GiB" if bench.cuda else ""))
        rows.append(Row("bf16-mfu", result, ">= 45 %", None if value is None else value >= 0.45))
    return rows


# Targets a correct FP8 can reach (docs/fp8.md, "GPU benchmark", has the arithmetic): FP8 runs only the layers'
# four linears; on H100 their GEMMs can approach 2x BF16 (the dense FP8 peak), less the separate casts.
GEMM_TARGET = 1.3  # the layer GEMMs alone, casts included
STEP_TARGET = 1.1  # the whole training step, where the layer GEMMs are only part of the work


def layer_gemm_share(cfg) -> float:
    """The share of a training step's model FLOPs in the layers' linears (what FP8 runs); the rest is the
    output layer (BF16) and attention (SDPA)."""
    from megatron_qwen.training.flops import forward_flops_per_token

    m = cfg.model
    gemm, attention, head = forward_flops_per_token(m.hidden_size, m.num_layers, m.ffn_hidden_size,
                                                    m.padded_vocab_size, m.seq_length)
    return gemm / (gemm + attention + head)


def amdahl_speedup(share: float, speedup: float) -> float:
    """The whole step's speed-up when `share` of its time runs `speedup` times faster and the rest as before."""
    return 1.0 / ((1.0 - share) + share / speedup)


def _fp8_rows(name: str, bf16: TrainRun, fp8: TrainRun, share: float, gemm: float | None = None) -> list[Row]:
    speed = fp8.tokens_per_s / bf16.tokens_per_s
    loss_diff = (fp8.final_loss() - bf16.final_loss()) / bf16.final_loss()
    steps = len(bf16.losses)
    bound = f"; at most {amdahl_speedup(share, gemm):.2f}x from the layer GEMMs' {gemm:.2f}x" if gemm else ""
    return [
        Row(name, f"whole step {speed:.2f}x BF16 tokens/s ({fp8.tokens_per_s:,.0f} against {bf16.tokens_per_s:,.0f}; "
                  f"layer GEMMs {share:.0%} of the FLOPs{bound})", f">= {STEP_TARGET}x", speed >= STEP_TARGET),
        Row(name, f"mean loss of steps {max(1, steps - 9)}-{steps}: {fp8.final_loss():.4f} against BF16 "
                  f"{bf16.final_loss():.4f} ({loss_diff:+.2%}; both from {bf16.losses[0]:.3f})", "within 3 %",
            abs(loss_diff) <= 0.03),
    ]


def layer_gemm_times(bench: Bench, iters: int = 10) -> tuple[float, float]:
    """Seconds of one layer's four linears (QKV, attention output, fc1, fc2) at the benchmark's micro-batch:
    forward and both backward GEMMs, in the training precision and through this project's torchao FP8
    linear (its casts included). The median over `iters` passes."""
    from megatron.core import parallel_state

    from megatron_qwen.model.fp8 import Float8Scaling, _Float8ParallelLinear

    m = bench.config(1).model
    h, f, tokens = m.hidden_size, m.ffn_hidden_size, bench.micro_batch() * m.seq_length
    dtype = torch.bfloat16 if bench.args.precision == "bf16" else torch.float32
    device, gen = bench.args.device, torch.Generator().manual_seed(SEED)
    shapes = [(3 * h, h), (h, h), (2 * f, h), (h, f)]  # (out, in); SwiGLU's fc1 holds both halves
    operands = [(torch.randn(tokens, 1, k, generator=gen).to(device, dtype).requires_grad_(),
                 (torch.randn(n, k, generator=gen) * 0.02).to(device, dtype).requires_grad_(),
                 torch.randn(tokens, 1, n, generator=gen).to(device, dtype)) for n, k in shapes]
    scaling, group = Float8Scaling.for_recipe("tensorwise"), parallel_state.get_tensor_model_parallel_group()

    def one_pass(fp8: bool) -> float:
        bench.synchronize()
        start = time.perf_counter()
        for x, w, grad in operands:  # noqa: F821 (bound above; deleted only after the last call)
            y = (_Float8ParallelLinear.apply(x, w, scaling, True, False, False, group) if fp8
                 else torch.nn.functional.linear(x, w))
            y.backward(grad)
        bench.synchronize()
        return time.perf_counter() - start

    times = {}
    for fp8 in (False, True):
        one_pass(fp8)  # warm-up
        times[fp8] = statistics.median(one_pass(fp8) for _ in range(iters))
    del operands
    release()
    return times[False], times[True]


@check("fp8-torchao", "FP8 (torchao, tensorwise, local spec) against BF16: the layer GEMMs alone, the whole step's "
                      "tokens/s and the loss after --steps steps")
def fp8_torchao(bench: Bench) -> list[Row]:
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        return [Row("fp8-torchao", "skipped: torchao is not installed (pip install torchao==0.18.0)")]
    base, fp8 = layer_gemm_times(bench)
    gemm = base / fp8
    share = layer_gemm_share(bench.config(1))
    gemm_row = Row("fp8-torchao", f"layer GEMMs {gemm:.2f}x BF16 (QKV, proj, fc1, fc2 forward + backward, casts "
                                  f"included: {fp8 * 1e3:.1f} ms against {base * 1e3:.1f} ms per layer)",
                   f">= {GEMM_TARGET}x", gemm >= GEMM_TARGET)
    return [gemm_row, *_fp8_rows("fp8-torchao", bench.bf16(), bench.train("fp8-torchao", fp8="tensorwise",
                                                                          backend="torchao"), share, gemm)]


@check("fp8-te", "FP8 (Transformer Engine, tensorwise) against BF16 with Transformer Engine, where it is installed")
def fp8_te(bench: Bench) -> list[Row]:
    missing = te_missing()
    if missing is not None:
        return [Row("fp8-te", f"skipped: transformer_engine is {missing}")]
    return _fp8_rows("fp8-te", bench.train("bf16-te", impl="transformer_engine"),
                     bench.train("fp8-te", impl="transformer_engine", fp8="tensorwise", backend="te"),
                     layer_gemm_share(bench.config(1)))


@check("logits", "bf16 against fp32 logits of the same trained weights (target: the same next token >= 99 %)")
def logits(bench: Bench) -> list[Row]:
    from megatron_qwen.model.qwen import build_model

    state = bench.bf16().state
    tokens = bench.batches[-1]["tokens"][:1].to(bench.args.device)  # a row not trained on
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
    out = {}
    for precision in ("fp32", "bf16"):
        cfg = bench.config(1, precision=precision)
        (model,) = build_model(cfg, bench.runtime(cfg))
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
        with torch.no_grad():
            out[precision] = model.eval()(tokens, positions, None).float()
        del model
        release()
    ref, got = out["fp32"], out["bf16"]
    rel = ((got - ref).norm() / ref.norm()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return [Row("logits", f"same next token {agree:.2%}; relative error {rel:.2e}, max |diff| "
                          f"{(got - ref).abs().max().item():.3f} (logits up to {ref.abs().max().item():.1f})",
                ">= 99 % same token", agree >= 0.99)]


def sdpa_expected(torch_version: str, capability: tuple[int, int] | None) -> tuple[str, ...]:
    """The fused SDPA kernels a correct build may run in bf16: flash attention, and from torch 2.11 on Hopper
    (capability 9.x) also cuDNN attention, which torch's dispatcher may prefer there."""
    major, minor = (int(part) for part in re.match(r"(\d+)\.(\d+)", torch_version).groups())
    if capability is not None and capability[0] == 9 and (major, minor) >= (2, 11):
        return ("flash", "cudnn")
    return ("flash",)


def sdpa_row(kernel_names: set[str], expected: tuple[str, ...]) -> Row:
    """The sdpa row from the names of the kernels (or, on CPU, the aten operators) that ran."""
    kinds = {"flash": ("flash",), "cudnn": ("cudnn",), "memory-efficient": ("fmha", "efficient", "mem_eff")}
    found = sorted(kind for kind, keys in kinds.items() if any(k in n.lower() for n in kernel_names for k in keys))
    kernels = sorted(n for n in kernel_names if any(k in n.lower() for keys in kinds.values() for k in keys))
    result = (", ".join(found) if found else "math (no fused attention kernel)") + (
        f": {kernels[0][:70]}" if kernels else "")
    return Row("sdpa", result, " or ".join(expected), bool(found) and set(found) <= set(expected))


@check("sdpa", "the scaled-dot-product-attention kernel the model's attention runs in bf16 (flash, or cuDNN on "
               "Hopper with torch >= 2.11)")
def sdpa(bench: Bench) -> list[Row]:
    from torch.profiler import ProfilerActivity, profile

    from megatron_qwen.model.qwen import build_model

    cfg = bench.config(1, precision="bf16")
    (model,) = build_model(cfg, bench.runtime(cfg))
    tokens = bench.batches[0]["tokens"][:1].to(bench.args.device)
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
    with torch.no_grad():
        model(tokens, positions, None)  # warm-up
        bench.synchronize()
        with profile(activities=[ProfilerActivity.CUDA if bench.cuda else ProfilerActivity.CPU]) as prof:
            model(tokens, positions, None)
            bench.synchronize()
    del model
    release()
    # GPU kernels (flash_fwd_kernel, fmha_cutlass..., cudnn...) or, on CPU, the aten operator SDPA dispatched to.
    names = {e.name for e in prof.events() if e.device_type.name == ("CUDA" if bench.cuda else "CPU")}
    capability = torch.cuda.get_device_capability() if bench.cuda else None
    return [sdpa_row(names, sdpa_expected(torch.__version__, capability))]


# --------------------------------------------------------------------------- main


def print_table(rows: list[Row]) -> None:
    width = max(len(r.result) for r in rows)
    print(f"\n{'check':12}  {'result':{width}}  {'target':20}  status")
    for r in rows:
        print(f"{r.check:12}  {r.result:{width}}  {r.target:20}  {r.status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24,
                        help="layers of the 1.8B-shaped model (default 24: Qwen-1.8B)")
    parser.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    parser.add_argument("--steps", type=int, default=50, help="training steps per run (default 50)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S - 60,
                        help=f"start no check, and run no subprocess, after this many seconds "
                             f"(default {BUDGET_S - 60})")
    parser.add_argument("--only", nargs="+", choices=sorted(CHECKS), help="run only these checks")
    parser.add_argument("--config", default=str(REPO / "configs" / "qwen-1_8b.yaml"),
                        help="model config (default Qwen-1.8B)")
    parser.add_argument("--override", nargs="*", default=[], help="further dotted config overrides")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="training precision (default bf16)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help=f"micro-batch (default: the largest of {MICRO_BATCHES} that fits)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu runs the checks' plumbing only")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (description, _) in CHECKS.items():
            print(f"{name:12}  {description}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: tools/bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    bench = Bench(args)
    m = bench.config(1).model
    print(f"{bench.device_name}, torch {torch.__version__}, Python {sys.version.split()[0]}; {Path(args.config).stem} "
          f"shape (hidden {m.hidden_size}, {m.num_attention_heads} heads, SwiGLU {m.ffn_hidden_size}, vocabulary "
          f"{m.padded_vocab_size}) with {m.num_layers} layers, sequence {m.seq_length}, {args.steps} steps per run",
          flush=True)
    rows = []
    for name in args.only or list(CHECKS):
        if time.perf_counter() - start > args.budget_s:
            new = [Row(name, f"not run: past the {args.budget_s:.0f} s budget")]
        else:
            try:
                new = CHECKS[name][1](bench)
            except Exception as exc:  # one broken check must not cost the others' figures
                traceback.print_exc()
                new = [Row(name, f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}",
                           ok=False)]
                release()
        for row in new:
            print(f"[{time.perf_counter() - start:6.1f} s] {row.check}: {row.result} ({row.status})", flush=True)
        rows += new
    print_table(rows)
    total = time.perf_counter() - start
    print(f"\n{total:.0f} s in all ({'within' if total <= BUDGET_S else 'over'} the {BUDGET_S} s meant for one H100)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
