"""Where PPO's scores come from and how they are normalised.

A score is either the reward model's value at a response's final ``<|im_end|>`` (see `rl.experience`) or
the return value of a Python function named ``package.module:function`` in ``ppo.reward_fn``, called as
``fn(prompt_tokens=[...], response_tokens=[...], prompt=str|None, response=str|None)`` for rule-based and
verifiable rewards (math answers, unit tests). `RunningMoments` keeps the mean and variance of every score
seen, so scores can be normalised by their running statistics (Qwen report, RLHF section); its state is
part of PPO checkpoints.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_qwen.errors import ConfigError, UserError


class RewardFunctionError(UserError):
    """A reward function raised or returned something that is not a finite number."""


def load_reward_fn(spec: str) -> Callable:
    """The function ``package.module:function`` names; ConfigError naming the value when it does not resolve."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ConfigError([f"ppo.reward_fn={spec!r} must be package.module:function "
                           "(e.g. my_rewards.math:exact_match)"])
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure is the user's module: report it in one line
        raise ConfigError([f"ppo.reward_fn={spec!r}: module {module_name!r} does not import "
                           f"({type(exc).__name__}: {exc}); "
                           "check the name and that it is on PYTHONPATH"]) from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError([f"ppo.reward_fn={spec!r}: {module_name} has no function {name!r}"])
    return fn


def call_reward_fn(fn: Callable, index: int, prompt_tokens: list[int], response_tokens: list[int],
                   prompt: str | None, response: str | None) -> float:
    """One score from the user's function; RewardFunctionError naming rollout `index` when it fails."""
    try:
        value = fn(prompt_tokens=prompt_tokens, response_tokens=response_tokens, prompt=prompt, response=response)
    except Exception as exc:
        raise RewardFunctionError(f"the reward function raised {type(exc).__name__}: {exc} "
                                  f"(prompt {index} of this step)") from exc
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RewardFunctionError(f"the reward function returned {value!r}, not a finite number "
                                  f"(prompt {index} of this step)")
    return float(value)


@dataclass
class RunningMoments:
    """Count, mean and sum of squared deviations of every score seen (Chan et al.'s parallel update)."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: torch.Tensor, group=None) -> None:
        """Add a batch of scores (of the whole data-parallel batch when `group` is given: then `values` live on
        the device that group's collectives take)."""
        values = values.double()
        stats = torch.stack([values.new_tensor(float(values.numel())), values.sum(), (values**2).sum()])
        if group is not None:
            torch.distributed.all_reduce(stats, group=group)
        n, total, squares = stats.tolist()
        if n == 0:
            return
        batch_mean = total / n
        batch_m2 = max(squares - n * batch_mean * batch_mean, 0.0)
        delta = batch_mean - self.mean
        count = self.count + n
        self.mean += delta * n / count
        self.m2 += batch_m2 + delta * delta * self.count * n / count
        self.count = count

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 1.0

    def normalise(self, values: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """(values - running mean) / running std."""
        return (values - self.mean) / (self.std + eps)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])
