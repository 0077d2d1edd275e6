"""Tests for megatron_qwen.tokenizer against the released Qwen tokenizer facts (no network)."""

import hashlib
import importlib.metadata
import pathlib

import numpy as np
import pytest

from megatron_qwen.tokenizer import QwenTokenizer, default_tokenizer_file, load_tokenizer

QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return load_tokenizer()


def test_tokenizer_file_is_the_qwen_one():
    path = default_tokenizer_file()
    assert path.name == "qwen.tiktoken"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == QWEN_TIKTOKEN_SHA256


def test_known_encoding(tok):
    assert tok.encode("Hello world! 你好，世界。") == [9707, 1879, 0, 220, 108386, 3837, 99489, 1773]


def test_special_ids(tok):
    assert tok.n_vocab == 151851
    assert (tok.eod_id, tok.pad_id, tok.im_start_id, tok.im_end_id) == (151643, 151643, 151644, 151645)
    assert tok.stop_ids == (151645, 151644, 151643)
    assert len(tok.special_tokens) == 208
    assert tok.special_tokens["<|endoftext|>"] == 151643
    assert tok.special_tokens["<|extra_0|>"] == 151646
    assert tok.special_tokens["<|extra_204|>"] == 151850
    assert tok.decode([151643, 151644, 151645, 151850]) == "<|endoftext|><|im_start|><|im_end|><|extra_204|>"


def test_generation_stops_only_at_ids_the_model_has(tok):
    assert tok.generation_stop_ids(151936) == (151645, 151644, 151643)
    assert tok.generation_stop_ids(151645) == (151644, 151643)  # a vocabulary ending before <|im_end|>
    assert tok.generation_stop_ids(1000) == ()
    assert tok.generation_stop_ids(1000, ids=[7, 999, 1000]) == (7, 999)


def test_missing_dashscope_names_the_fix(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps dashscope==2\.0\.2"):
        default_tokenizer_file()


def test_load_tokenizer_is_cached_per_resolved_path(tok, tmp_path):
    link = tmp_path / "link.tiktoken"
    link.symlink_to(default_tokenizer_file())
    assert load_tokenizer(default_tokenizer_file()) is tok
    assert load_tokenizer(str(link)) is tok


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain ascii, with punctuation: (a+b)*c = 42!",
        "mixed 中文 English русский العربية हिन्दी 日本語のテキスト 한국어",
        "emoji 👍🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵",
        "   leading and trailing spaces   ",
        "tabs\t\tand\n\n\nnewline runs\r\n\r\n  \n",
        "numbers 1234567890 3.14159 1e-9",
        "already NFC: café naïve Å",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert (ids == []) == (text == "")


def test_nfc_normalisation(tok):
    assert tok.encode("caf" + "e\u0301") == tok.encode("café")
    assert tok.decode(tok.encode("e\u0301")) == "\u00e9"


def test_special_token_text_is_plain_text(tok):
    text = "user says <|im_end|> and <|endoftext|> literally"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text


def test_decode_accepts_numpy_and_rejects_out_of_vocab(tok):
    ids = tok.encode("Hello world!")
    assert tok.decode(np.array(ids, dtype=np.int64)) == "Hello world!"
    with pytest.raises(ValueError, match="151851"):
        tok.decode([9707, 151851])


def test_encode_batch_matches_encode(tok):
    texts = ["Hello world! 你好，世界。", "", "e\u0301 <|im_start|>", "a\n\n  b " * 50]
    expected = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts) == expected
    assert tok.encode_batch(texts, num_threads=4) == expected


# ---- ChatML / SFT mask: expectations are written out turn by turn from the finetune.py rules -------------------------


def _turn(tok, role, content):
    """Expected ids/mask for one ChatML turn, straight from the QwenLM finetune.py rules."""
    nl = tok.encode("\n")
    role_ids = tok.encode(role) + nl
    content_ids = tok.encode(content)
    ids = [tok.im_start_id] + role_ids + content_ids + [tok.im_end_id] + nl
    trained_content = role == "assistant"
    mask = [True] + [False] * len(role_ids) + [trained_content] * len(content_ids) + [True] + [True] * len(nl)
    return ids, mask


def _concat(*turns):
    return [i for t in turns for i in t[0]], [m for t in turns for m in t[1]]


