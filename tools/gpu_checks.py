"""Checks of what only a GPU can show: each runs on one GPU and prints one result line.

    python tools/gpu_checks.py [NAME ...]    # every check by default; exit status 1 when one fails

``gpu-check NAME: PASS|FAIL|SKIP detail``. Each check is a function ``check_NAME() -> (status, detail)``,
listed in `CHECKS` for other tools to run. They need torch, transformers, tiktoken and the megatron-core,
torchao and psutil wheels only: not the compiled extension of csrc/ (shards are written with megatron-core's
builder) nor the dashscope wheel (the stage reads a stand-in tokenizer file; pretraining uses only its EOD id
and size). No subprocess runs past `DEADLINE` (a `time.monotonic()` value; tools/bench_gpu.py sets it from its
budget). They run in one process with one rank (TP = PP = DP = 1) on GPU 0; checks that need a fresh CUDA
context or the stage's command line start their own subprocess. What CPU ranks show (layouts, overlap at
DP = 2, resharding) is in the test suite; these confirm the CUDA, NCCL and Transformer Engine paths of the
same code.
"""

from __future__ import annotations

import base64
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SEQ, VOCAB = 128, 1024  # small shapes, so the checks take seconds
Result = tuple[str, str]
DEADLINE: float | None = None  # time.monotonic() after which no subprocess may run (None: their own limits)


def subprocess_timeout(limit: float) -> float:
    """`limit` seconds, or what is left before `DEADLINE` when that is less (at least 1 s)."""
    if DEADLINE is None:
        return limit
    return max(1.0, min(limit, DEADLINE - time.monotonic()))


