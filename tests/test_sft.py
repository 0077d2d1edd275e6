"""The SFT stage: packed rows give exactly the per-token losses of conversations run alone, and the tiny
Qwen fine-tuned through `python -m megatron_qwen.stages.sft` on a synthetic chat task learns it.

The task: "repeat: 3914" -> "3914" and "next: 3914" -> "4025" (each digit plus one), so the reply depends
on the instruction. Held-out prompts never occur in training; a reply counts as exact when every reply
token and the closing <|im_end|> is the model's argmax given the tokens before it, which is what greedy
decoding produces. Chance is 1e-4 (four digits).

The task is learned in a sudden step (held-out exact match goes from near 0 to 1.0 within 50-100 steps),
so the recipe must take that step early at any seed: with LR 1e-3, four heads and an empty system prompt,
held-out exact match is 1.0 by step 250 of the 400 at training seeds 1-5 and the default (0.62-1.0 at step
200, 0.0-0.1 at step 100). The earlier recipe (LR 3e-3, two heads, the default system prompt, 500 steps)
took its step between steps 250 and 400 at five of those seeds and never at seed 4 (0.0 at step 500).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from spawn import run_torchrun

STAGE = ["-m", "megatron_qwen.stages.sft", "configs/tiny.yaml"]
IM_START, IM_END = 151644, 151645
SEQ = 4 * 26  # four conversations of 26 tokens fill a packed row exactly: no compute spent on padding
STEPS = 400
DIGITS = 4
# Smaller than configs/tiny.yaml so that a few hundred CPU steps fit in the test budget. Four heads of 32
# rather than two of 64, and LR 1e-3 rather than 3e-3: measured at training seeds 1-5 and the default, the
# last seed reached 1.0 held-out exact match at step 250 with both, at step 350 with two heads or with 3e-3.
MODEL = ["model.num_layers=2", "model.hidden_size=128", "model.num_attention_heads=4", "model.ffn_hidden_size=256",
         f"model.seq_length={SEQ}"]


def digit_task(rng: np.random.Generator, count: int, exclude: set[str] = frozenset()) -> list[dict]:
    """`count` distinct conversations "repeat: 3914" -> "3914" or "next: 3914" -> "4025" (each digit plus
    one, mod 10) over DIGITS digits, none of them in `exclude` (the user messages). The system prompt is
    empty: 26 tokens a conversation instead of 32, so a row holds less that the reply does not depend on."""
    records, seen = [], set(exclude)
    while len(records) < count:
        digits = "".join(str(d) for d in rng.integers(0, 10, DIGITS))
        op = ("repeat", "next")[int(rng.integers(2))]
        prompt = f"{op}: {digits}"
        if prompt in seen:
            continue
        seen.add(prompt)
        reply = digits if op == "repeat" else "".join(str((int(d) + 1) % 10) for d in digits)
        records.append({"messages": [
            {"role": "system", "content": ""}, {"role": "user", "content": prompt},
            {"role": "assistant", "content": reply},
        ]})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def densify(token_prefixes: dict[str, str], out_dir: Path,
            copy_prefixes: dict[str, str] | None = None) -> tuple[dict, int]:
    """Renumber the token ids of the shards `token_prefixes` ({new name: prefix}) densely (a bijection on
    the ids that occur, in increasing order) into out_dir/NAME; copy `copy_prefixes` (e.g. loss masks)
    unchanged. Returns ({old id: new id}, a vocabulary size that is a multiple of 128)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_qwen.data.indexed import IndexedShardWriter

    shards = {name: IndexedDataset(prefix) for name, prefix in token_prefixes.items()}
    ids = np.unique(np.concatenate([shard[i] for shard in shards.values() for i in range(len(shard))]))
    remap = {int(old): new for new, old in enumerate(ids)}
    lookup = np.zeros(int(ids.max()) + 1, dtype=np.int32)
    lookup[ids] = np.arange(len(ids), dtype=np.int32)
    vocab = -(-len(ids) // 128) * 128
    for name, shard in shards.items():
        with IndexedShardWriter(out_dir / name, vocab) as writer:
            for i in range(len(shard)):
                writer.add_document(lookup[shard[i]])
    for name, prefix in (copy_prefixes or {}).items():
        for suffix in (".bin", ".idx"):
            shutil.copyfile(prefix + suffix, str(out_dir / name) + suffix)
    return remap, vocab


def config(*overrides):
    from megatron_qwen.config import load_config

    return load_config("configs/tiny.yaml", list(overrides))


@pytest.mark.usefixtures("single_rank")
def test_packed_rows_give_the_losses_of_conversations_alone(tmp_path):
    """Conversations packed into one row (block-diagonal attention, positions restarting) against each of
    them alone in a row of its own with plain causal attention and no mask (SDPA's is_causal)."""
    from megatron_qwen.data import preprocess as pp
    from megatron_qwen.data.chat_datasets import build_sft_datasets, packed_attention_mask
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    records = digit_task(np.random.default_rng(0), 9)
    pp.preprocess([str(write_jsonl(tmp_path / "chat.jsonl", records))], str(tmp_path / "chat"), mode="chat")
    common = ["model.padded_vocab_size=151936", *MODEL, "data.split=100,0,0", "training.global_batch_size=2",
              "training.train_iters=1", f"data.paths=[{tmp_path / 'chat'}]"]
    packed_ds, _ = build_sft_datasets(config(*common, "sft.pack=true"))
    alone_ds, _ = build_sft_datasets(config(*common, "sft.pack=false"))
    torch.manual_seed(0)
    (model,) = build_model(config(*common), Runtime.cpu(), rope_at_positions=True)
    model.eval()

    def losses(item, mask):
        batch = {k: torch.as_tensor(v)[None] for k, v in item.items()}
        with torch.no_grad():
            out = model(batch["tokens"], batch["position_ids"], mask(batch["position_ids"]), labels=batch["labels"])
        return out[0], batch

    def end_of_last(tokens) -> int:
        return int(np.flatnonzero(tokens == IM_END)[-1]) + 2  # a conversation ends with "<|im_end|>\n"

    # Per-token losses of each conversation alone, keyed by its tokens.
    reference = {}
    for i in range(len(alone_ds)):
        item = alone_ds[i]
        assert packed_attention_mask(torch.as_tensor(item["position_ids"])[None]) is None  # one conversation: no mask
        out, _ = losses(item, lambda pos: None)
        end = end_of_last(item["tokens"])
        reference[tuple(item["tokens"][:end])] = out[: end - 1]  # the last token predicts nothing
    assert len(reference) == 9

    compared = packed_rows = 0
    for i in range(len(packed_ds)):
        item = packed_ds[i]
        out, _ = losses(item, packed_attention_mask)
        starts = np.flatnonzero(item["position_ids"] == 0).tolist()
        for start, end in zip(starts, starts[1:] + [end_of_last(item["tokens"])]):
            ref = reference[tuple(item["tokens"][start:end])]
            assert (out[start : end - 1] - ref).abs().max().item() < 1e-5
            compared += 1
        if len(starts) > 1:
            packed_rows += 1
            # Without the block-diagonal mask the later conversations see the earlier ones: losses change.
            unmasked, _ = losses(item, lambda pos: None)
            assert (unmasked[starts[1] : starts[1] + 8] - out[starts[1] : starts[1] + 8]).abs().max().item() > 1e-3
    assert compared == 9 and packed_rows >= 2


@pytest.mark.usefixtures("single_rank")
def test_rotary_angles_follow_position_ids():
    """Each token is rotated by the angles of its own position id (p * base^(-2i/d), as Qwen's RoPE),
    not by its index in the row; positions restart where a packed conversation starts."""
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    cfg = config("model.padded_vocab_size=256", *MODEL)
    (model,) = build_model(cfg, Runtime.cpu(), rope_at_positions=True)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]])
    rotary = model._preprocess(input_ids=torch.zeros_like(positions), position_ids=positions)[1]
    d = cfg.model.head_dim
    inv_freq = 1.0 / (cfg.model.rotary_base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = positions.t()[..., None].double() * inv_freq
    assert rotary.shape == (8, 2, 1, d)
    assert torch.allclose(rotary[:, :, 0].double(), torch.cat([angles, angles], dim=-1), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def digit_data(tmp_path_factory):
    """Train and held-out conversations of `digit_task` as chat shards with a dense vocabulary."""
    from megatron_qwen.data import preprocess as pp

    root = tmp_path_factory.mktemp("digits")
    rng = np.random.default_rng(0)
    heldout = digit_task(rng, 200)
    train = digit_task(rng, 4000, exclude={m["content"] for r in heldout for m in r["messages"] if m["role"] == "user"})
    for name, records in (("train", train), ("heldout", heldout)):
        pp.preprocess([str(write_jsonl(root / f"{name}.jsonl", records))], str(root / name), mode="chat",
                      max_length=SEQ)
    dense = root / "dense"
    dense.mkdir()
    remap, vocab = densify(
        {f"{n}_chat_tokens_document": str(root / f"{n}_chat_tokens_document") for n in ("train", "heldout")},
        dense, {f"{n}_chat_mask_document": str(root / f"{n}_chat_mask_document") for n in ("train", "heldout")},
    )
    return dense, remap, vocab


def exact_match(chunks, tokens: torch.Tensor, remap: dict) -> float:
    """Share of conversations whose reply and closing <|im_end|> are each the argmax given what precedes."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        predicted = chunks[0](tokens, positions, None).argmax(-1)
    exact = 0
    for row, guess in zip(tokens, predicted):
        reply = int(torch.nonzero(row == remap[IM_START])[-1]) + 3  # after <|im_start|>assistant\n
        end = int(torch.nonzero(row == remap[IM_END])[-1])
        exact += bool(torch.equal(guess[reply - 1 : end], row[reply : end + 1]))
    return exact / len(tokens)


@pytest.mark.parallel
@pytest.mark.usefixtures("single_rank")
def test_sft_learns_a_synthetic_chat_task(digit_data, training_seed, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime
    from megatron_qwen.checkpoint.io import load_model

    dense, remap, vocab = digit_data
    overrides = [
        f"data.paths=[{dense / 'train'}]", f"model.padded_vocab_size={vocab}", *MODEL, "data.split=100,0,0",
        "training.micro_batch_size=4", "training.global_batch_size=8", "data.allow_repeat=true",
        f"training.train_iters={STEPS}",
        "training.lr=1e-3", "training.min_lr=1e-4", "training.lr_warmup_iters=20", "training.weight_decay=0.0",
        "logging.log_interval=10", f"logging.run_dir={tmp_path}", f"training.save_interval={STEPS // 2}",
        *([] if training_seed is None else [f"training.seed={training_seed}"]),
    ]
    run_torchrun(1, STAGE + overrides)

    heldout = IndexedDataset(str(dense / "heldout_chat_tokens_document"))
    tokens = torch.zeros(len(heldout), SEQ, dtype=torch.long)
    for i in range(len(heldout)):
        tokens[i, : len(heldout[i])] = torch.as_tensor(heldout[i].astype(np.int64))
    # The run's own initial weights: training.seed gives them.
    chunks = build_model(config(*overrides), Runtime.cpu(), rope_at_positions=True)
    for chunk in chunks:
        chunk.eval()
    untrained = exact_match(chunks, tokens, remap)
    # Halfway shows the margin: a recipe that learns only near its last step passes by luck.
    load_model(chunks, tmp_path / "checkpoints" / f"iter_{STEPS // 2:07d}")
    halfway = exact_match(chunks, tokens, remap)
    load_model(chunks, tmp_path / "checkpoints" / f"iter_{STEPS:07d}")
    trained = exact_match(chunks, tokens, remap)
    print(f"held-out exact match: {trained:.3f} after {STEPS} steps, {halfway:.3f} after {STEPS // 2} "
          f"(untrained: {untrained:.3f})")
    assert untrained < 0.05
    # Halfway already well above chance (1e-4) and the untrained model: measured 0.62 at worst (seeds 1-5 and
    # the default), so learning is under way by step 200 and the final figure is not one lucky last stretch.
    assert halfway > 0.3, (halfway, trained)
    assert trained > 0.9, trained  # measured 1.0 at training seeds 1-5 and the default


def test_sft_config_holds_the_qwen_recipe():
    from megatron_qwen.config import load_config

    cfg = load_config("configs/stage/sft.yaml")
    t, m = cfg.training, cfg.model
    # Qwen report, SFT: AdamW (0.9, 0.95, 1e-8), seq 2048, batch 128, 4000 steps, warmup 1430 to 2e-6,
    # weight decay 0.1, dropout 0.1, clip 1.0.
    assert (t.adam_beta1, t.adam_beta2, t.adam_eps) == (0.9, 0.95, 1e-8)
    assert (m.seq_length, t.global_batch_size, t.train_iters, t.lr_warmup_iters, t.lr) == (2048, 128, 4000, 1430, 2e-6)
    assert (t.weight_decay, m.hidden_dropout, m.attention_dropout, t.clip_grad) == (0.1, 0.1, 0.1, 1.0)
    assert (t.lr_decay_style, t.min_lr) == ("cosine", 0.0) and cfg.sft.pack and m.name == "qwen-7b"
