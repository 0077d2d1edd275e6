"""Worker for the Transformer Engine spec test (one GPU rank): the TE layers, loaded with the local
spec's saved weights, give the local spec's logits."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()

    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.launch import init_distributed
    from megatron_qwen.platform.runtime import resolve_runtime
    from megatron_qwen.training.checkpointing import load_model, save_model

    common = ["model.padded_vocab_size=1024", "training.precision=fp32", "parallel.device=cuda"]
    init_distributed(1, 1, None, device="cuda")
    tokens = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    positions = torch.arange(64, device="cuda").unsqueeze(0).expand(2, -1)
    logits = {}
    for impl in ("local", "transformer_engine"):
        cfg = load_config("configs/tiny.yaml", [*common, f"model.transformer_impl={impl}"])
        (model,) = build_model(cfg, resolve_runtime(cfg))
        if impl == "local":
            save_model([model], args.workdir / "weights")
        else:
            load_model([model], args.workdir / "weights")
        with torch.no_grad():
            logits[impl] = model.eval()(tokens, positions, None).float().cpu()
    diff = (logits["local"] - logits["transformer_engine"]).abs().max().item()
    print(f"RESULT {diff}")


if __name__ == "__main__":
    main()
