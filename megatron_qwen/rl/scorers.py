"""Each rollout's raw score, the same on every rank: from the frozen reward model or from a reward function.

`RewardModelScorer` reads the reward model's scalar at each row's final token (the last pipeline stage computes
it, the other stages receive it); `RewardFunctionScorer` calls the user's function once per rollout on the data-
parallel replica's first rank and shares the scores, stopping every rank with the function's error when it fails.
"""

from __future__ import annotations

from typing import Callable

import torch
from megatron.core import parallel_state

from megatron_qwen.model.context_parallel import cp_rank, cp_size
from megatron_qwen.rl.experience import Rollouts, Rows
from megatron_qwen.rl.rewards import RewardFunctionError, call_reward_fn
from megatron_qwen.training.forward_backward import forward_collect


class RewardModelScorer:
    """Scores from a frozen scalar-head model; `on_device()` is a context manager that holds it on its device."""

    def __init__(self, unit, on_device: Callable, scalar_step: Callable, micro_batch_size: int, device):
        self.unit, self.on_device, self.scalar_step = unit, on_device, scalar_step
        self.micro_batch_size, self.device = micro_batch_size, device

    def __call__(self, rollouts: Rollouts, rows: Rows, micro: list[dict], step: int) -> torch.Tensor:
        """The reward model's value at each row's final token ([n] float)."""
        with self.on_device():
            out = forward_collect(self.unit.chunks, micro, self.scalar_step, rows.length, self.micro_batch_size)
        scores = torch.zeros(len(rollouts), dtype=torch.float64, device=self.device)
        if out is not None:
            values = torch.cat(out).to(self.device)
            scores = values[torch.arange(len(rollouts), device=self.device), rows.final].double()
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(scores, parallel_state.get_pipeline_model_parallel_last_rank(),
                                        group=parallel_state.get_pipeline_model_parallel_group())
        return scores.float()


class RewardFunctionScorer:
    """Scores from ``fn(prompt_tokens, response_tokens, prompt, response)``; texts are decoded (stop ids left out of
    the response) only when `decode` is given (a model with its family's whole vocabulary)."""

    def __init__(self, fn: Callable, stop_ids, decode: Callable | None, device):
        self.fn, self.stop_ids, self.decode, self.device = fn, set(stop_ids), decode, device

    def __call__(self, rollouts: Rollouts, rows: Rows, micro: list[dict], step: int) -> torch.Tensor:
        """Each rollout's score ([n] float); RewardFunctionError on every rank, naming `step`, when one fails."""
        group = parallel_state.get_model_parallel_group()  # TP x PP: each context-parallel rank has its own
        source = torch.distributed.get_process_group_ranks(group)[0]
        scores = torch.zeros(len(rollouts), dtype=torch.float64)
        error = None
        # One call per rollout on CP rank 0's source, so a function that is not deterministic scores once.
        if torch.distributed.get_rank() == source and cp_rank() == 0:
            try:
                for i, (prompt, response) in enumerate(zip(rollouts.prompts, rollouts.responses)):
                    body = [t for t in response if t not in self.stop_ids]
                    scores[i] = call_reward_fn(self.fn, rollouts.prompt_index[i], prompt, response,
                                               self.decode(prompt) if self.decode else None,
                                               self.decode(body) if self.decode else None)
            except RewardFunctionError as exc:
                error = str(exc)
        errors = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errors, error)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise RewardFunctionError(f"step {step}: {first}; stopping without saving this step")
        scores = scores.to(self.device)
        if cp_size() > 1 and torch.distributed.get_rank() == source:  # the sources of the CP ranks share a group
            cp_group = parallel_state.get_context_parallel_group()
            torch.distributed.broadcast(scores, torch.distributed.get_process_group_ranks(cp_group)[0], group=cp_group)
        torch.distributed.broadcast(scores, source, group=group)
        return scores.float()
