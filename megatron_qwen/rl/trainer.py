"""The machinery of the PPO stage: a policy and a value model trained, a reference and a reward model held
frozen, all four at the training layout on every rank, composed from the same parts as the single-model
loop (run context, model units, checkpointer, megatron-core schedules). The step itself, in the order the
recipe runs it, is `megatron_qwen.stages.ppo.ppo_step`.

Each step: this data-parallel rank's prompts, ``ppo.samples_per_prompt`` responses each from the KV-cache
engine; old and reference log-probabilities and values recomputed by the training-layout forward (never
taken from the sampler); scores from the reward model or function, normalised by their running moments;
the KL penalty; advantages (GAE, whitened over the data-parallel batch, or GRPO); then ``ppo.epochs`` x
``ppo.minibatches`` optimizer steps of the value model and (after ``ppo.critic_warmup_steps``) the policy,
with ``ppo.ptx_coef`` times the language-model loss of pretraining micro-batches in the policy's steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from megatron.core import parallel_state

from megatron_qwen.checkpoint import directory as ckdir
from megatron_qwen.config import TOKENIZER_VOCAB_SIZE, Config, resolve
from megatron_qwen.data.chat_datasets import build_prompt_dataset
from megatron_qwen.data.gpt import build_gpt_datasets
from megatron_qwen.errors import ConfigError
from megatron_qwen.inference.engine import GenerationEngine
from megatron_qwen.inference.sampling import SamplingParams
from megatron_qwen.model.qwen import SCALAR_HEAD_KEY
from megatron_qwen.platform.launch import detect_launch
from megatron_qwen.rl import steps as ppo_steps
from megatron_qwen.rl.experience import Rollouts, Rows, gae_advantages, grpo_advantages, layout_rows, per_token_rewards
from megatron_qwen.rl.ppo_math import explained_variance
from megatron_qwen.rl.rewards import RewardFunctionError, RunningMoments, call_reward_fn, load_reward_fn
from megatron_qwen.tokenizer import load_tokenizer
from megatron_qwen.checkpoint import io as checkpointing
from megatron_qwen.training.context import EXIT_PREEMPTED, start_run
from megatron_qwen.training.forward_backward import forward_backward, forward_collect, micro_batch_iterators, reduce_reports
from megatron_qwen.training.loop import Checkpointer
from megatron_qwen.training.metrics import ProgressClock
from megatron_qwen.training.sampler import GlobalBatches
from megatron_qwen.training.units import ModelUnit, build_unit

FRESH_HEAD = (SCALAR_HEAD_KEY.rsplit(".", 1)[0] + ".",)  # a value model started from a language model


@dataclass
class PPOState:
    """The loop's position, saved in every checkpoint (JSON-friendly values only)."""

    step: int = 0
    consumed_prompts: int = 0
    consumed_ptx_samples: int = 0
    reward_moments: dict = field(default_factory=lambda: RunningMoments().state_dict())
    wandb_run_id: str | None = None


