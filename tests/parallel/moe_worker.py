"""Worker for tests/test_moe.py, launched with torchrun on gloo CPU ranks.

--train LAYOUT,... : TRAIN_STEPS Adam steps of a tiny Qwen2-MoE (shared expert with its gate, a dense layer among
MoE layers, load-balancing and z-loss on) at each layout (``ep1``, ``ep2``, ``tp2-ep2-sp``), each step on its own
global batch; rank 0 writes ``LAYOUT.json`` with every step's loss, gradient norm and MoE metrics, and the
routed-slot check of the tokens-per-expert counts. A layout named ``sft-...`` (``sft-ep2``) runs the SFT stage's
forward step instead: packed rows of ChatML-shaped conversations (the SFT dataset's packing, position ids restarting
at each conversation, the loss on the replies only), the same few conversations every step, so the loss falls. A
layout named ``fp8-...`` (``fp8-sft-ep2``) trains with ``model.fp8=tensorwise`` (the torchao FP8 linears; the routed
experts pad their token rows).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

SEQ, GLOBAL_BATCH, MICRO_BATCH, SEED, TRAIN_STEPS = 16, 8, 1, 1234, 10
MOE_OVERRIDES = [
    "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2", "model.ffn_hidden_size=96",
    "model.num_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32",
    "model.moe_shared_expert_ffn_hidden_size=48", "model.moe_shared_expert_gate=true", "model.moe_mlp_only_layers=[1]",
    "model.moe_aux_loss_coeff=0.01", "model.moe_z_loss_coeff=0.001", "model.padded_vocab_size=256",
    f"model.seq_length={SEQ}", "model.family=qwen1.5",
]


def parse_layout(name: str) -> dict:
    """``tp2-ep2-sp`` -> {"tp": 2, "ep": 2, "sp": True} (``fp8-`` and ``sft-`` prefixes name the run, not the
    layout)."""
    match = re.fullmatch(r"(?:fp8-)?(?:sft-)?(?:tp(\d+)-)?ep(\d+)(-sp)?", name)
    if not match:
        raise SystemExit(f"bad layout {name!r}; expected e.g. ep2, tp2-ep2-sp, sft-ep2 or fp8-sft-ep2")
    return {"tp": int(match.group(1) or 1), "ep": int(match.group(2)), "sp": match.group(3) is not None}


# ChatML-shaped conversations in the tiny vocabulary: <im_start> prompt <assistant> reply <im_end>; the reply
# is the prompt reversed, so a model can learn it.
IM_START, ASSISTANT, IM_END = 1, 2, 3


class _Conversations:
    """In-memory stand-in for the SFT shards: `get(key, doc)` gives a conversation's ids or its loss mask (1 on
    the reply and its <im_end>, as the --chat preprocessing marks the assistant's tokens)."""

    def __init__(self, count: int, vocab: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.docs = []
        for _ in range(count):
            prompt = torch.randint(4, vocab, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen).tolist()
            ids = [IM_START, *prompt, ASSISTANT, *prompt[::-1], IM_END]
            mask = [0] * (len(prompt) + 2) + [1] * (len(prompt) + 1)
            self.docs.append((ids, mask))

    def get(self, key: str, doc: int):
        import numpy as np

        from megatron_qwen.data.chat_datasets import SFT_KEYS

        ids, mask = self.docs[doc]
        return np.asarray(ids if key == SFT_KEYS[0] else mask)


def sft_batches(cfg, steps: int) -> list[dict]:
    """`steps` global batches of packed SFT rows (the SFT dataset's packing of 24 fixed conversations)."""
    import numpy as np

    from megatron_qwen.data.chat_datasets import SFTDataset, pack_conversations

    shards = _Conversations(24, cfg.model.padded_vocab_size, SEED)
    lengths = np.asarray([len(ids) for ids, _ in shards.docs])
    rows = pack_conversations(lengths, SEQ)
    dataset = SFTDataset(shards, rows, SEQ, steps * GLOBAL_BATCH, SEED)
    items = [{k: torch.from_numpy(v) for k, v in dataset[i].items()} for i in range(steps * GLOBAL_BATCH)]
    assert any(int((item["position_ids"] == 0).sum()) > 1 for item in items), "no row packs two conversations"
    return [{k: torch.stack([item[k] for item in items[s * GLOBAL_BATCH:(s + 1) * GLOBAL_BATCH]]) for k in items[0]}
            for s in range(steps)]


def train(name: str, workdir: Path) -> None:
    from megatron.core import parallel_state

    from megatron_qwen.config import load_config, resolve
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.launch import detect_launch, init_distributed
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.stages.sft import sft_forward_step
    from megatron_qwen.training.forward_backward import forward_backward
    from megatron_qwen.training.moe_metrics import MoEMetrics
    from megatron_qwen.training.units import build_optimizer, guarded_step, wrap_ddp

    layout_args = parse_layout(name)
    overrides = [*MOE_OVERRIDES, *(f"parallel.{k}={str(v).lower()}" for k, v in layout_args.items())]
    overrides += ["model.fp8=tensorwise"] if name.startswith("fp8-") else []
    overrides += [f"training.micro_batch_size={MICRO_BATCH}", f"training.global_batch_size={GLOBAL_BATCH}",
                  "training.adam_eps=1e-5"]  # as tests/parallel/equivalence_worker.py: updates follow the gradient
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml", overrides)
    cfg, layout, _ = resolve(cfg, detect_launch().world_size)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_distributed(layout.tp, layout.pp, layout.vpp, device="cpu", seed=SEED, ep=layout.ep)
    sft = "sft-" in name
    model = wrap_ddp(build_model(cfg, Runtime.cpu(), rope_at_positions=sft), cfg)
    metrics = MoEMetrics(model, cfg)
    optimizer = build_optimizer(cfg, model, bf16=False)
    num_micro = GLOBAL_BATCH // (MICRO_BATCH * layout.dp)
    steps, sft_steps = [], sft_batches(cfg, TRAIN_STEPS) if sft else None
    for step in range(TRAIN_STEPS):
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        if sft:
            dp_rank = parallel_state.get_data_parallel_rank()
            mine = {k: v.view(layout.dp, num_micro, MICRO_BATCH, SEQ)[dp_rank] for k, v in sft_steps[step].items()}
            batches = [{k: v[i] for k, v in mine.items()} for i in range(num_micro)]
            loss = forward_backward(model, iter(batches), num_micro, SEQ, MICRO_BATCH,
                                    forward_step_func=sft_forward_step)["lm loss"].item()
        else:
            gen = torch.Generator().manual_seed(SEED + step)
            tokens = torch.randint(0, cfg.model.padded_vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=gen)
            mine = tokens.view(layout.dp, num_micro, MICRO_BATCH, SEQ + 1)[parallel_state.get_data_parallel_rank()]
            batches = [{"tokens": b[:, :-1], "labels": b[:, 1:], "loss_mask": torch.ones(MICRO_BATCH, SEQ)}
                       for b in mine]
            loss = forward_backward(model, iter(batches), num_micro, SEQ, MICRO_BATCH)["lm loss"].item()
        counts, slots = metrics.layer_counts()
        reports = metrics.step_reports(num_micro)
        grad_norm, updated = guarded_step(optimizer, cfg.training.clip_grad)
        assert updated, f"step {step} skipped"
        steps.append({"loss": loss, "grad_norm": float(grad_norm), **reports,
                      "counts_per_layer": counts.sum(dim=1).tolist(), "slots_per_layer": slots.tolist()})
    if torch.distributed.get_rank() == 0:
        (workdir / f"{name}.json").write_text(json.dumps({"steps": steps, "tokens": GLOBAL_BATCH * SEQ,
                                                          "topk": cfg.model.moe_router_topk}))
    parallel_state.destroy_model_parallel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--train", type=str, required=True)
    args = parser.parse_args()
    for name in args.train.split(","):
        train(name, args.workdir)


if __name__ == "__main__":
    main()
