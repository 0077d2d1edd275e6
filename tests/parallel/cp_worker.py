"""Worker for tests/test_context_parallel.py, launched with torchrun on 4 gloo CPU ranks.

Every layout (``tp1-pp1-vpp1-cp1`` is the CP=1 reference, data-parallel over the 4 ranks) is built from the same
seed, so all hold the same weights. Per layout it writes under --workdir/LAYOUT:
- forward.json: for each sequence length, the largest difference between this rank's logits (its CP share of the
  sequence, its TP share of the vocabulary) and the reference's logits at the same positions (every rank runs the
  reference forward on the whole sequence itself first); the same for an SFT micro-batch of packed rows through
  the SFT stage's forward step; and the refusal of a sequence that does not cut into 2 x cp chunks.
- train/: TRAIN_STEPS optimizer steps (the project's model unit: DDP, megatron-core's Adam, the LR schedule),
  each on its own global batch: losses.json and the final weights. With --resume a layout also saves at
  RESUME_AT (ckpt/) and ``LAYOUT@FROM`` resumes from layout FROM's checkpoint for the remaining steps.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
MODEL = ["model.padded_vocab_size=1024", "model.seq_length=32", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.kv_channels=64"]
SEQ, GLOBAL_BATCH, MICRO_BATCH, SEED = 32, 8, 1, 1234
TRAIN_STEPS, RESUME_AT = 10, 5
FORWARD_LENGTHS = (8, 16, 32)
PACKED_STARTS = ((0, 5, 13, 20), (0, 11))  # where each row's packed sequences begin (rows of SEQ tokens)


def parse_layout(name: str) -> dict:
    match = re.fullmatch(r"tp(\d+)-pp(\d+)-vpp(\d+)-cp(\d+)(-sp)?(-dopt)?", name)
    if not match:
        raise SystemExit(f"bad layout {name!r}; expected e.g. tp2-pp1-vpp1-cp2-sp")
    tp, pp, vpp, cp = (int(g) for g in match.groups()[:4])
    return {"tp": tp, "pp": pp, "vpp": vpp, "cp": cp, "sp": match.group(5) is not None,
            "use_distributed_optimizer": match.group(6) is not None}


def setup(name: str, extra: tuple[str, ...] = ()):
    from megatron.core import parallel_state

    from megatron_qwen.config import load_config, resolve
    from megatron_qwen.platform.launch import detect_launch, init_distributed

    overrides = [*MODEL, *(f"parallel.{k}={str(v).lower()}" for k, v in parse_layout(name).items()),
                 f"training.micro_batch_size={MICRO_BATCH}", f"training.global_batch_size={GLOBAL_BATCH}",
                 "training.adam_eps=1e-5", "training.lr_warmup_iters=2", f"training.train_iters={TRAIN_STEPS}",
                 *extra]
    cfg, layout, _ = resolve(load_config(REPO / "configs" / "tiny.yaml", overrides), detect_launch().world_size)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_distributed(layout.tp, layout.pp, layout.vpp, device="cpu", seed=SEED, cp=layout.cp)
    return cfg, layout


def tokens_of(length: int, rows: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1000, (rows, length + 1), generator=torch.Generator().manual_seed(seed))


def packed_batch() -> dict:
    rows = tokens_of(SEQ, len(PACKED_STARTS), 7)
    positions = torch.zeros(len(PACKED_STARTS), SEQ, dtype=torch.long)
    for row, starts in enumerate(PACKED_STARTS):
        for start, end in zip(starts, (*starts[1:], SEQ)):
            positions[row, start:end] = torch.arange(end - start)
    return {"tokens": rows[:, :-1], "labels": rows[:, 1:], "loss_mask": torch.ones(len(PACKED_STARTS), SEQ),
            "position_ids": positions}


def collect(chunks, batches: list[dict], step, seq: int) -> list | None:
    """Forward passes through the layout's schedule; what `step`'s output is on the last stage."""
    from megatron_qwen.training.forward_backward import forward_collect

    def collecting(data_iterator, model):
        output, _ = step(data_iterator, model)
        return output, lambda out, non_loss_data=True: out.detach().clone()

    return forward_collect(chunks, batches, collecting, seq, batches[0]["tokens"].shape[0])


def logits_step(data_iterator, model):
    from megatron_qwen.training.forward_backward import model_inputs

    batch = next(data_iterator)
    tokens = batch["tokens"]
    batch = model_inputs({**batch, "position_ids": torch.arange(tokens.shape[1]).expand_as(tokens)}, model)
    return model(batch["tokens"], batch["position_ids"], None), None


def forward_outputs(cfg) -> dict:
    """This rank's logits at each forward length and its per-token losses of the packed SFT rows."""
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.stages.sft import sft_forward_step

    outputs = {}
    chunks = build_model(cfg, Runtime.cpu())
    for chunk in chunks:
        chunk.eval()
    for length in FORWARD_LENGTHS:
        tokens = tokens_of(length, 2, length)[:, :-1]
        outputs[length] = collect(chunks, [{"tokens": tokens}], logits_step, length)
    packed_model = build_model(cfg, Runtime.cpu(), rope_at_positions=True)
    for chunk in packed_model:
        chunk.eval()
    outputs["packed"] = collect(packed_model, [packed_batch()], sft_forward_step, SEQ)
    return outputs


