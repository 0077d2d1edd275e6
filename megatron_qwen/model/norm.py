"""Qwen's RMSNorm, usable inside megatron-core layers with or without sequence parallelism."""

from __future__ import annotations

import torch


class QwenRMSNorm(torch.nn.Module):
    """``(x.float() * rsqrt(mean(x^2) + eps)).type_as(x) * weight`` exactly as Qwen v1 computes it.

    Takes megatron-core's norm constructor arguments. Under sequence parallelism each rank sees a
    slice of the sequence, so the weight is marked ``sequence_parallel`` and megatron-core's
    finalize_model_grads all-reduces its gradient across the TP group.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        self.weight.sequence_parallel = config.sequence_parallel
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight
