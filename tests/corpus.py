"""Small real-text corpora for training tests.

Text from Python's standard library, tokenized with the Qwen tokenizer, written as Megatron shards with
megatron-core's own IndexedDatasetBuilder. The token ids are renumbered densely (a bijection on the
ids that occur), so the model's vocabulary can be a few thousand rows and a CPU step stays fast while
the text is unchanged.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np


def stdlib_texts(package: str = "email", limit: int = 40) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"]) / package
    return [p.read_text(errors="replace") for p in sorted(root.rglob("*.py"))[:limit]]


def write_dense_corpus(prefix: str | Path, package: str = "email", limit: int = 40) -> int:
    """Write ``PREFIX.bin/.idx``; returns a vocabulary size (multiple of 128) covering the ids."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_qwen.tokenizer import load_tokenizer

    tok = load_tokenizer()
    docs = [tok.encode(text) + [tok.eod_id] for text in stdlib_texts(package, limit)]
    ids = np.unique(np.concatenate([np.asarray(d) for d in docs]))
    remap = {int(old): new for new, old in enumerate(ids)}
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for doc in docs:
        dense = torch.tensor([remap[t] for t in doc], dtype=torch.int32)
        builder.add_document(dense, [len(dense)])
    builder.finalize(str(prefix) + ".idx")
    return int(-(-len(ids) // 128) * 128)
