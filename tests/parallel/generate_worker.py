"""Generation at several layouts in one launch (4 gloo ranks): the KV-cache engine against full recompute,
its log-probabilities against the training forward, seeded sampling, and the SP-padded forward pass.

For each layout the ranks build the tiny model, load the weights written by ``--save`` and write, from
the writer rank, ``LAYOUT.json``: greedy tokens and log-probabilities of the engine, the full-recompute
greedy tokens and the log-probabilities the recompute logits give them, the training forward's per-token
losses on the generated sequences, sampled tokens (temperature 0.9, top-p 0.9, seed 7), and the fp32
logits of a seq_length-long sequence through the (SP-padded) forward pass.

``--families ARCH,...`` (Qwen family architectures of tests/qwen_reference.py, ``+yarn`` for YaRN): for each, save
noisy weights at TP=1, then at every layout write ``ARCH/LAYOUT.json`` with the engine's greedy tokens and the
shapes of the KV cache of this rank's layers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # the shared architecture table (qwen_reference.FAMILY_ARCHS)
PROMPTS = [[3, 17, 92, 45, 8, 61, 33], [5, 120], [77, 77, 12, 9], [40]]
NEW_TOKENS = 6


def model_config(layout: dict, overrides: list[str]):
    from megatron_qwen.config import load_config, resolve
    from megatron_qwen.platform.launch import detect_launch

    dp = max(1, detect_launch().world_size // (layout["tp"] * layout["pp"]))
    dp_micro = f"training.global_batch_size={dp * layout['pp']}"  # a valid batch for the layout check
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        *overrides, f"parallel.tp={layout['tp']}", f"parallel.pp={layout['pp']}", f"parallel.vpp={layout['vpp']}",
        f"parallel.sp={str(layout['sp']).lower()}", "training.micro_batch_size=1", dp_micro,
    ])
    return resolve(cfg, detect_launch().world_size)


def loss_step(data_iterator, model):
    """Per-token losses of one sequence (what the training forward computes), reported as-is."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def collect(output_tensor, non_loss_data=True):
        return output_tensor.detach().float()

    return output, collect


def run(name: str, layout: dict, overrides: list[str], workdir: Path) -> None:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_qwen.inference.engine import GenerationEngine
    from megatron_qwen.inference.forward import ForwardPlan, forward_logits, is_writer, recompute_greedy
    from megatron_qwen.inference.sampling import SamplingParams, mask_vocab, token_logprobs
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.launch import init_distributed
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.checkpoint.io import load_model

    cfg, resolved, _ = model_config(layout, overrides)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_distributed(resolved.tp, resolved.pp, resolved.vpp, device="cpu")
    chunks = build_model(cfg, Runtime.cpu(), rope_at_positions=True)
    load_model(chunks, workdir / "weights")
    for chunk in chunks:
        chunk.eval()
    vocab = cfg.model.padded_vocab_size
    plan = ForwardPlan(cfg, resolved, vocab, vocab)
    engine = GenerationEngine(chunks, vocab)
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0))
    sampled = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.9, top_p=0.9, seed=7))

    # Full recompute, one prompt at a time (each row alone: no padding at all).
    recompute_tokens, recompute_logprobs = [], []
    for prompt in PROMPTS:
        rows = recompute_greedy(chunks, plan, torch.tensor([prompt]), NEW_TOKENS)
        recompute_tokens.append(rows[0, len(prompt):].tolist())
        logits = forward_logits(chunks, plan, rows[:, :-1])
        if logits is not None:
            steps = mask_vocab(logits[0, len(prompt) - 1:], vocab)
            recompute_logprobs.append(token_logprobs(steps, rows[0, len(prompt):]).tolist())

    # The training forward (labels -> per-token losses) on each generated sequence, through the schedule.
    losses = []
    for prompt, new in zip(PROMPTS, greedy.tokens):
        seq = torch.tensor([prompt + new])
        batch = {"tokens": seq[:, :-1], "labels": seq[:, 1:], "position_ids": torch.arange(seq.shape[1] - 1)[None]}
        if resolved.sp:
            pad = -(seq.shape[1] - 1) % resolved.tp
            batch = {k: torch.nn.functional.pad(v, (0, pad)) for k, v in batch.items()}
        micro = [batch] * (resolved.pp if resolved.vpp > 1 else 1)
        iterators = [iter(list(micro)) for _ in chunks] if len(chunks) > 1 else iter(micro)
        with torch.no_grad():
            out = get_forward_backward_func()(
                forward_step_func=loss_step, data_iterator=iterators, model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=len(micro), seq_length=batch["tokens"].shape[1], micro_batch_size=1,
                forward_only=True, collect_non_loss_data=True,
            )
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            losses.append(out[0][0, len(prompt) - 1: seq.shape[1] - 1].tolist())

    long_logits = None
    if overrides_long := [o for o in overrides if o.startswith("model.seq_length")]:
        seq_length = int(overrides_long[0].split("=")[1])
        # Exactly seq_length tokens: under SP at TP=2 an odd length is padded past seq_length.
        tokens = torch.randint(0, vocab, (1, seq_length), generator=torch.Generator().manual_seed(11))
        logits = forward_logits(chunks, plan, tokens)
        long_logits = None if logits is None else logits[0].tolist()

    if is_writer():
        (workdir / f"{name}.json").write_text(json.dumps({
            "greedy": greedy.tokens, "greedy_logprobs": greedy.logprobs, "finished": greedy.finished,
            "sampled": sampled.tokens, "sampled_logprobs": sampled.sampling_logprobs,
            "recompute": recompute_tokens, "recompute_logprobs": recompute_logprobs, "train_losses": losses,
            "long_logits": long_logits,
        }))


