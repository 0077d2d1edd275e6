"""Model units: a model's chunks plus, when it is trained, its DDP wrapper, optimizer and LR schedule.

A stage composes units: pretraining, SFT and the reward model train one; PPO trains a policy and a value
model and holds a frozen reference and reward model. Every unit is built, stepped, checkpointed and
logged the same way. A unit's `namespace` is its place in checkpoints: ``""`` is the root (where tools
such as the converter and the forward tool read a model), any other name nests the unit's state under
that name with its tensors' keys prefixed (see `megatron_qwen.checkpoint.directory`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import optimizer as mcore_optimizer

from megatron_qwen.checkpoint.io import finish_param_sync
from megatron_qwen.config import Config
from megatron_qwen.model.qwen import Head, build_model
from megatron_qwen.platform.runtime import Runtime
from megatron_qwen.training.schedule import LRSchedule, set_lr


def wrap_ddp(chunks: list[torch.nn.Module], cfg: Config) -> list[DistributedDataParallel]:
    """Wrap model chunks in megatron-core's DDP (gradient buckets in fp32, reduced across DP) and give their
    config the hooks megatron-core's schedules call, as Megatron-LM's training loop does.

    With ``parallel.overlap_grad_reduce`` a bucket's reduction starts as soon as the last micro-batch's
    backward has produced its gradients (``no_sync_func`` holds it back for the earlier micro-batches,
    ``grad_sync_func`` lets interleaved schedules start each chunk's). With ``parallel.overlap_param_gather``
    (distributed optimizer) the optimizer step leaves the other ranks' shares of the weights to be gathered
    bucket by bucket by forward pre-hooks during the next forward (interleaved schedules dispatch each
    chunk's through ``param_sync_func``); `ModelUnit.finish_param_sync` completes it before a save.
    """
    p = cfg.parallel
    gather = p.overlap_param_gather and p.use_distributed_optimizer
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=gather,
        # Only the interleaved schedule dispatches all-gathers itself; otherwise each bucket's pre-hook
        # dispatches the next bucket's.
        align_param_gather=gather and len(chunks) > 1,
        bucket_size=p.ddp_bucket_size,
        use_distributed_optimizer=p.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    model = [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            # Later chunks' buckets would only be overlapped with compute; keep one bucket each.
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]

    def per_chunk(method: str):
        hooks = [getattr(chunk, method) for chunk in model]
        return hooks if len(hooks) > 1 else hooks[0]

    config = chunks[0].config  # one config object shared by the chunks
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = per_chunk("no_sync") if p.overlap_grad_reduce else None
    config.grad_sync_func = per_chunk("start_grad_sync") if p.overlap_grad_reduce else None
    config.param_sync_func = per_chunk("start_param_sync") if ddp_config.align_param_gather else None
    return model


def build_optimizer(cfg: Config, chunks: list[torch.nn.Module], bf16: bool, lr: float | None = None):
    """megatron-core's Adam (AdamW: decoupled weight decay) over the model chunks; norms and biases
    get no weight decay (megatron-core's default parameter groups). The LR is set every step."""
    t = cfg.training
    config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr if lr is None else lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather and cfg.parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, chunks)


def guarded_step(optimizer, clip_grad: float) -> tuple[float | None, bool]:
    """megatron-core's optimizer step, except that a non-finite gradient norm skips the update
    instead of writing NaNs into the weights. Returns (grad norm, updated)."""
    if optimizer.prepare_grads():
        return None, False
    grad_norm = optimizer.get_grad_norm()
    if not math.isfinite(grad_norm):
        return grad_norm, False
    if clip_grad > 0:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            params = opt.get_parameters()
            if params:
                mcore_optimizer.clip_grad_by_total_norm_fp32(params, clip_grad, grad_norm)
    return grad_norm, optimizer.step_with_ready_grads()


@dataclass
class ModelUnit:
    """One model of a stage: its chunks (DDP-wrapped when trained) and, when trained, optimizer and schedule."""

    name: str
    chunks: list[torch.nn.Module]
    runtime: Runtime
    namespace: str = ""
    optimizer: object | None = None
    schedule: LRSchedule | None = None
    weight_decay: float = 0.0
    clip_grad: float = 0.0
    adapters: bool = False  # low-rank adapters trained on a frozen base (`peft.*`): checkpoints hold the adapters
    host_copies: list[torch.Tensor] | None = field(default=None, repr=False)  # a frozen unit's offloaded weights

    @property
    def trained(self) -> bool:
        return self.optimizer is not None

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The model chunks themselves (without their DDP wrappers)."""
        return [getattr(chunk, "module", chunk) for chunk in self.chunks]

    def train(self) -> None:
        for chunk in self.chunks:
            chunk.train()

    def eval(self) -> None:
        for chunk in self.chunks:
            chunk.eval()

    def zero_grad(self) -> None:
        """Clear the DDP gradient buffers and the optimizer's gradients before a step."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def set_lr(self, step: int) -> float:
        """Apply the schedule's learning rate for optimizer update `step` (0-based); returns it."""
        lr = self.schedule.at(step)
        set_lr(self.optimizer, lr, self.weight_decay)
        return lr

    def step(self) -> tuple[float | None, bool]:
        """The optimizer step on the reduced gradients (skipped when they are not finite): (grad norm, updated)."""
        return guarded_step(self.optimizer, self.clip_grad)

    def finish_param_sync(self) -> None:
        """Bring this rank's weights up to date now (before a save); see `finish_param_sync`."""
        finish_param_sync(self.chunks)

    def _tensors(self) -> list[torch.Tensor]:
        return [t for chunk in self.chunks for t in itertools.chain(chunk.parameters(), chunk.buffers())]

    def offload(self) -> None:
        """Free a frozen unit's device memory between uses, its weights kept in pinned host buffers (a no-op on CPU
        ranks). The weights never change, so only the first call copies them to the host."""
        if self.trained:
            raise ValueError(f"model unit {self.name!r} is trained: its optimizer holds views of its weights; "
                             "only frozen units move")
        if self.runtime.on_cpu:
            return
        tensors = self._tensors()
        if self.host_copies is None:
            # Pinned, so that `onload` copies back asynchronously (pageable memory makes every copy synchronous).
            self.host_copies = [torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
                                for t in tensors]
            for host, t in zip(self.host_copies, tensors):
                host.copy_(t.data)
        for host, t in zip(self.host_copies, tensors):
            t.data = host

    def onload(self) -> None:
        """Bring an offloaded frozen unit back to its device: non-blocking copies from its pinned host buffers
        (never the buffers themselves), ordered before the unit's first kernel on the same stream."""
        if self.runtime.on_cpu or self.host_copies is None:
            return
        for host, t in zip(self.host_copies, self._tensors()):
            t.data = host.to(self.runtime.device, non_blocking=True, copy=True)


def build_unit(
    cfg: Config,
    runtime: Runtime,
    name: str,
    *,
    head: Head = "lm",
    rope_at_positions: bool = False,
    trained: bool = True,
    lr: float | None = None,
    namespace: str = "",
) -> ModelUnit:
    """A model unit for this rank. Trained: wrapped in DDP with an optimizer and ``training.*``'s LR schedule
    (peaking at `lr` when given). Frozen: in eval mode, without gradients, DDP or optimizer.

    A trained language model (head ``lm``) gets ``peft.*``'s low-rank adapters when ``peft.method`` is set: its
    base weights are frozen, so DDP's gradient buffers and the optimizer (its main weights and Adam moments) hold
    the adapters alone. Frozen units and scalar-head models (reward, value) stay full."""
    adapters = trained and head == "lm" and cfg.peft.method is not None
    chunks = build_model(cfg, runtime, head, rope_at_positions, adapters=adapters)
    if not trained:
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        return ModelUnit(name, chunks, runtime, namespace)
    chunks = wrap_ddp(chunks, cfg)
    t = cfg.training
    return ModelUnit(
        name, chunks, runtime, namespace,
        optimizer=build_optimizer(cfg, chunks, runtime.params_dtype == torch.bfloat16, lr),
        schedule=LRSchedule.from_training(t, lr),
        weight_decay=t.weight_decay,
        clip_grad=t.clip_grad,
        adapters=adapters,
    )
