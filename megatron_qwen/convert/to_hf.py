"""megatron-core dist_checkpointing checkpoint (saved at any layout) -> Hugging Face safetensors + config.json.

Single process, streaming: tensors are read one layer (embeddings: one stored chunk) at a time, DCP
assembling them from whatever TP/PP pieces the checkpoint holds, and their bytes written straight
into safetensors files whose headers are known in advance, so no shard is ever held in memory.

Vocabulary: a checkpoint converted from Hugging Face remembers the source vocab_size
(`hf_source.json`) and the rows padded on for tensor parallelism are stripped again, so a round trip
gives back the original tensors. Other checkpoints keep every stored row, as the Qwen release does
(151936 / 152064); config.json's vocab_size is always the number of rows written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch

from megatron_qwen.checkpoint import directory as ckdir
from megatron_qwen.config import TOKENIZER_VOCAB_SIZE
from megatron_qwen.convert import mcore_keys as K
from megatron_qwen.checkpoint.dcp_io import read_chunks, tensor_metadata
from megatron_qwen.convert.hf_io import PlannedTensor, write_safetensors
from megatron_qwen.convert.layouts import (
    GLOBAL_NAMES,
    LAYOUTS,
    QWEN,
    default_layout,
    expected_tensors,
    hf_config,
    layer_name,
    layout_problem,
    qkv_source,
)
from megatron_qwen.convert.lora import base_checkpoint, merged, open_adapters
from megatron_qwen.errors import ConversionError
from megatron_qwen.checkpoint.adapters import is_adapter_key
from megatron_qwen.tokenizer import default_tokenizer_file

DEFAULT_MAX_SHARD_BYTES = 2 * 10**9


def exported_vocab(ckpt: Path, stored_rows: int) -> int:
    """The vocabulary to export: the source's vocab_size of a converted checkpoint (the rows padded on for
    tensor parallelism are dropped again), else every stored row."""
    source = ckdir.read_hf_source(ckpt)
    return source["vocab_size"] if source and source["vocab_size"] <= stored_rows else stored_rows


class LayerReader:
    """Reads a checkpoint's tensors for export, keeping the last layer read of each key (Q, K and V, or
    gate and up, come from one read)."""

    def __init__(self, ckpt: Path, stored: dict, target: torch.dtype | None, trust: bool = False):
        self.ckpt, self.stored, self.target, self.trust = ckpt, stored, target, trust
        self.cache: dict[str, tuple[int, torch.Tensor]] = {}

    def _read(self, key: str, offsets: tuple, sizes: tuple) -> torch.Tensor:
        block = read_chunks(self.ckpt, {key: (offsets, sizes, self.stored[key].dtype)}, self.trust)[key]
        return block.to(self.target) if self.target else block

    def dtype(self, key: str) -> torch.dtype:
        """The written dtype of (logical) key `key`: the target, else as stored (in any layer)."""
        if key in self.stored:
            return self.target or self.stored[key].dtype
        return self.target or next(info.dtype for name, info in self.stored.items()
                                   if K.split_layer_key(name)[0] == key)

    def layer(self, key: str, i: int) -> torch.Tensor:
        """Layer `i` of layer key `key`, stacked or (a mixture-of-experts model) stored per layer."""
        if self.cache.get(key, (None,))[0] != i:
            if key not in self.stored:
                self.cache[key] = (i, self.whole(K.layer_key(key, i)))
            else:
                shape = self.stored[key].shape[1:]
                self.cache[key] = (i, self._read(key, (i,) + (0,) * len(shape), (1,) + shape)[0])
        return self.cache[key][1]

    def expert(self, key: str, i: int, e: int) -> torch.Tensor:
        """Routed expert `e`'s tensor of layer key `key` in layer `i` (experts are read one at a time)."""
        if self.cache.get(key, (None,))[0] != (i, e):
            stored = K.layer_key(key, i)
            shape = self.stored[stored].shape
            self.cache[key] = ((i, e), self._read(stored, (e,) + (0,) * (len(shape) - 1), (1,) + shape[1:])[0])
        return self.cache[key][1]

    def rows(self, key: str, count: int) -> Iterator[torch.Tensor]:
        """Rows [0, count) in blocks that follow the stored chunks (one stored chunk read at a time)."""
        width = self.stored[key].shape[1:]
        for start, stop in self.stored[key].row_blocks(count):
            yield self._read(key, (start,) + (0,) * len(width), (stop - start,) + width)

    def whole(self, key: str) -> torch.Tensor:
        shape = self.stored[key].shape
        return self._read(key, (0,) * len(shape), shape)


