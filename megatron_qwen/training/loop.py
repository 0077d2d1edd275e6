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


class MetricWindow:
    """Sums of the reported metrics and step times since the last log line."""

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys
        self.sums = dict.fromkeys(keys, 0.0)
        self.updates = self.steps = 0
        self.seconds = 0.0

    def add(self, reports: dict | None, seconds: float) -> None:
        """One step: `reports` None for a skipped step (timed, not averaged)."""
        if reports is not None:
            for key in self.keys:
                self.sums[key] += reports[key].item()
            self.updates += 1
        self.steps += 1
        self.seconds += seconds

    def means(self) -> dict:
        return {key.replace(" ", "_"): (self.sums[key] / self.updates if self.updates else float("nan")) for key in self.keys}


class Trainer:
    """One training job: `Trainer(cfg, task).run()` builds everything, resumes, then loops."""

    def __init__(self, cfg: Config, task: Task):
        from megatron.core import parallel_state

        from megatron_qwen.data.gpt import GlobalBatches
        from megatron_qwen.model.qwen import build_model, params_dtype
        from megatron_qwen.platform.launch import detect_launch, init_distributed, use_cpu_ranks
        from megatron_qwen.tokenizer import load_tokenizer
        from megatron_qwen.training.flops import peak_flops, qwen_flops_per_token
        from megatron_qwen.training.forward_backward import wrap_ddp
        from megatron_qwen.training.metrics import MetricsLogger

        # Installed first: a USR1/TERM while the model builds or loads is honoured at the first step.
        self.preemption = PreemptionFlag()
        info = detect_launch()
        cfg, layout, notes = resolve(cfg, info.world_size)
        self.cfg, self.task, self.layout, self.world_size = cfg, task, layout, info.world_size
        self.on_cpu = use_cpu_ranks(cfg.parallel.device)
        init_distributed(layout.tp, layout.pp, layout.vpp, cfg.parallel.device, cfg.parallel.timeout_minutes, cfg.training.seed)
        self.rank0 = info.rank == 0
        t, m = cfg.training, cfg.model
        self.run_dir = Path(cfg.logging.run_dir)
        self.save_dir = Path(t.save or self.run_dir / "checkpoints")
        if self.rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            for note in notes:
                print(f"note: {note}", flush=True)

        self.train_ds, self.valid_ds = task.build_datasets(cfg, load_tokenizer(cfg.data.tokenizer_file))
        self.model = wrap_ddp((task.build_model or build_model)(cfg, self.on_cpu), cfg)
        self.optimizer = build_optimizer(cfg, self.model, params_dtype(cfg, self.on_cpu) == torch.bfloat16)
        self.state = TrainState()
        self.carried_files: dict[str, str] = {}  # e.g. a converted model's hf_source.json, kept in every save
        self.resumed = self.resume()

        self.logger = MetricsLogger(self.run_dir, cfg.logging.wandb, cfg.to_dict(), enabled=self.rank0, run_id=self.state.wandb_run_id)
        self.state.wandb_run_id = self.logger.run_id
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.batches = GlobalBatches(self.train_ds, self.state.consumed_samples, t.global_batch_size, t.micro_batch_size, self.dp_rank, layout.dp)
        self.flops_per_token = qwen_flops_per_token(m.hidden_size, m.num_layers, m.ffn_hidden_size, m.padded_vocab_size, m.seq_length, t.recompute == "full")
        self.nan_steps = {int(s) for s in t.inject_nan_at}
        self.peak = peak_flops(None if self.on_cpu else torch.cuda.get_device_name(), cfg.logging.peak_tflops)

    def say(self, text: str, error: bool = False) -> None:
        if self.rank0:
            print(text, file=sys.stderr if error else sys.stdout, flush=True)

    def resume(self) -> bool:
        """Load the latest checkpoint (any layout), else `training.init_from` weights. True if resumed."""
        from megatron_qwen.training import checkpointing

        t = self.cfg.training
        layout = dataclasses.asdict(self.layout)
        path = checkpointing.latest_checkpoint(t.load or self.save_dir)
        if path is not None:
            saved_layout = checkpointing.saved_train_state(path).get("layout")
            # RNG streams are per rank: they are restored only at the layout that wrote them.
            saved = checkpointing.load_checkpoint(path, self.model, self.optimizer, same_layout=saved_layout == layout)
            self.state = TrainState(**{k: saved[k] for k in dataclasses.asdict(TrainState()) if k in saved})
            change = "" if saved_layout == layout else f"; layout changed from {saved_layout} to {layout}"
            self.say(f"resumed from {path} at step {self.state.step} ({self.state.consumed_samples} samples consumed){change}")
            self._carry_from(path)
            return True
        if t.init_from:
            checkpointing.load_model(self.model, t.init_from)
            self.say(f"initialised weights from {t.init_from}")
            self._carry_from(Path(t.init_from))
        return False

    def _carry_from(self, path: Path) -> None:
        # A model converted from Hugging Face records its source vocabulary; exports after training need it.
        source = path / "hf_source.json"
        if source.is_file():
            self.carried_files[source.name] = source.read_text()

    def save(self) -> None:
        from megatron_qwen.training import checkpointing

        t = self.cfg.training
        train_state = dict(dataclasses.asdict(self.state), layout=dataclasses.asdict(self.layout), config=self.cfg.to_dict())
        files = {"model_config.yaml": yaml.safe_dump(self.cfg.to_dict(), sort_keys=False), **self.carried_files}
        path = checkpointing.save_checkpoint(
            self.save_dir, self.state.step, self.model, self.optimizer, train_state, t.keep_last, files
        )
        self.say(f"saved checkpoint {path}")

    def train_step(self, lr: float) -> tuple[dict, float | None, bool]:
        """One optimizer step on the next global batch: (reports, grad norm, updated)."""
        from megatron_qwen.training.forward_backward import forward_backward
        from megatron_qwen.training.schedule import set_lr

        t = self.cfg.training
        set_lr(self.optimizer, lr, t.weight_decay)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        micro = self.batches.next_global_batch()
        reports = forward_backward(
            self.model, _iterators(self.model, micro), self.batches.num_microbatches, self.cfg.model.seq_length,
            t.micro_batch_size, self.task.forward_step, report_keys=self.task.report_keys,
        )
        if self.state.step + 1 in self.nan_steps:
            reports[self.task.report_keys[0]] = torch.tensor(float("nan"))
        if not torch.isfinite(reports[self.task.report_keys[0]]):
            return reports, None, False
        grad_norm, updated = guarded_step(self.optimizer, t.clip_grad)
        return reports, grad_norm, updated

    def log(self, window: MetricWindow, lr: float, grad_norm: float | None) -> None:
        from megatron_qwen.training.flops import mfu

        t = self.cfg.training
        tokens_per_s = t.global_batch_size * self.cfg.model.seq_length * window.steps / window.seconds
        per_device = tokens_per_s / self.world_size
        means = window.means()
        metrics = {
            "loss": means.pop(self.task.report_keys[0].replace(" ", "_")),
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "skipped": self.state.skipped_steps,
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": per_device * self.flops_per_token / 1e12,
            "mfu": mfu(per_device, self.flops_per_token, self.peak),
            "mem_gb": _memory_gb(self.on_cpu),
            "consumed_samples": self.state.consumed_samples,
            **means,
        }
        self.logger.log(self.state.step, metrics)

    def run(self) -> int:
        """Train to `training.train_iters`; returns the exit code (0, 1 on repeated NaNs, 75 on a signal)."""
        try:
            return self._loop()
        finally:
            self.logger.close()

    def _loop(self) -> int:
        from megatron_qwen.training.schedule import lr_at

        t = self.cfg.training
        if t.train_iters == 0 and not self.resumed:
            self.save()  # train_iters=0 writes the initial weights: a common start for other layouts
        window = MetricWindow(self.task.report_keys)
        skipped_in_row = 0
        while self.state.step < t.train_iters:
            start = time.perf_counter()
            lr = lr_at(self.state.step, t.lr, t.min_lr, t.lr_warmup_iters, t.lr_decay_iters or t.train_iters, t.lr_decay_style)
            reports, grad_norm, updated = self.train_step(lr)
            self.state.step += 1
            self.state.consumed_samples += t.global_batch_size
            window.add(reports if updated else None, time.perf_counter() - start)
            skipped_in_row = 0 if updated else skipped_in_row + 1
            if not updated:
                self.state.skipped_steps += 1
                first = self.state.consumed_samples - t.global_batch_size
                self.say(f"step {self.state.step}: skipped (loss {reports[self.task.report_keys[0]].item()}, grad norm "
                         f"{grad_norm}); samples {first}..{self.state.consumed_samples - 1} ({skipped_in_row} in a row)")
                if skipped_in_row > t.max_skipped_in_row:
                    self.say(f"error: {skipped_in_row} non-finite steps in a row (training.max_skipped_in_row="
                             f"{t.max_skipped_in_row}); aborting without saving", error=True)
                    return 1
            if self.state.step % self.cfg.logging.log_interval == 0 or self.state.step == t.train_iters:
                self.log(window, lr, grad_norm)
                window = MetricWindow(self.task.report_keys)
            if self.valid_ds is not None and t.eval_interval and self.state.step % t.eval_interval == 0:
                self.logger.log(self.state.step, evaluate(self.cfg, self.model, self.valid_ds, self.task, self.dp_rank, self.layout.dp))
            preempted = self.preemption.any_rank()
            if preempted or (t.save_interval and self.state.step % t.save_interval == 0) or self.state.step == t.train_iters:
                self.save()
            if preempted and self.state.step < t.train_iters:  # at the last step the run is simply done
                self.say(f"signal received: saved at step {self.state.step}, exiting with {EXIT_PREEMPTED} so the job can be requeued")
                return EXIT_PREEMPTED
        return 0


