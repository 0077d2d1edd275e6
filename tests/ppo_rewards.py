"""Reward functions for the PPO tests (ppo.reward_fn=tests.ppo_rewards:NAME)."""

from __future__ import annotations

GOOD = 32  # ids below this are the "good" tokens: a quarter of the tests' 128-id vocabulary


def good_fraction(prompt_tokens, response_tokens, prompt, response) -> float:
    """The fraction of response tokens that are good ones (the stop id, if any, counts as a token)."""
    return sum(t < GOOD for t in response_tokens) / max(len(response_tokens), 1)


def raises(prompt_tokens, response_tokens, prompt, response) -> float:
    raise ValueError("no reward for you")


def not_a_number(prompt_tokens, response_tokens, prompt, response):
    return "high"
