"""Build the pretraining dataset's sample/shuffle index cache ahead of a job.

    megatron-qwen build-cache CONFIG.yaml [key=value ...]      (or python tools/build_dataset_cache.py ...)

Uses the run's own config (data.paths, data.split, data.cache_dir, model.seq_length, training.seed,
train_iters, global_batch_size, eval settings), so the job's ranks find the cache and only read it.
Runs in one process, no GPU or process group needed.
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_qwen.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-qwen build-cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from megatron_qwen.data.gpt import build_gpt_datasets, requested_samples
    from megatron_qwen.tokenizer import load_tokenizer

    import tempfile

    import torch

    tokenizer = load_tokenizer(cfg.data.tokenizer_file, cfg.model.family)
    # megatron-core's builder asks torch.distributed for the rank: a one-process group answers it.
    store = tempfile.NamedTemporaryFile(prefix="dataset_cache_pg_")
    torch.distributed.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    start = time.perf_counter()
    try:
        datasets = build_gpt_datasets(cfg, tokenizer.eod_id, tokenizer.n_vocab)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, requested, dataset in zip(("train", "valid", "test"), requested_samples(cfg), datasets):
        size = "not built" if dataset is None else f"{len(dataset)} samples"
        print(f"{name}: {size} (requested {requested if requested is not None else 'one epoch'})")
    print(f"index cache in {cfg.data.cache_dir or 'cache/ beside the shards'}, built in "
          f"{time.perf_counter() - start:.1f} s")
    return 0