def write_stand_in_tokenizer(path: Path) -> Path:
    """A file in qwen.tiktoken's format (151,643 distinct byte strings, ranks 0..151,642: the 256 bytes, then
    pairs, then triples) that `load_tokenizer` accepts. Not Qwen's merges: for runs that read only the
    tokenizer's EOD id and vocabulary size (pretraining on shards), on machines without the dashscope wheel."""
    from megatron_qwen.tokenizer import N_MERGEABLE

    tokens = [bytes([a]) for a in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    tokens += [bytes([a, b, c]) for a in range(256) for b in range(256) for c in range(2)][: N_MERGEABLE - len(tokens)]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


def write_shard(prefix: Path, documents: list[np.ndarray]) -> None:
    """A Megatron .bin/.idx shard through megatron-core's own builder (pure Python: no compiled extension)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for document in documents:
        builder.add_document(torch.as_tensor(document, dtype=torch.int32), [len(document)])
    builder.finalize(f"{prefix}.idx")


def _config(*overrides: str):
    from megatron_qwen.config import load_config

    return load_config(TINY, ["parallel.device=cuda", f"model.seq_length={SEQ}", f"model.padded_vocab_size={VOCAB}",
                              "training.micro_batch_size=2", "training.global_batch_size=4",
                              "training.lr_warmup_iters=0",
                              *overrides])


def _one_rank() -> None:
    """A one-rank process group and megatron-core's parallel state on GPU 0 (once per process)."""
    from megatron_qwen.platform.launch import init_distributed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    init_distributed(1, 1, None, device="cuda")


def _batches(count: int, micro: int = 2, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (count, micro, SEQ + 1), generator=gen)  # a small subset: learnable at once
    return [{"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(micro, SEQ)} for t in tokens]


def _train(unit, steps: int, seed: int = 0) -> list[float]:
    """`steps` optimizer steps of the unit on fixed batches: the losses."""
    from megatron_qwen.training.forward_backward import forward_backward

    losses = []
    for step in range(steps):
        unit.set_lr(step)
        unit.zero_grad()
        batches = _batches(2, seed=seed + step)
        losses.append(forward_backward(unit.chunks, iter(batches), 2, SEQ, 2)["lm loss"].item())
        assert unit.step()[1], "the step was skipped"
    return losses


def _close(a: list[float], b: list[float], rtol: float = 1e-3) -> bool:
    """Losses equal to `rtol`: flash attention's backward on GPU need not be bit-reproducible."""
    return all(abs(x - y) <= rtol * abs(x) for x, y in zip(a, b))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _logits(chunk, seed: int = 1) -> torch.Tensor:
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed)).cuda()
    positions = torch.arange(SEQ, device="cuda").unsqueeze(0).expand(2, -1)
    module = getattr(chunk, "module", chunk)
    with torch.no_grad():
        return module.eval()(tokens, positions, None).float()


def check_runtime() -> Result:
    """The start-up line on this GPU: precision (bf16 where the GPU has it), Transformer Engine, apex's fused
    weight-gradient kernel, the attention kernel, and the peak MFU is quoted against."""
    from megatron_qwen.platform.runtime import gpu_has_bf16, resolve_runtime
    from megatron_qwen.training.flops import peak_flops

    runtime = resolve_runtime(_config(), 0)
    name = torch.cuda.get_device_name(runtime.device)
    peak = peak_flops(name)
    bf16 = gpu_has_bf16(runtime.device)
    ok = (runtime.params_dtype == torch.bfloat16) == bf16
    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (set logging.peak_tflops)"
    return ("PASS" if ok else "FAIL"), (f"{runtime.describe()} | capability {torch.cuda.get_device_capability()} "
                                        f"| peak {peak_text}")


def check_cuda_work_ordering() -> Result:
    """A fresh process (as torchrun starts it) gets CUDA_DEVICE_MAX_CONNECTIONS=1 before CUDA starts."""
    probe = (
        "import os, torch\n"
        "from megatron_qwen.config import load_config\n"
        "from megatron_qwen.platform.runtime import resolve_runtime\n"
        "before = torch.cuda.is_initialized()\n"
        f"resolve_runtime(load_config({str(TINY)!r}, ['parallel.device=cuda']))\n"
        "torch.zeros(1, device='cuda')\n"
        "print(before, os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS'), torch.cuda.is_initialized())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=subprocess_timeout(120))
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
    return ("PASS" if line == "False 1 True" else "FAIL"), f"CUDA initialised before, variable, after: {line}"


def check_gradient_accumulation_fusion() -> Result:
    """The default GPU build (Transformer Engine when it imports) trains in bf16; gradient-accumulation fusion
    is on exactly when apex's fused_weight_gradient_mlp_cuda imports, and the model builds either way."""
    from megatron_qwen.platform.runtime import resolve_runtime
    from megatron_qwen.training.units import build_unit

    _one_rank()
    cfg = _config()
    runtime = resolve_runtime(cfg, 0)
    unit = build_unit(cfg, runtime, "model")
    fused = unit.modules[0].config.gradient_accumulation_fusion
    losses = _train(unit, 3)
    ok = fused == (runtime.accelerators.fused_wgrad is None) and all(np.isfinite(losses)) and losses[-1] < losses[0]
    return ("PASS" if ok else "FAIL"), (f"TE {runtime.use_te}, fusion {fused} (apex kernel: "
                                        f"{runtime.accelerators.fused_wgrad or 'imports'}), losses "
                                        f"{[round(x, 3) for x in losses]}")


def check_initialisation() -> Result:
    """On CUDA (tensors drawn with CUDA generators) a build is reproducible, any shard equals the same region
    of the whole tensor, layers differ, and the spread is Qwen v1's."""
    from megatron_qwen.model import init
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import resolve_runtime

    _one_rank()
    cfg = _config("model.transformer_impl=local", "training.precision=fp32")
    runtime = resolve_runtime(cfg, 0)
    first, second = (dict(build_model(cfg, runtime)[0].named_parameters()) for _ in range(2))
    same = all(torch.equal(first[k], second[k]) for k in first)
    qkv = first["decoder.layers.0.self_attention.linear_qkv.weight"]
    distinct = not torch.equal(qkv, first["decoder.layers.1.self_attention.linear_qkv.weight"])
    shape, cuda = (3000, 700), torch.device("cuda")
    whole = init.draw_region(shape, (slice(0, 3000), slice(0, 700)), 0.02, 1234, "w", (2,), cuda)
    shard = init.draw_region(shape, (slice(1500, 3000), slice(350, 700)), 0.02, 1234, "w", (2,), cuda)
    sliced = torch.equal(shard, whole[1500:, 350:])
    std = qkv.float().std().item()
    ok = same and distinct and sliced and abs(std - 0.02) < 0.002
    return ("PASS" if ok else "FAIL"), (f"reproducible {same}, layers differ {distinct}, "
                                        f"shard = region of whole {sliced}, QKV std {std:.4f}")


def check_te_checkpoints() -> Result:
    """Checkpoints move both ways between the local and the Transformer Engine spec, resumed with their
    optimizer (fp32, so the two specs' logits are comparable)."""
    from megatron_qwen.platform.runtime import Accelerators, resolve_runtime
    from megatron_qwen.checkpoint import io as checkpointing
    from megatron_qwen.training.units import build_unit

    reason = Accelerators.detect().transformer_engine
    if reason is not None:
        return "SKIP", f"Transformer Engine is {reason}"
    _one_rank()
    units = {}
    for impl in ("local", "transformer_engine"):
        cfg = _config(f"model.transformer_impl={impl}", "training.precision=fp32")
        units[impl] = (cfg, resolve_runtime(cfg, 0))
    diffs = []
    with tempfile.TemporaryDirectory() as tmp:
        for source, target in (("local", "transformer_engine"), ("transformer_engine", "local")):
            cfg, runtime = units[source]
            trained = build_unit(cfg, runtime, source)
            _train(trained, 2)
            checkpointing.save_checkpoint(Path(tmp) / source, 2, [trained], {"step": 2}, keep_last=1)
            cfg, runtime = units[target]
            resumed = build_unit(cfg, runtime, target)
            checkpointing.load_checkpoint(Path(tmp) / source / "iter_0000002", [resumed], restore_rng=False)
            diffs.append((_logits(trained.chunks[0]) - _logits(resumed.chunks[0])).abs().max().item())
    ok = max(diffs) < 1e-3
    return ("PASS" if ok else "FAIL"), f"max |logit difference| local->TE {diffs[0]:.2e}, TE->local {diffs[1]:.2e}"


def check_overlap() -> Result:
    """Overlapped gradient reduction and weight all-gather (small buckets, distributed optimizer, bf16)
    train like the plain schedule on CUDA streams (DP = 1 here; DP = 2 is tested on CPU ranks)."""
    from megatron_qwen.platform.runtime import resolve_runtime
    from megatron_qwen.training.units import build_unit

    _one_rank()
    losses = {}
    for flag in ("false", "true"):
        # Clipping off: the gradient norm's summation order follows the bucket layout (see the CPU test).
        cfg = _config("parallel.use_distributed_optimizer=true", f"parallel.overlap_grad_reduce={flag}",
                      f"parallel.overlap_param_gather={flag}", "parallel.ddp_bucket_size=200000",
                      "training.clip_grad=0")
        unit = build_unit(cfg, resolve_runtime(cfg, 0), "model")
        buckets = len(unit.chunks[0].buffers[0].buckets)
        losses[flag] = _train(unit, 4)
    ok = _close(losses["true"], losses["false"])
    return ("PASS" if ok else "FAIL"), f"losses plain {losses['false']} overlapped {losses['true']} ({buckets} buckets)"


def _peak_host_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def check_distributed_optimizer_checkpoint() -> Result:
    """A save of the distributed optimizer's GPU state (memory-efficient, gathered over gloo through host
    memory) resumes to the same state: the next steps' losses are those of the run that kept going."""
    from megatron_qwen.platform.runtime import resolve_runtime
    from megatron_qwen.checkpoint import io as checkpointing
    from megatron_qwen.training.units import build_unit

    _one_rank()
    cfg = _config("parallel.use_distributed_optimizer=true")
    runtime = resolve_runtime(cfg, 0)
    with tempfile.TemporaryDirectory() as tmp:
        unit = build_unit(cfg, runtime, "model")
        _train(unit, 2)
        gc.collect()
        rss = int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
        Path("/proc/self/clear_refs").write_text("5")
        checkpointing.save_checkpoint(tmp, 2, [unit], {"step": 2}, keep_last=1)
        save_mib = (_peak_host_kib() - rss) / 1024
        kept_going = _train(unit, 2, seed=100)
        resumed = build_unit(cfg, runtime, "model")
        checkpointing.load_checkpoint(Path(tmp) / "iter_0000002", [resumed], restore_rng=False)
        again = _train(resumed, 2, seed=100)
    ok = _close(again, kept_going)
    return ("PASS" if ok else "FAIL"), (f"losses after resume {again} vs {kept_going}; "
                                        f"save peak host memory +{save_mib:.0f} MiB")


def check_packed_attention() -> Result:
    """Packed SFT rows on CUDA: the variable-length flash kernel, the per-sequence path and the dense mask agree
    (bf16), the packed step makes no host-device synchronisation, and the variable-length path needs less
    memory than the dense mask at sequence 8192."""
    from megatron_qwen.data.chat_datasets import packed_attention_mask, packed_rows
    from megatron_qwen.model import attention
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import resolve_runtime

    if attention.varlen_attn is None:
        return "SKIP", "this torch has no torch.nn.attention.varlen"
    _one_rank()

    def rows(seq: int, lengths: list[int]) -> torch.Tensor:
        positions = np.concatenate([np.arange(n) for n in lengths] + [np.arange(lengths[-1],
                                                                                lengths[-1] + seq - sum(lengths))])
        return torch.as_tensor(positions)[None]

    results, syncs = {}, []
    for seq, lengths in ((SEQ, [40, 30, 50]), (8192, [512] * 15)):
        cfg = _config(f"model.seq_length={seq}")
        (model,) = build_model(cfg, resolve_runtime(cfg, 0), rope_at_positions=True)
        model.eval()
        positions = rows(seq, lengths)
        tokens = torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(0)).cuda()
        labels = torch.roll(tokens, -1, 1)
        out = {}
        for path in ("varlen", "per-sequence", "dense"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            saved = attention.varlen_attn
            if path == "per-sequence":
                attention.varlen_attn = None
            try:
                with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    if path == "dense":
                        out[path] = model(tokens, positions.cuda(), packed_attention_mask(positions.cuda()),
                                          labels=labels)
                    else:
                        # Reading the boundaries must not wait for the GPU; what else in the forward does is reported.
                        torch.cuda.set_sync_debug_mode("error")
                        packed = packed_rows(positions, torch.device("cuda"))
                        torch.cuda.set_sync_debug_mode("warn")
                        out[path] = model(tokens, positions.cuda(), None, labels=labels, packed_seq_params=packed)
                torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
            finally:
                attention.varlen_attn = saved
                torch.cuda.set_sync_debug_mode(0)
            if path == "varlen":
                syncs += [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
            results[(seq, path)] = torch.cuda.max_memory_allocated() / 2**20
        results[(seq, "diff")] = max((out["varlen"] - out[p]).abs().max().item() for p in ("per-sequence", "dense"))
    ok = results[(SEQ, "diff")] < 0.05 and results[(8192, "diff")] < 0.05 and results[(8192, "varlen")] < results[(8192,
                                                                                                                   "dense")]
    return ("PASS" if ok else "FAIL"), (
        f"max loss difference {results[(SEQ, 'diff')]:.2e} (seq {SEQ}), {results[(8192, 'diff')]:.2e} (seq 8192); "
        f"peak memory at 8192: varlen {results[(8192, 'varlen')]:.0f} MiB, per-sequence "
        f"{results[(8192, 'per-sequence')]:.0f}, dense mask {results[(8192, 'dense')]:.0f}; synchronising calls in the "
        f"packed forward: {len(syncs)} {syncs[:2]}")


def check_pretrain_stage(device: str = "cuda") -> Result:
    """The pretraining stage under torchrun on one GPU: bf16, distributed optimizer, overlap, full recomputation,
    saves every 2 steps keeping 1 (old ones deleted in the background), MFU and HFU logged. (`device="cpu"`
    runs the same command on a CPU rank: the test suite checks that it needs nothing a bare machine lacks.)"""
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        write_shard(Path(tmp) / "corpus", [rng.integers(0, 64, 300) for _ in range(400)])
        tokenizer = write_stand_in_tokenizer(Path(tmp) / "stand_in.tiktoken")
        run_dir = Path(tmp) / "run"
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
                str(_free_port()),
                "-m", "megatron_qwen.stages.pretrain", str(TINY), f"data.paths=[{Path(tmp) / 'corpus'}]",
                f"model.padded_vocab_size={VOCAB}", f"model.seq_length={SEQ}", f"parallel.device={device}",
                f"data.tokenizer_file={tokenizer}",
                "parallel.use_distributed_optimizer=true", "training.train_iters=6", "training.lr_warmup_iters=1",
                "training.save_interval=2", "training.keep_last=1", "training.recompute=full", "logging.log_interval=1",
                f"logging.run_dir={run_dir}", "data.split=100,0,0"]
        env = {k: v for k, v in os.environ.items() if k not in ("CUDA_DEVICE_MAX_CONNECTIONS", "MASTER_ADDR",
                                                                "MASTER_PORT")}
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                   WANDB_MODE="disabled")
        limit = subprocess_timeout(240)
        # Its own session: on a timeout the whole group (torchrun and its rank) is killed, not torchrun alone.
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            return "FAIL", f"the stage did not finish within {limit:.0f} s (its limit, or the time left in the budget)"
        proc = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
        if proc.returncode != 0:
            return "FAIL", f"exit {proc.returncode}: {proc.stderr[-800:]}"
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        startup = next((line for line in proc.stdout.splitlines() if line.startswith("running on")), "")
    last = records[-1]
    ok = (kept == ["iter_0000006", "latest"] and last["mfu"] is not None and 0 < last["mfu"] < last["hfu"] < 1
          and last["loss"] < records[0]["loss"])
    return ("PASS" if ok else "FAIL"), (f"loss {records[0]['loss']:.3f} -> {last['loss']:.3f}, "
                                        f"{last['tflops_per_device']:.1f} TFLOP/s, MFU {last['mfu']}, HFU "
                                        f"{last['hfu']}, kept {kept}; {startup}")


def check_te_context_parallel() -> Result:
    """Context parallelism in Transformer Engine's attention (CP = 2, each parallel.cp_comm_type; packed SFT rows
    in the THD layout) against CP = 1 on the same two GPUs, bf16: logits, the packed rows' loss, two training
    steps. Two torchrun ranks, one GPU each."""
    from megatron_qwen.platform.runtime import Accelerators

    reason = Accelerators.detect().transformer_engine
    if reason is not None:
        return "SKIP", f"Transformer Engine is {reason}"
    if torch.cuda.device_count() < 2:
        return "SKIP", (f"CP = 2 needs two GPUs (NCCL ranks cannot share one); this machine has "
                        f"{torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                   str(_free_port()), str(Path(__file__).resolve()), "--te-cp-worker", tmp]
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=subprocess_timeout(600),
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        if proc.returncode:
            return "FAIL", f"the ranks exited with {proc.returncode}: {(proc.stdout + proc.stderr)[-600:]}"
        result = json.loads((Path(tmp) / "te_cp.json").read_text())
    reference = result.pop("cp1")
    worst = {}
    for comm, got in result.items():
        worst[comm] = {"logits": got["logits_diff"] / reference["logits_max"],
                       "packed": abs(got["packed_loss"] - reference["packed_loss"]) / reference["packed_loss"],
                       "steps": max(abs(a - b) / b for a, b in zip(got["losses"], reference["losses"]))}
    # bf16 against bf16 through other attention kernels: differences of a few bf16 roundings.
    ok = all(value < 2e-2 for errors in worst.values() for value in errors.values())
    return ("PASS" if ok else "FAIL"), "; ".join(
        f"{comm}: relative logits {e['logits']:.1e}, packed loss {e['packed']:.1e}, step losses {e['steps']:.1e}"
        for comm, e in worst.items())


def te_context_parallel_worker(out: Path) -> None:
    """One rank of `check_te_context_parallel`: every rank runs the same batches (at CP = 1 the two ranks are
    data-parallel replicas of one another, so means and gradients are one copy's)."""
    from megatron.core import parallel_state

    from megatron_qwen.model.context_parallel import gather_sequence
    from megatron_qwen.platform.launch import detect_launch, init_distributed
    from megatron_qwen.platform.runtime import resolve_runtime
    from megatron_qwen.stages.sft import sft_forward_step
    from megatron_qwen.training.forward_backward import forward_backward, model_inputs
    from megatron_qwen.training.units import build_unit

    local_rank, results = detect_launch().local_rank, {}
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=gen)
    positions = torch.cat([torch.arange(n) for n in (40, 30, 58)])[None].expand(2, SEQ)  # three packed sequences
    packed = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, SEQ),
              "position_ids": positions.contiguous()}
    for name in ("cp1", "p2p", "all_gather", "a2a"):
        cp = ["parallel.cp=1"] if name == "cp1" else ["parallel.cp=2", f"parallel.cp_comm_type={name}"]
        cfg = _config("model.transformer_impl=transformer_engine", "training.precision=bf16",
                      "model.num_attention_heads=4", "model.num_query_groups=2", *cp)
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        init_distributed(1, 1, None, device="cuda", cp=cfg.parallel.cp)
        unit = build_unit(cfg, resolve_runtime(cfg, local_rank), "model", rope_at_positions=True)
        model = unit.chunks[0]
        with torch.no_grad():
            model.eval()
            batch = model_inputs({"tokens": tokens[:, :-1], "position_ids": torch.arange(SEQ).expand(2, SEQ)}, model)
            logits = gather_sequence(model(batch["tokens"], batch["position_ids"], None).float(), dim=1)
            packed_loss = forward_backward(unit.chunks, iter([packed]), 1, SEQ, 2, sft_forward_step,
                                           forward_only=True)["lm loss"].item()
            model.train()
        if name == "cp1":
            reference_logits = logits
            results[name] = {"logits_max": logits.abs().max().item(), "packed_loss": packed_loss}
        else:
            results[name] = {"logits_diff": (logits - reference_logits).abs().max().item(), "packed_loss": packed_loss}
        results[name]["losses"] = _train(unit, 2)
    if torch.distributed.get_rank() == 0:
        (out / "te_cp.json").write_text(json.dumps(results))


