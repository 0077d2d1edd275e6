"""Perplexity against context length, with and without Qwen's long-context tricks (the Qwen report's table).

    megatron-qwen long-ppl [--nproc N] --ckpt CKPT --data DOCS.jsonl|SHARD_PREFIX [--lengths 1024,2048,...]
        [--windows W1,W2,...] [--max-tokens T] [--tp T --pp P --vpp V --sequence-parallel --cp C] [--out RESULT.json]
        [--plot RESULT.png]

`torchrun --nproc-per-node N tools/long_context_ppl.py ...` is the same. The held-out documents (JSON lines read
at --json-key and tokenized with the checkpoint's tokenizer family, an end-of-document token after each; or an
indexed shard, used as stored) are concatenated into one token stream, cut to its first --max-tokens tokens. At
each context length L the stream is cut into non-overlapping windows of L tokens; a window is one forward pass of
L tokens, and its L - 1 next-token predictions are scored. Perplexity at L = exp(mean NLL over every prediction of
every window), the same windows for every variant:

    plain                             dynamic NTK, LogN and window attention off
    + dynamic NTK                     model.use_dynamic_ntk
    + dynamic NTK + LogN              ... and model.use_logn_attn
    + dynamic NTK + LogN + window     ... and model.attention_windows (--windows, else the checkpoint's config)

Each variant builds the model from the checkpoint's config with those keys set, so it runs the code that
`megatron-qwen forward` and `generate` run with the same config. Lengths longer than the stream or than
model.max_position_embeddings are skipped with a message. Prints the table (rows: variants, columns: lengths),
writes --out (JSON) and --plot (PNG, when matplotlib is installed). Exit status 2: the request was refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from megatron_qwen.errors import DataError, UserError

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
# name: (use_dynamic_ntk, use_logn_attn, window attention)
VARIANTS = {
    "plain": (False, False, False),
    "+ dynamic NTK": (True, False, False),
    "+ dynamic NTK + LogN": (True, True, False),
    "+ dynamic NTK + LogN + window": (True, True, True),
}


def _positive_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option} {text!r}: expected comma-separated whole numbers") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{option} {text!r}: expected comma-separated whole numbers >= 0")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-qwen long-ppl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="megatron-core checkpoint directory")
    parser.add_argument("--data", required=True, type=Path,
                        help="held-out documents: a .jsonl[.gz] file, or an indexed shard's prefix (PREFIX.bin/.idx)")
    parser.add_argument("--json-key", default="text", help="the text field of a JSON-lines record (default text)")
    parser.add_argument("--lengths", type=lambda t: _positive_ints(t, "--lengths"), default=list(DEFAULT_LENGTHS),
                        help="context lengths, comma-separated (default 1024,2048,4096,8192,16384)")
    parser.add_argument("--windows", type=lambda t: _positive_ints(t, "--windows"), default=None,
                        help="one attention window per layer, comma-separated, 0 = full attention "
                             "(default: the checkpoint's model.attention_windows)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="use the first T tokens of the documents (default: all)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    parser.add_argument("--vpp", type=int, default=1, help="model chunks per pipeline rank (default 1)")
    parser.add_argument("--sequence-parallel", action="store_true", help="split the sequence over TP ranks")
    parser.add_argument("--cp", type=int, default=1,
                        help="context-parallel size: each window split over this many ranks (default 1)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--config", type=Path, default=None, help="model config YAML (default CKPT/model_config.yaml)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="draw perplexity against length into this PNG")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle every object in CKPT, also types outside the allowlist "
                             "(can run code: trust its source)")
    args = parser.parse_args(argv)
    if args.max_tokens is not None and args.max_tokens < 2:
        parser.error(f"--max-tokens {args.max_tokens}: a window needs at least 2 tokens")
    if any(length < 2 for length in args.lengths):
        parser.error(f"--lengths {args.lengths}: every length must be >= 2 (one token and the one it predicts)")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: {unknown} unknown; choose from {', '.join(VARIANTS)}")
    return args


def read_documents(path: Path, json_key: str, family: str, vocab_size: int) -> list[np.ndarray]:
    """Token ids of every document in `path`: JSON lines tokenized with the `family` tokenizer and an
    end-of-document token after each, or the documents of an indexed shard as stored. DataError when unusable."""
    name = str(path)
    if name.endswith((".jsonl", ".jsonl.gz", ".json")):
        from megatron_qwen.tokenizer import load_tokenizer

        if not path.is_file():
            raise DataError(f"--data {path} does not exist")
        tokenizer = load_tokenizer(family=family)
        docs = []
        with (gzip.open(path, "rt", encoding="utf-8") if name.endswith(".gz") else open(path, encoding="utf-8")) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record[json_key]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"--data {path}:{number} is not a JSON object with a {json_key!r} string; "
                                    "fix the line or pass the field with --json-key") from None
                docs.append(np.asarray(tokenizer.encode(text) + [tokenizer.eod_id], dtype=np.int64))
    else:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from megatron_qwen.data.indexed import check_shard

        prefix = name[: -len(".bin")] if name.endswith((".bin", ".idx")) else name
        if not Path(prefix + ".bin").is_file():
            raise DataError(f"--data {path}: neither a .jsonl[.gz] file nor an indexed shard ({prefix}.bin is missing)")
        check_shard(prefix)
        dataset = IndexedDataset(prefix)
        docs = [np.asarray(dataset[i], dtype=np.int64) for i in range(len(dataset))]
    stream = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    if stream.size and (stream.min() < 0 or stream.max() >= vocab_size):
        raise DataError(f"--data {path} holds token id {int(stream.max())} outside the model's vocabulary "
                        f"[0, {vocab_size}); tokenize it with the checkpoint's tokenizer (model.family={family})")
    return docs


def cut_windows(stream: np.ndarray, length: int) -> np.ndarray:
    """The non-overlapping windows of `length` tokens from the start of `stream`: [n, length] (the tail dropped)."""
    n = stream.size // length
    return stream[: n * length].reshape(n, length)


def usable_lengths(lengths: list[int], tokens: int, max_positions: int) -> tuple[list[int], list[str]]:
    """The lengths that fit the stream and the model's positions, in order, and a message for each other one."""
    kept, skipped = [], []
    for length in lengths:
        if length > tokens:
            skipped.append(f"length {length}: skipped, the documents hold only {tokens} tokens (more text, or "
                           "a shorter length)")
        elif length > max_positions:
            skipped.append(f"length {length}: skipped, beyond model.max_position_embeddings={max_positions}")
        else:
            kept.append(length)
    return kept, skipped


