"""The options of the commands that load a checkpoint for inference (generate, serve, evaluate): the layout to run
at, the precision, the model config and whether to trust the checkpoint's pickled objects."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_qwen.checkpoint.safety import TRUST_WARNING
from megatron_qwen.errors import UserError


def add_loading_options(parser: argparse.ArgumentParser, ep: bool = False) -> None:
    """--tp, --pp, --vpp (and with `ep` --ep), --precision, --config, --trust-checkpoint."""
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    parser.add_argument("--vpp", type=int, default=1, help="model chunks per pipeline rank (default 1)")
    if ep:
        parser.add_argument("--ep", type=int, default=1,
                            help="expert-parallel size of a mixture-of-experts model (default 1)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--config", type=Path, default=None, help="model config YAML (default CKPT/model_config.yaml)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle every object in CKPT, also types outside the allowlist "
                             "(can run code: trust its source)")


def warn_if_trusted(args: argparse.Namespace, rank: int) -> None:
    """Rank 0 says what --trust-checkpoint allows."""
    if args.trust_checkpoint and rank == 0:
        print(f"warning: --trust-checkpoint: {TRUST_WARNING}", file=sys.stderr, flush=True)



def prepare_replica(args: argparse.Namespace, world_size: int, command: str, local_rank: int, hint: str = ""):
    """For a command that runs one model replica on exactly TP x PP x EP ranks: the checked plan, the tokenizer of
    its family and the runtime; UserError (before any process group exists) for another number of ranks.

    Expert parallelism takes its ranks from data parallelism: at EP > 1 the replica's dense layers are repeated on EP
    data-parallel ranks that all run every request in lockstep, each serving every token's routes to its experts."""
    from megatron_qwen.inference import forward as inference
    from megatron_qwen.platform.runtime import resolve_runtime
    from megatron_qwen.tokenizer import load_tokenizer

    ranks = args.tp * args.pp * args.ep
    if world_size != ranks:
        raise UserError(f"{command} runs one model replica on exactly --tp x --pp x --ep = {ranks} rank(s), not "
                        f"{world_size}; launch --nproc {ranks}{hint}")
    plan = inference.prepare(args.ckpt, world_size, tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep,
                             precision=args.precision, config_path=args.config, trust_checkpoint=args.trust_checkpoint)
    return plan, load_tokenizer(family=plan.cfg.model.family), resolve_runtime(plan.cfg, local_rank)


def start_replica(plan) -> None:
    """The process group and megatron-core's groups for `plan`'s layout."""
    from megatron_qwen.platform.launch import init_distributed

    p = plan.cfg.parallel
    init_distributed(p.tp, p.pp, p.vpp, device=p.device, ep=p.ep, timeout_minutes=p.timeout_minutes,
                     seed=plan.cfg.training.seed)



def running_layout(plan) -> dict[str, int]:
    """The layout the replica's process groups run at (after `start_replica`): TP, PP and EP as megatron-core's
    parallel state has them, VPP as the plan's."""
    from megatron.core import parallel_state

    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(), "vpp": plan.cfg.parallel.vpp,
            "ep": parallel_state.get_expert_model_parallel_world_size()}