def rows_of(stored: dict, m) -> int:
    """Embedding rows of a checkpoint (the model config's padded vocabulary when it has no embedding)."""
    return stored[K.EMBED].shape[0] if K.EMBED in stored else m.padded_vocab_size


def check_stored(stored: dict, expected: dict, m, ckpt: Path, config_path) -> int:
    """Refuse a checkpoint whose tensors are not `expected` (key -> shape) for model config `m`, naming the
    mismatch; returns the embedding rows. A stored tensor the config leaves out (an output layer, q/k norms,
    q/k/v biases) is refused too, since exporting without it would change the network."""
    described = (
        f"{config_path} (num_layers={m.num_layers}, hidden_size={m.hidden_size}, num_attention_heads="
        f"{m.num_attention_heads}, num_query_groups={m.num_query_groups}, kv_channels={m.kv_channels}, "
        f"ffn_hidden_size={m.ffn_hidden_size}, qkv_bias={m.qkv_bias}, qk_layernorm={m.qk_layernorm}, "
        f"tie_word_embeddings={m.tie_word_embeddings})"
    )
    for key, shape in expected.items():
        if key not in stored:
            raise ConversionError(
                f"--ckpt {ckpt} has no tensor {key}, which {described} needs; it is not a checkpoint of that model "
                "(pass the model's config with --config)"
            )
        if stored[key].shape != shape:
            raise ConversionError(
                f"--ckpt {ckpt}: tensor {key} has shape {list(stored[key].shape)}, but {described} needs {list(shape)}"
            )
    left_out = [key for key in stored if key not in expected
                and K.split_layer_key(key)[0] in (K.OUTPUT, K.QKV_BIAS, K.Q_NORM, K.K_NORM)]
    if left_out:
        raise ConversionError(
            f"--ckpt {ckpt} holds {left_out[0]}, which {described} does not have; exporting would drop it: pass the "
            "model's config with --config"
        )
    return rows_of(stored, m)


