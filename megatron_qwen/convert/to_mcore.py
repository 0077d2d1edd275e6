"""Hugging Face Qwen checkpoint (transformers Qwen2 / Qwen3 or Qwen v1 layout) -> megatron-core dist_checkpointing.

Streaming, single process: megatron-core describes the stored pieces of the model (see `mcore_layout`);
each piece, cut into row blocks of at most `max_chunk_bytes`, is read from the Hugging Face files
only when DCP's writer asks for it, rearranged (QKV per query group, fc1 = [gate; up], vocabulary padding)
and written. Peak memory is one block plus the interpreter, whatever the model size.

The output directory holds the checkpoint, `model_config.yaml` (the project's Config, with the
requested parallel layout) and `hf_source.json` (the source config.json and vocabulary size, used
to slice padding off logits and to export back to the same config).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import yaml

from megatron_qwen.checkpoint import directory as ckdir
from megatron_qwen.config import Config, ParallelConfig, padded_vocab_size, validate
from megatron_qwen.convert import mcore_keys as K
from megatron_qwen.checkpoint.dcp_io import Chunk, serialize_object, write_checkpoint
from megatron_qwen.convert.hf_io import HFCheckpoint, tokenizer_files
from megatron_qwen.convert.layouts import (
    GLOBAL_NAMES,
    IGNORED_SUFFIXES,
    QWEN,
    detect_family,
    detect_layout,
    expected_tensors,
    fused_experts,
    layer_name,
    model_from_hf,
    qkv_source,
)
from megatron_qwen.convert.mcore_layout import StoredTensor, stored_layout
from megatron_qwen.errors import ConversionError

DEFAULT_MAX_CHUNK_BYTES = 64 << 20


def _check_tensors(hf: HFCheckpoint, layout: str, cfg: Config, vocab: int, tied: bool) -> None:
    """Every tensor the config implies is there with its shape and a floating dtype, and nothing else is."""
    m = cfg.model
    lm_head = GLOBAL_NAMES[layout]["lm_head"]
    expected = expected_tensors(layout, m, vocab, fused=fused_experts(hf.tensors))
    sizes = (
        f"hidden_size={m.hidden_size}, num_attention_heads={m.num_attention_heads}, num_key_value_heads={m.kv_heads}, "
        f"head_dim={m.head_dim}, num_hidden_layers={m.num_layers}, "
        f"intermediate_size={2 * m.ffn_hidden_size if layout == QWEN else m.ffn_hidden_size}, vocab_size={vocab}"
    )
    missing = [name for name in expected if name not in hf.tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(
            f"{hf.dir}: tensor {missing[0]}{more} is missing; a {layout!r} checkpoint with config.json's {sizes} "
            f"has it with shape {list(expected[missing[0]])}; check the download (all shards present?) and config.json"
        )
    for name, shape in expected.items():
        info = hf.tensors[name]
        if info.shape != shape:
            raise ConversionError(
                f"{hf.dir}: tensor {name} has shape {list(info.shape)}, but config.json's {sizes} needs {list(shape)}; "
                "the weights and config.json do not belong together"
            )
        if not info.dtype.is_floating_point:
            raise ConversionError(f"{hf.dir}: tensor {name} has dtype {info.dtype}; weights must be floating point")
    if tied and lm_head in hf.tensors and hf.tensors[lm_head].shape != (vocab, m.hidden_size):
        raise ConversionError(
            f"{hf.dir}: tensor {lm_head} has shape {list(hf.tensors[lm_head].shape)}, expected {[vocab, m.hidden_size]}"
        )
    unexpected = [
        name for name in hf.tensors
        if name not in expected and name != lm_head and not name.endswith(IGNORED_SUFFIXES)
    ]
    if unexpected:
        raise ConversionError(
            f"{hf.dir}: tensor {unexpected[0]} is not part of a {layout!r} model with config.json's {sizes} "
            f"({len(unexpected)} unexpected tensor(s)); converting would drop it and change the network"
        )


class _Sources:
    """Rows of megatron-core tensors computed from the Hugging Face tensors they come from."""

    def __init__(self, hf: HFCheckpoint, layout: str, cfg: Config, vocab: int, tied: bool):
        self.hf, self.layout, self.m, self.vocab = hf, layout, cfg.model, vocab
        names = GLOBAL_NAMES[layout]
        self.embed = names["embed"]
        self.lm_head = names["embed"] if tied and names["lm_head"] not in hf.tensors else names["lm_head"]
        self.final_norm = names["final_norm"]
        self.fused = fused_experts(hf.tensors)

    def names(self, key: str, layer: int | None, expert: int = 0) -> list[str]:
        """The Hugging Face tensors that `key` (of layer `layer`, routed expert `expert`) is made of."""
        simple = {K.INPUT_NORM: "input_norm", K.POST_NORM: "post_norm", K.PROJ: "proj", K.FC2: "down",
                  K.Q_NORM: "q_norm", K.K_NORM: "k_norm", K.PRE_MLP_NORM: "post_norm", K.ROUTER: "router",
                  K.SHARED_FC2: "shared_down", K.SHARED_GATE: "shared_expert_gate"}
        if key == K.SHARED_FC1:
            return [layer_name(self.layout, "shared_gate", layer), layer_name(self.layout, "shared_up", layer)]
        if key in K.EXPERT_KEYS and self.fused:
            return [layer_name(self.layout, "experts_gate_up" if key == K.EXPERT_FC1 else "experts_down", layer)]
        if key == K.EXPERT_FC1:
            return [layer_name(self.layout, "expert_gate", layer, expert),
                    layer_name(self.layout, "expert_up", layer, expert)]
        if key == K.EXPERT_FC2:
            return [layer_name(self.layout, "expert_down", layer, expert)]
        if key == K.EMBED:
            return [self.embed]
        if key == K.OUTPUT:
            return [self.lm_head]
        if key == K.FINAL_NORM:
            return [self.final_norm]
        if key in simple:
            return [layer_name(self.layout, simple[key], layer)]
        if key == K.FC1:
            return [layer_name(self.layout, "gate", layer), layer_name(self.layout, "up", layer)]
        if key in (K.QKV_WEIGHT, K.QKV_BIAS):
            kind = "weight" if key == K.QKV_WEIGHT else "bias"
            return sorted({qkv_source(self.layout, layer, part, kind, self.m)[0] for part in range(3)})
        raise ConversionError(
            f"megatron-core's Qwen model stores {key}, which this converter does not know how to fill; "
            "megatron-core or the model spec changed: extend megatron_qwen/convert/to_mcore.py"
        )

    def dtype(self, key: str, layer: int | None) -> torch.dtype:
        """The stored dtype: the sources' own (promoted if, unusually, Q, K and V differ)."""
        return functools.reduce(torch.promote_types, [self.hf.tensors[name].dtype for name in self.names(key, layer)])

    def row_unit(self, key: str) -> int:
        """Rows that must stay together in one block: a whole query group (its q, k and v heads) for linear_qkv."""
        return K.qkv_group_rows(self.m) if key in (K.QKV_WEIGHT, K.QKV_BIAS) else 1

    def rows(self, key: str, layer: int | None, start: int, stop: int, dtype: torch.dtype,
             expert: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of `key`'s tensor for `layer` (without the layer axis; of routed expert `expert`)."""
        read = self.hf.read
        if key in K.EXPERT_KEYS and self.fused:
            # transformers 5's gate_up_proj rows are [gate; up] per expert, as megatron-core's fc1.
            return read(self.names(key, layer)[0], start, stop, slab=expert).to(dtype)
        if key in (K.EXPERT_FC1, K.SHARED_FC1):
            width = self.m.moe_ffn_hidden_size if key == K.EXPERT_FC1 else self.m.moe_shared_expert_ffn_hidden_size
            gate, up = self.names(key, layer, expert or 0)
            if start >= width:
                return read(up, start - width, stop - width).to(dtype)
            return read(gate, start, stop).to(dtype)
        if key == K.EXPERT_FC2:
            return read(self.names(key, layer, expert)[0], start, stop).to(dtype)
        if key in (K.EMBED, K.OUTPUT):
            name = self.names(key, layer)[0]
            real = min(stop, self.vocab)
            block = read(name, start, real).to(dtype) if real > start else None
            if real >= stop:
                return block
            # Padding rows: zero embeddings, and zero output rows whose logits are sliced off downstream.
            pad = torch.zeros(stop - max(start, real), self.m.hidden_size, dtype=dtype)
            return pad if block is None else torch.cat([block, pad])
        if key in (K.QKV_WEIGHT, K.QKV_BIAS):
            kind = "weight" if key == K.QKV_WEIGHT else "bias"
            unit, d = K.qkv_group_rows(self.m), self.m.head_dim
            first, last = start // unit, stop // unit
            parts = []
            # Query group g: query rows [g q, (g + 1) q) (q = its heads' rows), key and value rows [g d, (g + 1) d).
            for part, rows in enumerate((unit - 2 * d, d, d)):
                name, offset = qkv_source(self.layout, layer, part, kind, self.m)
                block = read(name, offset + first * rows, offset + last * rows).to(dtype)
                parts.append(block.reshape(last - first, rows, *block.shape[1:]))
            # [groups, q + 2d, ...]: group g's rows are its query heads, k_g, v_g, as megatron-core's linear_qkv
            # splits them.
            return torch.cat(parts, dim=1).reshape(stop - start, *parts[0].shape[2:])
        if key == K.FC1:
            # Rows [0, F) are the gate, [F, 2F) the up projection; megatron-core stores the two halves as
            # separate pieces, so a block never straddles them.
            F = self.m.ffn_hidden_size
            gate, up = self.names(key, layer)
            return read(up, start - F, stop - F).to(dtype) if start >= F else read(gate, start, stop).to(dtype)
        return read(self.names(key, layer)[0], start, stop).to(dtype)


def _chunks(pieces: list[StoredTensor], sources: _Sources, max_chunk_bytes: int) -> list[Chunk]:
    """Cut each stored piece into row blocks of at most `max_chunk_bytes` (at least one row unit)."""
    chunks = []
    for piece in pieces:
        # Layer tensors carry the stacked layer axis first, routed experts' the expert axis (the layer is then in
        # the key); rows are the axis after it.
        key, layer = K.split_layer_key(piece.key)
        expert = piece.offsets[0] if key in K.EXPERT_KEYS else None
        if layer is None and key in K.LAYER_KEYS:
            layer = piece.offsets[0]
        row_axis = 1 if piece.prepend else 0
        dtype = sources.dtype(key, layer)
        row_bytes = math.prod(piece.sizes[row_axis + 1:]) * dtype.itemsize
        unit = sources.row_unit(key)
        step = max(unit, (max_chunk_bytes // max(row_bytes * unit, 1)) * unit)
        first_row, n_rows = piece.offsets[row_axis], piece.sizes[row_axis]
        for start in range(first_row, first_row + n_rows, step):
            stop = min(start + step, first_row + n_rows)
            offsets = list(piece.offsets)
            sizes = list(piece.sizes)
            offsets[row_axis], sizes[row_axis] = start, stop - start
            chunks.append(
                Chunk(
                    key=piece.key,
                    global_shape=piece.global_shape,
                    offsets=tuple(offsets),
                    sizes=tuple(sizes),
                    dtype=dtype,
                    load=_loader(sources, key, layer, start, stop, dtype, tuple(sizes), expert),
                )
            )
    return chunks


def _loader(sources: _Sources, key, layer, start, stop, dtype, sizes, expert) -> Callable[[], torch.Tensor]:
    return lambda: sources.rows(key, layer, start, stop, dtype, expert).reshape(sizes)


def hf_to_mcore(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    tp: int = 1,
    pp: int = 1,
    vpp: int = 1,
    ep: int = 1,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    log: Callable[[str], None] = print,
    family: str | None = None,
) -> Path:
    """Convert the Hugging Face Qwen checkpoint in `hf_dir` into a megatron-core checkpoint at `out`.

    `tp`, `pp`, `vpp`, `ep` (expert parallelism, a mixture-of-experts model's) are checked against the model and
    recorded in `out/model_config.yaml`; the vocabulary is padded with zero rows to a multiple of `tp`. The
    checkpoint itself loads at any
    layout with the same padded vocabulary. `out` must not exist; it appears only when complete.
    `family` (the tokenizer family, model.family) defaults to the one the checkpoint's tokenizer files show,
    else the architecture's newest; it must fit the vocabulary. Every refusal comes before anything is written.
    """
    out = Path(out)
    if out.exists():
        raise ConversionError(f"--out {out} already exists; choose a new directory or remove it first")
    hf = HFCheckpoint(hf_dir)
    layout = detect_layout(hf.config, hf.tensors, str(hf.dir))
    model, vocab, tied = model_from_hf(hf.config, layout, str(hf.dir / "config.json"))
    added_tokens, chat_template = tokenizer_files(hf.dir)
    family, family_note = detect_family(layout, vocab, added_tokens, chat_template, family, str(hf.dir))
    model = dataclasses.replace(model, name=f"hf-{hf.dir.resolve().name}", family=family)
    cfg = Config(model=model, parallel=ParallelConfig(tp=tp, pp=pp, vpp=vpp, ep=ep))
    errors, notes = validate(cfg)
    if errors:
        raise ConversionError(f"layout --tp {tp} --pp {pp} --vpp {vpp} --ep {ep} does not fit the model: "
                              + "; ".join(errors))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(model, padded_vocab_size=padded_vocab_size(vocab, tp)))
    _check_tensors(hf, layout, cfg, vocab, tied)
    for note in notes + ([family_note] if family_note else []):
        log(f"note: {note}")

    sources = _Sources(hf, layout, cfg, vocab, tied)
    pieces, objects = stored_layout(cfg)
    chunks = _chunks(pieces, sources, max_chunk_bytes)
    dtype = sources.dtype(K.EMBED, None)
    m = cfg.model
    log(
        f"{hf.dir}: {layout} layout, {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads "
        f"({m.kv_heads} key/value) of {m.head_dim}, SwiGLU width {m.ffn_hidden_size}, vocabulary {vocab} (stored "
        f"{m.padded_vocab_size} rows{', tied' if tied else ''}), {dtype}, tokenizer family {family}"
    )

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_checkpoint(tmp, chunks, {key: serialize_object(value) for key, value in objects.items()})
        (tmp / ckdir.MODEL_CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        source = {
            "layout": layout,
            "vocab_size": vocab,
            "tied_embeddings": tied,
            "dtype": str(dtype).removeprefix("torch."),
            "config": hf.config,
        }
        (tmp / ckdir.HF_SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log(f"wrote {out} ({size / 2**20:.1f} MiB, {len(chunks)} chunks) for --tp {tp} --pp {pp} --vpp {vpp} --ep {ep}")
    return out
