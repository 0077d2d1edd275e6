"""The phases of one PPO step on the training skeleton's models: a policy and a value model trained, a reference
and a reward model held frozen, all four at the training layout on every rank. The recipe that runs them in
order is `megatron_qwen.stages.ppo`; the skeleton (`training.loop`) builds, loads, resumes, logs and saves.

Each step: this data-parallel rank's prompts, ``ppo.samples_per_prompt`` responses each from the KV-cache engine (on
whole sequences, the rollouts shared out over the context-parallel ranks and exchanged); old and reference log-
probabilities and values recomputed by the training-layout forward (never taken from the sampler); scores from the
reward model or function (`rl.scorers`), shaped and normalised by their running moments, the KL penalty and
advantages (GAE, whitened over the data-parallel batch, or GRPO) (`rl.experience`); then ``ppo.epochs`` x
``ppo.minibatches`` optimizer steps of the value model and (after ``ppo.critic_warmup_steps``) the policy, with
``ppo.ptx_coef`` times the language-model loss of pretraining micro-batches in the policy's steps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import torch
from megatron.core import parallel_state

from megatron_qwen.config import TOKENIZER_VOCAB_SIZES
from megatron_qwen.data.gpt import build_gpt_datasets
from megatron_qwen.errors import ConfigError
from megatron_qwen.inference.engine import GenerationEngine
from megatron_qwen.inference.sampling import SamplingParams
from megatron_qwen.model.context_parallel import context_parallel_off, cp_rank, cp_size
from megatron_qwen.rl import steps as ppo_steps
from megatron_qwen.rl.experience import (Rollouts, Rows, experience_metrics, experience_reports, gae_advantages,
                                         grpo_advantages, layout_rows, per_token_rewards, shape_scores)
from megatron_qwen.rl.rewards import RunningMoments, load_reward_fn
from megatron_qwen.rl.scorers import RewardFunctionScorer, RewardModelScorer
from megatron_qwen.training.forward_backward import forward_backward, forward_collect, micro_batch_iterators
from megatron_qwen.training.sampler import GlobalBatches
from megatron_qwen.training.units import ModelUnit


class PPORun:
    """What one PPO job keeps between steps, over the skeleton `trainer`'s units: the generation engine, the
    forward steps, the scorer, the reward moments and the pretraining batches."""

    def __init__(self, trainer):
        self.trainer = trainer
        cfg, ctx = trainer.cfg, trainer.ctx
        p, t = cfg.ppo, cfg.training
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.runtime.device
        self.policy: ModelUnit = trainer.units["policy"]
        if self.policy.modules[0].config.te_context_parallel:
            raise ConfigError([f"parallel.cp={cfg.parallel.cp} on the Transformer Engine spec: PPO generates its "
                               "rollouts on whole sequences, which Transformer Engine's context-parallel attention "
                               "is not switched out of here; set model.transformer_impl=local (its CP all-gathers "
                               "keys and values) or parallel.cp=1"])
        self.value: ModelUnit | None = trainer.units.get("value")
        # Rollouts draw only the family's token ids, never the embedding's padding rows after them.
        family_vocab = TOKENIZER_VOCAB_SIZES[cfg.model.family]
        vocab_limit = min(cfg.model.padded_vocab_size, family_vocab)
        saved = trainer.state.stage_state
        self.moments = RunningMoments(**saved.get("reward_moments", {}))
        self.engine = GenerationEngine(self.policy.chunks, vocab_limit)
        self.stop_ids = trainer.tokenizer.generation_stop_ids(vocab_limit, p.stop_ids)
        self.steps = ppo_steps.steps(vocab_limit, p.temperature, p.clip_ratio, p.value_clip,
                                     p.kl_coef if p.estimator == "grpo" else 0.0)
        self.dp_group = parallel_state.get_data_parallel_group()
        self.last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        if p.reward_from:
            self.score = RewardModelScorer(trainer.frozen["reward"], functools.partial(trainer.frozen_model, "reward"),
                                           self.steps.scalar, t.micro_batch_size, self.device)
        else:  # reward functions get decoded text when the model has the family's whole vocabulary
            decode = trainer.tokenizer.decode if vocab_limit >= family_vocab else None
            self.score = RewardFunctionScorer(load_reward_fn(p.reward_fn), self.stop_ids, decode, self.device)
        self.ptx = self._ptx_batches(saved.get("consumed_ptx_samples", 0)) if p.ptx_coef > 0 else None

    def _ptx_batches(self, consumed: int) -> GlobalBatches:
        cfg, p, t, ctx = self.cfg, self.cfg.ppo, self.cfg.training, self.ctx
        if not p.ptx_data:
            raise ConfigError([f"ppo.ptx_coef={p.ptx_coef} needs pretraining shards in ppo.ptx_data"])
        global_batch = p.ptx_microbatches * t.micro_batch_size * ctx.layout.dp
        training = dataclasses.replace(t, train_iters=t.train_iters * p.epochs * p.minibatches,
                                       global_batch_size=global_batch, eval_interval=0)
        data = dataclasses.replace(cfg.data, paths=list(p.ptx_data))
        ptx_cfg = dataclasses.replace(cfg, data=data, training=training)
        tokenizer = self.trainer.tokenizer
        train, _, _ = build_gpt_datasets(ptx_cfg, tokenizer.eod_id, tokenizer.n_vocab)
        return GlobalBatches(train, consumed, global_batch, t.micro_batch_size, ctx.dp_rank, ctx.layout.dp)

    @property
    def step(self) -> int:
        """Steps done before this one."""
        return self.trainer.state.step

    def saved_state(self) -> dict:
        """The run's own position, saved with the loop's (`TrainState.stage_state`)."""
        return {"reward_moments": self.moments.state_dict(),
                "consumed_ptx_samples": self.ptx.position if self.ptx is not None else 0}

    def next_prompts(self) -> tuple[list[list[int]], list[int]]:
        """This rank's prompts of the next step and their indices among the step's prompts."""
        per_rank = self.cfg.ppo.prompts_per_step // self.ctx.layout.dp
        first, start = self.ctx.dp_rank * per_rank, self.trainer.state.consumed_samples
        return [self.trainer.train_ds[start + first + i] for i in range(per_rank)], [first + i for i in range(per_rank)]

    def generate(self, prompts: list[list[int]], indices: list[int]) -> Rollouts:
        """`ppo.samples_per_prompt` responses per prompt (each prompt's samples side by side)."""
        p, t = self.cfg.ppo, self.cfg.training
        samples = p.samples_per_prompt
        batch = [prompt for prompt in prompts for _ in range(samples)]
        # A seed per step and rollout (its index among the step's rollouts): reproducible on resume, and the same
        # rollouts whatever the data-parallel split.
        first = indices[0] * samples
        seeds = tuple((t.seed * 1_000_003 + self.step * 100_003 + first + i) % 2**63 for i in range(len(batch)))
        # With context parallelism each CP rank generates its own share of the rollouts on whole sequences (every
        # CP rank holds the whole model), and the CP group exchanges them: each rollout keeps its seed.
        size, rank = cp_size(), cp_rank()
        share = math.ceil(len(batch) / size)
        mine = slice(rank * share, (rank + 1) * share)
        params = SamplingParams(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
                                stop_ids=self.stop_ids, row_seeds=seeds[mine])
        started = time.perf_counter()
        with context_parallel_off(self.policy.chunks):
            result = self.engine.generate(batch[mine], params) if batch[mine] else None
        self.policy.train()
        generated = (result.tokens, result.finished, result.sampling_logprobs, result.new_tokens) if result else \
            ([], [], [], 0)
        if size > 1:
            shares = [None] * size
            torch.distributed.all_gather_object(shares, generated, group=parallel_state.get_context_parallel_group())
            generated = tuple([x for share in shares for x in share[i]] for i in range(3)) + (
                sum(share[3] for share in shares),)
        tokens, finished, logprobs, new_tokens = generated
        return Rollouts(batch, tokens, finished, logprobs, [i for i in indices for _ in range(samples)],
                        time.perf_counter() - started, new_tokens)

    def _collect(self, unit: ModelUnit, micro: list[dict], step, length: int, *keys: str) -> list[torch.Tensor]:
        """Per-token outputs of `unit` over `micro`, each [n, length] on the device (zeros off the last stage);
        `keys` pick the fields of a step that collects several (none: the one tensor it collects)."""
        out = forward_collect(unit.chunks, micro, step, length, self.cfg.training.micro_batch_size)
        if out is None:  # not the last pipeline stage: the outputs are not computed here
            n = sum(len(m["tokens"]) for m in micro)
            return [torch.zeros(n, length, device=self.device) for _ in keys or (None,)]
        return [torch.cat([o[key] if key else o for o in out]).to(self.device).float() for key in keys or (None,)]

    def make_experience(self, rollouts: Rollouts) -> tuple[Rows, dict]:
        """Rows with old/reference log-probabilities, old values, advantages and returns; and this rank's reports.

        Everything stays on the device: the statistics over the data-parallel batch (running moments, whitening,
        explained variance, the reports) are reduced by that group's collectives, which are NCCL's on GPUs."""
        p, cfg = self.cfg.ppo, self.cfg
        # SP splits each row (each CP rank's share of it) over TP; CP cuts it into 2 x CP chunks.
        multiple = (cfg.parallel.tp if cfg.parallel.sp else 1) * (2 * cfg.parallel.cp if cfg.parallel.cp > 1 else 1)
        rows = layout_rows(rollouts, multiple=multiple).to(self.device)
        micro = rows.micro_batches(cfg.training.micro_batch_size)
        old_logprobs, entropy = self._collect(self.policy, micro, self.steps.logprobs, rows.length,
                                              "logprobs", "entropy")
        with self.trainer.frozen_model("reference") as reference:
            ref_logprobs, = self._collect(reference, micro, self.steps.logprobs, rows.length, "logprobs")
        values, = self._collect(self.value, micro, self.steps.scalar, rows.length) if self.value is not None \
            else (torch.zeros_like(old_logprobs),)
        finished = torch.tensor(rollouts.finished, dtype=torch.bool, device=self.device)
        raw = self.score(rollouts, rows, micro, self.step + 1)
        raw, scores, mask, kept = shape_scores(raw, finished, rows.mask, p, self.moments, self.dp_group)
        if p.estimator == "grpo":
            advantages, returns = grpo_advantages(raw, mask, p.samples_per_prompt), torch.zeros_like(values)
        else:
            rewards, _ = per_token_rewards(scores, old_logprobs, ref_logprobs, mask, p.kl_coef, p.kl_estimator)
            advantages, returns = gae_advantages(rewards, values, mask, p.gamma, p.lam, self.dp_group)
        rows.mask = mask
        rows.extra = {"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "advantages": advantages,
                      "old_values": values * mask, "returns": returns}
        reports = experience_reports(rollouts, raw, scores, kept, finished, mask, old_logprobs, ref_logprobs, entropy,
                                     values if self.value is not None else None, returns, self.dp_group,
                                     self.last_stage)
        return rows, reports

    def update(self, rows: Rows) -> dict:
        """``ppo.epochs`` x ``ppo.minibatches`` optimizer steps of the value model and, after the warm-up, the
        policy; each report's mean over them."""
        p, t = self.cfg.ppo, self.cfg.training
        micro = rows.micro_batches(t.micro_batch_size)
        per_minibatch = len(micro) // p.minibatches
        train_policy = self.step >= p.critic_warmup_steps
        sums: dict[str, tuple[float, int]] = {}
        for _ in range(p.epochs):
            for k in range(p.minibatches):
                batch = micro[k * per_minibatch:(k + 1) * per_minibatch]
                if self.value is not None:
                    _accumulate(sums, self._optimizer_step(self.value, batch, self.steps.value,
                                                           ppo_steps.VALUE_REPORTS, rows.length))
                if train_policy:
                    _accumulate(sums, self._optimizer_step(self.policy, self._weighted(batch, rows.length),
                                                           self.steps.policy, ppo_steps.POLICY_REPORTS, rows.length))
        return {key: total / count for key, (total, count) in sums.items() if count}

    def _weighted(self, batch: list[dict], length: int) -> list[dict]:
        """The rollout micro-batches plus this step's pretraining ones, each loss weighted so that the policy step
        minimises mean(policy loss) + ptx_coef * mean(LM loss) whatever their token counts."""
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)  # reduced over DP: on the device
        counts[0] = sum(b["mask"].sum() for b in batch)
        ptx = []
        if self.ptx is not None:
            for sample in self.ptx.next_global_batch():
                rows = sample["tokens"].shape[0]
                ptx.append({"kind": "ptx", "tokens": sample["tokens"][:, :length],
                            "labels": sample["labels"][:, :length],
                            "loss_mask": sample["loss_mask"][:, :length].float(),
                            "position_ids": torch.arange(length).expand(rows, length).contiguous()})
            counts[1] = sum(b["loss_mask"].sum() for b in ptx)
        torch.distributed.all_reduce(counts, group=self.dp_group)
        rollout_tokens, ptx_tokens = counts.tolist()
        total = rollout_tokens + ptx_tokens
        rollout_weight = total / rollout_tokens if rollout_tokens > 0 else 0.0
        ptx_weight = self.cfg.ppo.ptx_coef * total / ptx_tokens if ptx_tokens > 0 else 0.0
        return [dict(b, weight=rollout_weight) for b in batch] + [dict(b, weight=ptx_weight) for b in ptx]

    def _optimizer_step(self, unit: ModelUnit, batch: list[dict], step, keys: tuple, length: int) -> dict:
        unit.set_lr(self.step)
        unit.zero_grad()
        reports = forward_backward(unit.chunks, micro_batch_iterators(unit.chunks, batch), len(batch), length,
                                   self.cfg.training.micro_batch_size, step, report_keys=keys)
        grad_norm, updated = unit.step()
        reports = {key: float(value) for key, value in reports.items()}
        reports[f"{unit.name}_grad_norm"] = float("nan") if grad_norm is None else float(grad_norm)
        reports[f"{unit.name}_skipped"] = 0.0 if updated else 1.0
        return reports

    def metrics(self, rollouts: Rollouts, experience: dict, updates: dict, seconds: dict[str, float]) -> dict:
        """A step's metrics, the same on every rank: experience means over the data-parallel batch, the updates'
        means, generation throughput, the policy's LR and the seconds each phase took."""
        tokens = torch.tensor([float(rollouts.new_tokens), rollouts.seconds], device=self.device)
        torch.distributed.all_reduce(tokens, group=self.dp_group)
        new_tokens, seconds_generating = tokens.tolist()
        return {
            **experience_metrics(experience, self.last_stage, self.device), **updates,
            "generation_tokens_per_s": new_tokens / max(seconds_generating / self.ctx.layout.dp, 1e-9),
            **{f"seconds_{phase}": value for phase, value in seconds.items()},
            "policy_lr": self.policy.schedule.at(self.step),
        }


def _accumulate(sums: dict, reports: dict) -> None:
    for key, value in reports.items():
        total, count = sums.get(key, (0.0, 0))
        sums[key] = (total + value, count + 1) if math.isfinite(value) else (total, count)
