"""The training skeleton every stage runs on: build, load, resume, then step, log, validate, save and exit.

A stage is a `Stage`: the model it trains, the models it holds frozen (each named by the config keys of its
checkpoint), its datasets, its megatron-core forward step (the loss), and optionally a per-batch preparation
that may run the frozen models (DPO's reference log-probabilities). The skeleton composes the shared parts:
the run context (`training.context`), model units (`training.units`), the global-batch sampler, the
`Checkpointer` (multi-unit, atomic saves; resume at any layout) and the metrics logger with progress and
ETA. It skips non-finite steps, saves and exits with `EXIT_PREEMPTED` on a signal, and returns the process's
exit code. A stage with its own step (PPO: rollouts, experience, updates) gives `Stage.step` and keeps the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from megatron_qwen.config import Config, ConfigError, load_config
from megatron_qwen.errors import UserError
from megatron_qwen.model.lora import adapters_disabled
from megatron_qwen.model.qwen import SCALAR_HEAD_KEY, Head
from megatron_qwen.platform.launch import destroy_distributed, detect_launch, refuse
from megatron_qwen.tokenizer import load_tokenizer
from megatron_qwen.training.checkpointer import Checkpointer
from megatron_qwen.training.context import EXIT_PREEMPTED, start_run
from megatron_qwen.training.flops import hardware_flops_per_token, model_flops_per_token, peak_flops, utilisation
from megatron_qwen.training.forward_backward import forward_backward, micro_batch_iterators
from megatron_qwen.training.moe_metrics import moe_metrics
from megatron_qwen.training.metrics import ProgressClock
from megatron_qwen.training.sampler import GlobalBatches
from megatron_qwen.training.units import ModelUnit, build_unit

__all__ = ["Model", "Stage", "StepResult", "Trainer", "run_stage", "train"]


@dataclass(frozen=True)
class Model:
    """One model of a stage: the config keys naming the checkpoint it starts from (the first one set wins; a
    trained model with none set starts from fresh weights, a frozen one is refused), its head, and for a trained
    model the config key of its peak learning rate (None: ``training.lr``)."""

    from_keys: tuple[str, ...] = ("training.init_from",)
    head: Head = "lm"  # language-model logits, or one scalar per token (reward, value)
    rope_at_positions: bool = False  # RoPE at each token's position id (packed rows, generation)
    lr_key: str | None = None

    @property
    def fresh_keys(self) -> tuple[str, ...]:
        """Weights that may start fresh when the checkpoint lacks them: a scalar head started from a language
        model (whose output layer is then left out)."""
        return (SCALAR_HEAD_KEY.rsplit(".", 1)[0] + ".",) if self.head == "scalar" else ()


@dataclass
class Stage:
    """What a stage plugs into the skeleton.

    trains: name -> the trained model(s); the first is saved at the checkpoint's root (where export and
    generation read a model), any other under its name. frozen: name -> a model loaded from its checkpoint
    at every start and resume, never saved, offloaded between uses (``training.offload_frozen``).
    build_datasets(cfg, tokenizer) -> (train, valid): map-style datasets of dicts of ``tokens``, ``labels``,
    ``loss_mask`` (and optionally ``position_ids``); valid may be None.
    forward_step: megatron-core forward_step_func (see `training.forward_backward.lm_forward_step`).
    prepare(trainer, micro_batches): per global batch (training and validation), before the trained model's
    forward; it may run the frozen models (`Trainer.frozen_model`) and add tensors to the micro-batches.
    check(cfg) -> problems: the stage's own config rules, checked before any process group exists.
    step(trainer) -> StepResult: a stage's own optimizer step instead of one forward-backward of the model; its
    reports are the step's metrics, logged as they are. start(trainer): for such a stage, once the models are
    built and loaded and the loop state restored (its own saved position is ``trainer.state.stage_state``).
    """

    name: str
    build_datasets: Callable
    forward_step: Callable
    trains: dict[str, Model]
    # The loss function's report keys; the first is the loss. Each is logged as its mean.
    report_keys: tuple[str, ...] = ("lm loss",)
    frozen: dict[str, Model] = field(default_factory=dict)
    prepare: Callable[[Trainer, list[dict]], None] | None = None
    check: Callable[[Config], list[str]] | None = None
    step: Callable[[Trainer], StepResult] | None = None
    start: Callable[[Trainer], None] | None = None


@dataclass
class StepResult:
    """One optimizer step: the reported means, whether the update was applied, the LR, the gradient norm and the
    samples it consumed (None: ``training.global_batch_size``; PPO: its prompts)."""

    reports: dict
    updated: bool
    lr: float
    grad_norm: float | None = None
    samples: int | None = None


@dataclass
class TrainState:
    """The loop's position, saved in every checkpoint."""

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    wandb_run_id: str | None = None
    stage_state: dict = field(default_factory=dict)  # a stage's own position (PPO: reward moments), JSON values


