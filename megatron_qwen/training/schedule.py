"""Learning-rate schedule: linear warmup, then cosine (or linear) decay to the minimum LR."""

from __future__ import annotations

import math
from dataclasses import dataclass


def lr_at(step: int, peak: float, minimum: float, warmup: int, decay_end: int, style: str = "cosine") -> float:
    """Learning rate of optimizer update number `step` (0-based).

    Warmup: ``peak * (step + 1) / warmup`` for the first `warmup` updates. Then over updates
    ``warmup .. decay_end`` the rate falls from `peak` to `minimum` (cosine: ``min + (peak - min) *
    (1 + cos(pi * t)) / 2`` with t the fraction of the decay done) and stays at `minimum` after.
    ``style="constant"`` keeps `peak` after warmup.
    """
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if style == "constant":
        return peak
    span = max(decay_end - warmup, 1)
    t = min(max(step - warmup, 0) / span, 1.0)
    if style == "cosine":
        return minimum + (peak - minimum) * 0.5 * (1.0 + math.cos(math.pi * t))
    if style == "linear":
        return peak - (peak - minimum) * t
    raise ValueError(f"lr decay style {style!r} is not cosine, linear or constant")


def set_lr(optimizer, lr: float, weight_decay: float) -> None:
    """Apply the step's LR and weight decay to every parameter group (honouring megatron-core's
    per-group ``lr_mult``/``wd_mult``: norms and biases have ``wd_mult`` 0)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


@dataclass(frozen=True)
class LRSchedule:
    """One model unit's learning-rate schedule (see `lr_at`)."""

    peak: float
    minimum: float
    warmup: int
    decay_end: int
    style: str = "cosine"

    @classmethod
    def from_training(cls, t, peak: float | None = None) -> "LRSchedule":
        """``training.*``'s schedule, at another peak when given (e.g. a second model's learning rate); the
        minimum keeps its ratio to the peak."""
        if peak is None:
            peak, minimum = t.lr, t.min_lr
        else:
            minimum = t.min_lr * peak / t.lr if t.lr else t.min_lr
        return cls(peak, minimum, t.lr_warmup_iters, t.lr_decay_iters or t.train_iters, t.lr_decay_style)

    def at(self, step: int) -> float:
        """The learning rate of optimizer update number `step` (0-based)."""
        return lr_at(step, self.peak, self.minimum, self.warmup, self.decay_end, self.style)
