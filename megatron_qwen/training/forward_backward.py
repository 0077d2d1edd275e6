"""One forward+backward over a global batch with megatron-core's schedules and grad finalisation.

The loss is the per-token mean over every trained token of the global batch: each micro-batch
returns (sum of token losses, token count), megatron-core sums gradients and `finalize_model_grads`
divides them once by the global token count. That makes loss and gradients identical (to rounding)
at every TP/PP/VPP/CP/DP layout: with context parallelism each CP rank sums its share of every sequence's
tokens, and the sums, the counts and the gradients are reduced over data- and context-parallel ranks together.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_qwen.model.context_parallel import split_batch


def lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of masked per-token losses and the number of trained tokens of one micro-batch."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def model_inputs(batch: dict, model: torch.nn.Module) -> dict:
    """The micro-batch as this rank's model takes it: per-token entries cut to this context-parallel rank's
    share of each sequence (`model.context_parallel.split_batch`; whole without CP; packed rows in the THD layout
    for Transformer Engine's CP), every tensor on the device
    of the model's parameters (datasets yield CPU tensors). Every forward step feeds the model through it."""
    device = next(model.parameters()).device
    batch = split_batch(batch, model=model)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def lm_forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    """megatron-core forward_step_func for next-token prediction.

    Each item of the iterator is a dict with ``tokens``, ``labels``, ``loss_mask`` of shape
    (micro_batch, seq) and optional ``position_ids``/``attention_mask``.
    """
    batch = next(data_iterator)
    if batch.get("position_ids") is None:  # the positions of the whole sequence, before any CP split
        tokens = batch["tokens"]
        batch = {**batch, "position_ids": torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)}
    batch = model_inputs(batch, model)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(lm_loss, batch["loss_mask"])


def micro_batch_iterators(model: list[torch.nn.Module], batches: list):
    """The data iterator(s) megatron-core's schedule takes: one per model chunk with virtual pipelining."""
    return [iter(list(batches)) for _ in model] if len(model) > 1 else iter(batches)


def forward_collect(model: list[torch.nn.Module], batches: list[dict], forward_step_func, seq_length: int,
                    micro_batch_size: int) -> list | None:
    """Forward passes only, through this layout's schedule: what each micro-batch's loss function returns with
    ``non_loss_data=True``, in order, on the last pipeline stage (None on the others)."""
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step_func,
            data_iterator=micro_batch_iterators(model, batches),
            model=model if len(model) > 1 else model[0],
            num_microbatches=len(batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
            collect_non_loss_data=True,
        )
    return outputs if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None


def forward_backward(
    model: list[torch.nn.Module],
    data_iterator,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_step_func=lm_forward_step,
    forward_only: bool = False,
    report_keys: tuple[str, ...] = ("lm loss",),
) -> dict[str, torch.Tensor]:
    """Run one global batch through megatron-core's schedule for this layout (no pipelining, 1F1B or
    interleaved) and finalise gradients. Returns, on every rank, the global mean of each reported
    metric (the loss function's report maps each key to a [sum, count] pair per micro-batch).

    `data_iterator` is one iterator, or one per model chunk with virtual pipelining. The chunks are DDP-wrapped
    by `training.units.wrap_ddp`, which sets the gradient hooks the schedules call.
    """
    losses = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model if len(model) > 1 else model[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return reduce_reports(losses, report_keys, next(model[0].parameters()).device)


def reduce_reports(losses: list[dict], keys: tuple[str, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """Global means of the last stage's [sum, count] reports, summed over micro-batches, data-parallel replicas
    and context-parallel shares, and broadcast to every pipeline stage (the others have no reports to give).
    Summed and reduced on `device`; the means come to the host once, as one copy."""
    totals = torch.zeros(len(keys), 2, dtype=torch.float64, device=device)
    if losses:
        totals += torch.stack([torch.stack([torch.as_tensor(item[key]) for key in keys]) for item in losses]).to(
            device, torch.float64).sum(dim=0)
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        torch.distributed.broadcast(totals, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    means = (totals[:, 0] / totals[:, 1].clamp(min=1)).to("cpu", torch.float32)
    return {key: means[i] for i, key in enumerate(keys)}
