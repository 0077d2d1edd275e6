"""Pretraining data: megatron-core's GPTDataset/BlendedDataset over weighted shard prefixes, and the
batches each data-parallel rank takes from it.

`build_gpt_datasets` goes through megatron-core's BlendedMegatronDatasetBuilder: rank 0 builds the
sample/shuffle index cache first (in `data.cache_dir`), the other ranks wait and then read it. They wait in
barriers of the group of all ranks, bounded by ``parallel.io_timeout_minutes``, not by the training
step's ``parallel.timeout_minutes`` (`tools/build_dataset_cache.py` builds the cache ahead of a job).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_qwen.config import Config
from megatron_qwen.data.indexed import check_shard
from megatron_qwen.errors import DataError


@dataclass(frozen=True)
class _TokenizerInfo:
    """What GPTDataset needs of a tokenizer. No `pad`: Qwen pads with its end-of-document token, and
    megatron-core would then mask every EOD target; without one it uses an id that never occurs."""

    eod: int
    vocab_size: int

    @property
    def unique_identifiers(self) -> dict:
        # Part of the dataset's cache key: a different tokenizer must not reuse a cached index.
        return {"class": "QwenTokenizer", "eod": self.eod, "vocab_size": self.vocab_size}


def parse_blend(paths: list) -> tuple[list[str], list[float] | None]:
    """``[w1, prefix1, w2, prefix2, ...]`` or ``[prefix, ...]`` -> (prefixes, weights or None)."""
    if not paths:
        raise DataError("data.paths is empty; give shard prefixes, e.g. data.paths=[1.0, /data/web_text_document]")
    if all(isinstance(p, str) for p in paths):
        prefixes, weights = list(paths), None
    else:
        if len(paths) % 2 or not all(isinstance(w, (int, float)) for w in paths[0::2]):
            raise DataError(
                f"data.paths={paths!r} must alternate weight and prefix: [0.7, /data/a_text_document, 0.3, /data/b]"
            )
        weights, prefixes = [float(w) for w in paths[0::2]], [str(p) for p in paths[1::2]]
        if any(w <= 0 for w in weights):
            raise DataError(f"data.paths weights {weights} must all be > 0")
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise FileNotFoundError(
                    f"data shard {prefix + suffix} does not exist; data.paths takes prefixes without the suffix "
                    "(as written by tools/preprocess_data.py, e.g. corpus_text_document)"
                )
    return prefixes, weights


def gpt_dataset_config(cfg: Config, eod: int, vocab_size: int):
    """megatron-core's GPTDatasetConfig for this run."""
    prefixes, weights = parse_blend(cfg.data.paths)
    return GPTDatasetConfig(
        random_seed=cfg.training.seed,
        sequence_length=cfg.model.seq_length,
        blend=(prefixes, weights),
        split=cfg.data.split,
        path_to_cache=cfg.data.cache_dir,
        tokenizer=_TokenizerInfo(eod=eod, vocab_size=vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )


def requested_samples(cfg: Config) -> list[int]:
    """Samples indexed in the train, valid and test splits. Every validation reads the same first
    eval_iters global batches; a split the run does not read still gets one global batch (megatron-core
    needs a size per split of a weighted blend)."""
    t = cfg.training
    train = t.train_iters * t.global_batch_size
    valid = (t.eval_iters if t.eval_interval else 1) * t.global_batch_size
    return [train, valid, t.global_batch_size]


def build_gpt_datasets(cfg: Config, eod: int, vocab_size: int):
    """(train, valid, test) datasets of the blend in ``data.paths`` (None for an empty split).

    Checks the train split against the run's length first: a corpus that would be repeated raises
    unless ``data.allow_repeat`` is set, and an empty split always raises.
    """
    config = gpt_dataset_config(cfg, eod, vocab_size)
    if cfg.training.eval_interval and config.split_matrix[1] is None:
        raise DataError(
            f"training.eval_interval={cfg.training.eval_interval} needs a valid split, but data.split="
            f"{cfg.data.split!r} gives it 0; use e.g. data.split=969,30,1 or training.eval_interval=0"
        )
    sizes = requested_samples(cfg)
    # Ids the model can take: a small test model's uint16 shard is fine, a uint16 shard for Qwen's vocabulary is not.
    model_ids = min(vocab_size, cfg.model.padded_vocab_size)
    for prefix in config.blend[0]:
        check_shard(prefix, model_ids)
    check_corpus_size(cfg, config)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config)
    return tuple(builder.build())


def check_corpus_size(cfg: Config, config) -> None:
    """Report, before training, a train split too small for the requested steps."""
    prefixes, weights = config.blend
    weights = weights or [1.0] * len(prefixes)
    seq = cfg.model.seq_length
    train_needed = requested_samples(cfg)[0]
    for prefix, weight in zip(prefixes, weights):
        shard = IndexedDataset(prefix)  # keep it alive: its arrays are views of its mmap
        # megatron-core splits a GPT shard by sequence index (fractions of the sequence count).
        doc_tokens = np.array(shard.sequence_lengths, dtype=np.int64)
        del shard
        for split, name in enumerate(("train", "valid", "test")):
            if config.split_matrix[split] is None:  # a 0 in data.split: megatron-core builds no such split
                continue
            lo, hi = (round(f * len(doc_tokens)) for f in config.split_matrix[split])
            tokens = int(doc_tokens[lo:hi].sum())
            if tokens <= seq:
                raise DataError(
                    f"the {name} split of {prefix} (sequences {lo}..{hi} of {len(doc_tokens)}, {tokens} tokens, "
                    f"data.split={cfg.data.split!r}) holds no sequence of model.seq_length+1={seq + 1} tokens; "
                    "add data, give that split a 0 in data.split (e.g. 100,0,0), or shorten model.seq_length"
                )
        available = int(doc_tokens[: round(config.split_matrix[0][1] * len(doc_tokens))].sum()) // seq
        share = math.ceil(train_needed * weight / sum(weights))
        if share > available and not cfg.data.allow_repeat:
            raise DataError(
                f"{prefix}: the run needs {share} samples of {seq} tokens from it (training.train_iters="
                f"{cfg.training.train_iters} x global_batch_size={cfg.training.global_batch_size}, weight "
                f"{weight}) but its train split has {available} (~{share / available:.1f} epochs); add data, lower "
                "training.train_iters, or set data.allow_repeat=true to repeat it"
            )
