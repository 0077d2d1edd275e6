"""A reward-model checkpoint (saved at any layout) -> transformers' Qwen2ForSequenceClassification (Qwen3's with
query/key norms).

The language-model tensors go through the converter's Qwen2 / Qwen3 mapping (`megatron_qwen.convert.to_hf`); the
reward head becomes ``score.weight`` (Linear(hidden, 1), no bias, as transformers builds it), and
config.json gets one label and ``pad_token_id``: transformers reads each row's score at its last token
that is not padding, which is the final <|im_end|> the head was trained at when rows are right-padded
with that id (Qwen's <|endoftext|> by default).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import torch

from megatron_qwen.checkpoint import directory as ckdir
from megatron_qwen.convert import mcore_keys as K
from megatron_qwen.checkpoint.dcp_io import tensor_metadata
from megatron_qwen.convert.hf_io import PlannedTensor
from megatron_qwen.convert.layouts import ARCHITECTURES, QWEN_ENDOFTEXT_ID, default_layout, hf_config
from megatron_qwen.convert.to_hf import (
    DEFAULT_MAX_SHARD_BYTES,
    LayerReader,
    check_stored,
    exported_vocab,
    plan_tensors,
    rows_of,
    write_hf_dir,
)
from megatron_qwen.errors import ConversionError
from megatron_qwen.checkpoint.adapters import is_adapter_key

SCORE = "score.weight"


def export_reward_to_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    layout: str | None = None,
    config_path: str | os.PathLike | None = None,
    dtype: str | None = None,
    pad_token_id: int = QWEN_ENDOFTEXT_ID,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    log: Callable[[str], None] = print,
    trust_checkpoint: bool = False,
) -> Path:
    """Write the reward checkpoint `ckpt_dir` as a Hugging Face Qwen2ForSequenceClassification (Qwen3's for a
    model with query/key norms, or as `layout` says) in `out_dir`.

    The model's shape comes from `config_path` (default ``ckpt_dir/model_config.yaml``, which training
    checkpoints carry). `dtype` casts every tensor (default: as stored). `pad_token_id` must be the id the
    rows are right-padded with and must differ from <|im_end|>. `out_dir` must not exist; it appears only
    when complete. `trust_checkpoint` lifts the unpickling allowlist.
    """
    out = Path(out_dir)
    if out.exists():
        raise ConversionError(f"--out {out} already exists; choose a new directory or remove it first")
    ckpt = ckdir.require_checkpoint(ckpt_dir, f"--ckpt {ckpt_dir}")
    m = ckdir.read_model_config(ckpt, config_path)
    config_path = config_path or ckpt / ckdir.MODEL_CONFIG_FILE

    stored = tensor_metadata(ckpt, trust_checkpoint)
    adapters = [key for key in stored if is_adapter_key(key)]
    if adapters:
        raise ConversionError(
            f"--ckpt {ckpt} holds LoRA adapters ({adapters[0]}), which the reward export does not merge; export "
            "the adapters with mcore-to-peft and load them onto the reward model exported from the base checkpoint"
        )
    if K.SCALAR_HEAD not in stored:
        raise ConversionError(
            f"--ckpt {ckpt} has no reward head ({K.SCALAR_HEAD}); it is not a checkpoint of "
            "megatron_qwen.stages.reward (export a language model without --task reward)"
        )
    # A reward model has the scalar head in place of the output layer.
    expected = {k: v for k, v in K.full_shapes(m, rows_of(stored, m)).items() if k != K.OUTPUT}
    expected[K.SCALAR_HEAD] = (1, m.hidden_size)
    rows = check_stored({k: v for k, v in stored.items() if k != K.OUTPUT}, expected, m, ckpt, config_path)
    vocab = exported_vocab(ckpt, rows)
    # One dtype for every tensor (a checkpoint stores its weights in one). The LM plan of the tied model has no
    # lm_head, which a reward checkpoint lacks.
    layout = layout or default_layout(m)
    reader = LayerReader(ckpt, stored, getattr(torch, dtype) if dtype else stored[K.EMBED].dtype, trust_checkpoint)
    lm = dataclasses.replace(m, tie_word_embeddings=True)
    tensors = plan_tensors(reader, layout, lm, vocab)
    tensors.append(PlannedTensor(SCORE, (1, m.hidden_size), reader.dtype(K.SCALAR_HEAD),
                                 lambda: iter([reader.whole(K.SCALAR_HEAD)])))

    config = hf_config(layout, m, vocab, str(reader.dtype(K.EMBED)).removeprefix("torch."))
    architecture = ARCHITECTURES[layout].replace("ForCausalLM", "ForSequenceClassification")
    config.update(
        architectures=[architecture],
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        pad_token_id=pad_token_id,
    )
    files = write_hf_dir(out, tensors, config, vocab, max_shard_bytes, log)
    log(f"wrote {out}: {architecture}, {len(files)} safetensors file(s), vocab_size {vocab}, "
        f"pad_token_id {pad_token_id}")
    return out