def check_forward(name: str, reference: dict, workdir: Path) -> None:
    from megatron.core import parallel_state

    from megatron_qwen.errors import UserError
    from megatron_qwen.model.context_parallel import cp_rank, cp_size, split_sequence

    cfg, layout = setup(name)
    mine = forward_outputs(cfg)
    result = {}
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        tp, tp_rank = layout.tp, parallel_state.get_tensor_model_parallel_rank()
        for key, ref in reference.items():
            ref, out = ref[0], mine[key][0]
            expected = split_sequence(ref, 1, cp_rank(), cp_size())  # per-token losses [b, s], logits [b, s, vocab]
            if key != "packed":  # this TP rank's share of the vocabulary
                vocab = ref.shape[-1] // tp
                expected = expected[..., tp_rank * vocab:(tp_rank + 1) * vocab]
            result[str(key)] = (out - expected).abs().max().item() if out.shape == expected.shape else \
                f"shape {tuple(out.shape)} != {tuple(expected.shape)}"
    if layout.cp > 1 and layout.pp == 1:
        try:
            forward_outputs_at(cfg, 30)
            result["uneven"] = "accepted"
        except UserError as exc:
            result["uneven"] = str(exc)
    out = workdir / name
    out.mkdir(parents=True, exist_ok=True)
    (out / f"forward_rank{torch.distributed.get_rank()}.json").write_text(json.dumps(result))


def forward_outputs_at(cfg, length: int) -> None:
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    collect(build_model(cfg, Runtime.cpu()), [{"tokens": tokens_of(length, 1, 0)[:, :-1]}], logits_step, length)


def train(name: str, workdir: Path, resume: bool) -> None:
    """TRAIN_STEPS steps at layout ``LAYOUT`` (saving at RESUME_AT when `resume`), or from RESUME_AT on when the
    name is ``LAYOUT@FROM`` (loading FROM's checkpoint); losses.json and final/ under workdir/NAME/train."""
    from megatron.core import parallel_state

    from megatron_qwen.checkpoint.io import load_checkpoint, save_checkpoint, save_model
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.training.forward_backward import forward_backward, micro_batch_iterators
    from megatron_qwen.training.units import build_unit

    layout_name, _, source = name.partition("@")
    cfg, layout = setup(layout_name)
    unit = build_unit(cfg, Runtime.cpu(), "lm")
    out = workdir / name.replace("@", "_from_") / "train"
    first = 0
    if source:
        first = load_checkpoint(workdir / source / "train" / "ckpt" / f"iter_{RESUME_AT:07d}", [unit],
                                restore_rng=False)["step"]
    elif layout.cp == 1:
        save_model(unit.chunks, out / "initial")  # to show that training moved every weight
    num_micro = GLOBAL_BATCH // (MICRO_BATCH * layout.dp)
    losses = {}
    for step in range(first, TRAIN_STEPS):
        if resume and not source and step == RESUME_AT:
            save_checkpoint(out / "ckpt", step, [unit], {}, keep_last=1)
        unit.set_lr(step)
        unit.zero_grad()
        tokens = tokens_of(SEQ, GLOBAL_BATCH, SEED + step)
        mine = tokens.view(layout.dp, num_micro, MICRO_BATCH, SEQ + 1)[parallel_state.get_data_parallel_rank()]
        batches = [{"tokens": b[:, :-1], "labels": b[:, 1:], "loss_mask": torch.ones(MICRO_BATCH, SEQ)} for b in mine]
        loss = forward_backward(unit.chunks, micro_batch_iterators(unit.chunks, batches), num_micro, SEQ, MICRO_BATCH)
        losses[step] = loss["lm loss"].item()
        _, updated = unit.step()
        assert updated, f"step {step} skipped"
    save_model(unit.chunks, out / "final")
    if torch.distributed.get_rank() == 0:
        (out / "losses.json").write_text(json.dumps(losses))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--forward", default="", help="layouts whose forward passes are compared with CP=1")
    parser.add_argument("--train", default="", help="layouts to train (LAYOUT@FROM: resume from FROM's checkpoint)")
    parser.add_argument("--resume", action="store_true", help="save at RESUME_AT while training")
    args = parser.parse_args()
    if args.forward:
        cfg, _ = setup("tp1-pp1-vpp1-cp1")
        reference = forward_outputs(cfg)
        for name in args.forward.split(","):
            check_forward(name, reference, args.workdir)
    for name in filter(None, args.train.split(",")):
        train(name, args.workdir, args.resume)


if __name__ == "__main__":
    main()