CHECKS: dict[str, Callable[[], Result]] = {
    "runtime": check_runtime,
    "cuda_work_ordering": check_cuda_work_ordering,
    "gradient_accumulation_fusion": check_gradient_accumulation_fusion,
    "initialisation": check_initialisation,
    "te_checkpoints": check_te_checkpoints,
    "overlap": check_overlap,
    "distributed_optimizer_checkpoint": check_distributed_optimizer_checkpoint,
    "packed_attention": check_packed_attention,
    "pretrain_stage": check_pretrain_stage,
    "te_context_parallel": check_te_context_parallel,
}


def run_check(name: str) -> str:
    """Run one check and print its result line; returns the status."""
    try:
        status, detail = CHECKS[name]()
    except Exception as exc:  # a crash is a failed check: report it and go on with the others
        status, detail = "FAIL", f"{type(exc).__name__}: {exc} | {traceback.format_exc(limit=3).splitlines()[-3:]}"
    print(f"gpu-check {name}: {status} {detail}", flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"error: unknown check(s) {unknown}; known: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: no CUDA device: these checks run on a GPU (the CPU paths are the test suite's)", file=sys.stderr)
        return 2
    statuses = [run_check(name) for name in names]
    return 1 if "FAIL" in statuses else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--te-cp-worker"]:  # one rank of check_te_context_parallel, under torchrun
        te_context_parallel_worker(Path(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