def plan_tensors(reader: LayerReader, layout: str, m, vocab: int) -> list[PlannedTensor]:
    """The Hugging Face tensors in checkpoint order, each with a producer of its data (no lm_head when the
    embeddings are tied: transformers ties it to the embedding again on load)."""
    F, d, groups = m.ffn_hidden_size, m.head_dim, m.kv_heads
    q_rows = m.num_attention_heads // groups * d  # query rows per group
    names = GLOBAL_NAMES[layout]
    shapes = expected_tensors(layout, m, vocab, fused=False)

    def planned(name, key, produce):
        return PlannedTensor(name, shapes[name], reader.dtype(key), produce)

    def qkv(key, i, parts):
        # linear_qkv rows are [its query heads; k_g; v_g] per query group g: regroup into Q, K and V.
        stored = reader.layer(key, i)
        grouped = stored.view(groups, q_rows + 2 * d, *stored.shape[1:])
        pieces = (grouped[:, :q_rows], grouped[:, q_rows:q_rows + d], grouped[:, q_rows + d:])
        return iter([torch.cat([pieces[j].reshape(-1, *stored.shape[1:]) for j in parts])])

    out = [planned(names["embed"], K.EMBED, lambda: reader.rows(K.EMBED, vocab))]
    for i in range(m.num_layers):
        def whole(role, key, i=i):
            return planned(layer_name(layout, role, i), key, lambda: iter([reader.layer(key, i)]))

        out.append(whole("input_norm", K.INPUT_NORM))
        parts = [[0, 1, 2]] if layout == QWEN else [[0], [1], [2]]  # v1's fused c_attn, or separate q/k/v_proj
        kinds = ((K.QKV_WEIGHT, "weight"), (K.QKV_BIAS, "bias")) if m.qkv_bias else ((K.QKV_WEIGHT, "weight"),)
        for j, part in enumerate(parts):
            for key, kind in kinds:
                name = qkv_source(layout, i, j, kind, m)[0]
                out.append(planned(name, key, lambda key=key, i=i, part=part: qkv(key, i, part)))
        if m.qk_layernorm:
            out += [whole("q_norm", K.Q_NORM), whole("k_norm", K.K_NORM)]
        if m.moe_layers[i]:
            out += [whole("proj", K.PROJ), whole("post_norm", K.PRE_MLP_NORM)]
            out += moe_tensors(reader, layout, m, i, planned, whole)
            continue
        out += [whole("proj", K.PROJ), whole("post_norm", K.POST_NORM)]
        out.append(planned(layer_name(layout, "gate", i), K.FC1, lambda i=i: iter([reader.layer(K.FC1, i)[:F]])))
        out.append(planned(layer_name(layout, "up", i), K.FC1, lambda i=i: iter([reader.layer(K.FC1, i)[F:]])))
        out.append(whole("down", K.FC2))
    out.append(planned(names["final_norm"], K.FINAL_NORM, lambda: iter([reader.whole(K.FINAL_NORM)])))
    if not m.tie_word_embeddings:
        out.append(planned(names["lm_head"], K.OUTPUT, lambda: reader.rows(K.OUTPUT, vocab)))
    if [t.name for t in out] != list(shapes):
        raise AssertionError("export order differs from the layout table")
    return out


def moe_tensors(reader: LayerReader, layout: str, m, i: int, planned, whole) -> list[PlannedTensor]:
    """The tensors of MoE layer `i`: the router, each routed expert's gate/up/down (the form transformers'
    save_pretrained writes and the releases use; read one expert at a time) and, for Qwen2-MoE, the shared expert
    and its gate."""
    I, S = m.moe_ffn_hidden_size, m.moe_shared_expert_ffn_hidden_size
    out = [whole("router", K.ROUTER)]
    for e in range(m.num_experts):
        out += [
            planned(layer_name(layout, "expert_gate", i, e), K.EXPERT_FC1,
                    lambda e=e: iter([reader.expert(K.EXPERT_FC1, i, e)[:I]])),
            planned(layer_name(layout, "expert_up", i, e), K.EXPERT_FC1,
                    lambda e=e: iter([reader.expert(K.EXPERT_FC1, i, e)[I:]])),
            planned(layer_name(layout, "expert_down", i, e), K.EXPERT_FC2,
                    lambda e=e: iter([reader.expert(K.EXPERT_FC2, i, e)])),
        ]
    if S is not None:
        out.append(planned(layer_name(layout, "shared_gate", i), K.SHARED_FC1,
                           lambda: iter([reader.layer(K.SHARED_FC1, i)[:S]])))
        out.append(planned(layer_name(layout, "shared_up", i), K.SHARED_FC1,
                           lambda: iter([reader.layer(K.SHARED_FC1, i)[S:]])))
        out.append(whole("shared_down", K.SHARED_FC2))
        if m.moe_shared_expert_gate:
            out.append(whole("shared_expert_gate", K.SHARED_GATE))
    return out


