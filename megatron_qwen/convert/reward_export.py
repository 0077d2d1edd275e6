"""A reward-model checkpoint (saved at any layout) -> transformers' Qwen2ForSequenceClassification.

The language-model tensors go through the converter's Qwen2 mapping (`megatron_qwen.convert.to_hf`); the
reward head becomes ``score.weight`` (Linear(hidden, 1), no bias, as transformers builds it), and
config.json gets one label and ``pad_token_id``: transformers reads each row's score at its last token
that is not padding, which is the final <|im_end|> the head was trained at when rows are right-padded
with that id (Qwen's <|endoftext|> by default).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from megatron_qwen.checkpoint import directory as ckdir
from megatron_qwen.convert import mcore_keys as K
from megatron_qwen.checkpoint.dcp_io import tensor_metadata
from megatron_qwen.convert.hf_io import PlannedTensor
from megatron_qwen.convert.layouts import GLOBAL_NAMES, QWEN2, QWEN_ENDOFTEXT_ID, hf_config
from megatron_qwen.convert.to_hf import DEFAULT_MAX_SHARD_BYTES, LayerReader, exported_vocab, plan_tensors, write_hf_dir
from megatron_qwen.errors import ConversionError

SCORE = "score.weight"


def export_reward_to_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config_path: str | os.PathLike | None = None,
    dtype: str | None = None,
    pad_token_id: int = QWEN_ENDOFTEXT_ID,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    log: Callable[[str], None] = print,
    trust_checkpoint: bool = False,
) -> Path:
    """Write the reward checkpoint `ckpt_dir` as a Hugging Face Qwen2ForSequenceClassification in `out_dir`.

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
    if K.SCALAR_HEAD not in stored:
        raise ConversionError(
            f"--ckpt {ckpt} has no reward head ({K.SCALAR_HEAD}); it is not a checkpoint of "
            "megatron_qwen.stages.reward (export a language model without --task reward)"
        )
    rows = stored[K.EMBED].shape[0] if K.EMBED in stored else m.padded_vocab_size
    expected = {k: v for k, v in K.full_shapes(m.num_layers, m.hidden_size, m.ffn_hidden_size, rows).items()
                if k != K.OUTPUT}
    expected[K.SCALAR_HEAD] = (1, m.hidden_size)
    for key, shape in expected.items():
        if key not in stored or stored[key].shape != shape:
            found = "missing" if key not in stored else f"of shape {list(stored[key].shape)}"
            raise ConversionError(
                f"--ckpt {ckpt}: tensor {key} is {found}, but {config_path} (num_layers={m.num_layers}, hidden_size="
                f"{m.hidden_size}, ffn_hidden_size={m.ffn_hidden_size}) needs {list(shape)}; pass the model's config "
                "with --config"
            )
    vocab = exported_vocab(ckpt, rows)
    # One dtype for every tensor (a checkpoint stores its weights in one): the LM plan also describes an
    # lm_head, which a reward checkpoint lacks and which is dropped before anything is read.
    reader = LayerReader(ckpt, stored, getattr(torch, dtype) if dtype else stored[K.EMBED].dtype, trust_checkpoint)
    tensors = [t for t in plan_tensors(reader, QWEN2, m, vocab) if t.name != GLOBAL_NAMES[QWEN2]["lm_head"]]
    tensors.append(PlannedTensor(SCORE, (1, m.hidden_size), reader.dtype(K.SCALAR_HEAD),
                                 lambda: iter([reader.whole(K.SCALAR_HEAD)])))

    config = hf_config(QWEN2, m, vocab, str(reader.dtype(K.EMBED)).removeprefix("torch."))
    config.update(
        architectures=["Qwen2ForSequenceClassification"],
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        pad_token_id=pad_token_id,
    )
    files = write_hf_dir(out, tensors, config, vocab, max_shard_bytes, log)
    log(f"wrote {out}: Qwen2ForSequenceClassification, {len(files)} safetensors file(s), vocab_size {vocab}, "
        f"pad_token_id {pad_token_id}")
    return out
