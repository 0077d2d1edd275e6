"""Worker for the Transformer Engine spec test (one GPU rank): the TE layers, loaded with the local spec's saved
weights (perturbed first: norm weights other than 1, biases other than 0), give the local spec's logits; with
FP8 (TE's tensorwise and delayed recipes) they are as far from the fp32 logits as the local spec's torchao FP8
(same recipe) is.

Prints ``RESULT <max |TE - local|>`` and ``FP8 <case> <||logits - fp32 logits|| / ||fp32 logits||>`` lines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

# (name, model.transformer_impl, model.fp8, model.fp8_backend); the first is the reference
CASES = [
    ("local", "local", "null", "auto"),
    ("transformer_engine", "transformer_engine", "null", "auto"),
    ("te-tensorwise", "transformer_engine", "tensorwise", "te"),
    ("te-delayed", "transformer_engine", "delayed", "te"),
    ("torchao-tensorwise", "local", "tensorwise", "torchao"),
]


def perturb(model: torch.nn.Module, seed: int = 5) -> None:
    """Noise on every weight: norm weights leave 1 and biases leave 0 (their initial values), so a spec that
    drops a bias or ignores a norm's weight gives other logits. Drawn on the CPU: the same on every GPU."""
    noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            scale = 0.2 if param.dim() == 1 else 0.5 * param.std().item()  # 1-D: norm weights and biases
            param.add_((torch.randn(param.shape, generator=noise) * scale).to(param.device, param.dtype))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--fp8", action="store_true", help="also the FP8 cases (a GPU of compute capability >= 8.9)")
    args = parser.parse_args()

    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.launch import init_distributed
    from megatron_qwen.platform.runtime import resolve_runtime
    from megatron_qwen.checkpoint.io import load_model, save_model

    common = ["model.padded_vocab_size=1024", "training.precision=fp32", "parallel.device=cuda"]
    init_distributed(1, 1, None, device="cuda")
    tokens = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    positions = torch.arange(64, device="cuda").unsqueeze(0).expand(2, -1)
    logits = {}
    for name, impl, fp8, backend in CASES if args.fp8 else CASES[:2]:
        cfg = load_config("configs/tiny.yaml", [*common, f"model.transformer_impl={impl}", f"model.fp8={fp8}",
                                                f"model.fp8_backend={backend}"])
        runtime = resolve_runtime(cfg)
        assert runtime.fp8_backend == (None if fp8 == "null" else backend), (name, runtime.fp8_backend)
        (model,) = build_model(cfg, runtime)
        if name == "local":
            perturb(model)
            save_model([model], args.workdir / "weights")
        else:
            load_model([model], args.workdir / "weights")
        with torch.no_grad():
            # Delayed scaling takes its scales from the amaxes of earlier passes: the first ones start from 1.
            for _ in range(3 if fp8 == "delayed" else 1):
                logits[name] = model.eval()(tokens, positions, None).float().cpu()
    ref = logits["local"]
    print(f"RESULT {(ref - logits['transformer_engine']).abs().max().item()}")
    for name in ("te-tensorwise", "te-delayed", "torchao-tensorwise") if args.fp8 else ():
        print(f"FP8 {name} {((logits[name] - ref).norm() / ref.norm()).item()}")


if __name__ == "__main__":
    main()