def write_hf_dir(out: Path, tensors, config: dict, vocab: int, max_shard_bytes: int, log) -> list:
    """Write safetensors shards, config.json and (for Qwen's vocabulary) the tokenizer file into
    ``OUT.tmp`` and rename it to `out` when complete; nothing is left behind on failure."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = write_safetensors(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _copy_tokenizer(tmp, vocab, log)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def mcore_to_hf(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    layout: str | None = None,
    config_path: str | os.PathLike | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    log: Callable[[str], None] = print,
    trust_checkpoint: bool = False,
    base: str | os.PathLike | None = None,
) -> Path:
    """Write the megatron-core checkpoint `ckpt` as a Hugging Face model directory `out` in `layout` (default:
    transformers' Qwen3 for a model with query/key norms, else Qwen2; `qwen` writes the v1 release's layout).

    The model's shape comes from `config_path` (default `ckpt/model_config.yaml`). `dtype` casts every
    tensor (default: as stored). `out` must not exist; it appears only when complete. `trust_checkpoint`
    lifts the unpickling allowlist.

    LoRA adapters in `ckpt` are merged into their projections (`megatron_qwen.convert.lora`); the base weights of an
    adapter-only checkpoint come from `base`, by default the checkpoint its adapter_base.json names.
    """
    out = Path(out)
    if layout is not None and layout not in LAYOUTS:
        raise ConversionError(f"--layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if out.exists():
        raise ConversionError(f"--out {out} already exists; choose a new directory or remove it first")
    ckpt = ckdir.require_checkpoint(ckpt, f"--ckpt {ckpt}")
    m = ckdir.read_model_config(ckpt, config_path)
    config_path = config_path or ckpt / ckdir.MODEL_CONFIG_FILE
    adapters = open_adapters(ckpt, config_path, trust_checkpoint)
    if adapters is None and base is not None:
        raise ConversionError(f"--base {base}: --ckpt {ckpt} holds no LoRA adapters, so it has no base to name; "
                              "drop --base")
    weights = ckpt if adapters is None else base_checkpoint(adapters, base)  # where the base weights are
    source = ckdir.read_hf_source(weights)
    layout = layout or default_layout(m)
    problem = layout_problem(layout, m)
    if problem:
        raise ConversionError(f"--layout {layout} cannot hold this model: {problem}; use --layout {default_layout(m)}")
    if adapters is not None and layout == QWEN:
        raise ConversionError(f"--ckpt {ckpt} holds LoRA adapters, which are merged in the transformers layouts only; "
                              f"use --layout {default_layout(m)}")

    stored = {key: info for key, info in tensor_metadata(weights, trust_checkpoint).items()
              if not is_adapter_key(key)}
    rows = check_stored(stored, K.full_shapes(m, rows_of(stored, m)), m, weights, config_path)
    vocab = exported_vocab(weights, rows)
    reader = LayerReader(weights, stored, getattr(torch, dtype) if dtype else None, trust_checkpoint)
    out_dtype = reader.dtype(K.EMBED)
    if layout != QWEN and (m.use_dynamic_ntk or m.use_logn_attn):
        log(
            f"note: the model uses dynamic NTK / LogN attention beyond {m.seq_length} tokens, which transformers' "
            f"{layout} class does not model: its logits match only up to that length (--layout qwen keeps both)"
        )

    source_config = source["config"] if source and source.get("layout") == layout else None
    config = hf_config(layout, m, vocab, str(out_dtype).removeprefix("torch."), source_config)
    tensors = plan_tensors(reader, layout, m, vocab)
    if adapters is not None:
        tensors = merged(tensors, adapters)
    files = write_hf_dir(out, tensors, config, vocab, max_shard_bytes, log)
    size = sum(t.nbytes for t in tensors)
    merge = "" if adapters is None else f", LoRA adapters merged (base {weights})"
    log(f"wrote {out}: {layout} layout, {len(files)} safetensors file(s), {size / 2**20:.1f} MiB, vocab_size {vocab}"
        f"{merge}")
    return out


def _copy_tokenizer(directory: Path, vocab: int, log) -> None:
    """Put qwen.tiktoken next to a model with Qwen's vocabulary (smaller vocabularies are not Qwen's)."""
    if vocab < TOKENIZER_VOCAB_SIZE:
        return
    try:
        shutil.copyfile(default_tokenizer_file(), directory / "qwen.tiktoken")
    except FileNotFoundError as exc:
        log(f"note: qwen.tiktoken not copied: {exc}")