def variant_model(model, name: str, windows: list[int] | None):
    """`model` (a ModelConfig) with the long-context keys of variant `name` set."""
    ntk, logn, windowed = VARIANTS[name]
    return dataclasses.replace(model, use_dynamic_ntk=ntk, use_logn_attn=logn,
                               attention_windows=list(windows) if windowed else [])


def _nll_step(data_iterator, model):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_qwen.model.context_parallel import gather_sequence, split_batch

    tokens, vocab_size = next(data_iterator)
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    labels = torch.nn.functional.pad(tokens[:, 1:], (0, 1))  # the last position predicts nothing scored
    # With context parallelism each rank runs its two chunks of the window (global positions kept).
    mine = split_batch({"tokens": tokens, "position_ids": positions, "labels": labels})
    output = model(mine["tokens"].contiguous(), mine["position_ids"].contiguous(), None)
    labels = mine["labels"]

    def token_nll(logits, non_loss_data=True):
        # Vocabulary-parallel logits [b, s, v / tp]: rows past the real vocabulary (padding for TP) take no
        # probability, as if the softmax covered the real vocabulary alone.
        logits = logits.float()
        width = logits.shape[-1]
        first = parallel_state.get_tensor_model_parallel_rank() * width
        padding = torch.arange(first, first + width, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padding, float("-inf"))
        return gather_sequence(vocab_parallel_cross_entropy(logits, labels), dim=1)  # [b, s], the whole window

    return output, token_nll


def window_nll(chunks: list[torch.nn.Module], plan, windows: torch.Tensor) -> torch.Tensor | None:
    """Per-token NLL [n, L - 1] (fp32) of each window's next-token predictions on the last pipeline stage's ranks,
    None on the others. Like `inference.forward.forward_logits`: one micro-batch per window, rows padded to a
    multiple of TP under sequence parallelism (causal: padding cannot change earlier positions), the dynamic-NTK
    alpha pinned to the unpadded length, interleaved pipelines given a multiple of PP micro-batches."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_qwen.model.rotary import ntk_alpha, pinned_ntk_alphas

    n, length = windows.shape
    layout, m = plan.layout, plan.cfg.model
    # SP splits each CP rank's share over TP; CP cuts the window into 2 x CP chunks.
    multiple = (layout.tp if layout.sp else 1) * 2 * layout.cp if layout.cp > 1 else (layout.tp if layout.sp else 1)
    padded = -(-length // multiple) * multiple
    rows = [(torch.nn.functional.pad(row[None], (0, padded - length)), plan.vocab_size) for row in windows]
    if layout.vpp > 1:
        rows += rows[-1:] * (-len(rows) % layout.pp)
    iterators = [iter(rows) for _ in chunks] if len(chunks) > 1 else iter(rows)
    alphas = (ntk_alpha(length, m.seq_length),) if m.use_dynamic_ntk else None
    with torch.no_grad(), pinned_ntk_alphas(chunks, alphas):
        outputs = get_forward_backward_func()(
            forward_step_func=_nll_step, data_iterator=iterators, model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(rows), seq_length=padded, micro_batch_size=1, forward_only=True,
            collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat(outputs[:n])[:, : length - 1]


def format_table(results: dict[str, dict[int, float]], lengths: list[int]) -> str:
    """The report's table: one row per variant, one column of perplexity per context length."""
    width = max(len(name) for name in results) if results else 7
    lines = [f"{'':<{width}}  " + "  ".join(f"{length:>9}" for length in lengths)]
    for name, row in results.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{row[length]:>9.2f}" for length in lengths))
    return "\n".join(lines)


