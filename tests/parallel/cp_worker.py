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
- stages.json: one step of the reward and of the DPO stage (reports, gradient norm).
- ppo/ESTIMATOR/LAYOUT/metrics.jsonl: a few PPO (GAE) and GRPO steps from the CP=1 run's final weights (--ppo).
- cli_forward/LAYOUT.npy: `megatron-qwen forward`'s logits of the CP=1 run's final weights (--cli-forward).
--measure LAYOUT@SEQ prints the activation bytes and the forward+backward time of one sequence (a figure for the
docs, not a test).
"""

from __future__ import annotations

import argparse
import json
import re
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
MODEL = ["model.padded_vocab_size=1024", "model.seq_length=32", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.kv_channels=64"]
SEQ, GLOBAL_BATCH, MICRO_BATCH, SEED = 32, 8, 1, 1234
REFERENCE = "tp1-pp1-vpp1-cp1"
TRAIN_STEPS, RESUME_AT = 10, 5
FORWARD_LENGTHS = (8, 16, 32)
PACKED_STARTS = ((0, 5, 13, 20), (0, 11))
PREFERENCE_ROWS = 8  # 4 pairs  # where each row's packed sequences begin (rows of SEQ tokens)


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


def cli_forward(layouts: list[str], workdir: Path) -> None:
    """`megatron-qwen forward` on the CP=1 run's final weights (the training runs come first) at CP=1 and at each
    of `layouts` (``--cp 2``, ``--cp 2 --tp 2 --sequence-parallel``): logits of two 30-token rows, a length that
    does not cut into 2 x CP chunks, so the command pads it; under --workdir/cli_forward/LAYOUT.npy."""
    import numpy as np
    import yaml

    from megatron_qwen.cli import forward

    out = workdir / "cli_forward"
    cfg, _ = setup(REFERENCE)
    if torch.distributed.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()["model"]}))
        np.save(out / "tokens.npy", tokens_of(30, 2, 21)[:, :-1].numpy())
    torch.distributed.barrier()
    for name in (REFERENCE, *layouts):
        layout = parse_layout(name)
        args = ["--ckpt", str(workdir / REFERENCE / "train" / "final"), "--config", str(out / "model.yaml"),
                "--tokens", str(out / "tokens.npy"), "--out", str(out / f"{name}.npy"),
                "--tp", str(layout["tp"]), "--pp", str(layout["pp"]), "--cp", str(layout["cp"])]
        code = forward.main(args + (["--sequence-parallel"] if layout["sp"] else []))
        assert code == 0, (name, code)


PPO_RUNS = {"gae": [], "grpo": ["ppo.estimator=grpo"]}
PPO_STEPS = 2


def low_half(prompt_tokens, response_tokens, prompt, response) -> float:
    """The PPO runs' rule reward: the fraction of response ids in the lower half of the vocabulary."""
    return sum(t < 512 for t in response_tokens) / max(len(response_tokens), 1)


def ppo(layouts: list[str], workdir: Path) -> None:
    """PPO_STEPS steps of the PPO stage (GAE with a value model, and GRPO) from the CP=1 run's final weights, at
    CP=1 and at each of `layouts`: metrics.jsonl under --workdir/ppo/ESTIMATOR/LAYOUT."""
    from megatron.core import parallel_state

    from megatron_qwen.config import load_config
    from megatron_qwen.data.indexed import IndexedShardWriter
    from megatron_qwen.data.shard_names import shard_prefix
    from megatron_qwen.stages.ppo import train_ppo

    setup(REFERENCE)  # the process group, when nothing ran before
    root = workdir / "ppo"
    prompts = root / "prompts"
    if torch.distributed.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(4)
        with IndexedShardWriter(shard_prefix(str(prompts), "prompt"), 1024) as writer:
            for _ in range(64):
                writer.add_document(torch.randint(0, 1000, (int(torch.randint(4, 12, (1,), generator=gen)),),
                                                  generator=gen).numpy())
    torch.distributed.barrier()
    for estimator, extra in PPO_RUNS.items():
        for name in (REFERENCE, *layouts):
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            overrides = [*MODEL, *(f"parallel.{k}={str(v).lower()}" for k, v in parse_layout(name).items()),
                         "model.hidden_dropout=0", "model.attention_dropout=0", f"data.paths=[{prompts}]",
                         f"data.cache_dir={root / 'cache'}", "data.split=100,0,0",
                         f"ppo.policy_from={workdir / REFERENCE / 'train' / 'final'}",
                         "ppo.reward_fn=tests.parallel.cp_worker:low_half", "ppo.prompts_per_step=4",
                         "ppo.samples_per_prompt=2", "ppo.max_new_tokens=6", "ppo.critic_warmup_steps=0",
                         "training.micro_batch_size=2", "training.global_batch_size=8", "training.lr=5e-3",
                         "training.min_lr=5e-3", "ppo.value_lr=5e-3", f"training.train_iters={PPO_STEPS}",
                         "logging.log_interval=1", f"logging.run_dir={root / estimator / name}", *extra]
            code = train_ppo(load_config(REPO / "configs" / "tiny.yaml", overrides, stage="ppo"))
            assert code == 0, (estimator, name, code)


