"""Preference-optimisation math as pure functions: DPO's loss (Rafailov et al. 2023), its label-smoothed
form (cDPO) and IPO (Azar et al. 2023), the implicit rewards, and the response span of a preference pair.

A sequence's log-probability is the sum of log p(token) over its response tokens; the policy's and the frozen
reference's enter the loss only through the log-ratios log pi(y|x) - log pi_ref(y|x).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo")


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
               reference_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
               loss: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards of the chosen and rejected responses (detached).

    With h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)):
    sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h) (eps = `label_smoothing`; 0 is DPO);
    ipo: (h - 1 / (2 beta))^2 on the summed log-probabilities, as in Azar et al.'s paper.
    The reward of a response is beta (log pi(y) - log pi_ref(y)).
    """
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo loss {loss!r} is not one of {', '.join(LOSSES)}")
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def response_start(chosen: np.ndarray, rejected: np.ndarray) -> int:
    """Where the two responses of a pair begin to differ: the first position at which the token ids differ
    (the shorter length when one side is a prefix of the other).

    The shards hold each side as one conversation, the prompt shared; tokens both responses share after the
    prompt add the same log-probability to both sides, so leaving them out changes the chosen and rejected
    rewards but neither the loss, the margin nor the accuracy.
    """
    n = min(len(chosen), len(rejected))
    differ = np.flatnonzero(np.asarray(chosen[:n]) != np.asarray(rejected[:n]))
    return int(differ[0]) if differ.size else n
