"""PPO: the Qwen report's RLHF stage. A policy (from the SFT model) and a value model (from the reward model)
are trained; a reference (the SFT model) and the reward model stay frozen; all four at the training layout.

    torchrun --nproc-per-node N -m megatron_qwen.stages.ppo configs/stage/ppo.yaml ppo.policy_from=SFT_CKPT \\
        (ppo.reward_from=RM_CKPT | ppo.reward_fn=package.module:function) data.paths=[PROMPTS] \\
        [ppo.ptx_data=[PRETRAIN_SHARDS] ppo.ptx_coef=C] [key=value ...]

Data: `tools/preprocess_data.py --prompts` shards. The stage runs on the training skeleton (`training.loop`),
which builds, loads (frozen models offloaded between uses with ``training.offload_frozen``), resumes, logs and
saves; its own step below runs the phases of `megatron_qwen.rl.trainer`; the losses are `rl.ppo_math`.
"""

from __future__ import annotations

import time

from megatron_qwen.config import Config
from megatron_qwen.data.chat_datasets import build_prompt_dataset
from megatron_qwen.platform.launch import detect_launch
from megatron_qwen.rl.checks import validate_ppo
from megatron_qwen.rl.trainer import PPORun
from megatron_qwen.training.loop import Model, Stage, StepResult, Trainer, run_stage, train


class PPOStage:
    """The PPO stage: what it trains and holds frozen (by config key), and its step."""

    def __init__(self, cfg: Config):
        p = cfg.ppo
        trains = {"policy": Model(from_keys=("ppo.policy_from",), rope_at_positions=True)}
        if p.estimator != "grpo":  # GRPO's advantages need no value model
            trains["value"] = Model(from_keys=("ppo.value_from", "ppo.reward_from", "ppo.policy_from"), head="scalar",
                                    lr_key="ppo.value_lr")
        frozen = {"reference": Model(from_keys=("ppo.reference_from", "ppo.policy_from"))}
        if p.reward_from:
            frozen["reward"] = Model(from_keys=("ppo.reward_from",), head="scalar")
        self.stage = Stage(name="ppo", build_datasets=lambda cfg, tokenizer: (build_prompt_dataset(cfg), None),
                           forward_step=None, trains=trains, frozen=frozen, check=self.check, step=self.step,
                           start=self.start)
        self.run: PPORun | None = None

    @staticmethod
    def check(cfg: Config) -> list[str]:
        """The stage's config rules (`rl.checks`), before any process group exists."""
        validate_ppo(cfg, detect_launch().world_size)  # raises ConfigError naming every problem
        return []

    def start(self, trainer: Trainer) -> None:
        """Once the skeleton has built, loaded and resumed the models: the run's engine, scorer and moments."""
        self.run = PPORun(trainer)

    def step(self, trainer: Trainer) -> StepResult:
        """One step of the recipe: its metrics, with the seconds of each phase."""
        run, clock = self.run, time.perf_counter
        started = clock()
        prompts, indices = run.next_prompts()  # this data-parallel rank's share of ppo.prompts_per_step
        rollouts = run.generate(prompts, indices)  # ppo.samples_per_prompt responses each, KV-cache engine, top-p
        generated = clock()
        # Old and reference log-probabilities and values from the training-layout forward; scores (reward model
        # or function), shaped and normalised by their running moments; the KL penalty; the advantages.
        rows, experience = run.make_experience(rollouts)
        scored = clock()
        # ppo.epochs x ppo.minibatches optimizer steps: the value model's clipped loss, then (after the critic
        # warm-up) the policy's clipped surrogate plus ppo.ptx_coef x the pretraining loss.
        updates = run.update(rows)
        trained = clock()
        trainer.state.stage_state = run.saved_state()
        seconds = {"generate": generated - started, "score": scored - generated, "train": trained - scored}
        metrics = run.metrics(rollouts, experience, updates, seconds)
        return StepResult(metrics, True, metrics["policy_lr"], samples=trainer.cfg.ppo.prompts_per_step)


def train_ppo(cfg: Config) -> int:
    """Run (or resume) a PPO job; returns the process exit code."""
    return train(cfg, PPOStage(cfg).stage)


if __name__ == "__main__":
    run_stage("ppo", train_ppo)
