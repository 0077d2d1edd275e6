"""One PPO update (policy and value losses, gradients) on a fixed experience batch at several layouts.

``--reference`` writes the initial weights and the TP=1 results; ``--layouts`` then runs each layout on the
launch's ranks (data parallelism takes the rest) from the same weights and the same global batch, each
data-parallel rank taking its share of the rows. Gradients are written at full shape through
dist_checkpointing (copied into the parameters), the reduced reports as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
VOCAB, ROWS, LENGTH, MICRO = 128, 8, 16, 2
MODEL = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=2", "model.ffn_hidden_size=128",
         f"model.padded_vocab_size={VOCAB}", "model.seq_length=32", "model.max_position_embeddings=64"]


def experience():
    """The global batch: rows of prompt + response with made-up old/reference log-probabilities and targets."""
    from megatron_qwen.rl.experience import Rollouts, layout_rows

    gen = torch.Generator().manual_seed(3)
    prompts, responses = [], []
    for _ in range(ROWS):
        p, r = int(torch.randint(3, 7, (1,), generator=gen)), int(torch.randint(2, 9, (1,), generator=gen))
        prompts.append(torch.randint(0, VOCAB, (p,), generator=gen).tolist())
        responses.append(torch.randint(0, VOCAB, (r,), generator=gen).tolist())
    rows = layout_rows(Rollouts(prompts, responses, [True] * ROWS, [[]] * ROWS, list(range(ROWS))))
    pad = LENGTH - rows.length
    pad2 = lambda t: torch.nn.functional.pad(t, (0, pad))  # noqa: E731 - one fixed length for every layout
    rows.tokens, rows.labels, rows.mask = pad2(rows.tokens), pad2(rows.labels), pad2(rows.mask)
    rows.position_ids = torch.arange(LENGTH).expand(ROWS, LENGTH).contiguous()
    shape = (ROWS, LENGTH)
    rows.extra = {
        "old_logprobs": -4.85 + 0.3 * torch.randn(shape, generator=gen),
        "ref_logprobs": -4.85 + 0.3 * torch.randn(shape, generator=gen),
        "advantages": torch.randn(shape, generator=gen) * rows.mask,
        "old_values": 0.1 * torch.randn(shape, generator=gen) * rows.mask,
        "returns": torch.randn(shape, generator=gen) * rows.mask,
    }
    return rows


def save_grads(unit, path: Path) -> None:
    from megatron_qwen.checkpoint.io import save_model

    for chunk in unit.chunks:
        for param in chunk.parameters():
            param.data.copy_(param.main_grad)
    save_model(unit.chunks, path)


def run(name: str, layout: dict, workdir: Path, reference: bool) -> None:
    from megatron.core import parallel_state

    from megatron_qwen.config import load_config, resolve
    from megatron_qwen.platform.launch import detect_launch, init_distributed
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.rl import steps as ppo_steps
    from megatron_qwen.checkpoint.io import load_model, save_model
    from megatron_qwen.training.forward_backward import forward_backward, micro_batch_iterators
    from megatron_qwen.training.units import build_unit

    world = detect_launch().world_size
    dp = world // (layout["tp"] * layout["pp"])
    cfg = load_config(REPO / "configs" / "tiny.yaml", MODEL + [
        f"parallel.tp={layout['tp']}", f"parallel.pp={layout['pp']}", f"parallel.sp={str(layout['sp']).lower()}",
        f"training.micro_batch_size={MICRO}", f"training.global_batch_size={ROWS}",
    ])
    cfg, resolved, _ = resolve(cfg, world)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_distributed(resolved.tp, resolved.pp, None, device="cpu")
    policy = build_unit(cfg, Runtime.cpu(), "policy", rope_at_positions=True)
    value = build_unit(cfg, Runtime.cpu(), "value", head="scalar", namespace="value")
    if reference:
        save_model(policy.chunks, workdir / "policy0")
        save_model(value.chunks, workdir / "value0")
    load_model(policy.chunks, workdir / "policy0")
    load_model(value.chunks, workdir / "value0")

    rows = experience()
    share = ROWS // dp
    rank = parallel_state.get_data_parallel_rank()
    micro = [b for b in rows.micro_batches(MICRO)][rank * share // MICRO:(rank + 1) * share // MICRO]
    steps = ppo_steps.steps(VOCAB, 0.9, 0.2, 0.15, grpo_kl_coef=0.1)
    reports = {}
    for unit, step, keys in ((policy, steps.policy, ppo_steps.POLICY_REPORTS),
                             (value, steps.value, ppo_steps.VALUE_REPORTS)):
        unit.zero_grad()
        out = forward_backward(unit.chunks, micro_batch_iterators(unit.chunks, micro), len(micro), LENGTH, MICRO,
                               step, report_keys=keys)
        reports.update({k: float(v) for k, v in out.items()})
    out_dir = workdir / ("reference" if reference else name)
    save_grads(policy, out_dir / "policy_grads")
    save_grads(value, out_dir / "value_grads")
    if torch.distributed.get_rank() == 0:
        (out_dir / "reports.json").write_text(json.dumps(dict(reports, dp=dp)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--layouts", default="", help="name:tp,pp,sp;...")
    args = parser.parse_args()
    if args.reference:
        run("reference", {"tp": 1, "pp": 1, "sp": False}, args.workdir, reference=True)
        return
    for item in args.layouts.split(";"):
        name, sizes = item.split(":")
        tp, pp, sp = (int(x) for x in sizes.split(","))
        run(name, {"tp": tp, "pp": pp, "sp": bool(sp)}, args.workdir, reference=False)


if __name__ == "__main__":
    main()