class MetricWindow:
    """Sums of the reported metrics and step times since the last log line."""

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys
        self.sums = dict.fromkeys(keys, 0.0)
        self.updates = self.steps = 0
        self.seconds = self.prepare_seconds = 0.0

    def add(self, reports: dict | None, seconds: float, prepare_seconds: float = 0.0) -> None:
        """One step: `reports` None for a skipped step (timed, not averaged)."""
        if reports is not None:
            for key in self.keys:
                self.sums[key] += float(reports[key])
            self.updates += 1
        self.steps += 1
        self.seconds += seconds
        self.prepare_seconds += prepare_seconds

    def means(self) -> dict:
        return {key.replace(" ", "_"): (self.sums[key] / self.updates if self.updates else float("nan"))
                for key in self.keys}


def config_value(cfg: Config, key: str):
    """The value of dotted config key `key` (``training.init_from``)."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def model_source(cfg: Config, model: Model) -> tuple[str, str] | None:
    """(config key, checkpoint path) that `model` starts from: the first of its keys that is set, or None."""
    return next(((key, config_value(cfg, key)) for key in model.from_keys if config_value(cfg, key)), None)


def check_stage(cfg: Config, stage: Stage) -> None:
    """Refuse, before any process group exists, a config the stage cannot run; ConfigError names the fix."""
    problems = list(stage.check(cfg)) if stage.check else []
    for name, model in stage.frozen.items():
        if model_source(cfg, model) is None:
            keys = " or ".join(model.from_keys)
            problems.append(f"the {stage.name} stage holds a frozen {name} model: set {keys} to its checkpoint")
    if stage.step is None and len(stage.trains) != 1:
        problems.append(f"the {stage.name} stage trains {len(stage.trains)} models; give Stage.step to update them")
    problems += peft_problems(cfg, stage)
    if problems:
        raise ConfigError(problems)


def peft_problems(cfg: Config, stage: Stage) -> list[str]:
    """What a stage cannot do with ``peft.method`` set: adapters go on a language model (not a reward model's
    scalar head) and train on a base checkpoint that its config key names."""
    if cfg.peft.method is None:
        return []
    models = [model for model in stage.trains.values() if model.head == "lm"]
    if not models:
        return [f"peft.method={cfg.peft.method}: the {stage.name} stage trains a scalar-head model, which takes no "
                "adapters; train it with every parameter (peft.method=null)"]
    if model_source(cfg, models[0]) is None:
        return [f"peft.method={cfg.peft.method} trains adapters on a frozen base model: set "
                f"{' or '.join(models[0].from_keys)} to its checkpoint"]
    return []


class Trainer:
    """One training job of `stage`: `Trainer(cfg, stage).run()` builds everything, resumes, then loops.

    `after_save(trainer) -> metrics`, when given, runs after the checkpoints of the steps `evaluation.interval`
    names (and the last one): the benchmarks of `evaluation.tasks`, logged with the step.
    """

    def __init__(self, cfg: Config, stage: Stage, after_save: Callable | None = None):
        if cfg.evaluation.tasks and after_save is None:
            raise ConfigError([f"evaluation.tasks runs benchmarks on a language model; the {stage.name} stage has "
                               "none to run them on: evaluate its checkpoints' policy with `megatron-qwen evaluate`"])
        self.after_save = after_save if cfg.evaluation.tasks else None
        check_stage(cfg, stage)
        self.ctx = ctx = start_run(cfg)
        self.cfg, self.stage = ctx.cfg, stage
        t, m = self.cfg.training, self.cfg.model
        self.tokenizer = load_tokenizer(self.cfg.data.tokenizer_file, self.cfg.model.family)
        self.train_ds, self.valid_ds = stage.build_datasets(self.cfg, self.tokenizer)
        self.units: dict[str, ModelUnit] = {}
        for i, (name, model) in enumerate(stage.trains.items()):
            lr = config_value(self.cfg, model.lr_key) if model.lr_key else None
            self.units[name] = build_unit(self.cfg, ctx.runtime, name, head=model.head,
                                          rope_at_positions=model.rope_at_positions, lr=lr,
                                          namespace="" if i == 0 else name)
        # A frozen model that is the base of the model trained with adapters is that model with its adapters off:
        # no copy of it is built (DPO's and PPO's reference).
        self.adapter_unit = next((u for u in self.units.values() if u.adapters), None)
        base = model_source(self.cfg, stage.trains[self.adapter_unit.name]) if self.adapter_unit else None
        self.base_views = {name for name, model in stage.frozen.items()
                           if base is not None and model.head == "lm" and model_source(self.cfg, model)[1] == base[1]}
        self.frozen = {name: build_unit(self.cfg, ctx.runtime, name, head=model.head,
                                        rope_at_positions=model.rope_at_positions, trained=False)
                       for name, model in stage.frozen.items() if name not in self.base_views}
        self.checkpointer = Checkpointer(ctx)
        self.state = TrainState()
        bases = {name: model_source(self.cfg, model) or (model.from_keys[0], None)
                 for name, model in stage.trains.items()}
        saved = self.checkpointer.resume(list(self.units.values()), bases)
        if saved is not None:
            self.state = TrainState(**{k: saved[k] for k in dataclasses.asdict(TrainState()) if k in saved})
        else:
            for name, model in stage.trains.items():
                source = model_source(self.cfg, model)
                if source is not None:
                    key, path = source
                    self.checkpointer.init_from(self.units[name], path, f"{key}={path}", model.fresh_keys)
        for name, model in stage.frozen.items():
            if name in self.base_views:
                ctx.say(f"the {name} model is the {self.adapter_unit.name} model with its adapters off")
                continue
            key, path = model_source(self.cfg, model)
            self.checkpointer.load_frozen(self.frozen[name], path, f"{key}={path}", t.offload_frozen)
        self.state.wandb_run_id = ctx.logger.run_id
        self.batches = GlobalBatches(self.train_ds, self.state.consumed_samples, t.global_batch_size,
                                     t.micro_batch_size, ctx.dp_rank, ctx.layout.dp)
        first = next(iter(stage.trains.values()))
        shape = (m.hidden_size, m.num_layers, m.ffn_hidden_size, m.padded_vocab_size, m.seq_length)
        widths = dict(query_width=m.num_attention_heads * m.head_dim, kv_width=m.kv_heads * m.head_dim)
        self.model_flops = model_flops_per_token(*shape, head=first.head, **widths)
        self.hardware_flops = hardware_flops_per_token(*shape, head=first.head, recompute=t.recompute, **widths)
        self.peak = peak_flops(None if ctx.runtime.on_cpu else torch.cuda.get_device_name(),
                               self.cfg.logging.peak_tflops)
        self.prepare_seconds = 0.0
        self.moe = moe_metrics(self.model, self.cfg)  # None for a dense model
        self.report_keys = self.stage.report_keys + (self.moe.keys if self.moe else ())
        if stage.start is not None:
            stage.start(self)

    @property
    def unit(self) -> ModelUnit:
        """The trained model (the first, for a stage that trains several)."""
        return next(iter(self.units.values()))

    @property
    def model(self) -> list[torch.nn.Module]:
        return self.unit.chunks

    @contextlib.contextmanager
    def frozen_model(self, name: str):
        """The frozen unit `name` on the device for the duration of the block (offloaded again after it). The base
        of a model trained with adapters is that model, in eval mode with its adapters off for the block."""
        if name in self.base_views:
            unit = self.adapter_unit
            training = unit.modules[0].training
            unit.eval()
            try:
                with adapters_disabled(unit.modules):
                    yield unit
            finally:
                if training:
                    unit.train()
            return
        unit = self.frozen[name]
        offload = self.cfg.training.offload_frozen
        if offload:
            unit.onload()
        try:
            yield unit
        finally:
            if offload:
                unit.offload()

    def save(self) -> None:
        self.checkpointer.save(self.state.step, list(self.units.values()), dataclasses.asdict(self.state))

    def prepare(self, micro: list[dict]) -> None:
        """Run the stage's per-batch preparation on `micro` (timed into `prepare_seconds`)."""
        if self.stage.prepare is not None:
            start = time.perf_counter()
            self.stage.prepare(self, micro)
            self.prepare_seconds += time.perf_counter() - start

    def forward_backward(self, micro: list[dict], forward_only: bool = False) -> dict:
        """The trained model's forward (and backward) over this rank's micro-batches of one global batch."""
        t = self.cfg.training
        return forward_backward(
            self.model, micro_batch_iterators(self.model, micro), len(micro), self.cfg.model.seq_length,
            t.micro_batch_size, self.stage.forward_step, forward_only=forward_only, report_keys=self.stage.report_keys,
        )

    def train_step(self) -> StepResult:
        """One optimizer step: the stage's own, or one forward-backward of the trained model on the next global
        batch (skipped when the loss or the gradient norm is not finite)."""
        if self.stage.step is not None:
            return self.stage.step(self)
        lr = self.unit.set_lr(self.state.step)
        self.unit.zero_grad()
        micro = self.batches.next_global_batch()
        self.prepare(micro)
        reports = self.forward_backward(micro)
        if self.moe:
            reports.update(self.moe.step_reports(len(micro)))
        loss_key = self.stage.report_keys[0]
        if self.ctx.faults.nan_loss(self.state.step + 1):
            reports[loss_key] = torch.tensor(float("nan"))
        if not torch.isfinite(reports[loss_key]):
            return StepResult(reports, False, lr)
        grad_norm, updated = self.unit.step()
        return StepResult(reports, updated, lr, grad_norm)

    def log(self, window: MetricWindow, result: StepResult, clock: ProgressClock) -> None:
        t = self.cfg.training
        tokens_per_s = t.global_batch_size * self.cfg.model.seq_length * window.steps / window.seconds
        per_device = tokens_per_s / self.ctx.layout.world_size
        means = window.means()
        metrics = {
            "loss": means.pop(self.stage.report_keys[0].replace(" ", "_")),
            "lr": result.lr,
            "grad_norm": None if result.grad_norm is None else float(result.grad_norm),
            "skipped": self.state.skipped_steps,
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": per_device * self.model_flops / 1e12,
            "mfu": utilisation(per_device, self.model_flops, self.peak),
            "hfu": utilisation(per_device, self.hardware_flops, self.peak),
            "mem_gb": _memory_gb(self.ctx.runtime.on_cpu),
            "consumed_samples": self.state.consumed_samples,
            **means,
        }
        if self.stage.prepare is not None:  # the share of the step the frozen models take
            metrics["prepare_seconds"] = window.prepare_seconds / window.steps
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
        window = MetricWindow(self.report_keys)
        clock = ProgressClock(self.state.step, t.train_iters)
        skipped_in_row = 0
        while self.state.step < t.train_iters:
            start, self.prepare_seconds = time.perf_counter(), 0.0
            result = self.train_step()
            self.state.step += 1
            self.state.consumed_samples += t.global_batch_size if result.samples is None else result.samples
            if self.stage.step is None:
                window.add(result.reports if result.updated else None, time.perf_counter() - start,
                           self.prepare_seconds)
            skipped_in_row = 0 if result.updated else skipped_in_row + 1
            if not result.updated:
                self.state.skipped_steps += 1
                first = self.state.consumed_samples - t.global_batch_size
                ctx.say(f"step {self.state.step}: skipped (loss {float(result.reports[self.stage.report_keys[0]])}, "
                        f"grad norm {result.grad_norm}); samples {first}..{self.state.consumed_samples - 1} "
                        f"({skipped_in_row} in a row)")
                if skipped_in_row > t.max_skipped_in_row:
                    ctx.say(f"error: {skipped_in_row} non-finite steps in a row (training.max_skipped_in_row="
                            f"{t.max_skipped_in_row}); aborting without saving", error=True)
                    return 1
            if self.state.step % self.cfg.logging.log_interval == 0 or self.state.step == t.train_iters:
                if self.stage.step is None:
                    self.log(window, result, clock)
                else:  # a stage's own step reports its metrics whole
                    ctx.logger.log(self.state.step, result.reports, progress=clock.progress(self.state.step))
                window = MetricWindow(self.report_keys)
            if self.valid_ds is not None and t.eval_interval and self.state.step % t.eval_interval == 0:
                ctx.logger.log(self.state.step, self.evaluate())
            preempted = ctx.preemption.any_rank(ctx.runtime.device)
            periodic = t.save_interval and self.state.step % t.save_interval == 0
            every = self.cfg.evaluation.interval
            benchmark = self.after_save is not None and not preempted and (
                self.state.step == t.train_iters or (every and self.state.step % every == 0))
            if preempted or periodic or benchmark or self.state.step == t.train_iters:
                self.save()
            if benchmark:  # on the weights just saved, so the figures belong to that checkpoint
                ctx.logger.log(self.state.step, self.after_save(self))
            if preempted and self.state.step < t.train_iters:  # at the last step the run is simply done
                ctx.say(f"signal received: saved at step {self.state.step}, exiting with {EXIT_PREEMPTED} so the job "
                        "can be requeued")
                return EXIT_PREEMPTED
        return 0

    def evaluate(self) -> dict[str, float]:
        """Each reported metric's mean over ``training.eval_iters`` global batches of the valid split."""
        t, ctx, keys = self.cfg.training, self.ctx, self.stage.report_keys
        # Each validation reads the same batches, so curves are comparable across steps.
        batches = GlobalBatches(self.valid_ds, 0, t.global_batch_size, t.micro_batch_size, ctx.dp_rank, ctx.layout.dp)
        self.unit.eval()
        totals = dict.fromkeys(keys, 0.0)
        with torch.no_grad():
            for _ in range(t.eval_iters):
                micro = batches.next_global_batch()
                self.prepare(micro)
                reports = self.forward_backward(micro, forward_only=True)
                for key in keys:
                    totals[key] += reports[key].item()
        self.unit.train()
        # The first key is the loss: logged as valid_loss; the others as valid_<key>.
        names = ["loss", *(key.replace(" ", "_") for key in keys[1:])]
        return {f"valid_{name}": totals[key] / t.eval_iters for name, key in zip(names, keys)}


def train(cfg: Config, stage: Stage, after_save: Callable | None = None) -> int:
    """Run (or resume) a training job of `stage`; returns the process exit code (`after_save`: see Trainer)."""
    return Trainer(cfg, stage, after_save).run()


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
