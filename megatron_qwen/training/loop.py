"""The training loop every stage shares: build, resume, then step, log, validate and save.

A stage (pretrain, SFT, reward, ...) is a `Task`: how to build its datasets and its megatron-core
forward step. Everything else (layouts, schedules, DDP, the optimizer and LR schedule, checkpoints and
resume, NaN skipping, preemption, metrics) lives here once.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from megatron_qwen.config import Config, resolve

EXIT_PREEMPTED = 75  # saved on SIGTERM/SIGUSR1; the launcher may requeue (sysexits' EX_TEMPFAIL)


@dataclass
class Task:
    """What a stage plugs into the loop.

    build_datasets(cfg, tokenizer) -> (train, valid): map-style datasets whose items are dicts of
    ``tokens``, ``labels``, ``loss_mask`` (and optionally ``position_ids``), valid may be None.
    forward_step: megatron-core forward_step_func (see `training.forward_backward.lm_forward_step`).
    """

    name: str
    build_datasets: Callable
    forward_step: Callable
    # The loss function's report keys; the first is the loss. Each is logged as its mean.
    report_keys: tuple[str, ...] = ("lm loss",)
    # build_model(cfg, on_cpu) -> model chunks; None builds the Qwen language model.
    build_model: Callable | None = None


@dataclass
class TrainState:
    """The loop's position, saved in every checkpoint."""

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    wandb_run_id: str | None = None


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 (Slurm's warning before the time limit, or preemption)."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signum

    def any_rank(self) -> bool:
        """True on every rank when any rank got a signal (one collective per step)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag.item() > 0


def _device():
    return "cpu" if torch.distributed.get_backend() == "gloo" else torch.cuda.current_device()


def guarded_step(optimizer, clip_grad: float) -> tuple[float | None, bool]:
    """megatron-core's optimizer step, except that a non-finite gradient norm skips the update
    instead of writing NaNs into the weights. Returns (grad norm, updated)."""
    from megatron.core.optimizer import optimizer as mcore_optimizer

    if optimizer.prepare_grads():
        return None, False
    grad_norm = optimizer.get_grad_norm()
    if not math.isfinite(grad_norm):
        return grad_norm, False
    if clip_grad > 0:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            params = opt.get_parameters()
            if params:
                mcore_optimizer.clip_grad_by_total_norm_fp32(params, clip_grad, grad_norm)
    return grad_norm, optimizer.step_with_ready_grads()


def build_optimizer(cfg: Config, model, bf16: bool):
    """megatron-core's Adam (AdamW: decoupled weight decay) over the model chunks; norms and biases
    get no weight decay (megatron-core's default parameter groups)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    t = cfg.training
    config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, model)


def _iterators(model, batches):
    return [iter(list(batches)) for _ in model] if len(model) > 1 else iter(batches)


def train(cfg: Config, task: Task) -> int:
    """Run (or resume) a training job for `task`; returns the process exit code."""
    from megatron.core import parallel_state

    from megatron_qwen.data.gpt import GlobalBatches
    from megatron_qwen.model.qwen import build_model, params_dtype
    from megatron_qwen.platform.launch import detect_launch, init_distributed, use_cpu_ranks
    from megatron_qwen.tokenizer import load_tokenizer
    from megatron_qwen.training import checkpointing
    from megatron_qwen.training.flops import mfu, peak_flops, qwen_flops_per_token
    from megatron_qwen.training.forward_backward import forward_backward, wrap_ddp
    from megatron_qwen.training.metrics import MetricsLogger
    from megatron_qwen.training.schedule import lr_at, set_lr

    info = detect_launch()
    cfg, layout, notes = resolve(cfg, info.world_size)
    on_cpu = use_cpu_ranks(cfg.parallel.device)
    init_distributed(layout.tp, layout.pp, layout.vpp, cfg.parallel.device, cfg.parallel.timeout_minutes, cfg.training.seed)
    rank0 = info.rank == 0
    t, m = cfg.training, cfg.model
    run_dir = Path(cfg.logging.run_dir)
    save_dir = Path(t.save or run_dir / "checkpoints")
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        for note in notes:
            print(f"note: {note}", flush=True)

    tokenizer = load_tokenizer(cfg.data.tokenizer_file)
    train_ds, valid_ds = task.build_datasets(cfg, tokenizer)

    chunks = (task.build_model or build_model)(cfg, on_cpu)
    model = wrap_ddp(chunks, cfg)
    bf16 = params_dtype(cfg, on_cpu) == torch.bfloat16
    optimizer = build_optimizer(cfg, model, bf16)

    state = TrainState()
    layout_record = dataclasses.asdict(layout)
    resume_from = checkpointing.latest_checkpoint(t.load or save_dir)
    if resume_from is not None:
        saved_layout = checkpointing.saved_train_state(resume_from).get("layout")
        # RNG streams are per rank: they are restored only at the layout that wrote them.
        saved = checkpointing.load_checkpoint(resume_from, model, optimizer, same_layout=saved_layout == layout_record)
        state = TrainState(**{k: saved[k] for k in dataclasses.asdict(TrainState()) if k in saved})
        if rank0:
            change = "" if saved_layout == layout_record else f"; layout changed from {saved_layout} to {layout_record}"
            print(f"resumed from {resume_from} at step {state.step} ({state.consumed_samples} samples consumed){change}", flush=True)
    elif t.init_from:
        checkpointing.load_model(model, t.init_from)
        if rank0:
            print(f"initialised weights from {t.init_from}", flush=True)

    logger = MetricsLogger(run_dir, cfg.logging.wandb, cfg.to_dict(), enabled=rank0, run_id=state.wandb_run_id)
    state.wandb_run_id = logger.run_id
    preemption = PreemptionFlag()

    dp_rank = parallel_state.get_data_parallel_rank()
    batches = GlobalBatches(train_ds, state.consumed_samples, t.global_batch_size, t.micro_batch_size, dp_rank, layout.dp)
    seq = m.seq_length
    flops_per_token = qwen_flops_per_token(m.hidden_size, m.num_layers, m.ffn_hidden_size, m.padded_vocab_size, seq, t.recompute == "full")
    device_name = None if on_cpu else torch.cuda.get_device_name()
    peak = peak_flops(device_name, cfg.logging.peak_tflops)
    decay_end = t.lr_decay_iters or t.train_iters
    inject = {int(s) for s in t.inject_nan_at}

    def save(step: int) -> None:
        train_state = dict(dataclasses.asdict(state), layout=layout_record, config=cfg.to_dict())
        path = checkpointing.save_checkpoint(save_dir, step, model, optimizer, train_state, t.keep_last)
        if rank0:
            print(f"saved checkpoint {path}", flush=True)

    if t.train_iters == 0 and resume_from is None:
        save(0)  # train_iters=0 writes the initial weights: a common starting point for other layouts
    skipped_in_row = 0
    window = {"loss": 0.0, "updates": 0, "steps": 0, "time": 0.0}
    exit_code = 0
    while state.step < t.train_iters:
        step_start = time.perf_counter()
        lr = lr_at(state.step, t.lr, t.min_lr, t.lr_warmup_iters, decay_end, t.lr_decay_style)
        set_lr(optimizer, lr, t.weight_decay)
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        micro = batches.next_global_batch()
        reports = forward_backward(
            model, _iterators(model, micro), batches.num_microbatches, seq, t.micro_batch_size, task.forward_step,
            report_keys=task.report_keys,
        )
        loss = reports[task.report_keys[0]]
        if state.step + 1 in inject:
            loss = torch.tensor(float("nan"))
        grad_norm, updated = (None, False) if not torch.isfinite(loss) else guarded_step(optimizer, t.clip_grad)
        state.consumed_samples += t.global_batch_size
        state.step += 1
        if not updated:
            state.skipped_steps += 1
            skipped_in_row += 1
            if rank0:
                print(f"step {state.step}: skipped (loss {loss.item()}, grad norm {grad_norm}); samples "
                      f"{state.consumed_samples - t.global_batch_size}..{state.consumed_samples - 1} "
                      f"({skipped_in_row} in a row)", flush=True)
            if skipped_in_row > t.max_skipped_in_row:
                if rank0:
                    print(f"error: {skipped_in_row} non-finite steps in a row (training.max_skipped_in_row="
                          f"{t.max_skipped_in_row}); aborting without saving", file=sys.stderr, flush=True)
                return 1
        else:
            skipped_in_row = 0
            window["loss"] += loss.item()
            window["updates"] += 1
            for key in task.report_keys[1:]:
                window[key] = window.get(key, 0.0) + reports[key].item()
        window["steps"] += 1
        window["time"] += time.perf_counter() - step_start

        if state.step % cfg.logging.log_interval == 0 or state.step == t.train_iters:
            tokens_per_s = t.global_batch_size * seq * window["steps"] / window["time"]
            per_device = tokens_per_s / info.world_size
            metrics = {
                "loss": window["loss"] / window["updates"] if window["updates"] else float("nan"),
                "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "skipped": state.skipped_steps,
                "tokens_per_s": tokens_per_s,
                "tflops_per_device": per_device * flops_per_token / 1e12,
                "mfu": mfu(per_device, flops_per_token, peak),
                "mem_gb": _memory_gb(on_cpu),
                "consumed_samples": state.consumed_samples,
            }
            for key in task.report_keys[1:]:
                metrics[key.replace(" ", "_")] = window.get(key, 0.0) / window["updates"] if window["updates"] else None
            logger.log(state.step, metrics)
            window = {"loss": 0.0, "updates": 0, "steps": 0, "time": 0.0}

        if valid_ds is not None and t.eval_interval and state.step % t.eval_interval == 0:
            logger.log(state.step, {"valid_loss": evaluate(cfg, model, valid_ds, task, dp_rank, layout.dp, state.step)})

        preempted = preemption.any_rank()
        if preempted or (t.save_interval and state.step % t.save_interval == 0) or state.step == t.train_iters:
            save(state.step)
        if preempted:
            if rank0:
                print(f"signal received: saved at step {state.step}, exiting with {EXIT_PREEMPTED} so the job can be requeued", flush=True)
            exit_code = EXIT_PREEMPTED
            break
    logger.close()
    return exit_code


def evaluate(cfg: Config, model, valid_ds, task: Task, dp_rank: int, dp_size: int, step: int) -> float:
    """Mean per-token loss over ``training.eval_iters`` global batches of the valid split."""
    from megatron_qwen.data.gpt import GlobalBatches
    from megatron_qwen.training.forward_backward import forward_backward

    t = cfg.training
    # Each validation reads the same batches, so curves are comparable across steps.
    batches = GlobalBatches(valid_ds, 0, t.global_batch_size, t.micro_batch_size, dp_rank, dp_size)
    for chunk in model:
        chunk.eval()
    total = 0.0
    with torch.no_grad():
        for _ in range(t.eval_iters):
            micro = batches.next_global_batch()
            total += forward_backward(
                model, _iterators(model, micro), batches.num_microbatches, cfg.model.seq_length, t.micro_batch_size,
                task.forward_step, forward_only=True, report_keys=task.report_keys,
            )[task.report_keys[0]].item()
    for chunk in model:
        chunk.train()
    return total / t.eval_iters


def _memory_gb(on_cpu: bool) -> float:
    if on_cpu:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return torch.cuda.max_memory_allocated() / 2**30


def run_stage(task: Task, argv: list[str] | None = None) -> None:
    """Command-line entry of a stage: ``python -m megatron_qwen.stages.NAME CONFIG.yaml [key=value ...]``."""
    import argparse

    from megatron_qwen.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog=f"python -m megatron_qwen.stages.{task.name}")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 training.train_iters=100")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        code = train(cfg, task)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    from megatron_qwen.platform.launch import destroy_distributed

    destroy_distributed()
    sys.exit(code)
