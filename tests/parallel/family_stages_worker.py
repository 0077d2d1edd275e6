"""Every training stage on a tiny model of each later Qwen family, one stage after the other, in one launch.

    torchrun --nproc-per-node N tests/parallel/family_stages_worker.py --data DATA --workdir DIR --name NAME \
        --layout TP,PP,SP [--starts DIR/REFERENCE] [--reference]

DATA holds each family's shards (`tests/test_family_stages.py` writes them, ids renumbered densely) and
``FAMILY/data.json`` (vocabulary size, stop ids). For each family the stages run in the order a team runs them:
pretraining from fresh weights; SFT and a reward model from that language model; DPO and PPO (reward model) and
GRPO (reward function) from the SFT model. Each writes ``DIR/NAME/FAMILY/STAGE/metrics.jsonl``. The reference
launch (one rank, ``--reference``) also saves the checkpoints the others start from (``--starts``: its run
directory), a reward stage with ``training.train_iters=0`` (its initial weights), and, for Qwen3, pretraining with
FP8 rowwise scaling. Imports cost seconds per process, so one launch runs them all.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SEQ = 64
FAMILIES = {
    # GQA, q/k RMSNorm, a head width apart from hidden / heads (4 x 64 != 128), no q/k/v bias, tied embeddings.
    "qwen3": ["model.num_query_groups=2", "model.kv_channels=64", "model.qk_layernorm=true", "model.qkv_bias=false",
              "model.tie_word_embeddings=true", "model.family=qwen3"],
    # GQA with q/k/v bias and tied embeddings.
    "qwen2.5": ["model.num_query_groups=2", "model.qkv_bias=true", "model.tie_word_embeddings=true",
                "model.family=qwen2.5"],
}
MODEL = ["model.num_layers=2", "model.hidden_size=128", "model.num_attention_heads=4", "model.ffn_hidden_size=256",
         f"model.seq_length={SEQ}", "model.max_position_embeddings=256"]
PRETRAIN_STEPS = 40  # the reference's pretraining curves, fp32 and FP8; the other layouts run STEPS of them
STEPS = {"pretrain": 3, "sft": 3, "reward": 3, "dpo": 2, "ppo": 2, "grpo": 2}


def stage_overrides(name: str, family: str, data: Path, starts: Path, vocab: dict) -> list[str]:
    """The stage's own settings: its data, where it starts from, a few small batches."""
    shards = data / family
    lm = starts / family / "pretrain" / "checkpoints" / f"iter_{PRETRAIN_STEPS:07d}"
    sft = starts / family / "sft" / "checkpoints" / f"iter_{STEPS['sft']:07d}"
    reward = starts / family / "reward" / "checkpoints" / f"iter_{STEPS['reward']:07d}"
    if name in ("pretrain", "fp8"):
        return [f"data.paths=[{shards / 'corpus_text_document'}]", "data.split=100,0,0",
                "training.micro_batch_size=2", "training.global_batch_size=4", "training.lr=3e-3",
                "training.min_lr=3e-4", "training.lr_warmup_iters=5", f"training.lr_decay_iters={PRETRAIN_STEPS}"]
    if name == "sft":
        return [f"data.paths=[{shards / 'chat'}]", "data.split=100,0,0", f"training.init_from={lm}",
                "training.micro_batch_size=2", "training.global_batch_size=4", "training.lr=1e-3"]
    if name in ("reward", "reward0"):
        return [f"data.paths=[{shards / 'pairs'}]", "data.split=100,0,0", f"training.init_from={lm}",
                "training.micro_batch_size=4", "training.global_batch_size=8", "training.lr=1e-3"]
    if name == "dpo":
        return [f"data.paths=[{shards / 'pairs'}]", "data.split=100,0,0", f"training.init_from={sft}",
                "training.micro_batch_size=4", "training.global_batch_size=8", "training.lr=1e-3",
                "training.weight_decay=0.0"]
    rl = [f"data.paths=[{shards / 'prompts'}]", f"ppo.policy_from={sft}", "ppo.prompts_per_step=4",
          "ppo.samples_per_prompt=2", "ppo.max_new_tokens=6", "ppo.critic_warmup_steps=0",
          f"ppo.stop_ids=[{','.join(map(str, vocab['stop_ids']))}]", "training.micro_batch_size=4",
          "training.lr=1e-3", "training.min_lr=1e-3", "ppo.value_lr=1e-3"]
    if name == "ppo":
        return rl + [f"ppo.reward_from={reward}"]
    return rl + ["ppo.estimator=grpo", "ppo.reward_fn=tests.ppo_rewards:good_fraction"]


def run_stage(name: str, family: str, args: argparse.Namespace, run_dir: Path, *extra: str) -> None:
    from megatron_qwen.config import load_config
    from megatron_qwen.stages import dpo, ppo, pretrain, reward, sft
    from megatron_qwen.training.loop import train

    kind = {"fp8": "pretrain", "reward0": "reward", "grpo": "ppo"}.get(name, name)
    vocab = json.loads((args.data / family / "data.json").read_text())
    tp, pp, sp = args.layout
    overrides = MODEL + FAMILIES[family] + stage_overrides(name, family, args.data, args.starts, vocab) + [
        f"model.padded_vocab_size={vocab['vocab']}", f"parallel.tp={tp}", f"parallel.pp={pp}",
        f"parallel.sp={str(bool(sp)).lower()}", f"data.cache_dir={run_dir / 'cache'}", "logging.log_interval=1",
        # A rank that waits for a collective the others never join (a model built differently on some stage)
        # ends the launch in minutes rather than after the default two hours.
        "parallel.timeout_minutes=5", "parallel.io_timeout_minutes=5",
        f"logging.run_dir={run_dir}", *extra,
    ]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides, stage=kind)
    run = {"pretrain": lambda c: train(c, pretrain.STAGE), "sft": lambda c: train(c, sft.STAGE),
           "reward": lambda c: train(c, reward.STAGE), "dpo": dpo.train_dpo, "ppo": ppo.train_ppo}[kind]
    code = run(cfg)
    if code != 0:
        raise SystemExit(f"{family} {name}: exit code {code}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--layout", type=lambda s: tuple(int(x) for x in s.split(",")), required=True)
    parser.add_argument("--starts", type=Path, default=None, help="the reference's run directory (default: own)")
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--stages", default="pretrain,sft,reward,dpo,ppo,grpo", help="a subset, in this order")
    args = parser.parse_args()
    out = args.workdir / args.name
    args.starts = args.starts or out
    for family in args.families.split(","):
        steps = dict(STEPS, pretrain=PRETRAIN_STEPS) if args.reference else STEPS
        order = args.stages.split(",")
        if args.reference and "reward" in order:
            order.insert(order.index("reward"), "reward0")
        if args.reference and "pretrain" in order and family == "qwen3":
            order.insert(order.index("pretrain") + 1, "fp8")
        for name in order:
            iters = 0 if name == "reward0" else steps.get(name, PRETRAIN_STEPS)
            extra = [f"training.train_iters={iters}", f"training.save_interval={max(iters, 1)}"]
            if name == "fp8":
                extra.append("model.fp8=rowwise")
            run_stage(name, family, args, out / family / name, *extra)


if __name__ == "__main__":
    main()
