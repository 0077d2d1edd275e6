"""Loading a checkpoint for inference at any TP/PP/VPP/SP/EP/CP layout, and its full-vocabulary logits
(tools/forward.py, tools/generate.py).

Everything that can be refused is checked before any process group exists (`prepare`), identically
on every rank, so a bad request ends all ranks with the same message instead of a hang.

Vocabulary: logits cover the model's real vocabulary, `vocab_size` (the source Hugging Face
vocab_size of a converted checkpoint, else every stored row); rows padded on for tensor parallelism
are zero, would score 0 and are sliced off. Greedy decoding also never picks an id the tokenizer
lacks: the release's 151936/152064 embedding rows exceed every family's tokenizer (v1: 151851 tokens, Qwen2.5:
151665; `TOKENIZER_VOCAB_SIZES[model.family]`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_qwen.checkpoint import directory as ckdir
from megatron_qwen.config import TOKENIZER_VOCAB_SIZES, Config, ConfigError, ParallelLayout, load_config, resolve
from megatron_qwen.convert import mcore_keys as K
from megatron_qwen.checkpoint.dcp_io import tensor_metadata
from megatron_qwen.convert.to_hf import exported_vocab
from megatron_qwen.errors import ConversionError
from megatron_qwen.model.context_parallel import gather_sequence, split_batch
from megatron_qwen.model.qwen import build_model
from megatron_qwen.model.rotary import ntk_alpha, pinned_ntk_alphas
from megatron_qwen.platform.runtime import Runtime
from megatron_qwen.checkpoint.io import load_model


@dataclasses.dataclass(frozen=True)
class ForwardPlan:
    """A validated request: the config to build, its layout, and the vocabulary bounds."""

    cfg: Config
    layout: ParallelLayout
    vocab_size: int  # logits columns written
    generate_vocab: int  # greedy decoding picks ids below this
    trust_checkpoint: bool = False  # unpickle everything in the checkpoint (see megatron_qwen.checkpoint.safety)


def prepare(
    ckpt: str | os.PathLike, world_size: int, tp: int = 1, pp: int = 1, vpp: int = 1, sp: bool = False,
    precision: str = "auto", config_path: str | os.PathLike | None = None, trust_checkpoint: bool = False,
    ep: int = 1, cp: int = 1,
) -> ForwardPlan:
    """Check the checkpoint and the layout for `world_size` ranks; raise ConversionError naming the problem
    (or CheckpointError, for a checkpoint that holds objects outside the unpickling allowlist)."""
    ckpt = ckdir.require_checkpoint(ckpt, f"--ckpt {ckpt}")
    # FP8 is a training setting: logits and generation run the weights at --precision.
    model = dataclasses.replace(ckdir.read_model_config(ckpt, config_path), fp8=None)
    stored = tensor_metadata(ckpt, trust_checkpoint)
    if K.EMBED not in stored:
        raise ConversionError(
            f"--ckpt {ckpt} has no tensor {K.EMBED}; it is not a Qwen model checkpoint of this project"
        )
    # A model with tied embeddings stores no output layer: its output layer is the embedding.
    if K.OUTPUT not in stored and not model.tie_word_embeddings:
        kind = "a reward or value model (scalar head)" if K.SCALAR_HEAD in stored else "not a language model"
        raise ConversionError(f"--ckpt {ckpt} has no {K.OUTPUT}: it is {kind}; logits and generation need a "
                              "language-model checkpoint")
    stored_rows = stored[K.EMBED].shape[0]
    mp = tp * pp * cp
    dp = world_size // mp if mp > 0 and world_size % mp == 0 else 1
    overrides = [
        f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.vpp={vpp}", f"parallel.sp={str(sp).lower()}",
        f"parallel.ep={ep}", f"parallel.cp={cp}", f"training.precision={precision}",
        # Forward passes need no batch recipe; these values satisfy the training-batch checks for any layout.
        "training.micro_batch_size=1", f"training.global_batch_size={dp * pp}",
    ]
    try:
        cfg = load_config(None, overrides)
        cfg, layout, _ = resolve(dataclasses.replace(cfg, model=model), world_size)
    except ConfigError as exc:
        raise ConversionError(f"layout --tp {tp} --pp {pp} --vpp {vpp} --ep {ep} --cp {cp} on {world_size} rank(s): "
                              f"{exc}") from exc
    if cfg.model.padded_vocab_size != stored_rows:
        raise ConversionError(
            f"--tp {tp} needs the vocabulary padded to a multiple of {tp} ({cfg.model.padded_vocab_size} rows) but the "
            f"checkpoint stores {stored_rows} rows; choose a --tp that divides {stored_rows}"
        )
    vocab = exported_vocab(ckpt, stored_rows)
    # Qwen's padded vocabularies (151936, 152064) hold rows past the family's tokenizer's last id: never generate
    # those.
    return ForwardPlan(cfg, layout, vocab, min(vocab, TOKENIZER_VOCAB_SIZES[model.family]), trust_checkpoint)


def read_token_array(path: str | os.PathLike, option: str) -> np.ndarray:
    """A non-empty (batch, seq) integer array from a .npy file given as `option` (a 1-D array is one row)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{option} {path} does not exist")
    try:
        tokens = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ConversionError(f"{option} {path} is not a .npy array ({exc})") from exc
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ConversionError(f"{option} {path} has dtype {tokens.dtype}; token ids must be integers")
    if tokens.ndim == 1:
        tokens = tokens[None, :]
    if tokens.ndim != 2 or tokens.size == 0:
        raise ConversionError(
            f"{option} {path} has shape {list(tokens.shape)}; expected a non-empty (batch, seq) array"
        )
    return tokens.astype(np.int64)


