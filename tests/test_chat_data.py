"""Chat and preference data through `tools/preprocess_data.py --chat / --preference` and the SFT and
preference datasets, against hand-written expectations.

Expected sequences are written here piece by piece from QwenLM finetune.py's rule (ChatML markers and the
"\\n" after <|im_end|> trained in every turn, assistant replies trained, everything else not), with text
encoded by a tiktoken Encoding built here from qwen.tiktoken; megatron-core's IndexedDataset reads the
shards back.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import tiktoken
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_qwen.data import preprocess as pp
from spawn import REPO, cpu_env

QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501 (Qwen's pattern, verbatim)
IM_START, IM_END = 151644, 151645
MAX_LENGTH = 60


@pytest.fixture(scope="module")
def encode():
    path = importlib.metadata.distribution("dashscope").locate_file("dashscope/resources/qwen.tiktoken")
    with open(path, "rb") as f:
        ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}
    return tiktoken.Encoding(name="qwen-reference", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                             special_tokens={}).encode_ordinary


def expected(encode, pieces) -> tuple[list[int], list[int]]:
    """(ids, mask) of [(piece, trained)]: a piece is a special token id or text."""
    ids, mask = [], []
    for piece, trained in pieces:
        tokens = [piece] if isinstance(piece, int) else encode(piece)
        ids += tokens
        mask += [int(trained)] * len(tokens)
    return ids, mask


def turn(role: str, content: str) -> list:
    """One ChatML turn: markers and the newline after <|im_end|> trained; the content only for the assistant."""
    return [(IM_START, 1), (role, 0), ("\n", 0), (content, role == "assistant"), (IM_END, 1), ("\n", 1)]


DEFAULT_SYSTEM = turn("system", "You are a helpful assistant.")
LONG = " ".join(["word"] * 40)  # 40 tokens

CHATS = [
    # single turn, "messages" shape, default system prompt
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
     DEFAULT_SYSTEM + turn("user", "Hi") + turn("assistant", "Hello!")),
    # multi-turn, Qwen's "conversations" shape with human/gpt
    ({"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},
                        {"from": "human", "value": "and 3+3?"}, {"from": "gpt", "value": "6"}]},
     DEFAULT_SYSTEM + turn("user", "2+2?") + turn("assistant", "4") + turn("user", "and 3+3?")
     + turn("assistant", "6")),
    # a system prompt as the "system" field
    ({"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Yo"}], "system": "Be terse."},
     turn("system", "Be terse.") + turn("user", "Hi") + turn("assistant", "Yo")),
    # ... and as a leading system turn
    ({"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Yo"}]},
     turn("system", "Be terse.") + turn("user", "Hi") + turn("assistant", "Yo")),
    # over MAX_LENGTH: the third exchange does not fit and is dropped whole
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
                   {"role": "user", "content": "e"},
                   {"role": "assistant", "content": LONG}]},
     DEFAULT_SYSTEM + turn("user", "a") + turn("assistant", "b") + turn("user", "c") + turn("assistant", "d")),
]
BAD_CHATS = [  # (record, the reason's tell-tale words)
    ({"messages": [{"role": "bot", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}, "role 'bot'"),
    ({"messages": []}, "no user/assistant turns"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Yo"}]}, "'assistant' is due"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                   {"role": "user", "content": "?"}]}, "ends with a user turn"),
    ({"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": LONG}]}, "first exchange alone"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Yo"}], "system": "t"}, "given twice"),
    ({"text": "not a conversation"}, "exactly one of 'messages'"),
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def shard_docs(prefix: str) -> list[list[int]]:
    shard = IndexedDataset(prefix)
    return [shard[i].tolist() for i in range(len(shard))]


@pytest.fixture(scope="module")
def chat_shards(tmp_path_factory):
    """The good and bad chats interleaved, through the CLI with --skip-bad-lines; returns (prefix, stderr)."""
    root = tmp_path_factory.mktemp("chat")
    records = ([r for pair in zip([c for c, _ in CHATS], [b for b, _ in BAD_CHATS]) for r in pair]
               + [b for b, _ in BAD_CHATS[len(CHATS):]])
    path = write_jsonl(root / "chat.jsonl", records)
    run = subprocess.run(
        [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--chat", "--input", path, "--output-prefix",
         str(root / "sft"), "--max-length", str(MAX_LENGTH), "--skip-bad-lines"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=cpu_env(),  # cpu_env: this checkout's package
    )
    assert run.returncode == 0, run.stderr
    return str(root / "sft"), path, run.stderr


def test_chat_tokens_and_loss_mask_follow_finetune_py(chat_shards, encode):
    prefix, _, _ = chat_shards
    tokens, masks = shard_docs(prefix + "_chat_tokens_document"), shard_docs(prefix + "_chat_mask_document")
    assert len(tokens) == len(CHATS)
    for i, (_, pieces) in enumerate(CHATS):
        ids, mask = expected(encode, pieces)
        assert tokens[i] == ids, f"conversation {i}"
        assert masks[i] == mask, f"conversation {i}"
    assert len(tokens[4]) <= MAX_LENGTH < len(tokens[4]) + len(
        expected(encode, turn("user", "e") + turn("assistant", LONG))[0])


def test_bad_conversations_are_counted_with_their_lines(chat_shards):
    _, path, summary = chat_shards
    assert f"bad lines skipped: {len(BAD_CHATS)}" in summary
    assert "conversations truncated to --max-length (trailing exchanges dropped): 1" in summary
    # Bad line k sits at line 2k + 2 while good ones interleave, then the rest follow in order.
    lines = ([2 * k + 2 for k in range(len(CHATS))]
             + [2 * len(CHATS) + 1 + k for k in range(len(BAD_CHATS) - len(CHATS))])
    for (_, words), line in zip(BAD_CHATS, lines):
        assert any(f"{path}:{line}: " in row and words in row for row in summary.splitlines()), (line, words, summary)


@pytest.mark.parametrize("index", range(len(BAD_CHATS)))
def test_a_bad_conversation_stops_the_run_with_file_and_line(tmp_path, index):
    record, words = BAD_CHATS[index]
    path = write_jsonl(tmp_path / "chat.jsonl", [CHATS[0][0], record])
    with pytest.raises(pp.PreprocessError, match=rf"chat\.jsonl:2: .*{re.escape(words)}.*--skip-bad-lines") as info:
        pp.preprocess([path], str(tmp_path / "out"), mode="chat", max_length=MAX_LENGTH, workers=1)
    assert "fix or remove the line" in str(info.value)
    assert not list(tmp_path.glob("out*"))


def test_sft_dataset_shifts_labels_and_mask_and_packs(chat_shards, encode):
    from megatron_qwen.config import load_config
    from megatron_qwen.data.chat_datasets import build_sft_datasets

    prefix, _, _ = chat_shards
    common = [f"data.paths=[{prefix}]", "model.seq_length=64", "data.split=100,0,0", "training.train_iters=1",
              "training.global_batch_size=2"]
    alone, _ = build_sft_datasets(load_config("configs/tiny.yaml", common + ["sft.pack=false"]))
    rows = [alone[i] for i in range(len(alone))]
    for _, pieces in CHATS:
        ids, mask = expected(encode, pieces)
        row = next(r for r in rows if r["tokens"][: len(ids)].tolist() == ids)
        n = len(ids)
        # Input token j predicts token j + 1 and is trained when that token is.
        assert row["labels"][: n - 1].tolist() == ids[1:]
        assert row["loss_mask"].tolist() == mask[1:] + [0] * (64 - n + 1)
        assert row["position_ids"].tolist() == list(range(64))

    packed, _ = build_sft_datasets(load_config("configs/tiny.yaml", common))
    lengths = sorted(len(expected(encode, pieces)[0]) for _, pieces in CHATS)
    seen = []
    for i in range(len(packed)):
        row = packed[i]
        starts = np.flatnonzero(row["position_ids"] == 0).tolist()
        ends = starts[1:] + [int(np.flatnonzero(row["tokens"] == IM_END)[-1]) + 2]
        for start, end in zip(starts, ends):
            assert row["position_ids"][start:end].tolist() == list(range(end - start))
            assert row["loss_mask"][end - 1] == 0  # the last token of a conversation predicts nothing
            seen.append(end - start)
        # Padding continues the last conversation's positions: it opens no attention segment.
        assert row["position_ids"][ends[-1]:].tolist() == list(range(ends[-1] - starts[-1], 64 - starts[-1]))
        assert not row["loss_mask"][ends[-1]:].any()
    assert sorted(seen) == lengths and len(packed) < len(CHATS)


def test_pack_conversations_is_next_fit():
    from megatron_qwen.data.chat_datasets import pack_conversations

    rows = pack_conversations(np.array([30, 20, 20, 64, 10, 50, 5]), 64)
    assert [r.tolist() for r in rows] == [[0, 1], [2], [3], [4, 5], [6]]


def test_packed_attention_mask_is_block_diagonal_causal():
    from megatron_qwen.data.chat_datasets import packed_attention_mask

    # Two conversations (3 and 2 tokens) and one padding token continuing the second.
    mask = packed_attention_mask(torch.tensor([[0, 1, 2, 0, 1, 2]]))
    keep = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
    ]
    assert mask.shape == (1, 1, 6, 6)
    assert torch.equal(mask[0, 0], ~torch.tensor(keep, dtype=torch.bool))
    assert packed_attention_mask(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])) is None


PAIRS = [
    ({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}, [], "Hi", "Hello!", "Go away."),
    ({"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "a"},
                   {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}], "chosen": [{"role": "assistant", "content": "d"}],
                   "rejected": "e"},
     turn("user", "a") + turn("assistant", "b"), "c", "d", "e"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "y"}]}, [], "q", "x", "y"),
]
BAD_PAIRS = [
    ({"prompt": "Hi", "chosen": "Same", "rejected": "Same"}, "the same conversation"),
    ({"prompt": "Hi", "chosen": "Yo"}, "missing 'rejected'"),
    ({"prompt": "Hi", "chosen": LONG, "rejected": "Yo"}, "chosen conversation is"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "chosen": "c",
      "rejected": "d"}, "'user' is due"),
]


def test_preference_pairs_end_at_the_final_im_end(tmp_path, encode):
    from megatron_qwen.config import load_config
    from megatron_qwen.data.chat_datasets import build_preference_datasets

    path = write_jsonl(tmp_path / "pairs.jsonl", [p[0] for p in PAIRS] + [b for b, _ in BAD_PAIRS])
    result = pp.preprocess([path], str(tmp_path / "rm"), mode="preference", max_length=40, skip_bad_lines=True)
    assert result.bad_lines == len(BAD_PAIRS)
    for (_, words), example in zip(BAD_PAIRS, result.bad_line_examples):
        assert words in example, (words, example)
    chosen, rejected = (shard_docs(str(tmp_path / "rm_chosen_document")),
                        shard_docs(str(tmp_path / "rm_rejected_document")))
    for i, (_, history, prompt, good, bad) in enumerate(PAIRS):
        system = turn("system", "Be terse.") if i == 1 else DEFAULT_SYSTEM
        for got, reply in ((chosen[i], good), (rejected[i], bad)):
            ids, _ = expected(encode, system + history + turn("user", prompt) + turn("assistant", reply))
            assert got == ids[:-1], f"pair {i}"  # without the "\n" after the final <|im_end|>
            assert got[-1] == IM_END

    cfg = load_config("configs/tiny.yaml",
                      [f"data.paths=[{tmp_path / 'rm'}]", "model.seq_length=40", "data.split=100,0,0",
                       "training.train_iters=1", "training.micro_batch_size=2", "training.global_batch_size=6"])
    train, _ = build_preference_datasets(cfg)
    items = [train[i] for i in range(6)]
    for pair in range(3):
        sides = {tuple(items[2 * pair + s]["tokens"][: np.flatnonzero(items[2 * pair + s]["loss_mask"])[0] + 1])
                 for s in (0, 1)}
        index = next(i for i in range(3) if tuple(chosen[i]) in sides)
        # Item 2k is the chosen side, 2k + 1 the rejected side of the same pair; loss_mask marks the last token.
        for side, doc in ((0, chosen[index]), (1, rejected[index])):
            item = items[2 * pair + side]
            assert item["tokens"][: len(doc)].tolist() == doc and not item["tokens"][len(doc):].any()
            assert item["loss_mask"].tolist() == [0] * (len(doc) - 1) + [1] + [0] * (40 - len(doc))

    odd = load_config("configs/tiny.yaml", [f"data.paths=[{tmp_path / 'rm'}]", "training.micro_batch_size=3"])
    with pytest.raises(ValueError, match="training.micro_batch_size=3 must be even"):
        build_preference_datasets(odd)


def test_data_epochs_sets_the_run_length_and_repeats_need_consent(tmp_path):
    from megatron_qwen.config import load_config
    from megatron_qwen.data.chat_datasets import build_preference_datasets, build_sft_datasets

    pp.preprocess([write_jsonl(tmp_path / "pairs.jsonl", [p[0] for p in PAIRS])], str(tmp_path / "rm"),
                  mode="preference")
    cfg = load_config("configs/stage/reward.yaml",
                      [f"data.paths=[{tmp_path / 'rm'}]", "data.split=100,0,0", "training.eval_interval=0",
                                                    "training.global_batch_size=4", "training.train_iters=999"])
    build_preference_datasets(cfg)
    assert cfg.training.train_iters == 2  # one epoch: 3 pairs = 6 sequences, 4 per step

    pp.preprocess([write_jsonl(tmp_path / "chat.jsonl", [c for c, _ in CHATS])], str(tmp_path / "sft"), mode="chat",
                  max_length=MAX_LENGTH)
    common = [f"data.paths=[{tmp_path / 'sft'}]", "model.seq_length=64", "data.split=100,0,0", "sft.pack=false",
              "training.global_batch_size=4", "training.train_iters=2"]
    with pytest.raises(ValueError, match=r"needs 8 sequences .* holds 5 .*data.allow_repeat=true"):
        build_sft_datasets(load_config("configs/tiny.yaml", common))
    train, _ = build_sft_datasets(load_config("configs/tiny.yaml", common + ["data.allow_repeat=true"]))
    rows = [tuple(train[i]["tokens"]) for i in range(8)]
    # The first epoch holds each conversation once (two of them render alike: the system prompt given two
    # ways); the second epoch repeats rows of the first.
    assert sorted(Counter(rows[:5]).values()) == [1, 1, 1, 2] and set(rows[5:]) <= set(rows[:5])
