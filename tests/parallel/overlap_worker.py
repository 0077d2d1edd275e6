"""Worker for tests/test_overlap.py, launched with torchrun on gloo CPU ranks.

For each layout (``tp,pp,vpp`` or ``tp,pp,vpp,clip``, the rest of the ranks data-parallel, distributed
optimizer; gradient clipping off unless ``clip``), trains the tiny Qwen for STEPS steps on the same batches
twice, with gradient reduction and weight all-gather overlapped
(``parallel.overlap_grad_reduce``, ``parallel.overlap_param_gather``, small buckets) and without, the model
unit built as the trainer builds it. Each run writes its per-step losses and when its collectives ran, and
saves a checkpoint through the trainer's save path (which must first complete the overlapped all-gather).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
SEQ, GLOBAL_BATCH, MICRO_BATCH, STEPS, VOCAB = 32, 8, 1, 10, 1024
BUCKET = 300_000  # elements: several buckets in the first model chunk of the first pipeline stage


class CollectiveLog:
    """Counts megatron-core's gradient reduce-scatters and weight all-gathers by the phase of the step that
    issues them (the worker sets `phase`)."""

    def __init__(self):
        from megatron.core.distributed import param_and_grad_buffer as buffers

        self.phase = "idle"
        self.counts: dict[str, int] = {}
        for name, kind in (("dist_reduce_scatter_func", "reduce-scatter"), ("dist_all_gather_func", "all-gather")):
            setattr(buffers, name, self._counted(kind, getattr(buffers, name)))

    def _counted(self, kind: str, original):
        def call(*args, **kwargs):
            key = f"{kind} during {self.phase}"
            self.counts[key] = self.counts.get(key, 0) + 1
            return original(*args, **kwargs)

        return call


def run(layout: tuple[int, int, int], overlap: bool, clip: bool, workdir: Path, log: CollectiveLog) -> None:
    from megatron.core import parallel_state

    from megatron_qwen.config import load_config, resolve
    from megatron_qwen.platform.launch import detect_launch, init_distributed
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.checkpoint.io import save_checkpoint
    from megatron_qwen.training.forward_backward import forward_backward
    from megatron_qwen.training.units import build_unit

    tp, pp, vpp = layout
    flag = str(overlap).lower()
    cfg = load_config(CONFIG, [
        f"model.padded_vocab_size={VOCAB}", f"model.seq_length={SEQ}", f"parallel.tp={tp}", f"parallel.pp={pp}",
        f"parallel.vpp={vpp}", "parallel.use_distributed_optimizer=true", f"parallel.overlap_grad_reduce={flag}",
        f"parallel.overlap_param_gather={flag}", f"parallel.ddp_bucket_size={BUCKET}",
        f"training.micro_batch_size={MICRO_BATCH}", f"training.global_batch_size={GLOBAL_BATCH}",
        f"training.train_iters={STEPS}", "training.lr=3e-3", "training.lr_warmup_iters=2",
        # Clipping scales every gradient by the global norm, which each rank sums over the share of the buffer
        # it owns: a share that the bucket layout changes, so the norm's last bits would too, and Adam turns
        # such differences into visible ones for near-zero gradients (the key biases). Without it, every
        # update is elementwise on identically reduced gradients; with it (the default, 1.0) the test
        # compares within a tolerance.
        *([] if clip else ["training.clip_grad=0"]),
    ])
    assert cfg.training.clip_grad == (1.0 if clip else 0.0), cfg.training.clip_grad
    cfg, layout_, _ = resolve(cfg, detect_launch().world_size)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_distributed(tp, pp, vpp, device="cpu", seed=cfg.training.seed)
    unit = build_unit(cfg, Runtime.cpu(), "model")
    config = unit.modules[0].config
    finalize = config.finalize_model_grads_func

    def finalize_logged(*args, **kwargs):
        log.phase = "finalize"
        return finalize(*args, **kwargs)

    config.finalize_model_grads_func = finalize_logged
    num_micro = GLOBAL_BATCH // (MICRO_BATCH * layout_.dp)
    dp_rank = parallel_state.get_data_parallel_rank()
    losses, phases, norms = [], [], []
    for step in range(STEPS):
        # Tokens from a small subset of the vocabulary: learnable in a few steps, so the runs visibly train.
        tokens = torch.randint(0, 16, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
        mine = tokens.view(layout_.dp, num_micro, MICRO_BATCH, SEQ + 1)[dp_rank]
        batches = [{"tokens": b[:, :-1], "labels": b[:, 1:], "loss_mask": torch.ones(MICRO_BATCH, SEQ)} for b in mine]
        iterators = [iter(list(batches)) for _ in unit.chunks] if len(unit.chunks) > 1 else iter(batches)
        unit.set_lr(step)
        unit.zero_grad()
        log.counts, log.phase = {}, "forward-backward"
        losses.append(forward_backward(unit.chunks, iterators, num_micro, SEQ, MICRO_BATCH)["lm loss"].item())
        log.phase = "optimizer step"
        norm, updated = unit.step()
        assert updated
        norms.append(norm)
        log.phase = "idle"
        phases.append(log.counts)
    log.counts = {}
    out = workdir / f"tp{tp}-pp{pp}-vpp{vpp}{'-clip' if clip else ''}-{'overlap' if overlap else 'plain'}"
    save_checkpoint(out, STEPS, [unit], {"consumed_samples": STEPS * GLOBAL_BATCH}, keep_last=1)
    buckets = [len(buffer.buckets) for chunk in unit.chunks for buffer in chunk.buffers]
    result = {"losses": losses, "phases": phases, "grad_norms": norms, "buckets": buckets,
              "pp_rank": parallel_state.get_pipeline_model_parallel_rank()}
    (out / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--layouts", required=True, help="tp,pp,vpp[,clip];tp,pp,vpp[,clip];...")
    args = parser.parse_args()
    log = CollectiveLog()
    for item in args.layouts.split(";"):
        *sizes, clip = item.split(",") + ([] if item.endswith(",clip") else [""])
        for overlap in (False, True):
            run(tuple(int(x) for x in sizes), overlap, clip == "clip", args.workdir, log)


if __name__ == "__main__":
    main()
