"""One pretraining step and a PPO step at DP=2 and at TP=2 (a reward function, pretraining micro-batches mixed
in) with every collective recorded and every tensor's GPU-run residency tracked (tests/collective_residency.py);
each rank writes its records to WORKDIR/collectives-RANK.json.

    torchrun --nproc-per-node 2 tests/parallel/collectives_worker.py --workdir DIR --prompts PREFIX
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from collective_residency import (
    RUN_DEVICE,
    CollectiveRecorder,
    ResidencyMode,
    route_cpu_harness_to_run_device,
)

MODEL = ["model.name=tiny", "parallel.tp=1", "parallel.pp=1", "model.num_layers=2", "model.hidden_size=64",
         "model.num_attention_heads=2", "model.ffn_hidden_size=128", "model.padded_vocab_size=128",
         "model.seq_length=32", "model.max_position_embeddings=64", "model.use_dynamic_ntk=false",
         "model.use_logn_attn=false"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--prompts", required=True, help="prompt shards' prefix (also the pretraining data)")
    args = parser.parse_args()

    recorder = CollectiveRecorder()
    recorder.install()  # before megatron-core is imported
    route_cpu_harness_to_run_device()

    from megatron.core import parallel_state

    from megatron_qwen.config import load_config
    from megatron_qwen.stages.ppo import train_ppo
    from megatron_qwen.stages.pretrain import STAGE
    from megatron_qwen.training import context
    from megatron_qwen.training.loop import train

    resolve_runtime = context.resolve_runtime
    context.resolve_runtime = lambda cfg, local_rank=0: dataclasses.replace(resolve_runtime(cfg, local_rank),
                                                                            device=RUN_DEVICE)
    shards, cache = f"{args.prompts}_prompt_document", f"data.cache_dir={args.workdir / 'cache'}"
    policy = args.workdir / "pretrain" / "checkpoints" / "iter_0000001"
    stages = {}
    with ResidencyMode():
        first = len(recorder.calls)
        assert train(load_config(REPO / "configs" / "tiny.yaml", MODEL + [
            f"data.paths=[{shards}]", "data.split=100,0,0", cache, "training.micro_batch_size=2",
            "training.global_batch_size=4", "training.train_iters=1", "training.lr_warmup_iters=0",
            f"logging.run_dir={args.workdir / 'pretrain'}"]), stage=STAGE) == 0
        stages["pretrain"] = recorder.calls[first:]
        # PPO at DP=2 (the data-parallel statistics) and at TP=2 with SP (generation and the vocab-parallel
        # log-probabilities and entropy over the tensor-parallel group).
        for name, layout in (("ppo", []), ("ppo-tp2", ["parallel.tp=2", "parallel.sp=true"])):
            parallel_state.destroy_model_parallel()  # the next run makes its layout's groups
            first = len(recorder.calls)
            assert train_ppo(load_config(REPO / "configs" / "stage" / "ppo.yaml", MODEL + layout + [
                f"data.paths=[{args.prompts}]", f"ppo.policy_from={policy}",
                "ppo.reward_fn=tests.ppo_rewards:good_fraction", "ppo.prompts_per_step=4", "ppo.samples_per_prompt=2",
                "ppo.max_new_tokens=4", "ppo.critic_warmup_steps=0", "training.micro_batch_size=2",
                "training.train_iters=1", f"ppo.ptx_data=[{shards}]", "ppo.ptx_coef=0.1", "data.split=100,0,0", cache,
                f"logging.run_dir={args.workdir / name}"])) == 0
            stages[name] = recorder.calls[first:]
    rank = int(os.environ["RANK"])
    (args.workdir / f"collectives-{rank}.json").write_text(json.dumps(stages, indent=1))


if __name__ == "__main__":
    main()
