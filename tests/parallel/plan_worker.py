"""Worker for tests/test_plan.py, launched with torchrun on 4 gloo CPU ranks: what the trainer really
allocates, measured from the real objects, for the planner's memory model to be checked against.

For each state case (a layout and a precision) it builds the tiny model as the trainer does
(`build_model`, `wrap_ddp`, `build_optimizer`), runs one forward+backward and one optimizer step, and
counts the distinct storages behind the parameters (weights), DDP's gradient buffers (gradients) and
whatever the optimizer holds beyond those (main weights, Adam moments, step counters).

For each activation case (PP=1, so the whole network runs in one forward) it runs one micro-batch
forward under `torch.autograd.graph.saved_tensors_hooks` and counts the distinct storages saved for
backward that are not parameters, per decoder layer and in all.

Every rank writes its figures to WORKDIR/rank{R}.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
VOCAB = 1001  # odd: TP=2 pads it to 1002, as the trainer does
SEQ, MICRO_BATCH = 128, 2  # the activation cases' micro-batch
# Model state does not depend on the batch: the state cases run the smallest one every layout accepts.
STATE_SEQ, STATE_MICRO_BATCH, STATE_GLOBAL_BATCH = 32, 1, 4

# The later families' shape on the tiny model: 4 query heads of 128 (kv_channels apart from hidden / heads = 64)
# sharing 2 key/value heads, q/k norms, no q/k/v bias (Qwen3's features); tied embeddings like Qwen3-0.6B, or not.
QWEN3_UNTIED = ["model.num_attention_heads=4", "model.num_query_groups=2", "model.kv_channels=128",
                "model.qk_layernorm=true", "model.qkv_bias=false"]
QWEN3_STYLE = QWEN3_UNTIED + ["model.tie_word_embeddings=true"]
# Qwen2.5-style: grouped-query attention with q/k/v bias, head_dim = hidden / heads.
QWEN25_STYLE = ["model.num_attention_heads=4", "model.num_query_groups=2", "model.tie_word_embeddings=true"]

# name -> overrides. 4 ranks: DP is what TP x PP leaves.
STATE_CASES = {
    "tp2-pp2": ["parallel.tp=2", "parallel.pp=2"],
    "tp2-pp2-distopt": ["parallel.tp=2", "parallel.pp=2", "parallel.use_distributed_optimizer=true"],
    "pp2-vpp2": ["parallel.pp=2", "parallel.vpp=2"],
    "pp2-vpp2-distopt": ["parallel.pp=2", "parallel.vpp=2", "parallel.use_distributed_optimizer=true"],
    "tp2-dp2-distopt": ["parallel.tp=2", "parallel.use_distributed_optimizer=true"],
    # bf16 weights with fp32 main weights; on CPU ranks megatron-core's bf16 optimizer runs only distributed.
    "tp2-pp2-distopt-bf16": ["parallel.tp=2", "parallel.pp=2", "parallel.use_distributed_optimizer=true",
                             "training.precision=bf16"],
    "pp2-vpp2-distopt-bf16": ["parallel.pp=2", "parallel.vpp=2", "parallel.use_distributed_optimizer=true",
                              "training.precision=bf16"],
    # Sizes that are not multiples of 64 exercise the distributed optimizer's alignment padding.
    "odd-pp2-vpp2-distopt": [
        "parallel.pp=2", "parallel.vpp=2", "parallel.use_distributed_optimizer=true",
        "model.hidden_size=200", "model.ffn_hidden_size=300",
    ],
    # Small gradient buckets (several in the first stage's first chunk), each padded and split over DP.
    "pp2-vpp2-distopt-buckets": [
        "parallel.pp=2", "parallel.vpp=2", "parallel.use_distributed_optimizer=true", "parallel.ddp_bucket_size=150000",
        "model.hidden_size=200", "model.ffn_hidden_size=300",
    ],
    "tp2-dp2-distopt-buckets": ["parallel.tp=2", "parallel.use_distributed_optimizer=true",
                                "parallel.ddp_bucket_size=200000"],
    "tp2-pp2-no-overlap": ["parallel.tp=2", "parallel.pp=2", "parallel.overlap_grad_reduce=false"],
    "qwen3-untied-tp2-pp2": QWEN3_UNTIED + ["parallel.tp=2", "parallel.pp=2"],
    "qwen3-untied-pp2-vpp2-distopt-buckets": QWEN3_UNTIED + ["parallel.pp=2", "parallel.vpp=2",
                                                             "parallel.use_distributed_optimizer=true",
                                                             "parallel.ddp_bucket_size=150000"],
    # Tied at PP = 1: the output layer is the embedding itself.
    "qwen3-tp2-dp2-distopt": QWEN3_STYLE + ["parallel.tp=2", "parallel.use_distributed_optimizer=true"],
    # Tied at PP > 1: the last stage holds its own copy of the embedding (its own gradient bucket when distributed).
    "qwen3-tp2-pp2": QWEN3_STYLE + ["parallel.tp=2", "parallel.pp=2"],
    "qwen3-pp2-vpp2-distopt": QWEN3_STYLE + ["parallel.pp=2", "parallel.vpp=2",
                                             "parallel.use_distributed_optimizer=true"],
}
ACTIVATION_CASES = {
    "tp1": [],
    "tp1-bf16": ["training.precision=bf16"],
    "tp1-selective": ["training.recompute=selective"],
    "tp1-full": ["training.recompute=full"],
    "tp1-dropout": ["model.hidden_dropout=0.1"],
    "tp2": ["parallel.tp=2"],
    "tp2-sp": ["parallel.tp=2", "parallel.sp=true"],
    "tp2-sp-selective": ["parallel.tp=2", "parallel.sp=true", "training.recompute=selective"],
    "tp2-sp-full": ["parallel.tp=2", "parallel.sp=true", "training.recompute=full"],
    "tp2-sp-bf16": ["parallel.tp=2", "parallel.sp=true", "training.precision=bf16"],
    "qwen2.5-tp1": QWEN25_STYLE,
    "qwen2.5-tp2-sp-selective": QWEN25_STYLE + ["parallel.tp=2", "parallel.sp=true", "training.recompute=selective"],
    "qwen3-tp1": QWEN3_STYLE,
    "qwen3-tp1-bf16": QWEN3_STYLE + ["training.precision=bf16"],
    # Context parallelism: each rank keeps its half of every sequence, the gathered K/V and the shared mask.
    "tp1-cp2": ["parallel.cp=2"],
    "tp2-sp-cp2": ["parallel.tp=2", "parallel.sp=true", "parallel.cp=2"],
    "qwen3-tp2-sp": QWEN3_STYLE + ["parallel.tp=2", "parallel.sp=true"],
}


def setup(overrides: list[str]):
    """The resolved config for `overrides`, its runtime (CPU ranks at the config's precision), on this layout's
    parallel state."""
    from megatron.core import parallel_state

    from megatron_qwen.config import load_config, resolve
    from megatron_qwen.platform.launch import detect_launch, init_distributed
    from megatron_qwen.platform.runtime import Runtime, precision_dtype

    cfg = load_config(CONFIG, [f"model.padded_vocab_size={VOCAB}"] + overrides)
    cfg, layout, _ = resolve(cfg, detect_launch().world_size)
    # Cases are grouped by layout: the parallel state is rebuilt only when TP, PP or VPP change.
    if parallel_state.model_parallel_is_initialized() and (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
        parallel_state.get_context_parallel_world_size(),
    ) != (layout.tp, layout.pp, layout.vpp, layout.cp):
        parallel_state.destroy_model_parallel()
    init_distributed(layout.tp, layout.pp, layout.vpp, device="cpu", cp=layout.cp)
    return cfg, layout, Runtime.cpu(precision_dtype(cfg.training.precision, on_cpu=True))


def storages(tensors) -> dict[int, int]:
    """Distinct storages behind `tensors`: data pointer -> bytes."""
    out = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.nbytes():
            out[storage.data_ptr()] = storage.nbytes()
    return out


def measure_state(overrides: list[str]) -> dict:
    """One real training step; then the bytes behind weights, gradient buffers and optimizer state."""
    from megatron.core import parallel_state

    from megatron_qwen.training.forward_backward import forward_backward
    from megatron_qwen.training.units import build_unit

    batch = [f"model.seq_length={STATE_SEQ}", f"training.micro_batch_size={STATE_MICRO_BATCH}",
             f"training.global_batch_size={STATE_GLOBAL_BATCH}"]
    cfg, layout, runtime = setup(batch + overrides)
    unit = build_unit(cfg, runtime, "model")  # the model, DDP and optimizer exactly as the trainer builds them
    model, optimizer = unit.chunks, unit.optimizer
    seq, micro = STATE_SEQ, STATE_MICRO_BATCH
    num_micro = STATE_GLOBAL_BATCH // (micro * layout.dp)
    gen = torch.Generator().manual_seed(parallel_state.get_data_parallel_rank())
    tokens = torch.randint(0, VOCAB, (num_micro, micro, seq + 1), generator=gen)
    batches = [{"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(micro, seq)} for t in tokens]
    iterators = [iter(list(batches)) for _ in model] if len(model) > 1 else iter(batches)
    forward_backward(model, iterators, num_micro, seq, micro)
    updated, _, _ = optimizer.step()
    assert updated, "the optimizer step was skipped"

    weights = storages(p for chunk in model for p in chunk.parameters())
    grads = storages(buffer.grad_data for chunk in model for buffer in chunk.buffers)
    held = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.optimizer.param_groups:
            held += group["params"]
        for state in opt.optimizer.state.values():
            held += [v for v in state.values() if torch.is_tensor(v)]
    optimizer_only = {k: v for k, v in storages(held).items() if k not in weights and k not in grads}
    return {
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "dp_rank": parallel_state.get_data_parallel_rank(),
        "tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "dp": layout.dp,
        "weights": sum(weights.values()),
        "gradients": sum(grads.values()),
        "optimizer": sum(optimizer_only.values()),
        # The assumptions the memory and time models make about the trainer's DDP.
        "buckets_per_chunk": [len(buffer.buckets) for chunk in model for buffer in chunk.buffers],
        "overlap_grad_reduce": model[0].ddp_config.overlap_grad_reduce,
        "overlap_param_gather": model[0].ddp_config.overlap_param_gather,
    }


def measure_activations(overrides: list[str]) -> dict:
    """Bytes saved for backward by one micro-batch forward, per decoder layer and in all."""
    from megatron_qwen.model.qwen import build_model

    cfg, layout, runtime = setup([f"model.seq_length={SEQ}", f"training.micro_batch_size={MICRO_BATCH}"] + overrides)
    (model,) = build_model(cfg, runtime)
    model.train()
    parameters = set(storages(model.parameters()))
    layers = list(model.decoder.layers)
    current = [None]  # the decoder layer running now
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda module, args, i=index: current.__setitem__(0, i))
        layer.register_forward_hook(lambda module, args, output: current.__setitem__(0, None))
    saved: dict[int, tuple[int, int | None]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in parameters:
            saved.setdefault(storage.data_ptr(), (storage.nbytes(), current[0]))
        return tensor

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=gen)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH, SEQ)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # own storages, as a batch has
    if layout.cp > 1:  # this rank's two chunks of each sequence, as the trainer feeds them
        from megatron_qwen.model.context_parallel import split_batch

        batch = split_batch({"tokens": inputs, "labels": labels, "position_ids": position_ids})
        inputs, labels, position_ids = (batch[k].contiguous() for k in ("tokens", "labels", "position_ids"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(inputs, position_ids, None, labels=labels)
    assert loss.requires_grad
    per_layer = [sum(n for n, where in saved.values() if where == i) for i in range(len(layers))]
    return {"layers": per_layer, "total": sum(n for n, _ in saved.values())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    result = {
        "state": {name: measure_state(overrides) for name, overrides in STATE_CASES.items()},
        "activations": {name: measure_activations(overrides) for name, overrides in ACTIVATION_CASES.items()},
    }
    (args.workdir / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
