"""PPO: the Qwen report's RLHF stage. A policy (from the SFT model) and a value model (from the reward model)
are trained; a reference (the SFT model) and the reward model stay frozen; all four at the training layout.

    torchrun --nproc-per-node N -m megatron_qwen.stages.ppo configs/stage/ppo.yaml ppo.policy_from=SFT_CKPT \\
        (ppo.reward_from=RM_CKPT | ppo.reward_fn=package.module:function) data.paths=[PROMPTS] \\
        [ppo.ptx_data=[PRETRAIN_SHARDS] ppo.ptx_coef=C] [key=value ...]

Data: `tools/preprocess_data.py --prompts` shards. The machinery (the four models, rollouts, experience,
updates, checkpoints) is megatron_qwen.rl.trainer; the losses are megatron_qwen.rl.ppo_math.
"""

from __future__ import annotations

import time

from megatron_qwen.rl.trainer import PPOTrainer
from megatron_qwen.training.loop import run_stage


def ppo_step(run: PPOTrainer) -> dict:
    """One step of the recipe; returns its metrics."""
    started = time.perf_counter()
    prompts, indices = run.next_prompts()  # this data-parallel rank's share of ppo.prompts_per_step
    rollouts = run.generate(prompts, indices)  # ppo.samples_per_prompt responses each, KV-cache engine, top-p
    generated = time.perf_counter()
    # Old and reference log-probabilities and values from the training-layout forward; scores (reward model or
    # function) normalised by their running moments; the KL penalty; GAE advantages whitened over the DP batch.
    rows, experience = run.make_experience(rollouts)
    scored = time.perf_counter()
    # ppo.epochs x ppo.minibatches optimizer steps: the value model's clipped loss, then (after the critic warm-up)
    # the policy's clipped surrogate plus ppo.ptx_coef x the pretraining loss.
    updates = run.update(rows)
    trained = time.perf_counter()
    return run.step_metrics(rollouts, experience, updates, (generated - started, scored - generated, trained - scored))


def train_ppo(cfg) -> int:
    """Run (or resume) a PPO job; returns the process exit code."""
    return PPOTrainer(cfg, ppo_step).run()


if __name__ == "__main__":
    run_stage("ppo", train_ppo)