def validate_ppo(cfg: Config, world_size: int) -> None:
    """Refuse, before any process group exists, a PPO configuration that cannot run; ConfigError names the fix."""
    p, t = cfg.ppo, cfg.training
    problems = []
    if not p.policy_from:
        problems.append("ppo.policy_from is not set: give the SFT checkpoint the policy starts from")
    if t.init_from:
        problems.append(f"training.init_from={t.init_from!r} does not apply to PPO: the policy starts from ppo.policy_from")
    if bool(p.reward_from) == bool(p.reward_fn):
        problems.append("set exactly one of ppo.reward_from (a reward-model checkpoint) and ppo.reward_fn "
                        "(package.module:function)" + (f"; both are set" if p.reward_from else "; neither is set"))
    for key in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "epochs", "minibatches"):
        if getattr(p, key) < 1:
            problems.append(f"ppo.{key}={getattr(p, key)} must be >= 1")
    if p.estimator == "grpo" and p.samples_per_prompt < 2:
        problems.append(f"ppo.estimator=grpo compares a prompt's samples: ppo.samples_per_prompt={p.samples_per_prompt} must be >= 2")
    if p.max_new_tokens >= cfg.model.seq_length:
        problems.append(f"ppo.max_new_tokens={p.max_new_tokens} leaves no room for a prompt within model.seq_length="
                        f"{cfg.model.seq_length}; lower it or raise model.seq_length")
    if cfg.model.fp8 is not None:
        problems.append(f"model.fp8={cfg.model.fp8}: PPO generates one token at a time, shapes the FP8 GEMMs do not take; "
                        "train PPO without FP8 (model.fp8=null)")
    if cfg.model.hidden_dropout or cfg.model.attention_dropout:
        problems.append("PPO needs the old log-probabilities and the first update's to agree: set model.hidden_dropout=0 and "
                        "model.attention_dropout=0")
    if problems:
        raise ConfigError(problems)
    _, layout, _ = resolve(cfg, world_size)
    if p.prompts_per_step % layout.dp:
        problems.append(f"ppo.prompts_per_step={p.prompts_per_step} does not split over {layout.dp} data-parallel ranks; "
                        f"use a multiple of {layout.dp}")
    else:
        rollouts = p.prompts_per_step // layout.dp * p.samples_per_prompt
        unit = p.minibatches * t.micro_batch_size
        if rollouts % unit:
            problems.append(f"{rollouts} rollouts per data-parallel rank (ppo.prompts_per_step / DP x ppo.samples_per_prompt) "
                            f"do not split into ppo.minibatches={p.minibatches} x training.micro_batch_size="
                            f"{t.micro_batch_size}; make them a multiple of {unit}")
    if p.reward_fn:
        load_reward_fn(p.reward_fn)
    for key in ("policy_from", "reference_from", "reward_from", "value_from"):
        path = getattr(p, key)
        if path:
            problems += _model_mismatch(f"ppo.{key}", path, cfg)
    if problems:
        raise ConfigError(problems)


def _model_mismatch(key: str, path: str, cfg: Config) -> list[str]:
    """The model sizes a checkpoint differs in from ``model.*`` (all four models share one shape)."""
    if not ckdir.is_checkpoint(path):
        return [f"{key}={path} is not a megatron-core checkpoint (no {ckdir.COMPLETE_MARKER}); check the path"]
    if not (Path(path) / ckdir.MODEL_CONFIG_FILE).is_file():
        return []  # weights only: load_weights checks every tensor's shape
    theirs = ckdir.read_model_config(path)
    fields = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "padded_vocab_size")
    return [f"{key}={path} has model.{name}={getattr(theirs, name)} but this run has {getattr(cfg.model, name)}; the four "
            "PPO models must share one shape: set model.* to the SFT model's" for name in fields
            if getattr(theirs, name) != getattr(cfg.model, name)]


