"""The global-batch sampler every stage uses: consumed samples -> this data-parallel rank's micro-batches.

Resuming from a checkpoint (which records the consumed samples) continues at exactly the next sample.
"""

from __future__ import annotations

import numpy as np
import torch


class GlobalBatches:
    """This data-parallel rank's micro-batches of consecutive global batches.

    Global batch k covers samples ``[start + k*G, start + (k+1)*G)`` of the dataset; micro-batch i of
    DP rank r takes samples ``i*(m*D) + r*m .. + m`` of it (as Megatron-LM's pretraining sampler).
    """

    def __init__(self, dataset, consumed_samples: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int):
        self.dataset = dataset
        self.position = consumed_samples
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    def next_global_batch(self) -> list[dict]:
        """The micro-batches (dicts of stacked tensors) of the next global batch for this rank."""
        start = self.position
        self.position += self.global_batch
        stride = self.micro_batch * self.dp_size
        batches = []
        for i in range(self.num_microbatches):
            first = start + i * stride + self.dp_rank * self.micro_batch
            samples = [self.dataset[(first + j) % len(self.dataset)] for j in range(self.micro_batch)]
            batches.append(collate(samples))
        return batches


def collate(samples: list[dict]) -> dict:
    """Stack a list of sample dicts into one batch dict (tokens, labels, loss_mask, position_ids)."""
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        if key in samples[0] and samples[0][key] is not None:
            out[key] = torch.stack([torch.as_tensor(np.asarray(s[key])) for s in samples])
    return out
