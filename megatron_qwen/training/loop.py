"""The training loop of the single-model stages (pretrain, SFT, reward): build, resume, then step, log,
validate and save.

A stage is a `Task`: how to build its datasets, which model head it trains, and its megatron-core
forward step. The loop composes the shared parts: the run context (`training.context`), one trained
model unit (`training.units`), the global-batch sampler, checkpoints (`checkpoint.io`) and the
metrics logger. A stage with several models (PPO) composes the same parts in a loop of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from megatron_qwen.checkpoint import directory as ckdir
from megatron_qwen.config import Config, ConfigError, load_config
from megatron_qwen.errors import UserError
from megatron_qwen.model.qwen import SCALAR_HEAD_KEY, Head
from megatron_qwen.platform.launch import destroy_distributed, detect_launch, refuse
from megatron_qwen.tokenizer import load_tokenizer
from megatron_qwen.checkpoint import io as checkpointing
from megatron_qwen.training.context import EXIT_PREEMPTED, RunContext, start_run
from megatron_qwen.training.flops import hardware_flops_per_token, model_flops_per_token, peak_flops, utilisation
from megatron_qwen.training.forward_backward import forward_backward, micro_batch_iterators
from megatron_qwen.training.metrics import ProgressClock
from megatron_qwen.training.sampler import GlobalBatches
from megatron_qwen.training.units import ModelUnit, build_unit


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
    head: Head = "lm"  # the model's head: language-model logits, or one scalar per token (reward)
    rope_at_positions: bool = False  # RoPE at each token's position id (packed SFT rows)

    @property
    def fresh_keys(self) -> tuple[str, ...]:
        """Weights that may start fresh when ``training.init_from`` lacks them: a scalar head started from a
        language model (whose output layer is then left out)."""
        return (SCALAR_HEAD_KEY.rsplit(".", 1)[0] + ".",) if self.head == "scalar" else ()


@dataclass
class TrainState:
    """The loop's position, saved in every checkpoint."""

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    wandb_run_id: str | None = None


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