def preference_rows(rows: int) -> list[dict]:
    """`rows` sequences of SEQ tokens, pairs side by side (a shared 10-token prompt), each marked at its last
    token as the preference shards mark them."""
    tokens = tokens_of(SEQ - 1, rows, 11)
    tokens[1::2, :10] = tokens[0::2, :10]
    items = []
    for i in range(rows):
        mark = torch.zeros(SEQ)
        mark[18 + i] = 1.0
        items.append({"tokens": tokens[i].numpy(), "loss_mask": mark.numpy()})
    return items


def check_stages(name: str, workdir: Path) -> None:
    """One step of the reward and the DPO stage (their forward steps, losses and DPO's reference preparation) on
    PREFERENCE_ROWS rows: the reports and the gradient norm."""
    import contextlib
    import types

    from megatron.core import parallel_state

    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.stages import dpo, reward
    from megatron_qwen.training.forward_backward import forward_backward, micro_batch_iterators
    from megatron_qwen.training.units import build_unit

    cfg, layout = setup(name, ("training.micro_batch_size=2",))
    rows = preference_rows(PREFERENCE_ROWS)
    per_rank = PREFERENCE_ROWS // layout.dp
    mine = range(parallel_state.get_data_parallel_rank() * per_rank, (parallel_state.get_data_parallel_rank() + 1)
                 * per_rank)
    result = {}
    for stage, head in (("reward", "scalar"), ("dpo", "lm")):
        unit = build_unit(cfg, Runtime.cpu(), stage, head=head)
        unit.set_lr(0)
        unit.zero_grad()
        if stage == "reward":
            items = [{k: torch.as_tensor(v) for k, v in rows[i].items()} for i in mine]
            step, keys = reward.reward_forward_step, reward.REPORT_KEYS
        else:
            responses = dpo.ResponseRows(rows)
            items = [{k: torch.as_tensor(v) for k, v in responses[i].items()} for i in mine]
            step, keys = partial(dpo.dpo_forward_step, cfg.dpo), dpo.REPORT_KEYS
        micro = [{k: torch.stack([items[j][k], items[j + 1][k]]) for k in items[j]} for j in range(0, len(items), 2)]
        if stage == "dpo":
            reference = build_unit(cfg, Runtime.cpu(), "reference", trained=False)
            for param in (p for chunk in reference.chunks for p in chunk.parameters()):
                param.data.mul_(0.9)  # a reference apart from the policy: its log-probabilities count in the loss
            trainer = types.SimpleNamespace(cfg=cfg, frozen_model=lambda _: contextlib.nullcontext(reference))
            dpo.add_reference_logprobs(trainer, micro)
        reports = forward_backward(unit.chunks, micro_batch_iterators(unit.chunks, micro), len(micro), SEQ, 2, step,
                                   report_keys=keys)
        grad_norm, _ = unit.step()
        result[stage] = {**{k: v.item() for k, v in reports.items()}, "grad_norm": grad_norm}
    if torch.distributed.get_rank() == 0:
        (workdir / name).mkdir(parents=True, exist_ok=True)
        (workdir / name / "stages.json").write_text(json.dumps(result))


def measure(name: str, seq: int, workdir: Path) -> None:
    """Activation bytes one micro-batch of `seq` tokens saves for backward on this rank (distinct storages under
    saved_tensors_hooks, as the planner's activation test counts them) and the seconds of a forward+backward."""
    import time

    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.training.forward_backward import model_inputs

    cfg, _ = setup(name, (f"model.seq_length={seq}",))
    (model,) = build_model(cfg, Runtime.cpu())
    model.train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tokens = tokens_of(seq, 1, 0)
    batch = model_inputs({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                          "position_ids": torch.arange(seq)[None]}, model)
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in parameters:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    loss.sum().backward()
    seconds = []
    for _ in range(3):
        torch.distributed.barrier()
        start = time.perf_counter()
        model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).sum().backward()
        torch.distributed.barrier()
        seconds.append(time.perf_counter() - start)
    if torch.distributed.get_rank() == 0:
        print(json.dumps({"layout": name, "seq": seq, "activation_bytes": sum(saved.values()),
                          "step_seconds": min(seconds)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--forward", default="", help="layouts whose forward passes are compared with CP=1")
    parser.add_argument("--train", default="", help="layouts to train (LAYOUT@FROM: resume from FROM's checkpoint)")
    parser.add_argument("--resume", action="store_true", help="save at RESUME_AT while training")
    parser.add_argument("--stages", default="", help="layouts at which one reward and one DPO step run")
    parser.add_argument("--cli-forward", default="", help="layouts at which `megatron-qwen forward` runs")
    parser.add_argument("--ppo", default="", help="layouts at which PPO and GRPO run a few steps")
    parser.add_argument("--measure", default="", help="LAYOUT@SEQ,...: activation bytes and step time (not a test)")
    args = parser.parse_args()
    if args.forward:
        cfg, _ = setup("tp1-pp1-vpp1-cp1")
        reference = forward_outputs(cfg)
        for name in args.forward.split(","):
            check_forward(name, reference, args.workdir)
    for name in filter(None, args.train.split(",")):
        train(name, args.workdir, args.resume)
    for name in filter(None, args.stages.split(",")):
        check_stages(name, args.workdir)
    if args.cli_forward:
        cli_forward(args.cli_forward.split(","), args.workdir)
    if args.ppo:
        ppo(args.ppo.split(","), args.workdir)
    for item in filter(None, args.measure.split(",")):
        name, seq = item.split("@")
        measure(name, int(seq), args.workdir)


if __name__ == "__main__":
    main()