class PPOTrainer:
    """One PPO job: `PPOTrainer(cfg).run()` builds the four models, resumes, then loops."""

    def __init__(self, cfg: Config, step: Callable[["PPOTrainer"], dict]):
        validate_ppo(cfg, detect_launch().world_size)
        self.step = step  # one PPO step (stages/ppo.py): its metrics
        self.ctx = ctx = start_run(cfg)
        self.cfg = cfg = ctx.cfg
        p, t = cfg.ppo, cfg.training
        self.tokenizer = load_tokenizer(cfg.data.tokenizer_file)
        self.prompts = build_prompt_dataset(cfg)
        self.vocab_limit = min(cfg.model.padded_vocab_size, TOKENIZER_VOCAB_SIZE)
        self.texts = self.vocab_limit >= TOKENIZER_VOCAB_SIZE  # reward functions get decoded text with Qwen's vocabulary
        runtime = ctx.runtime
        self.policy = build_unit(cfg, runtime, "policy", rope_at_positions=True)
        self.value = None if p.estimator == "grpo" else build_unit(cfg, runtime, "value", head="scalar", lr=p.value_lr,
                                                                   namespace="value")
        self.reference = build_unit(cfg, runtime, "reference", trained=False)
        self.reward_model = build_unit(cfg, runtime, "reward", head="scalar", trained=False) if p.reward_from else None
        self.reward_fn = load_reward_fn(p.reward_fn) if p.reward_fn else None
        self.trained = [unit for unit in (self.policy, self.value) if unit is not None]
        self.checkpointer = Checkpointer(ctx)
        self.state = PPOState()
        saved = self.checkpointer.resume(self.trained)
        if saved is not None:
            self.state = PPOState(**{k: saved[k] for k in dataclasses.asdict(PPOState()) if k in saved})
        else:
            self.checkpointer.init_from(self.policy, p.policy_from, f"ppo.policy_from={p.policy_from}")
            if self.value is not None:
                source = p.value_from or p.reward_from or p.policy_from
                self.checkpointer.init_from(self.value, source, f"ppo.value_from={source}", fresh=FRESH_HEAD)
        self._load_frozen(self.reference, p.reference_from or p.policy_from, "ppo.reference_from")
        if self.reward_model is not None:
            self._load_frozen(self.reward_model, p.reward_from, "ppo.reward_from")
        self.moments = RunningMoments(**self.state.reward_moments)
        self.state.wandb_run_id = ctx.logger.run_id
        self.engine = GenerationEngine(self.policy.chunks, self.vocab_limit)
        self.stop_ids = self.tokenizer.generation_stop_ids(self.vocab_limit, p.stop_ids)
        self.steps = ppo_steps.steps(self.vocab_limit, p.temperature, p.clip_ratio, p.value_clip,
                                     p.kl_coef if p.estimator == "grpo" else 0.0)
        self.dp_group = parallel_state.get_data_parallel_group()
        self.last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.ptx = None
        if p.ptx_coef > 0:
            if not p.ptx_data:
                raise ConfigError([f"ppo.ptx_coef={p.ptx_coef} needs pretraining shards in ppo.ptx_data"])
            ptx_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, paths=list(p.ptx_data)),
                                          training=dataclasses.replace(t, train_iters=t.train_iters * p.epochs * p.minibatches,
                                                                       global_batch_size=p.ptx_microbatches * t.micro_batch_size * ctx.layout.dp,
                                                                       eval_interval=0))
            train, _, _ = build_gpt_datasets(ptx_cfg, self.tokenizer.eod_id, self.tokenizer.n_vocab)
            self.ptx = GlobalBatches(train, self.state.consumed_ptx_samples, ptx_cfg.training.global_batch_size,
                                     t.micro_batch_size, ctx.dp_rank, ctx.layout.dp)

    def _load_frozen(self, unit: ModelUnit, path: str, key: str) -> None:
        checkpointing.load_weights(unit.modules, path, f"{key}={path}", trust=self.cfg.training.trust_checkpoint)
        if self.cfg.ppo.offload_frozen:
            unit.offload()
        self.ctx.say(f"loaded the frozen {unit.name} model from {path}")

    @contextlib.contextmanager
    def frozen_on_device(self, unit: ModelUnit):
        """The block runs with frozen `unit` on its device: with ``ppo.offload_frozen`` it is brought back from
        pinned host memory for the block and its device memory freed after; without, it stays resident."""
        if not self.cfg.ppo.offload_frozen:
            yield
            return
        unit.onload()
        try:
            yield
        finally:
            unit.offload()

    # ------------------------------------------------------------------ one step

    def next_prompts(self) -> tuple[list[list[int]], list[int]]:
        """This rank's prompts of the next step and their indices among the step's prompts."""
        p, layout = self.cfg.ppo, self.ctx.layout
        per_rank = p.prompts_per_step // layout.dp
        first = self.ctx.dp_rank * per_rank
        start = self.state.consumed_prompts
        return [self.prompts[start + first + i] for i in range(per_rank)], [first + i for i in range(per_rank)]

    def generate(self, prompts: list[list[int]], indices: list[int]) -> Rollouts:
        """`ppo.samples_per_prompt` responses per prompt (each prompt's samples side by side)."""
        p, t = self.cfg.ppo, self.cfg.training
        samples = p.samples_per_prompt
        batch = [prompt for prompt in prompts for _ in range(samples)]
        # A seed per step and rollout (its index among the step's rollouts): reproducible on resume, and the same
        # rollouts whatever the data-parallel split.
        first = indices[0] * samples
        seeds = tuple((t.seed * 1_000_003 + self.state.step * 100_003 + first + i) % 2**63 for i in range(len(batch)))
        params = SamplingParams(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
                                stop_ids=self.stop_ids, row_seeds=seeds)
        result = self.engine.generate(batch, params)
        self.policy.train()
        return Rollouts(batch, result.tokens, result.finished, result.sampling_logprobs,
                        [i for i in indices for _ in range(samples)], result.seconds, result.new_tokens)

    def collect(self, unit: ModelUnit, micro: list[dict], step: str, length: int) -> list | None:
        return forward_collect(unit.chunks, micro, self.steps[step], length, self.cfg.training.micro_batch_size)

    def scores(self, rollouts: Rollouts, rows: Rows, micro: list[dict]) -> torch.Tensor:
        """Each rollout's raw score on every rank: the reward model at its final token, or the reward function."""
        device = self.ctx.runtime.device
        if self.reward_model is not None:
            with self.frozen_on_device(self.reward_model):
                out = self.collect(self.reward_model, micro, "scalar", rows.length)
            scores = torch.zeros(len(rollouts), dtype=torch.float64, device=device)
            if out is not None:
                values = torch.cat(out).to(device)
                scores = values[torch.arange(len(rollouts), device=device), rows.final].double()
            group = parallel_state.get_pipeline_model_parallel_group()
            if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                torch.distributed.broadcast(scores, parallel_state.get_pipeline_model_parallel_last_rank(), group=group)
            return scores.float()
        # A user function: called once per rollout on this data-parallel replica's first rank, then shared.
        group = parallel_state.get_model_parallel_group()
        source = torch.distributed.get_process_group_ranks(group)[0]
        scores = torch.zeros(len(rollouts), dtype=torch.float64)
        error = None
        if torch.distributed.get_rank() == source:
            try:
                for i, (prompt, response) in enumerate(zip(rollouts.prompts, rollouts.responses)):
                    body = [t for t in response if t not in self.stop_ids]
                    scores[i] = call_reward_fn(
                        self.reward_fn, rollouts.prompt_index[i], prompt, response,
                        self.tokenizer.decode(prompt) if self.texts else None,
                        self.tokenizer.decode(body) if self.texts else None,
                    )
            except RewardFunctionError as exc:
                error = str(exc)
        errors = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errors, error)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise RewardFunctionError(f"step {self.state.step + 1}: {first}; stopping without saving this step")
        scores = scores.to(device)
        torch.distributed.broadcast(scores, source, group=group)
        return scores.float()

    def make_experience(self, rollouts: Rollouts) -> tuple[Rows, dict]:
        """Rows with old/reference log-probabilities, old values, advantages and returns; and the step's reports.

        Everything stays on the device: the statistics over the data-parallel batch (running moments, whitening,
        explained variance, the reports) are reduced by that group's collectives, which are NCCL's on GPUs."""
        p, cfg, device = self.cfg.ppo, self.cfg, self.ctx.runtime.device
        rows = layout_rows(rollouts, multiple=cfg.parallel.tp if cfg.parallel.sp else 1).to(device)
        micro = rows.micro_batches(cfg.training.micro_batch_size)
        n, length = rows.tokens.shape
        zeros = torch.zeros(n, length, device=device)

        def cat(out, key=None):
            if out is None:  # not the last pipeline stage: the loss is not computed here
                return zeros.clone()
            return torch.cat([o[key] if key else o for o in out]).to(device).float()

        policy_out = self.collect(self.policy, micro, "logprobs", length)
        old_logprobs, entropy = cat(policy_out, "logprobs"), cat(policy_out, "entropy")
        with self.frozen_on_device(self.reference):
            ref_logprobs = cat(self.collect(self.reference, micro, "logprobs", length), "logprobs")
        values = cat(self.collect(self.value, micro, "scalar", length)) if self.value is not None else zeros.clone()
        raw = self.scores(rollouts, rows, micro)

        finished = torch.tensor(rollouts.finished, dtype=torch.bool, device=device)
        mask = rows.mask.clone()
        if p.unfinished == "penalty":
            raw = torch.where(finished, raw, torch.full_like(raw, p.unfinished_penalty))
        elif p.unfinished == "drop":
            mask[~finished] = 0.0
        kept = finished | (p.unfinished != "drop")
        if p.reward_norm:
            self.moments.update(raw[kept], self.dp_group)
            scores = self.moments.normalise(raw)
        else:
            scores = raw
        if p.estimator == "grpo":
            advantages = grpo_advantages(raw, mask, p.samples_per_prompt)
            returns, kl = zeros.clone(), (old_logprobs - ref_logprobs) * mask
        else:
            rewards, kl = per_token_rewards(scores, old_logprobs, ref_logprobs, mask, p.kl_coef, p.kl_estimator)
            advantages, returns = gae_advantages(rewards, values, mask, p.gamma, p.lam, self.dp_group)
        rows.mask = mask
        rows.extra = {"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "advantages": advantages,
                      "old_values": values * mask, "returns": returns}

        sampler = torch.zeros(n, length)  # filled on the host from the engine's lists, then moved in one copy
        for i, (prompt, response) in enumerate(zip(rollouts.prompts, rollouts.responses)):
            first = len(prompt) - 1  # the label position of the response's first token
            sampler[i, first:first + len(response)] = torch.tensor(rollouts.sampler_logprobs[i][:len(response)])
        sampler = sampler.to(device)
        tokens = mask.sum()
        per_row = torch.ones(n, device=device)
        reports = {
            "reward": [raw[kept].sum(), kept.sum()], "reward_sq": [(raw[kept] ** 2).sum(), kept.sum()],
            "reward_normalised": [scores[kept].sum(), kept.sum()],
            "reward_normalised_sq": [(scores[kept] ** 2).sum(), kept.sum()],
            "kl": [((old_logprobs - ref_logprobs) * mask).sum(), tokens],
            "kl_per_response": [((old_logprobs - ref_logprobs) * mask).sum(), kept.sum()],
            "entropy_before": [(entropy * mask).sum(), tokens],
            "response_length": [torch.tensor(float(sum(map(len, rollouts.responses))), device=device), per_row.sum()],
            "finished": [finished.float().sum(), per_row.sum()],
            "sampler_logprob_gap": [((sampler - old_logprobs).abs() * mask).sum(), tokens],
        }
        if self.value is not None:
            ev = explained_variance(values, returns, mask, self.dp_group)
            weight = 1.0 if self.last_stage else 0.0
            reports["explained_variance"] = [ev * weight, ev.new_tensor(weight)]
        return rows, reports

    def update(self, rows: Rows) -> dict:
        """``ppo.epochs`` x ``ppo.minibatches`` optimizer steps of the value model and, after the warm-up, the policy."""
        p, t = self.cfg.ppo, self.cfg.training
        micro = rows.micro_batches(t.micro_batch_size)
        per_minibatch = len(micro) // p.minibatches
        train_policy = self.state.step >= p.critic_warmup_steps
        sums: dict[str, list[float]] = {}
        for _ in range(p.epochs):
            for k in range(p.minibatches):
                batch = micro[k * per_minibatch:(k + 1) * per_minibatch]
                if self.value is not None:
                    self._accumulate(sums, self._optimizer_step(self.value, batch, "value", ppo_steps.VALUE_REPORTS, rows.length))
                if train_policy:
                    batch = self._weighted(batch, rows.length)
                    self._accumulate(sums, self._optimizer_step(self.policy, batch, "policy", ppo_steps.POLICY_REPORTS, rows.length))
        return {key: total / count for key, (total, count) in sums.items() if count}

    def _weighted(self, batch: list[dict], length: int) -> list[dict]:
        """The rollout micro-batches plus this step's pretraining ones, each loss weighted so that the policy step
        minimises mean(policy loss) + ptx_coef * mean(LM loss) whatever their token counts."""
        counts = torch.zeros(2, dtype=torch.float64, device=self.ctx.runtime.device)  # reduced over DP: on the device
        counts[0] = sum(b["mask"].sum() for b in batch)
        ptx = []
        if self.ptx is not None:
            for sample in self.ptx.next_global_batch():
                ptx.append({"kind": "ptx", "tokens": sample["tokens"][:, :length], "labels": sample["labels"][:, :length],
                            "loss_mask": sample["loss_mask"][:, :length].float(),
                            "position_ids": torch.arange(length).expand(sample["tokens"].shape[0], length).contiguous()})
            counts[1] = sum(b["loss_mask"].sum() for b in ptx)
            self.state.consumed_ptx_samples = self.ptx.position
        torch.distributed.all_reduce(counts, group=self.dp_group)
        rollout_tokens, ptx_tokens = counts.tolist()
        total = rollout_tokens + ptx_tokens
        rollout_weight = total / rollout_tokens if rollout_tokens > 0 else 0.0
        ptx_weight = self.cfg.ppo.ptx_coef * total / ptx_tokens if ptx_tokens > 0 else 0.0
        return [dict(b, weight=rollout_weight) for b in batch] + [dict(b, weight=ptx_weight) for b in ptx]

    def _optimizer_step(self, unit: ModelUnit, batch: list[dict], step: str, keys: tuple, length: int) -> dict:
        unit.set_lr(self.state.step)
        unit.zero_grad()
        reports = forward_backward(unit.chunks, micro_batch_iterators(unit.chunks, batch), len(batch), length,
                                   self.cfg.training.micro_batch_size, self.steps[step], report_keys=keys)
        grad_norm, updated = unit.step()
        reports = {key: float(value) for key, value in reports.items()}
        reports[f"{unit.name}_grad_norm"] = float("nan") if grad_norm is None else float(grad_norm)
        reports[f"{unit.name}_skipped"] = 0.0 if updated else 1.0
        return reports

    @staticmethod
    def _accumulate(sums: dict, reports: dict) -> None:
        for key, value in reports.items():
            total, count = sums.get(key, (0.0, 0))
            sums[key] = (total + value, count + 1) if math.isfinite(value) else (total, count)

    def step_metrics(self, rollouts: Rollouts, experience: dict, updates: dict, seconds: tuple[float, float, float]) -> dict:
        """A step's metrics, the same on every rank: experience means over the data-parallel batch, the updates'
        means, generation throughput and the seconds each phase took."""
        means = self._global_means(experience)
        tokens = torch.tensor([float(rollouts.new_tokens), rollouts.seconds], device=self.ctx.runtime.device)
        torch.distributed.all_reduce(tokens, group=self.dp_group)
        new_tokens, seconds_generating = tokens.tolist()
        generate, score, train = seconds
        return {
            "reward_mean": means["reward"], "reward_std": _std(means["reward"], means["reward_sq"]),
            "reward_normalised_mean": means["reward_normalised"],
            "reward_normalised_std": _std(means["reward_normalised"], means["reward_normalised_sq"]),
            "kl_to_reference": means["kl"], "kl_per_response": means["kl_per_response"], "entropy": means["entropy_before"],
            "response_length": means["response_length"], "finished_fraction": means["finished"],
            "sampler_trainer_logprob_gap": means["sampler_logprob_gap"],
            **({"explained_variance": means["explained_variance"]} if "explained_variance" in means else {}),
            **{key.replace(" ", "_"): value for key, value in updates.items()},
            "generation_tokens_per_s": new_tokens / max(seconds_generating / self.ctx.layout.dp, 1e-9),
            "seconds_generate": generate, "seconds_score": score, "seconds_train": train,
            "policy_lr": self.policy.schedule.at(self.state.step),
        }

    def _global_means(self, reports: dict) -> dict:
        keys, device = tuple(reports), self.ctx.runtime.device
        item = {key: torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in reports[key]])
                for key in keys}
        means = reduce_reports([item] if self.last_stage else [], keys, self.ctx.runtime.device)
        return {key: float(value) for key, value in means.items()}

    # ------------------------------------------------------------------ the loop

    def save(self) -> None:
        self.state.reward_moments = self.moments.state_dict()
        self.checkpointer.save(self.state.step, self.trained, dataclasses.asdict(self.state))

    def run(self) -> int:
        """Train to ``training.train_iters`` PPO steps; returns the exit code (0, or 75 on a signal)."""
        try:
            return self._loop()
        finally:
            self.ctx.close()

    def _loop(self) -> int:
        ctx, t = self.ctx, self.cfg.training
        clock = ProgressClock(self.state.step, t.train_iters)
        while self.state.step < t.train_iters:
            metrics = self.step(self)
            self.state.consumed_prompts += self.cfg.ppo.prompts_per_step
            self.state.step += 1
            if self.state.step % self.cfg.logging.log_interval == 0 or self.state.step == t.train_iters:
                ctx.logger.log(self.state.step, metrics, progress=clock.progress(self.state.step))
            preempted = ctx.preemption.any_rank(ctx.runtime.device)
            if preempted or (t.save_interval and self.state.step % t.save_interval == 0) or self.state.step == t.train_iters:
                self.save()
            if preempted and self.state.step < t.train_iters:
                ctx.say(f"signal received: saved at step {self.state.step}, exiting with {EXIT_PREEMPTED} so the job can be requeued")
                return EXIT_PREEMPTED
        return 0


def _std(mean: float, mean_sq: float) -> float:
    return math.sqrt(max(mean_sq - mean * mean, 0.0))