def write_plot(results: dict[str, dict[int, float]], lengths: list[int], path: Path) -> str:
    """Draw perplexity against context length (log-log) into `path`; returns what was done."""
    try:
        import matplotlib
    except ImportError:
        return f"not drawing {path}: matplotlib is not installed"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in results.items():
        ax.plot(lengths, [row[length] for length in lengths], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return f"wrote {path}"


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation on this process's rank; returns the exit status. Re-entrant like `forward`."""
    from megatron.core import parallel_state

    from megatron_qwen.checkpoint.safety import TRUST_WARNING
    from megatron_qwen.inference import forward as inference
    from megatron_qwen.platform.launch import detect_launch, init_distributed, refuse
    from megatron_qwen.platform.runtime import resolve_runtime

    args = parse_args(argv)
    launch = detect_launch()
    say = print if launch.rank == 0 else (lambda *a, **k: None)
    if args.trust_checkpoint and launch.rank == 0:
        print(f"warning: --trust-checkpoint: {TRUST_WARNING}", file=sys.stderr, flush=True)
    try:
        base = inference.prepare(
            args.ckpt, launch.world_size, tp=args.tp, pp=args.pp, vpp=args.vpp, sp=args.sequence_parallel, cp=args.cp,
            precision=args.precision, config_path=args.config, trust_checkpoint=args.trust_checkpoint,
        )
        m = base.cfg.model
        windows = args.windows if args.windows is not None else list(m.attention_windows)
        if "+ dynamic NTK + LogN + window" in args.variants:
            if not any(windows):
                raise UserError("the window variant needs windows: pass --windows (one per layer, 0 = full) or "
                                "set model.attention_windows in the config, or leave the variant out (--variants)")
            if len(windows) != m.num_layers:
                raise UserError(f"--windows has {len(windows)} entries for a model of {m.num_layers} layers; give "
                                "one window per layer (0 = full attention)")
        docs = read_documents(args.data, args.json_key, m.family, base.vocab_size)
        stream = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
        stream = stream[: args.max_tokens] if args.max_tokens is not None else stream
        lengths, skipped = usable_lengths(args.lengths, stream.size, m.max_position_embeddings)
        if not lengths:
            raise UserError("no context length is left to evaluate: " + "; ".join(skipped))
        runtime = resolve_runtime(base.cfg, launch.local_rank)
    except UserError as exc:
        return refuse(launch, str(exc))
    for message in skipped:
        say(message, flush=True)

    cfg = base.cfg
    init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp, device=cfg.parallel.device,
                     timeout_minutes=cfg.parallel.timeout_minutes, seed=cfg.training.seed, cp=cfg.parallel.cp)
    results: dict[str, dict[int, float]] = {}
    nll: dict[str, dict[int, float]] = {}
    predictions = {length: cut_windows(stream, length).shape[0] * (length - 1) for length in lengths}
    # Progress in tokens: a forward pass costs about as much per token at every length (attention aside).
    total = len(args.variants) * sum(stream.size // length * length for length in lengths)
    done, start = 0, time.monotonic()
    try:
        for name in args.variants:
            plan = dataclasses.replace(base, cfg=dataclasses.replace(cfg, model=variant_model(m, name, windows)))
            chunks = inference.load_chunks(plan, args.ckpt, runtime)
            results[name], nll[name] = {}, {}
            for length in lengths:
                cut = torch.from_numpy(cut_windows(stream, length)).to(runtime.device)
                token_nll = window_nll(chunks, plan, cut)
                if token_nll is not None:
                    mean = token_nll.double().sum().item() / token_nll.numel()
                    nll[name][length], results[name][length] = mean, math.exp(mean)
                done += cut.numel()
                if inference.is_writer():
                    elapsed = time.monotonic() - start
                    print(f"[{done}/{total} tokens, {elapsed:.0f} s, about {elapsed / done * (total - done):.0f} s "
                          f"left] {name} at {length}: perplexity {results[name][length]:.3f}", flush=True)
            del chunks
        if inference.is_writer():
            print("\nperplexity (rows: variants, columns: context length)")
            print(format_table(results, lengths), flush=True)
            if args.out is not None:
                record = {
                    "checkpoint": str(args.ckpt), "data": str(args.data), "tokens": int(stream.size),
                    "seq_length": m.seq_length, "lengths": lengths, "predictions": predictions,
                    "windows": windows, "variants": list(results), "perplexity": results, "nll": nll,
                    "skipped": skipped, "layout": {"tp": args.tp, "pp": args.pp, "vpp": args.vpp,
                                                   "sp": args.sequence_parallel, "cp": args.cp,
                                                   "dp": base.layout.dp},
                }
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(record, indent=1) + "\n")
                print(f"wrote {args.out}")
            if args.plot is not None:
                print(write_plot(results, lengths, args.plot))
        torch.distributed.barrier()
    finally:
        parallel_state.destroy_model_parallel()
    return 0