FAMILY_VOCAB = 1024


def family_generate(arch: str, layouts: list[tuple[str, dict]], workdir: Path) -> None:
    """Greedy generation of a family architecture at each layout, from the same TP=1 weights."""
    from megatron.core import parallel_state

    import megatron_qwen.inference.engine as engine_module
    from megatron_qwen.checkpoint.io import load_model, save_model
    from megatron_qwen.inference.engine import GenerationEngine
    from megatron_qwen.inference.forward import is_writer
    from megatron_qwen.inference.sampling import SamplingParams
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.launch import init_distributed
    from megatron_qwen.platform.runtime import Runtime
    from qwen_reference import arch_overrides

    overrides = [*arch_overrides(arch), f"model.padded_vocab_size={FAMILY_VOCAB}", "model.seq_length=32"]
    out = workdir / arch
    cfg, resolved, _ = model_config({"tp": 1, "pp": 1, "vpp": 1, "sp": False}, overrides)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_distributed(1, 1, None, device="cpu")
    torch.manual_seed(5)  # every data-parallel rank draws the same noise
    chunks = build_model(cfg, Runtime.cpu())
    with torch.no_grad():  # larger than initialisation, so that continuations vary
        for p in chunks[0].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(chunks, out / "weights")

    contexts = []  # the engine's KV cache of the running generation

    class RecordedContext(engine_module.StaticInferenceContext):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            contexts.append(self)

    for name, layout in layouts:
        cfg, resolved, _ = model_config(layout, overrides)
        parallel_state.destroy_model_parallel()
        init_distributed(resolved.tp, resolved.pp, resolved.vpp, device="cpu")
        chunks = build_model(cfg, Runtime.cpu(), rope_at_positions=True)
        load_model(chunks, out / "weights")
        cache_shapes = {}

        def record(row, token):
            for layer, (keys, values) in contexts[-1].key_value_memory_dict.items():
                cache_shapes[layer] = [list(keys.shape), list(values.shape)]

        engine_module.StaticInferenceContext, original = RecordedContext, engine_module.StaticInferenceContext
        try:
            greedy = GenerationEngine(chunks, FAMILY_VOCAB).generate(
                PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0), on_token=record)
        finally:
            engine_module.StaticInferenceContext = original
        if is_writer():
            (out / f"{name}.json").write_text(json.dumps({"greedy": greedy.tokens, "kv_cache": cache_shapes}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--save", action="store_true", help="write random weights at TP=1 and stop")
    parser.add_argument("--layouts", default="", help="name:tp,pp,vpp,sp;...")
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--families", default="", help="ARCH,...: greedy generation of Qwen family architectures")
    args = parser.parse_args()
    layouts = []
    for item in filter(None, args.layouts.split(";")):
        name, sizes = item.split(":")
        tp, pp, vpp, sp = (int(x) for x in sizes.split(","))
        layouts.append((name, {"tp": tp, "pp": pp, "vpp": vpp, "sp": bool(sp)}))
    if args.families:
        for arch in args.families.split(","):
            family_generate(arch, layouts, args.workdir)
        return
    if args.save:
        from megatron_qwen.model.qwen import build_model
        from megatron_qwen.platform.launch import init_distributed
        from megatron_qwen.platform.runtime import Runtime
        from megatron_qwen.checkpoint.io import save_model

        cfg, _, _ = model_config({"tp": 1, "pp": 1, "vpp": 1, "sp": False}, args.override)
        init_distributed(1, 1, None, device="cpu")
        torch.manual_seed(5)
        chunks = build_model(cfg, Runtime.cpu())
        with torch.no_grad():  # larger than initialisation, so that continuations vary
            for p in chunks[0].parameters():
                p.add_(torch.randn_like(p) * 0.05)
        save_model(chunks, args.workdir / "weights")
        return
    for name, layout in layouts:
        run(name, layout, args.override, args.workdir)


if __name__ == "__main__":
    main()