def test_chat_single_turn(tok):
    ids, mask = tok.render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    nl = tok.encode("\n")
    assert len(nl) == 1
    S, E, N = tok.im_start_id, tok.im_end_id, nl[0]
    sys_ids, usr_ids, ast_ids = tok.encode("system"), tok.encode("user"), tok.encode("assistant")
    prompt, hi, hello = tok.encode("You are a helpful assistant."), tok.encode("Hi"), tok.encode("Hello!")
    expected_ids = (
        [S] + sys_ids + [N] + prompt + [E, N]
        + [S] + usr_ids + [N] + hi + [E, N]
        + [S] + ast_ids + [N] + hello + [E, N]
    )
    expected_mask = (
        [True] + [False] * (len(sys_ids) + 1 + len(prompt)) + [True, True]
        + [True] + [False] * (len(usr_ids) + 1 + len(hi)) + [True, True]
        + [True] + [False] * (len(ast_ids) + 1) + [True] * len(hello) + [True, True]
    )
    assert ids == expected_ids
    assert mask == expected_mask
    # The trained tokens are exactly: each turn's <|im_start|>, <|im_end|>, "\n" after it, and the reply.
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == [S, E, N, S, E, N, S] + hello + [E, N]
    assert tok.decode(ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    )


def test_chat_multi_turn(tok):
    conv = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And in 中文?"},
        {"role": "assistant", "content": "\n四。\n\nDone"},
    ]
    ids, mask = tok.render_chat(conv)
    expected = _concat(
        _turn(tok, "system", "You are a helpful assistant."),
        *[_turn(tok, m["role"], m["content"]) for m in conv],
    )
    assert (ids, mask) == expected
    # The last reply starts with "\n": finetune.py encodes role, "\n" and content separately, so the two
    # newlines must stay [198, 198] rather than merging into "\n\n" as encoding the joined text would.
    assert tok.encode("assistant\n\n四") != tok.encode("assistant") + tok.encode("\n") + tok.encode("\n四")
    last_start = len(ids) - 1 - ids[::-1].index(tok.im_start_id)
    assert ids[last_start + 1 : last_start + 5] == tok.encode("assistant") + tok.encode("\n") * 2 + tok.encode("四")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == (
        "<|im_start|><|im_end|>\n" * 2 + "<|im_start|>4.<|im_end|>\n<|im_start|><|im_end|>\n"
        "<|im_start|>\n四。\n\nDone<|im_end|>\n"
    )


def test_chat_explicit_system(tok):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    expected = _concat(_turn(tok, "system", "Be terse."), *[_turn(tok, m["role"], m["content"]) for m in conv])
    assert tok.render_chat(conv, system="Be terse.") == expected
    assert tok.render_chat([{"role": "system", "content": "Be terse."}] + conv) == expected
    assert tok.render_chat_text(conv, system="Be terse.") == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nYo<|im_end|>\n"
    )


def test_chat_special_text_in_content_is_not_a_special_token(tok):
    ids, _ = tok.render_chat([{"role": "user", "content": "fake <|im_end|> end"}])
    assert ids.count(tok.im_end_id) == 2  # the system turn's and the user turn's, none from the content
    assert "fake <|im_end|> end<|im_end|>" in tok.decode(ids)


def test_chat_generation_prompt(tok):
    conv = [{"role": "user", "content": "Hi"}]
    ids, mask = tok.render_chat(conv, add_generation_prompt=True)
    base_ids, base_mask = tok.render_chat(conv)
    tail = [tok.im_start_id] + tok.encode("assistant") + tok.encode("\n")
    assert ids == base_ids + tail
    assert mask == base_mask + [False] * len(tail)
    assert tok.render_chat_text(conv, add_generation_prompt=True).endswith("Hi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(ids) == tok.render_chat_text(conv, add_generation_prompt=True)


def test_chat_unknown_role(tok):
    with pytest.raises(ValueError, match=r"'tool'.*system.*user.*assistant"):
        tok.render_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="'tool'"):
        tok.render_chat_text([{"role": "tool", "content": "x"}])


def test_chat_rejects_ambiguous_system(tok):
    with pytest.raises(ValueError, match="system"):
        tok.render_chat([{"role": "system", "content": "a"}], system="b")
    with pytest.raises(ValueError, match="system"):
        tok.render_chat([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def test_not_a_qwen_file(tmp_path: pathlib.Path):
    bad = tmp_path / "tiny.tiktoken"
    bad.write_text("YQ== 0\nYg== 1\n")
    with pytest.raises(ValueError, match=r"tiny\.tiktoken.*151643"):
        load_tokenizer(bad)
    garbage = tmp_path / "garbage.tiktoken"
    garbage.write_text("not base64!! zero\n")
    with pytest.raises(ValueError, match=r"garbage\.tiktoken.*line 1"):
        load_tokenizer(garbage)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_tokenizer(tmp_path / "missing.tiktoken")
