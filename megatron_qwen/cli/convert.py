"""Convert Qwen checkpoints between Hugging Face and megatron-core (dist_checkpointing).

    megatron-qwen convert hf-to-mcore --hf DIR --out CKPT --tp T --pp P [--vpp V] [--ep E] [--family F]
    megatron-qwen convert mcore-to-hf --ckpt CKPT --out DIR [--layout qwen2|qwen3|qwen] [--task lm|reward] \
        [--base BASE] [--trust-checkpoint]
    megatron-qwen convert mcore-to-peft --ckpt CKPT --out DIR [--base-model NAME]
    megatron-qwen convert peft-to-mcore --adapter DIR --base BASE --out CKPT --tp T --pp P [--vpp V] [--ep E]

hf-to-mcore reads transformers' Qwen2ForCausalLM (Qwen1.5, 2, 2.5) and Qwen3ForCausalLM (Qwen3 dense) or the
Qwen v1 release's (remote code) layout, told apart by config.json's architectures and model_type, from
safetensors (sharded or not) or pytorch_model*.bin, and writes CKPT with model_config.yaml; the
checkpoint loads at any TP/PP/VPP layout. mcore-to-hf reads a checkpoint saved at any layout and
writes safetensors + config.json that `AutoModelForCausalLM.from_pretrained` loads (qwen2, qwen3) or the v1
names and config keys (qwen). Both run in one process and stream tensor by tensor. Exit status 2
means the input or the request was refused (the message says why and what to do), e.g. a checkpoint
whose metadata holds pickled objects outside the allowlist (--trust-checkpoint unpickles them: only for
a checkpoint from a source you trust). `python tools/convert_checkpoint.py` takes the same arguments.

LoRA adapters: mcore-to-hf merges the adapters of a checkpoint into the exported weights (an adapter-only
checkpoint's base comes from its adapter_base.json or --base); mcore-to-peft writes them as a `peft` adapter
(adapter_config.json + adapter_model.safetensors); peft-to-mcore reads a `peft` adapter into an adapter-only
checkpoint on the base checkpoint BASE.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_qwen.config import TOKENIZER_FAMILIES
from megatron_qwen.convert.layouts import LAYOUTS, QWEN
from megatron_qwen.errors import ConversionError, UserError


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1GiB' or a number of bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    value = text.strip().upper()
    number = value.rstrip("KMGIB")
    try:
        return int(float(number) * units[value[len(number):]])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 2GB, 500MB or 1GiB") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-qwen convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    to_mcore = sub.add_parser("hf-to-mcore", help="Hugging Face Qwen checkpoint -> megatron-core checkpoint")
    to_mcore.add_argument("--hf", required=True, type=Path, help="Hugging Face model directory (config.json + weights)")
    to_mcore.add_argument("--out", required=True, type=Path, help="new checkpoint directory")
    to_mcore.add_argument("--tp", type=int, default=1,
                          help="tensor-parallel size: checked against the model, pads the vocabulary, "
                               "recorded (default 1)")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline-parallel size: checked and recorded (default 1)")
    to_mcore.add_argument("--vpp", type=int, default=1,
                          help="model chunks per pipeline rank: checked and recorded (default 1)")
    to_mcore.add_argument("--ep", type=int, default=1,
                          help="expert-parallel size of a mixture-of-experts model: checked and recorded (default 1)")
    to_mcore.add_argument("--family", choices=TOKENIZER_FAMILIES, default=None,
                          help="tokenizer family (model.family; default: from the checkpoint's tokenizer files, "
                               "else qwen2 -> qwen2.5, qwen3 -> qwen3, v1 -> qwen)")
    to_mcore.add_argument("--max-chunk-size", type=parse_size, default="64MiB",
                          help="largest block held in memory and stored as one piece (default 64MiB)")

    to_hf = sub.add_parser("mcore-to-hf", help="megatron-core checkpoint -> Hugging Face safetensors + config.json")
    to_hf.add_argument("--ckpt", required=True, type=Path, help="megatron-core checkpoint directory")
    to_hf.add_argument("--out", required=True, type=Path, help="new Hugging Face model directory")
    to_hf.add_argument("--layout", choices=LAYOUTS, default=None,
                       help="qwen2 / qwen3 (transformers) or qwen (v1 release); default: qwen3 for a model with "
                            "query/key norms, else qwen2")
    to_hf.add_argument("--config", type=Path, default=None, help="model config YAML (default CKPT/model_config.yaml)")
    to_hf.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                       help="cast weights (default: as stored)")
    to_hf.add_argument("--max-shard-size", type=parse_size, default="2GB",
                       help="largest safetensors file (default 2GB)")
    to_hf.add_argument("--task", choices=("lm", "reward"), default="lm",
                       help="lm: Qwen2/Qwen3ForCausalLM (default); reward: Qwen2/Qwen3ForSequenceClassification "
                            "(score head)")
    to_hf.add_argument("--pad-token-id", type=int, default=151643,
                       help="reward export: pad id (rewards are read at the last non-pad token; default <|endoftext|>)")
    to_hf.add_argument("--base", type=Path, default=None,
                       help="base checkpoint of an adapter-only CKPT (default: the one its adapter_base.json names)")
    to_hf.add_argument("--trust-checkpoint", action="store_true",
                       help="unpickle every object in CKPT, also types outside the allowlist "
                            "(can run code: trust its source)")

    to_peft = sub.add_parser("mcore-to-peft", help="the LoRA adapters of a checkpoint -> a peft adapter directory")
    to_peft.add_argument("--ckpt", required=True, type=Path,
                         help="checkpoint with adapters (base and adapters, or adapters only)")
    to_peft.add_argument("--out", required=True, type=Path, help="new peft adapter directory")
    to_peft.add_argument("--base-model", default=None,
                         help="adapter_config.json's base_model_name_or_path: the exported base model's directory "
                              "or hub name (default: none)")
    to_peft.add_argument("--config", type=Path, default=None,
                         help="model config YAML with the peft section (default CKPT/model_config.yaml)")
    to_peft.add_argument("--trust-checkpoint", action="store_true",
                         help="unpickle every object in CKPT, also types outside the allowlist")

    from_peft = sub.add_parser("peft-to-mcore", help="a peft LoRA adapter -> an adapter-only checkpoint")
    from_peft.add_argument("--adapter", required=True, type=Path,
                           help="peft adapter directory (adapter_config.json + adapter_model.safetensors)")
    from_peft.add_argument("--base", required=True, type=Path,
                           help="checkpoint of the base model the adapter was trained on (e.g. from hf-to-mcore)")
    from_peft.add_argument("--out", required=True, type=Path, help="new adapter-only checkpoint directory")
    from_peft.add_argument("--tp", type=int, default=1, help="tensor-parallel size: checked and recorded (default 1)")
    from_peft.add_argument("--pp", type=int, default=1, help="pipeline-parallel size: checked and recorded (default 1)")
    from_peft.add_argument("--vpp", type=int, default=1, help="model chunks per pipeline rank (default 1)")
    from_peft.add_argument("--ep", type=int, default=1, help="expert-parallel size (default 1)")
    from_peft.add_argument("--trust-checkpoint", action="store_true",
                           help="unpickle every object in BASE, also types outside the allowlist")

    args = parser.parse_args(argv)
    trust = getattr(args, "trust_checkpoint", False)
    if trust:
        from megatron_qwen.checkpoint.safety import TRUST_WARNING

        print(f"warning: --trust-checkpoint: {TRUST_WARNING}", file=sys.stderr, flush=True)
    # Each direction is imported when it runs: --help and argument errors answer without loading megatron-core.
    try:
        if args.command == "hf-to-mcore":
            from megatron_qwen.convert.to_mcore import hf_to_mcore

            hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep,
                        max_chunk_bytes=args.max_chunk_size, family=args.family)
        elif args.command == "mcore-to-peft":
            from megatron_qwen.convert.lora import mcore_to_peft

            mcore_to_peft(args.ckpt, args.out, base_model=args.base_model, config_path=args.config,
                          trust_checkpoint=trust)
        elif args.command == "peft-to-mcore":
            from megatron_qwen.convert.lora import peft_to_mcore

            peft_to_mcore(args.adapter, args.base, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep,
                          trust_checkpoint=trust)
        elif args.task == "reward":
            from megatron_qwen.convert.reward_export import export_reward_to_hf

            if args.base is not None:
                raise ConversionError(f"--base {args.base}: the reward export does not merge adapters; drop --base")
            if args.layout == QWEN:
                raise ConversionError(
                    f"--task reward writes transformers' Qwen2/Qwen3ForSequenceClassification; --layout {args.layout} "
                    "has no sequence-classification class: drop --layout"
                )
            export_reward_to_hf(
                args.ckpt, args.out, layout=args.layout, config_path=args.config, dtype=args.dtype,
                pad_token_id=args.pad_token_id,
                max_shard_bytes=args.max_shard_size, trust_checkpoint=trust,
            )
        else:
            from megatron_qwen.convert.to_hf import mcore_to_hf

            mcore_to_hf(
                args.ckpt, args.out, layout=args.layout, config_path=args.config, dtype=args.dtype,
                max_shard_bytes=args.max_shard_size, trust_checkpoint=trust, base=args.base,
            )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

