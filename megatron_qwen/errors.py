"""Errors a user can cause and fix: each message names the value, the rule it breaks and the fix.

They live here, below every package, so that any layer may raise them and every entry point (stages,
tools) reports them as one clear line instead of a traceback per rank.
"""

from __future__ import annotations


class UserError(ValueError):
    """A request that cannot run as given (config, data, checkpoint, conversion); the message says why and how
    to fix it."""


class ConfigError(UserError):
    """A configuration that cannot run; `problems` lists every message found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


class DataError(UserError):
    """Data that cannot feed the run as configured; the message names the shard, the rule and the fix."""


class ConversionError(UserError):
    """A checkpoint or request that cannot be converted; the message names the problem and the fix."""


class CheckpointError(UserError):
    """A checkpoint directory that is missing, incomplete or does not fit the model being loaded."""


class PreprocessError(UserError):
    """A corpus or preprocessing request that cannot be turned into shards; the message says where and how to fix it."""
