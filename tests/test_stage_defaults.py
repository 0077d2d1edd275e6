"""A stage's recipe is its default whichever config file a run starts from (config.STAGE_DEFAULTS): the PPO stage
trains the policy at the Qwen report's constant 1e-6 and the value model at 5e-6, not at pretraining's 3e-4 with a
2000-step warm-up, unless the user's own file or command line says otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from spawn import REPO


def stage_config(monkeypatch, stage: str, argv: list[str]):
    """The config `python -m megatron_qwen.stages.STAGE ARGV` would train with (the job itself not run)."""
    from megatron_qwen.training import loop

    monkeypatch.setattr(loop, "destroy_distributed", lambda: None)  # no process group here: nothing to tear down
    seen = []
    with pytest.raises(SystemExit) as exit_info:
        loop.run_stage(stage, lambda cfg: seen.append(cfg) or 0, argv)
    assert exit_info.value.code == 0
    return seen[0]


def learning_rates(cfg, steps=(0, 1, 10, 999)) -> tuple[list[float], list[float]]:
    """(policy, value) learning rates at `steps`, as the PPO trainer's units schedule them."""
    from megatron_qwen.training.schedule import LRSchedule

    policy, value = LRSchedule.from_training(cfg.training), LRSchedule.from_training(cfg.training, cfg.ppo.value_lr)
    return [policy.at(s) for s in steps], [value.at(s) for s in steps]


def write(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("base", [None, "configs/qwen-7b.yaml"])
def test_ppo_trains_at_its_own_learning_rates_without_its_stage_file(monkeypatch, tmp_path, base):
    own = {"model": {"name": "mine", "num_layers": 2}, "data": {"paths": ["prompts"]}}
    if base is not None:
        own["base"] = str(REPO / base)  # a model size: its training section is pretraining's recipe
    user_file = write(tmp_path / "mine.yaml", own)
    cfg = stage_config(monkeypatch, "ppo", [str(user_file), "ppo.policy_from=SFT"])
    policy, value = learning_rates(cfg)
    assert policy == [1e-6] * 4 and value == [5e-6] * 4, (policy, value)
    assert cfg.training.weight_decay == 0.0 and cfg.model.hidden_dropout == 0.0 and cfg.training.train_iters == 1000
    assert cfg.model.name == "mine" and cfg.ppo.policy_from == "SFT"
    # Pretraining from the same file keeps pretraining's recipe: the stage's defaults are the PPO stage's alone.
    pretrain = stage_config(monkeypatch, "pretrain", [str(user_file)])
    assert pretrain.training.lr == 3e-4 and pretrain.training.lr_warmup_iters == 2000


def test_the_users_file_and_overrides_beat_the_stage_defaults(monkeypatch, tmp_path):
    user_file = write(tmp_path / "mine.yaml", {"base": str(REPO / "configs/qwen-7b.yaml"),
                                               "training": {"lr": 2e-6, "lr_warmup_iters": 5}})
    cfg = stage_config(monkeypatch, "ppo", [str(user_file), "training.lr_decay_style=linear"])
    assert (cfg.training.lr, cfg.training.lr_warmup_iters, cfg.training.lr_decay_style) == (2e-6, 5, "linear")
    assert cfg.training.min_lr == 1e-6  # what the user's file leaves out is still the stage's


def test_the_stage_file_restates_the_stage_defaults():
    """configs/stage/ppo.yaml is the recipe users read: it gives every stage default, so loading it as the stage
    does and as any other tool does (no stage) is the same configuration."""
    from megatron_qwen.config import STAGE_DEFAULTS, load_config

    path = REPO / "configs" / "stage" / "ppo.yaml"
    assert load_config(path, stage="ppo") == load_config(path)
    cfg = load_config(path).to_dict()
    for section, values in STAGE_DEFAULTS["ppo"].items():
        for key, value in values.items():
            assert cfg[section][key] == value, (section, key)
