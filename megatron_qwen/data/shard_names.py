"""How a preprocessed corpus's shards are named: ``{output_prefix}_{key}_document.bin/.idx`` (Megatron-LM's naming).

Apart from the shard writer (`megatron_qwen.data.indexed`, which needs the compiled extension), so that the
datasets, which only read shards through megatron-core, import without it.
"""

from __future__ import annotations

import os


def shard_prefix(output_prefix: str | os.PathLike, key: str) -> str:
    """The prefix of the shard that holds ``key`` of a corpus preprocessed to ``output_prefix``."""
    return f"{os.fspath(output_prefix)}_{key}_document"
