"""Worker for tests/test_parallel_equivalence.py and tests/test_family_model.py, launched with torchrun on gloo
CPU ranks.

--reference (1 rank): build the tiny Qwen from the seed and run one forward+backward.
--layouts L1,L2,... (N ranks): for each layout (e.g. ``tp2-pp2-vpp1-sp1``) rebuild the parallel
state, build the model from the same seed, run the same global batch. Each run writes its initial
weights, its loss and its gradients under --workdir (weights and gradients as dist_checkpointing
checkpoints, so they are stored at full, unsharded shapes).
--train ARCH@LAYOUT,... (1 rank for the TP=1 references, N ranks for the others): TRAIN_STEPS optimizer steps of
a Qwen family architecture (tests/qwen_reference.py's FAMILY_ARCHS) at the layout (a ``-dopt`` suffix: the
distributed optimizer), writing the loss of every step, the final weights and, on a last stage that holds a tied
copy of the embedding, that copy.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared architecture table

MODEL_OVERRIDES = ["model.padded_vocab_size=1024", "model.seq_length=32"]
SEQ, GLOBAL_BATCH, MICRO_BATCH, SEED = 32, 8, 1, 1234
TRAIN_STEPS = 10


def parse_layout(name: str) -> tuple[dict, bool]:
    """``tp2-pp2-vpp1-sp1`` -> the parallel settings; a ``-p2p`` suffix asks for the interleaved schedule's
    overlapped p2p transfers (what GPU ranks run) on these CPU ranks too, a ``-dopt`` suffix for the distributed
    optimizer."""
    match = re.fullmatch(r"tp(\d+)-pp(\d+)-vpp(\d+)-sp([01])(-p2p)?(-dopt)?", name)
    if not match:
        raise SystemExit(f"bad layout {name!r}; expected e.g. tp2-pp2-vpp1-sp1")
    tp, pp, vpp, sp = (int(g) for g in match.groups()[:4])
    settings = {"tp": tp, "pp": pp, "vpp": vpp, "sp": bool(sp)}
    if match.group(6):
        settings["use_distributed_optimizer"] = True
    return settings, match.group(5) is not None


def global_batch(vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=gen)


def run(name: str, workdir: Path, reference: bool, extra: tuple[str, ...] = (), out_name: str | None = None) -> None:
    """One forward+backward at layout `name` (config overrides `extra` added), written to `out_name`
    (default: "reference" or the layout's name)."""
    from megatron.core import parallel_state

    from megatron_qwen.config import load_config, resolve
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.launch import detect_launch, init_distributed
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.checkpoint.io import save_model
    from megatron_qwen.training.forward_backward import forward_backward
    from megatron_qwen.training.units import wrap_ddp

    layout_args, overlap_p2p = parse_layout(name)
    overrides = MODEL_OVERRIDES + [f"parallel.{k}={str(v).lower()}" for k, v in layout_args.items()]
    overrides += [f"training.micro_batch_size={MICRO_BATCH}", f"training.global_batch_size={GLOBAL_BATCH}", *extra]
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml", overrides)
    cfg, layout, _ = resolve(cfg, detect_launch().world_size)

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_distributed(layout.tp, layout.pp, layout.vpp, device="cpu", seed=SEED)
    chunks = build_model(cfg, Runtime.cpu())
    chunks[0].config.overlap_p2p_comm = overlap_p2p  # one config object for all chunks
    out = workdir / (out_name or ("reference" if reference else name))
    save_model(chunks, out / "initial")
    model = wrap_ddp(chunks, cfg)

    num_micro = GLOBAL_BATCH // (MICRO_BATCH * layout.dp)
    tokens = global_batch(cfg.model.padded_vocab_size)
    mine = tokens.view(layout.dp, num_micro, MICRO_BATCH, SEQ + 1)[parallel_state.get_data_parallel_rank()]
    batches = [
        {"tokens": b[:, :-1], "labels": b[:, 1:], "loss_mask": torch.ones(MICRO_BATCH, SEQ)} for b in mine
    ]
    iterators = [iter(list(batches)) for _ in model] if len(model) > 1 else iter(batches)
    loss = forward_backward(model, iterators, num_micro, SEQ, MICRO_BATCH)["lm loss"]

    # Store gradients in the parameters so that dist_checkpointing writes them at full shape.
    for chunk in model:
        for param in chunk.parameters():
            param.data.copy_(param.main_grad)
    save_model(model, out / "grads")
    if torch.distributed.get_rank() == 0:
        (out / "loss.json").write_text(json.dumps({"loss": loss.item(), "dp": layout.dp}))


def train(arch: str, name: str, workdir: Path) -> None:
    """TRAIN_STEPS Adam steps (megatron-core's optimizer, gradient clipping on) of `arch` at layout `name`, each on
    its own global batch; writes ``ARCH@LAYOUT/{losses.json, final/, output_copy_tp*.pt}``."""
    from megatron.core import parallel_state

    from megatron_qwen.checkpoint.io import save_model
    from megatron_qwen.config import load_config, resolve
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.launch import detect_launch, init_distributed
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.training.forward_backward import forward_backward
    from megatron_qwen.training.units import build_optimizer, guarded_step, wrap_ddp
    from qwen_reference import FAMILY_ARCHS

    layout_args, _ = parse_layout(name)
    overrides = [*FAMILY_ARCHS[arch], *MODEL_OVERRIDES]
    overrides += [f"parallel.{k}={str(v).lower()}" for k, v in layout_args.items()]
    overrides += [f"training.micro_batch_size={MICRO_BATCH}", f"training.global_batch_size={GLOBAL_BATCH}"]
    # Adam divides each gradient element by its own RMS: with eps 1e-8 an element whose gradient is rounding noise
    # (~1e-10) still moves by a full lr, in the noise's direction, and ten steps compare that noise. Above 1e-5
    # eps changes nothing; below it keeps the update proportional to the gradient.
    overrides += ["training.adam_eps=1e-5"]
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml", overrides)
    cfg, layout, _ = resolve(cfg, detect_launch().world_size)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_distributed(layout.tp, layout.pp, layout.vpp, device="cpu", seed=SEED)
    model = wrap_ddp(build_model(cfg, Runtime.cpu()), cfg)
    out = workdir / f"{arch}@{name}"
    if layout.world_size == 1:
        save_model(model, out / "initial")  # to show that training moved every weight
    optimizer = build_optimizer(cfg, model, bf16=False)
    num_micro = GLOBAL_BATCH // (MICRO_BATCH * layout.dp)
    losses = []
    for step in range(TRAIN_STEPS):
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        gen = torch.Generator().manual_seed(SEED + step)
        tokens = torch.randint(0, cfg.model.padded_vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=gen)
        mine = tokens.view(layout.dp, num_micro, MICRO_BATCH, SEQ + 1)[parallel_state.get_data_parallel_rank()]
        batches = [{"tokens": b[:, :-1], "labels": b[:, 1:], "loss_mask": torch.ones(MICRO_BATCH, SEQ)} for b in mine]
        iterators = [iter(list(batches)) for _ in model] if len(model) > 1 else iter(batches)
        losses.append(forward_backward(model, iterators, num_micro, SEQ, MICRO_BATCH)["lm loss"].item())
        _, updated = guarded_step(optimizer, cfg.training.clip_grad)
        assert updated, f"step {step} skipped"
    save_model(model, out / "final")
    last = model[-1].module
    if (last.share_embeddings_and_output_weights and last.post_process and not last.pre_process
            and parallel_state.get_data_parallel_rank() == 0):
        # The last stage's own copy of the tied embedding: the checkpoint stores only the first stage's.
        torch.save(last.output_layer.weight.detach().clone(),
                   out / f"output_copy_tp{parallel_state.get_tensor_model_parallel_rank()}.pt")
    if torch.distributed.get_rank() == 0:
        (out / "losses.json").write_text(json.dumps({"losses": losses, "dp": layout.dp}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--reference", action="store_true")
    group.add_argument("--layouts", type=str)
    group.add_argument("--train", type=str, help="ARCH@LAYOUT,...: training runs of the Qwen family architectures")
    args = parser.parse_args()
    if args.train:
        for run_name in args.train.split(","):
            train(*run_name.split("@"), args.workdir)
    elif args.reference:
        run("tp1-pp1-vpp1-sp0", args.workdir, reference=True)
    else:
        for name in args.layouts.split(","):
            run(name, args.workdir, reference=False)


if __name__ == "__main__":
    main()