class Checkpointer:
    """Where a job's checkpoints go and come from: resume, initial weights, periodic saves, carried files."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.carried_files: dict[str, str] = {}  # e.g. a converted model's hf_source.json, kept in every save

    def resume(self, units: list[ModelUnit]) -> dict | None:
        """Load the checkpoint the run continues from (any layout) into `units`; its loop state, or None."""
        ctx = self.ctx
        if ctx.resume_from is None:
            return None
        layout = dataclasses.asdict(ctx.layout)
        saved_layout = ctx.saved_state.get("layout")
        # RNG streams are per rank: they are restored only at the layout that wrote them.
        saved = checkpointing.load_checkpoint(ctx.resume_from, units, restore_rng=saved_layout == layout,
                                              trust=ctx.cfg.training.trust_checkpoint)
        change = "" if saved_layout == layout else f"; layout changed from {saved_layout} to {layout}"
        consumed = ", ".join(f"{v} {k.removeprefix('consumed_').replace('_', ' ')} consumed"
                             for k, v in saved.items() if k.startswith("consumed_"))
        ctx.say(f"resumed from {ctx.resume_from} at step {saved['step']} ({consumed}){change}")
        self.carry_from(ctx.resume_from)
        return saved

    def init_from(self, unit: ModelUnit, path: str, what: str, fresh: tuple[str, ...] = ()) -> None:
        """Start `unit` from the weights of checkpoint `path` (named `what` in messages)."""
        trust = self.ctx.cfg.training.trust_checkpoint
        started_fresh = checkpointing.load_weights(unit.modules, path, what, fresh=fresh, trust=trust)
        note = f" ({', '.join(started_fresh)} started fresh)" if started_fresh else ""
        self.ctx.say(f"initialised {unit.name} weights from {path}{note}")
        self.carry_from(Path(path))

    def carry_from(self, path: Path) -> None:
        # A model converted from Hugging Face records its source vocabulary; exports after training need it.
        source = path / ckdir.HF_SOURCE_FILE
        if source.is_file():
            self.carried_files[source.name] = source.read_text()

    def save(self, step: int, units: list[ModelUnit], train_state: dict) -> None:
        ctx, t = self.ctx, self.ctx.cfg.training
        train_state = dict(train_state, layout=dataclasses.asdict(ctx.layout), config=ctx.cfg.to_dict())
        files = {ckdir.MODEL_CONFIG_FILE: yaml.safe_dump(ctx.cfg.to_dict(), sort_keys=False), **self.carried_files}
        path = checkpointing.save_checkpoint(ctx.save_dir, step, units, train_state, t.keep_last, files, ctx.faults.before_commit)
        ctx.say(f"saved checkpoint {path}")


class Trainer:
    """One single-model training job: `Trainer(cfg, task).run()` builds everything, resumes, then loops."""

    def __init__(self, cfg: Config, task: Task):
        self.ctx = ctx = start_run(cfg)
        self.cfg, self.task = ctx.cfg, task
        t, m = self.cfg.training, self.cfg.model
        self.train_ds, self.valid_ds = task.build_datasets(self.cfg, load_tokenizer(self.cfg.data.tokenizer_file))
        self.unit = build_unit(self.cfg, ctx.runtime, task.name, head=task.head, rope_at_positions=task.rope_at_positions)
        self.checkpointer = Checkpointer(ctx)
        self.state = TrainState()
        saved = self.checkpointer.resume([self.unit])
        if saved is not None:
            self.state = TrainState(**{k: saved[k] for k in dataclasses.asdict(TrainState()) if k in saved})
        elif t.init_from:
            self.checkpointer.init_from(self.unit, t.init_from, f"training.init_from={t.init_from}", task.fresh_keys)
        self.state.wandb_run_id = ctx.logger.run_id
        self.batches = GlobalBatches(self.train_ds, self.state.consumed_samples, t.global_batch_size, t.micro_batch_size,
                                     ctx.dp_rank, ctx.layout.dp)
        shape = (m.hidden_size, m.num_layers, m.ffn_hidden_size, m.padded_vocab_size, m.seq_length)
        self.model_flops = model_flops_per_token(*shape, head=task.head)
        self.hardware_flops = hardware_flops_per_token(*shape, head=task.head, recompute=t.recompute)
        self.peak = peak_flops(None if ctx.runtime.on_cpu else torch.cuda.get_device_name(), self.cfg.logging.peak_tflops)

    @property
    def model(self) -> list[torch.nn.Module]:
        return self.unit.chunks

    def save(self) -> None:
        self.checkpointer.save(self.state.step, [self.unit], dataclasses.asdict(self.state))

    def train_step(self) -> tuple[float, dict, float | None, bool]:
        """One optimizer step on the next global batch: (lr, reports, grad norm, updated)."""
        t = self.cfg.training
        lr = self.unit.set_lr(self.state.step)
        self.unit.zero_grad()
        micro = self.batches.next_global_batch()
        reports = forward_backward(
            self.model, micro_batch_iterators(self.model, micro), self.batches.num_microbatches, self.cfg.model.seq_length,
            t.micro_batch_size, self.task.forward_step, report_keys=self.task.report_keys,
        )
        if self.ctx.faults.nan_loss(self.state.step + 1):
            reports[self.task.report_keys[0]] = torch.tensor(float("nan"))
        if not torch.isfinite(reports[self.task.report_keys[0]]):
            return lr, reports, None, False
        grad_norm, updated = self.unit.step()
        return lr, reports, grad_norm, updated

    def log(self, window: MetricWindow, lr: float, grad_norm: float | None, clock: ProgressClock) -> None:
        t = self.cfg.training
        tokens_per_s = t.global_batch_size * self.cfg.model.seq_length * window.steps / window.seconds
        per_device = tokens_per_s / self.ctx.layout.world_size
        means = window.means()
        metrics = {
            "loss": means.pop(self.task.report_keys[0].replace(" ", "_")),
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "skipped": self.state.skipped_steps,
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": per_device * self.model_flops / 1e12,
            "mfu": utilisation(per_device, self.model_flops, self.peak),
            "hfu": utilisation(per_device, self.hardware_flops, self.peak),
            "mem_gb": _memory_gb(self.ctx.runtime.on_cpu),
            "consumed_samples": self.state.consumed_samples,
            **means,
        }
        self.ctx.logger.log(self.state.step, metrics, progress=clock.progress(self.state.step))

    def run(self) -> int:
        """Train to `training.train_iters`; returns the exit code (0, 1 on repeated NaNs, 75 on a signal)."""
        try:
            return self._loop()
        finally:
            self.ctx.close()

    def _loop(self) -> int:
        ctx, t = self.ctx, self.cfg.training
        if t.train_iters == 0 and ctx.resume_from is None:
            self.save()  # train_iters=0 writes the initial weights (to inspect them, or start other runs from)
        window = MetricWindow(self.task.report_keys)
        clock = ProgressClock(self.state.step, t.train_iters)
        skipped_in_row = 0
        while self.state.step < t.train_iters:
            start = time.perf_counter()
            lr, reports, grad_norm, updated = self.train_step()
            self.state.step += 1
            self.state.consumed_samples += t.global_batch_size
            window.add(reports if updated else None, time.perf_counter() - start)
            skipped_in_row = 0 if updated else skipped_in_row + 1
            if not updated:
                self.state.skipped_steps += 1
                first = self.state.consumed_samples - t.global_batch_size
                ctx.say(f"step {self.state.step}: skipped (loss {reports[self.task.report_keys[0]].item()}, grad norm "
                        f"{grad_norm}); samples {first}..{self.state.consumed_samples - 1} ({skipped_in_row} in a row)")
                if skipped_in_row > t.max_skipped_in_row:
                    ctx.say(f"error: {skipped_in_row} non-finite steps in a row (training.max_skipped_in_row="
                            f"{t.max_skipped_in_row}); aborting without saving", error=True)
                    return 1
            if self.state.step % self.cfg.logging.log_interval == 0 or self.state.step == t.train_iters:
                self.log(window, lr, grad_norm, clock)
                window = MetricWindow(self.task.report_keys)
            if self.valid_ds is not None and t.eval_interval and self.state.step % t.eval_interval == 0:
                ctx.logger.log(self.state.step, evaluate(self.cfg, self.unit, self.valid_ds, self.task, ctx))
            preempted = ctx.preemption.any_rank(ctx.runtime.device)
            if preempted or (t.save_interval and self.state.step % t.save_interval == 0) or self.state.step == t.train_iters:
                self.save()
            if preempted and self.state.step < t.train_iters:  # at the last step the run is simply done
                ctx.say(f"signal received: saved at step {self.state.step}, exiting with {EXIT_PREEMPTED} so the job can be requeued")
                return EXIT_PREEMPTED
        return 0


def train(cfg: Config, task: Task) -> int:
    """Run (or resume) a training job for `task`; returns the process exit code."""
    return Trainer(cfg, task).run()


def evaluate(cfg: Config, unit: ModelUnit, valid_ds, task: Task, ctx: RunContext) -> dict[str, float]:
    """Each reported metric's mean over ``training.eval_iters`` global batches of the valid split."""
    t = cfg.training
    # Each validation reads the same batches, so curves are comparable across steps.
    batches = GlobalBatches(valid_ds, 0, t.global_batch_size, t.micro_batch_size, ctx.dp_rank, ctx.layout.dp)
    unit.eval()
    totals = dict.fromkeys(task.report_keys, 0.0)
    with torch.no_grad():
        for _ in range(t.eval_iters):
            micro = batches.next_global_batch()
            reports = forward_backward(
                unit.chunks, micro_batch_iterators(unit.chunks, micro), batches.num_microbatches, cfg.model.seq_length,
                t.micro_batch_size, task.forward_step, forward_only=True, report_keys=task.report_keys,
            )
            for key in task.report_keys:
                totals[key] += reports[key].item()
    unit.train()
    # The first key is the loss: logged as valid_loss; the others as valid_<key>.
    names = ["loss", *(key.replace(" ", "_") for key in task.report_keys[1:])]
    return {f"valid_{name}": totals[key] / t.eval_iters for name, key in zip(names, task.report_keys)}


def _memory_gb(on_cpu: bool) -> float:
    if on_cpu:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return torch.cuda.max_memory_allocated() / 2**30


def run_stage(name: str, train_fn: Callable[[Config], int], argv: list[str] | None = None) -> None:
    """Command-line entry of a stage: ``python -m megatron_qwen.stages.NAME CONFIG.yaml [key=value ...]``;
    `train_fn(cfg)` runs the job and returns the exit code."""
    parser = argparse.ArgumentParser(prog=f"python -m megatron_qwen.stages.{name}")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 training.train_iters=100")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, stage=name)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        code = train_fn(cfg)
    except (UserError, FileNotFoundError) as exc:
        # A mistake in the config, the data or a checkpoint path: one clear line (from rank 0), not a
        # traceback per rank.
        if torch.distributed.is_initialized():
            if torch.distributed.get_rank() == 0:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            code = 2
        else:  # refused before any process group: every rank exits, rank 0 reporting
            code = refuse(detect_launch(), str(exc))
    destroy_distributed()
    sys.exit(code)