def train(cfg: Config, task: Task) -> int:
    """Run (or resume) a training job for `task`; returns the process exit code."""
    return Trainer(cfg, task).run()


def evaluate(cfg: Config, model, valid_ds, task: Task, dp_rank: int, dp_size: int) -> dict[str, float]:
    """Each reported metric's mean over ``training.eval_iters`` global batches of the valid split."""
    from megatron_qwen.data.gpt import GlobalBatches
    from megatron_qwen.training.forward_backward import forward_backward

    t = cfg.training
    # Each validation reads the same batches, so curves are comparable across steps.
    batches = GlobalBatches(valid_ds, 0, t.global_batch_size, t.micro_batch_size, dp_rank, dp_size)
    for chunk in model:
        chunk.eval()
    totals = dict.fromkeys(task.report_keys, 0.0)
    with torch.no_grad():
        for _ in range(t.eval_iters):
            micro = batches.next_global_batch()
            reports = forward_backward(
                model, _iterators(model, micro), batches.num_microbatches, cfg.model.seq_length, t.micro_batch_size,
                task.forward_step, forward_only=True, report_keys=task.report_keys,
            )
            for key in task.report_keys:
                totals[key] += reports[key].item()
    for chunk in model:
        chunk.train()
    # The first key is the loss: logged as valid_loss; the others as valid_<key>.
    names = ["loss", *(key.replace(" ", "_") for key in task.report_keys[1:])]
    return {f"valid_{name}": totals[key] / t.eval_iters for name, key in zip(names, task.report_keys)}


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
    from megatron_qwen.data.gpt import DataError

    try:
        code = train(cfg, task)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        # A mistake in the config or the data: one clear line (from rank 0), not a traceback per rank.
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"error: {exc}", file=sys.stderr)
        code = 2
    from megatron_qwen.platform.launch import destroy_distributed

    destroy_distributed()
    sys.exit(code)
