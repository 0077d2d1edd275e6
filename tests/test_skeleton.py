"""The training skeleton's declarations (`training.loop`): where each model's weights come from and the rules
checked before any process group exists. The runs themselves are exercised by every stage's tests (pretraining's
kill -9 resume, SFT, the reward model, DPO's frozen reference)."""

from __future__ import annotations

import pytest

from megatron_qwen.config import load_config
from megatron_qwen.errors import ConfigError
from megatron_qwen.training.loop import Model, Stage, check_stage, model_source


def stage(**kwargs) -> Stage:
    return Stage(name="demo", build_datasets=None, forward_step=None, **{"trains": {"policy": Model()}, **kwargs})


def test_a_model_starts_from_the_first_key_that_is_set():
    model = Model(from_keys=("dpo.reference_from", "training.init_from"))
    assert model_source(load_config(None), model) is None
    cfg = load_config(None, ["training.init_from=/ckpt/sft"])
    assert model_source(cfg, model) == ("training.init_from", "/ckpt/sft")
    cfg = load_config(None, ["training.init_from=/ckpt/sft", "dpo.reference_from=/ckpt/other"])
    assert model_source(cfg, model) == ("dpo.reference_from", "/ckpt/other")


def test_a_scalar_head_may_start_fresh_from_a_language_model():
    assert Model(head="scalar").fresh_keys == ("reward_head.",) and Model().fresh_keys == ()


def test_a_frozen_model_needs_a_checkpoint():
    frozen = {"reference": Model(from_keys=("dpo.reference_from", "training.init_from"))}
    with pytest.raises(ConfigError) as err:
        check_stage(load_config(None), stage(frozen=frozen))
    assert err.value.problems == ["the demo stage holds a frozen reference model: set dpo.reference_from or "
                                  "training.init_from to its checkpoint"]
    check_stage(load_config(None, ["training.init_from=/ckpt"]), stage(frozen=frozen))


def test_every_problem_is_reported_at_once():
    two = {"policy": Model(), "value": Model(head="scalar")}
    with pytest.raises(ConfigError) as err:
        check_stage(load_config(None), stage(trains=two, check=lambda cfg: ["a rule of the stage"],
                                             frozen={"reference": Model(from_keys=("ppo.reference_from",))}))
    assert err.value.problems == [
        "a rule of the stage",
        "the demo stage holds a frozen reference model: set ppo.reference_from to its checkpoint",
        "the demo stage trains 2 models; give Stage.step to update them",
    ]
    frozen = {"reference": Model(from_keys=("ppo.reference_from",))}
    cfg = load_config(None, ["ppo.reference_from=/ckpt"])
    check_stage(cfg, stage(trains=two, step=lambda trainer: None, frozen=frozen))