def load_tokens(path: str | os.PathLike, vocab_size: int) -> np.ndarray:
    """A (batch, seq) int64 array from a .npy file (a 1-D array is one row), every id in [0, vocab_size)."""
    tokens = read_token_array(path, "--tokens")
    bad = np.argwhere((tokens < 0) | (tokens >= vocab_size))
    if len(bad):
        row, col = (int(i) for i in bad[0])
        raise ConversionError(
            f"--tokens {path}: id {int(tokens[row, col])} at [{row}, {col}] is outside the model's vocabulary "
            f"[0, {vocab_size}) ({len(bad)} id(s) out of range)"
        )
    return tokens


def load_chunks(plan: ForwardPlan, ckpt: str | os.PathLike, runtime: Runtime) -> list[torch.nn.Module]:
    """This rank's model chunks with the checkpoint's weights, in eval mode (NTK/LogN active), rotating each
    token at its position id (what the generation engine needs; the same logits as by row index)."""
    chunks = build_model(plan.cfg, runtime, rope_at_positions=True)
    load_model(chunks, ckpt, plan.trust_checkpoint)
    for chunk in chunks:
        chunk.eval()
    return chunks


def _forward_step(data_iterator, model):
    tokens = next(data_iterator)
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    # With context parallelism each rank runs its two chunks of the row, at their global positions.
    mine = split_batch({"tokens": tokens, "position_ids": positions})
    output = model(mine["tokens"].contiguous(), mine["position_ids"].contiguous(), None)

    def gather(output_tensor, non_loss_data=True):
        # The output layer is column-parallel: each TP rank holds a slice of the vocabulary; each CP rank a share
        # of the positions.
        return gather_sequence(gather_from_tensor_model_parallel_region(output_tensor).float(), dim=1)

    return output, gather


def forward_logits(chunks: list[torch.nn.Module], plan: ForwardPlan, tokens: torch.Tensor) -> torch.Tensor | None:
    """fp32 logits [batch, seq, vocab_size] on the last pipeline stage's ranks, None on the others.

    Each row is one micro-batch of megatron-core's schedule for this layout. Sequence parallelism
    splits the sequence over TP ranks and context parallelism cuts it into 2 x CP chunks, so rows are
    right-padded to a multiple of both (causal attention: the padding cannot change earlier positions) and the
    padding is cut off again; the dynamic-NTK alpha is pinned to the unpadded length, so padding cannot change it.
    Interleaved pipelining needs a multiple of PP micro-batches, made up by repeating the last row.
    """
    batch, seq = tokens.shape
    layout, m = plan.layout, plan.cfg.model
    multiple = (layout.tp if layout.sp else 1) * (2 * layout.cp if layout.cp > 1 else 1)
    seq_padded = -(-seq // multiple) * multiple
    rows = [torch.nn.functional.pad(row[None], (0, seq_padded - seq)) for row in tokens]
    if layout.vpp > 1:
        rows += rows[-1:] * (-len(rows) % layout.pp)
    iterators = [iter(rows) for _ in chunks] if len(chunks) > 1 else iter(rows)
    alphas = (ntk_alpha(seq, m.seq_length),) if m.use_dynamic_ntk else None
    with torch.no_grad(), pinned_ntk_alphas(chunks, alphas):
        outputs = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=iterators,
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(rows),
            seq_length=seq_padded,
            micro_batch_size=1,
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat(outputs[:batch])[:, :seq, : plan.vocab_size]


def recompute_greedy(chunks: list[torch.nn.Module], plan: ForwardPlan, tokens: torch.Tensor,
                     steps: int) -> torch.Tensor:
    """`tokens` with `steps` greedy ids appended to every row, on every rank, recomputing the whole sequence at
    every step: the reference the KV-cache engine (`inference.engine`) is tested and benchmarked against."""
    for _ in range(steps):
        logits = forward_logits(chunks, plan, tokens)
        next_ids = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        if logits is not None:
            next_ids = logits[:, -1, : plan.generate_vocab].argmax(-1).to(tokens.device)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            # The last stage chose; the first stage needs the ids for the next step.
            torch.distributed.broadcast(
                next_ids,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
    return tokens


def is_writer() -> bool:
    """The rank that writes results: TP rank 0 and CP rank 0 of the last pipeline stage of data-parallel replica
    0."""
    return (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )


def writer_rank() -> int:
    """The global rank of `is_writer()`'s rank, agreed by every rank (a collective: call it on all of them)."""
    flags = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(flags, is_writer())
    return flags.index(True)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """np.save to a temporary name, renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)
