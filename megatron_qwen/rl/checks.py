"""The PPO stage's config rules, checked before any process group exists (`Stage.check`)."""

from __future__ import annotations

from pathlib import Path

from megatron_qwen.checkpoint import directory as ckdir
from megatron_qwen.config import Config, resolve
from megatron_qwen.errors import ConfigError
from megatron_qwen.rl.rewards import load_reward_fn


def validate_ppo(cfg: Config, world_size: int) -> None:
    """Refuse, before any process group exists, a PPO configuration that cannot run; ConfigError names the fix."""
    p, t = cfg.ppo, cfg.training
    problems = []
    if not p.policy_from:
        problems.append("ppo.policy_from is not set: give the SFT checkpoint the policy starts from")
    if t.init_from:
        problems.append(f"training.init_from={t.init_from!r} does not apply to PPO: the policy starts from "
                        "ppo.policy_from")
    if bool(p.reward_from) == bool(p.reward_fn):
        problems.append("set exactly one of ppo.reward_from (a reward-model checkpoint) and ppo.reward_fn "
                        "(package.module:function)" + ("; both are set" if p.reward_from else "; neither is set"))
    for key in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "epochs", "minibatches"):
        if getattr(p, key) < 1:
            problems.append(f"ppo.{key}={getattr(p, key)} must be >= 1")
    if p.estimator == "grpo" and p.samples_per_prompt < 2:
        problems.append(f"ppo.estimator=grpo compares a prompt's samples: ppo.samples_per_prompt="
                        f"{p.samples_per_prompt} must be >= 2")
    if p.max_new_tokens >= cfg.model.seq_length:
        problems.append(f"ppo.max_new_tokens={p.max_new_tokens} leaves no room for a prompt within model.seq_length="
                        f"{cfg.model.seq_length}; lower it or raise model.seq_length")
    if cfg.model.fp8 is not None:
        problems.append(f"model.fp8={cfg.model.fp8}: PPO generates one token at a time, shapes the FP8 GEMMs do "
                        "not take; train PPO without FP8 (model.fp8=null)")
    if cfg.peft.method is not None and cfg.peft.dropout:
        problems.append(f"peft.dropout={cfg.peft.dropout}: PPO needs the old log-probabilities and the first update's "
                        "to agree, and adapter dropout makes them differ: set peft.dropout=0")
    if cfg.model.hidden_dropout or cfg.model.attention_dropout:
        problems.append("PPO needs the old log-probabilities and the first update's to agree: set "
                        "model.hidden_dropout=0 and model.attention_dropout=0")
    if problems:
        raise ConfigError(problems)
    _, layout, _ = resolve(cfg, world_size)
    if p.prompts_per_step % layout.dp:
        problems.append(f"ppo.prompts_per_step={p.prompts_per_step} does not split over {layout.dp} data-parallel "
                        f"ranks; use a multiple of {layout.dp}")
    else:
        rollouts = p.prompts_per_step // layout.dp * p.samples_per_prompt
        unit = p.minibatches * t.micro_batch_size
        if rollouts % unit:
            problems.append(f"{rollouts} rollouts per data-parallel rank (ppo.prompts_per_step / DP x "
                            f"ppo.samples_per_prompt) do not split into ppo.minibatches={p.minibatches} x "
                            f"training.micro_batch_size={t.micro_batch_size}; make them a multiple of {unit}")
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
    return [f"{key}={path} has model.{name}={getattr(theirs, name)} but this run has {getattr(cfg.model, name)}; "
            "the four PPO models must share one shape: set model.* to the SFT model's" for name in fields
            if getattr(theirs, name) != getattr(cfg.model, name)]
