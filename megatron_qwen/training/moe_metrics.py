"""Per-step metrics of a mixture-of-experts model: the load-balancing loss and how evenly tokens reach experts.

megatron-core's router records each MoE layer's load-balancing loss (without its coefficient) in its layer-wise
tracker; `MoEMetrics` reduces it over the pipeline, tensor and data-parallel ranks as megatron-core's own
logging does and reports its mean over MoE layers and micro-batches (``moe_aux_loss``). Tokens per expert are
counted from each router's routing map (a forward hook, training passes only) and summed over the ranks that
hold distinct tokens: over one global batch, every MoE layer's experts together receive tokens x top-k (less the
dropped ones when a capacity factor is set). Reported: the smallest and largest count of any expert in any MoE
layer, the coefficient of variation (std / mean over a layer's experts, averaged over layers) and, with a
capacity factor, the fraction of routed token slots dropped.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

from megatron_qwen.config import Config

KEYS = ("moe_aux_loss", "moe_tokens_per_expert_min", "moe_tokens_per_expert_max", "moe_tokens_per_expert_cv")
DROPPED_KEY = "moe_dropped_tokens"


class MoEMetrics:
    """Counts each MoE layer's routed tokens while the model trains; `step_reports` gives one step's metrics."""

    def __init__(self, chunks: list[torch.nn.Module], cfg: Config):
        m = cfg.model
        self.keys = KEYS + ((DROPPED_KEY,) if m.moe_capacity_factor is not None else ())
        self.topk, self.num_layers = m.moe_router_topk, m.num_layers
        self.moe_layers = [i for i, moe in enumerate(m.moe_layers) if moe]
        # TP ranks route the same tokens unless the sequence is split over them.
        self.duplicates = 1 if cfg.parallel.sp else cfg.parallel.tp
        self.counts = torch.zeros(m.num_layers, m.num_experts, dtype=torch.float64)
        self.slots = torch.zeros(m.num_layers, dtype=torch.float64)  # tokens x top-k offered to the router
        self.hooks = [module.register_forward_hook(self._count) for chunk in chunks for module in chunk.modules()
                      if isinstance(module, TopKRouter)]

    def _count(self, router: TopKRouter, inputs, output) -> None:
        if not router.training:
            return
        _, routing_map = output
        layer = router.layer_number - 1
        self.counts[layer] += routing_map.sum(dim=0).to(self.counts)
        self.slots[layer] += routing_map.shape[0] * self.topk

    def layer_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens per expert [MoE layers, experts], routed slots [MoE layers]) over every rank since the last
        step, summed over distinct tokens (a collective over all ranks)."""
        both = torch.cat([self.counts, self.slots[:, None]], dim=1)
        # nccl reduces device tensors only; gloo (CPU ranks) host tensors.
        both = both.to("cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
        torch.distributed.all_reduce(both)
        both = both / self.duplicates
        rows = both[self.moe_layers]
        return rows[:, :-1].cpu(), rows[:, -1].cpu()

    def step_reports(self, num_microbatches: int) -> dict:
        """The step's MoE metrics (see the module docstring), then every count and tracked loss reset."""
        counts, slots = self.layer_counts()
        self.counts.zero_()
        self.slots.zero_()
        reports = {
            "moe_tokens_per_expert_min": counts.min().item(),
            "moe_tokens_per_expert_max": counts.max().item(),
            "moe_tokens_per_expert_cv": (counts.std(dim=1, correction=0) / counts.mean(dim=1)).mean().item(),
            "moe_aux_loss": self._aux_loss(num_microbatches),
        }
        if DROPPED_KEY in self.keys:
            reports[DROPPED_KEY] = (1 - counts.sum() / slots.sum()).item()
        return reports

    def _aux_loss(self, num_microbatches: int) -> float:
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        if "load_balancing_loss" not in tracker:
            return 0.0  # no coefficient: megatron-core computes no loss
        moe_utils.reduce_aux_losses_tracker_across_ranks(["load_balancing_loss"])
        values = tracker["load_balancing_loss"]["values"]
        loss = values[self.moe_layers].sum().item() / (len(self.moe_layers) * num_microbatches)
        moe_utils.clear_aux_losses_tracker()
        return loss


def moe_metrics(chunks: list[torch.nn.Module], cfg: Config) -> MoEMetrics | None:
    """The MoE metrics of a training run's model chunks (None for a dense model)."""
    return MoEMetrics(chunks, cfg) if cfg.model.is_moe else None
