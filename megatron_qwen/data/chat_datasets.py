"""SFT and preference datasets over the shards that ``tools/preprocess_data.py --chat / --preference`` writes.

``data.paths`` lists output prefixes of those runs (``[/data/sft_a, /data/sft_b]``); their conversations
are concatenated, each shard split by ``data.split`` into train/valid ranges of its documents.

SFT rows are ``model.seq_length`` tokens. A conversation of L tokens takes L positions: its tokens, the
next token as label, the loss mask of that label (QwenLM finetune.py's rule), and position ids 0..L-1.
With ``sft.pack`` several conversations fill a row (next-fit in shuffled order): position ids restart
at each conversation, and `packed_rows` gives the attention their boundaries, which keep attention inside
each one. Padding at the end of a row continues the last conversation's positions (it opens no sequence),
is never trained, and needs no mask: under causal attention nothing before it sees it.

Preference items are single sequences: item 2k is the chosen and item 2k+1 the rejected side of a pair,
right-padded, with ``loss_mask`` 1 at the final ``<|im_end|>`` where the reward is read. A micro-batch
of even size therefore holds whole pairs.

With ``sft.epochs`` (``reward.epochs``, ``dpo.epochs``) set, ``training.train_iters`` is derived from the train
split's size; otherwise a run longer than the split stops unless ``data.allow_repeat``. Rows (SFT) and pairs
(preference) are reshuffled every epoch with ``training.seed``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_qwen.config import Config
from megatron_qwen.data.chat import PREFERENCE_KEYS, PROMPT_KEYS, SFT_KEYS
from megatron_qwen.data.indexed import check_shard
from megatron_qwen.data.shard_names import shard_prefix
from megatron_qwen.errors import DataError
from megatron_qwen.packed_rows import PackedRows, packed_boundaries

class _Shards:
    """Parallel shards of several prefixes (e.g. tokens and loss mask) addressed as one list of documents."""

    def __init__(self, prefixes: list[str], keys: tuple[str, ...], flag: str):
        if not prefixes or not all(isinstance(p, str) for p in prefixes):
            raise DataError(
                f"data.paths={prefixes!r} must list the --output-prefix of `tools/preprocess_data.py {flag}` runs, "
                "e.g. data.paths=[/data/chat_a, /data/chat_b]"
            )
        self.prefixes = prefixes
        self.parts: list[dict] = []
        for prefix in prefixes:
            shards = {}
            for key in keys:
                path = shard_prefix(prefix, key)
                if not (Path(path + ".bin").is_file() and Path(path + ".idx").is_file()):
                    raise DataError(
                        f"{path}.bin/.idx does not exist; data.paths takes the --output-prefix given to "
                        f"`tools/preprocess_data.py {flag}` ({prefix!r} should hold "
                        f"{', '.join(shard_prefix(prefix, k) for k in keys)})"
                    )
                check_shard(path)
                shards[key] = IndexedDataset(path)
            counts = {key: len(shard) for key, shard in shards.items()}
            if len(set(counts.values())) != 1:
                raise DataError(
                    f"the shards of {prefix} disagree on the number of documents {counts}; preprocess it again"
                )
            if keys == SFT_KEYS:  # a loss mask has exactly one entry per token of its conversation
                tokens, mask = (np.asarray(shards[k].sequence_lengths) for k in keys)
                if (tokens != mask).any():
                    doc = int(np.flatnonzero(tokens != mask)[0])
                    raise DataError(
                        f"{shard_prefix(prefix, keys[1])} does not belong with {shard_prefix(prefix, keys[0])}: "
                        f"document {doc} has {mask[doc]} mask entries for {tokens[doc]} tokens; preprocess it again"
                    )
            self.parts.append(shards)
        self.offsets = np.cumsum([0] + [len(p[keys[0]]) for p in self.parts])

    def lengths(self, key: str) -> np.ndarray:
        return np.concatenate([np.asarray(p[key].sequence_lengths, dtype=np.int64) for p in self.parts])

    def get(self, key: str, doc: int) -> np.ndarray:
        part = int(np.searchsorted(self.offsets, doc, side="right")) - 1
        return self.parts[part][key][doc - int(self.offsets[part])]

    def split_documents(self, split: str, which: int) -> np.ndarray:
        """Global indices of split `which` (0 train, 1 valid, 2 test): the same fraction of every shard."""
        bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[which]
        if bounds is None:
            return np.zeros(0, dtype=np.int64)
        pieces = []
        for lo, hi in zip(self.offsets[:-1], self.offsets[1:]):
            n = hi - lo
            pieces.append(np.arange(lo + round(bounds[0] * n), lo + round(bounds[1] * n), dtype=np.int64))
        return np.concatenate(pieces)


def _check_fits(lengths: np.ndarray, docs: np.ndarray, seq_length: int, shards: _Shards, flag: str,
                limit: str = "model.seq_length") -> None:
    too_long = docs[lengths[docs] > seq_length]
    if too_long.size:
        doc = int(too_long[0])
        part = int(np.searchsorted(shards.offsets, doc, side="right")) - 1
        raise DataError(
            f"{shards.prefixes[part]}: document {doc - int(shards.offsets[part])} is {int(lengths[doc])} tokens, over "
            f"{limit}={seq_length} ({too_long.size} such documents); preprocess with "
            f"`tools/preprocess_data.py {flag} --max-length {seq_length}`"
        )


def _train_samples_needed(cfg: Config, available: int, what: str, epochs: float | None, epochs_key: str) -> int:
    """Samples the train split must provide; sets training.train_iters when `epochs` (config key `epochs_key`)
    is given."""
    t, d = cfg.training, cfg.data
    if available == 0:
        raise DataError(f"the train split holds no {what} (data.split={d.split!r}); add data or give train a share")
    if epochs is not None:
        if epochs <= 0:
            raise DataError(f"{epochs_key}={epochs} must be > 0 (or null to use training.train_iters)")
        # The loop reads train_iters after building the datasets: the run length follows the data.
        t.train_iters = math.ceil(epochs * available / t.global_batch_size)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"note: {epochs_key}={epochs} over {available} {what} = training.train_iters={t.train_iters} "
                  f"(global_batch_size={t.global_batch_size})", flush=True)
        return t.train_iters * t.global_batch_size
    needed = t.train_iters * t.global_batch_size
    if needed > available and not d.allow_repeat:
        raise DataError(
            f"the run needs {needed} {what} (training.train_iters={t.train_iters} x global_batch_size="
            f"{t.global_batch_size}) but the train split holds {available} (~{needed / available:.1f} epochs); "
            f"add data, lower training.train_iters, set {epochs_key}, or set data.allow_repeat=true"
        )
    return needed


def _valid_documents(cfg: Config, shards: _Shards) -> np.ndarray | None:
    docs = shards.split_documents(cfg.data.split, 1)
    if cfg.training.eval_interval and docs.size == 0:
        raise DataError(
            f"training.eval_interval={cfg.training.eval_interval} needs a valid split, but "
            f"data.split={cfg.data.split!r} "
            "leaves it empty; use e.g. data.split=98,2,0 or training.eval_interval=0"
        )
    return docs if docs.size else None


class _EpochOrder:
    """Index i of a dataset of `count` items per epoch -> item of a fresh permutation each epoch."""

    def __init__(self, count: int, seed: int):
        self.count, self.seed = count, seed
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, i: int) -> int:
        epoch, j = divmod(i, self.count)
        if epoch not in self._cache:
            self._cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.count)}
        return int(self._cache[epoch][j])


# --------------------------------------------------------------------------- SFT


def pack_conversations(lengths: np.ndarray, seq_length: int) -> list[np.ndarray]:
    """Next-fit packing: conversations (positions in `lengths`), in order, fill rows of `seq_length` tokens.

    Returns the positions held by each row. Every length must be <= seq_length.
    """
    rows, row, used = [], [], 0
    for i, length in enumerate(lengths.tolist()):
        if used + length > seq_length:
            rows.append(np.array(row, dtype=np.int64))
            row, used = [], 0
        row.append(i)
        used += length
    if row:
        rows.append(np.array(row, dtype=np.int64))
    return rows


def packed_rows(position_ids: torch.Tensor, device: torch.device) -> PackedRows | None:
    """The sequence boundaries of packed rows for the attention (`megatron_qwen.packed_rows.PackedRows`), read from
    a micro-batch's position ids on the host before it moves to the GPU, or None when no row holds more
    than one conversation (plain causal attention). A conversation starts wherever its position id is 0."""
    boundaries = packed_boundaries(position_ids)
    return None if boundaries is None else PackedRows.from_boundaries(boundaries, device)


def packed_attention_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """The dense equivalent of `packed_rows`: megatron-core's attention mask [b, 1, s, s] (True = masked) that
    keeps each packed conversation to itself, or None when no row holds more than one. An s x s mask per
    row rules out flash attention; the trainer passes `packed_rows` instead, and this serves as the
    reference it is checked against."""
    starts = position_ids == 0
    if not bool(starts[:, 1:].any()):
        return None
    segment = starts.cumsum(dim=-1)
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    keep = (segment[:, :, None] == segment[:, None, :]) & causal
    return ~keep[:, None]


class SFTDataset:
    """Rows of packed (or single) conversations; see the module docstring for the layout."""

    def __init__(self, shards: _Shards, rows: list[np.ndarray], seq_length: int, num_samples: int, seed: int):
        self.shards, self.rows, self.seq_length, self.num_samples = shards, rows, seq_length, num_samples
        self.order = _EpochOrder(len(rows), seed)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        s = self.seq_length
        tokens = np.zeros(s, dtype=np.int64)
        labels = np.zeros(s, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.zeros(s, dtype=np.int64)
        offset = 0
        for doc in self.rows[self.order(i)].tolist():
            ids = self.shards.get(SFT_KEYS[0], doc)
            mask = self.shards.get(SFT_KEYS[1], doc)
            n = len(ids)
            tokens[offset : offset + n] = ids
            labels[offset : offset + n - 1] = ids[1:]
            loss_mask[offset : offset + n - 1] = mask[1:]  # mask[j] says whether ids[j] is a target
            position_ids[offset : offset + n] = np.arange(n)
            offset += n
        # Padding continues the last conversation's positions, so it opens no attention segment.
        position_ids[offset:] = np.arange(n, n + s - offset)
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


def build_sft_datasets(cfg: Config) -> tuple[SFTDataset, SFTDataset | None]:
    """(train, valid or None) SFT datasets of ``data.paths`` for this run."""
    flag = "--chat"
    shards = _Shards(list(cfg.data.paths), SFT_KEYS, flag)
    seq, seed = cfg.model.seq_length, cfg.training.seed
    lengths = shards.lengths(SFT_KEYS[0])
    if not np.array_equal(lengths, shards.lengths(SFT_KEYS[1])):
        raise DataError(
            f"the token and loss-mask shards of {shards.prefixes} differ in document lengths; preprocess again"
        )

    def rows_of(docs: np.ndarray, which: int) -> list[np.ndarray]:
        _check_fits(lengths, docs, seq, shards, flag)
        docs = docs[np.random.default_rng([seed, which]).permutation(docs.size)]
        if not cfg.sft.pack:
            return [docs[i : i + 1] for i in range(docs.size)]
        return [docs[row] for row in pack_conversations(lengths[docs], seq)]

    train_rows = rows_of(shards.split_documents(cfg.data.split, 0), 0)
    needed = _train_samples_needed(cfg, len(train_rows), "sequences", cfg.sft.epochs, "sft.epochs")
    train = SFTDataset(shards, train_rows, seq, max(needed, len(train_rows)), seed)
    valid_docs = _valid_documents(cfg, shards)
    valid = None
    if valid_docs is not None:
        valid_rows = rows_of(valid_docs, 1)
        valid = SFTDataset(shards, valid_rows, seq, len(valid_rows), seed + 1)
    return train, valid


# --------------------------------------------------------------------------- preference pairs


class PreferenceDataset:
    """Chosen (even items) and rejected (odd items) sides of preference pairs; see the module docstring."""

    def __init__(self, shards: _Shards, pairs: np.ndarray, seq_length: int, num_samples: int, seed: int):
        self.shards, self.pairs, self.seq_length, self.num_samples = shards, pairs, seq_length, num_samples
        self.order = _EpochOrder(len(pairs), seed)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        pair, side = divmod(i, 2)
        ids = self.shards.get(PREFERENCE_KEYS[side], int(self.pairs[self.order(pair)]))
        tokens = np.zeros(self.seq_length, dtype=np.int64)
        tokens[: len(ids)] = ids
        loss_mask = np.zeros(self.seq_length, dtype=np.float32)
        loss_mask[len(ids) - 1] = 1.0  # the final <|im_end|>: the reward is read there
        return {"tokens": tokens, "loss_mask": loss_mask}


def build_preference_datasets(cfg: Config, epochs_key: str = "reward.epochs"
                              ) -> tuple[PreferenceDataset, PreferenceDataset | None]:
    """(train, valid or None) preference datasets of ``data.paths`` for this run; `epochs_key` names the config
    key of the run length in passes over the pairs (``reward.epochs``, ``dpo.epochs``)."""
    flag = "--preference"
    t = cfg.training
    if t.micro_batch_size % 2:
        raise DataError(
            f"training.micro_batch_size={t.micro_batch_size} must be even: a micro-batch holds whole preference "
            "pairs (chosen and rejected side by side); use 2, 4, ... (global_batch_size counts sequences, 2 per pair)"
        )
    shards = _Shards(list(cfg.data.paths), PREFERENCE_KEYS, flag)
    seq, seed = cfg.model.seq_length, t.seed
    for key in PREFERENCE_KEYS:
        lengths = shards.lengths(key)
        _check_fits(lengths, np.arange(lengths.size), seq, shards, flag)
    train_pairs = shards.split_documents(cfg.data.split, 0)
    section, name = epochs_key.split(".")
    epochs = getattr(getattr(cfg, section), name)
    needed = _train_samples_needed(cfg, 2 * train_pairs.size, "sequences (2 per pair)", epochs, epochs_key)
    train = PreferenceDataset(shards, train_pairs, seq, max(needed, 2 * train_pairs.size), seed)
    valid_pairs = _valid_documents(cfg, shards)
    valid = None if valid_pairs is None else PreferenceDataset(shards, valid_pairs, seq, 2 * valid_pairs.size, seed + 1)
    return train, valid


# --------------------------------------------------------------------------- PPO prompts


class PromptDataset:
    """PPO prompts (`tools/preprocess_data.py --prompts` shards): item i is a prompt's token ids, in an order
    reshuffled with ``training.seed`` at every pass, for as many passes as the run takes."""

    def __init__(self, shards: _Shards, docs: np.ndarray, seed: int):
        self.shards, self.docs = shards, docs
        self.order = _EpochOrder(len(docs), seed)

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> list[int]:
        return self.shards.get(PROMPT_KEYS[0], int(self.docs[self.order(i)])).tolist()


def build_prompt_dataset(cfg: Config) -> PromptDataset:
    """The train split of the prompt shards in ``data.paths``; every prompt must leave room for
    ``ppo.max_new_tokens`` within ``model.seq_length``."""
    flag = "--prompts"
    shards = _Shards(list(cfg.data.paths), PROMPT_KEYS, flag)
    lengths = shards.lengths(PROMPT_KEYS[0])
    room = cfg.model.seq_length - cfg.ppo.max_new_tokens
    if room < 1:
        raise DataError(f"ppo.max_new_tokens={cfg.ppo.max_new_tokens} leaves no room for a prompt within "
                        f"model.seq_length={cfg.model.seq_length}; lower ppo.max_new_tokens or raise model.seq_length")
    docs = shards.split_documents(cfg.data.split, 0)
    if docs.size == 0:
        raise DataError(f"the train split of {shards.prefixes} holds no prompt (data.split={cfg.data.split!r})")
    _check_fits(lengths, docs, room, shards, flag, "model.seq_length - ppo.max_new_tokens")
    return PromptDataset(shards, docs, cfg.training.seed)
