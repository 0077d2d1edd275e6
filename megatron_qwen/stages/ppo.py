"""PPO: the Qwen report's RLHF stage. A policy (from the SFT model) and a value model (from the reward model)
are trained; a reference (the SFT model) and the reward model stay frozen; all four at the training layout.

    torchrun --nproc-per-node N -m megatron_qwen.stages.ppo configs/stage/ppo.yaml ppo.policy_from=SFT_CKPT \\
        (ppo.reward_from=RM_CKPT | ppo.reward_fn=package.module:function) data.paths=[PROMPTS] \\
        [ppo.ptx_data=[PRETRAIN_SHARDS] ppo.ptx_coef=C] [key=value ...]

Data: `tools/preprocess_data.py --prompts` shards. Each step samples ``ppo.samples_per_prompt`` responses to
``ppo.prompts_per_step`` prompts with the KV-cache engine, scores them, and trains on them (see
megatron_qwen.rl.trainer for the order of work and megatron_qwen.rl.ppo_math for the losses).
"""

from __future__ import annotations

from megatron_qwen.rl.trainer import train_ppo
from megatron_qwen.training.loop import run_stage

if __name__ == "__main__":
    run_stage("ppo", train_ppo)
