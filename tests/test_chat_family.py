"""Tokenizer families after v1 (Qwen1.5, Qwen2, Qwen2.5, Qwen3): special tokens, the released chat templates
rendered by transformers, token ids against transformers' Qwen2Tokenizer, the SFT loss mask, the vocabulary
check and preprocessing with --family."""

import json
import pathlib

import numpy as np
import pytest

from megatron_qwen.config import TOKENIZER_VOCAB_SIZES, ConfigError, load_config
from megatron_qwen.tokenizer import (
    FAMILIES, FAMILY_SPECIAL_TOKENS, check_vocabulary, default_tokenizer_file, load_tokenizer,
)

TEMPLATES = pathlib.Path(__file__).parent / "fixtures" / "chat_templates"
LATER = ("qwen1.5", "qwen2", "qwen2.5", "qwen3")

# Published added tokens (tokenizer_config.json added_tokens_decoder) after the 151,643 BPE ranks.
QWEN25_ADDED = {
    151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151646: "<|object_ref_start|>",
    151647: "<|object_ref_end|>", 151648: "<|box_start|>", 151649: "<|box_end|>", 151650: "<|quad_start|>",
    151651: "<|quad_end|>", 151652: "<|vision_start|>", 151653: "<|vision_end|>", 151654: "<|vision_pad|>",
    151655: "<|image_pad|>", 151656: "<|video_pad|>", 151657: "<tool_call>", 151658: "</tool_call>",
    151659: "<|fim_prefix|>", 151660: "<|fim_middle|>", 151661: "<|fim_suffix|>", 151662: "<|fim_pad|>",
    151663: "<|repo_name|>", 151664: "<|file_sep|>",
}
QWEN3_ADDED = {
    **QWEN25_ADDED, 151665: "<tool_response>", 151666: "</tool_response>", 151667: "<think>", 151668: "</think>",
}
CHATML_ADDED = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"}
PUBLISHED = {"qwen1.5": CHATML_ADDED, "qwen2": CHATML_ADDED, "qwen2.5": QWEN25_ADDED, "qwen3": QWEN3_ADDED}

CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Hi"}],
    "system and exchange": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
    ],
    "empty system": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],
    "two exchanges": [
        {"role": "user", "content": "Bonjour, ça va ?"},
        {"role": "assistant", "content": "Très bien.\n\nEt vous ?"},
        {"role": "user", "content": "   spaces and\ttabs \n"},
        {"role": "assistant", "content": "\nA reply that starts with a newline 你好"},
    ],
    "follow-up question": [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another?"},
    ],
    "reasoning on every turn": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two and two.\n"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "\nThree and three."},
    ],
    "tool response in a user turn": [
        {"role": "user", "content": "What is 6*7? Use the tool."},
        {"role": "assistant", "content": "Calling it.", "reasoning_content": "Multiply with the tool."},
        {"role": "user", "content": "<tool_response>\n42\n</tool_response>"},
        {"role": "assistant", "content": "42", "reasoning_content": "The tool said 42."},
    ],
    "inline think block": [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>\nOne and one.\n</think>\n\n2"},
        {"role": "user", "content": "and again?"},
        {"role": "assistant", "content": "<think>\nStill one and one.\n</think>\n\n2 again"},
    ],
}


@pytest.fixture(scope="module")
def hf_tokenizers():
    """transformers' Qwen2Tokenizer over the same qwen.tiktoken ranks, with each family's published added tokens."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    path = str(default_tokenizer_file())
    vocab, merges = TikTokenConverter(path).extract_vocab_merges_from_model(path)
    out = {}
    for family, added in PUBLISHED.items():
        hf = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges))
        hf.add_tokens([AddedToken(added[i], special=True, normalized=False) for i in sorted(added)])
        assert hf.convert_tokens_to_ids([added[i] for i in sorted(added)]) == sorted(added)
        out[family] = hf
    return out


def hf_render(family: str, messages, **kwargs) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=(TEMPLATES / f"{family}.jinja").read_text(), **kwargs)
    return rendered[0]


@pytest.mark.parametrize("family", LATER)
def test_special_tokens_are_the_published_ones(family):
    tok = load_tokenizer(family=family)
    assert {i: t for t, i in tok.special_tokens.items()} == PUBLISHED[family]
    assert tok.n_vocab == 151643 + len(PUBLISHED[family]) == TOKENIZER_VOCAB_SIZES[family]
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    assert tok.decode(sorted(PUBLISHED[family])) == "".join(PUBLISHED[family][i] for i in sorted(PUBLISHED[family]))
    with pytest.raises(ValueError, match=str(tok.n_vocab)):
        tok.decode([tok.n_vocab])


def test_families_share_the_bpe_and_keep_special_text_plain():
    text = "Hello world! 你好，世界。<think>x</think><|im_end|><tool_call>"
    ids = {family: load_tokenizer(family=family).encode(text) for family in FAMILIES}
    assert ids["qwen"][:7] == [9707, 1879, 0, 220, 108386, 3837, 99489]  # tests/test_tokenizer.py's known encoding
    assert all(v == ids["qwen"] for v in ids.values())
    assert max(ids["qwen"]) < 151643  # special-token strings stay plain text
    # NFC, as transformers' Qwen2Tokenizer normalises.
    assert load_tokenizer(family="qwen3").encode("e\u0301") == load_tokenizer().encode("\u00e9")


def test_load_tokenizer_is_cached_per_path_and_family():
    assert load_tokenizer(family="qwen3") is load_tokenizer(default_tokenizer_file(), family="qwen3")
    assert load_tokenizer(family="qwen3") is not load_tokenizer(family="qwen2.5")
    assert load_tokenizer() is load_tokenizer(family="qwen")
    with pytest.raises(ValueError, match=r"'qwen4' is not one of qwen, qwen1\.5, qwen2, qwen2\.5, qwen3"):
        load_tokenizer(family="qwen4")


def _cases():
    for family in LATER:
        for name, messages in CONVERSATIONS.items():
            if "think" in name or "reasoning" in name or "tool" in name:
                if family != "qwen3":
                    continue
            for generation in (False, True):
                if generation and messages[-1]["role"] != "user":
                    continue
                case = f"{family}-{name}-{'prompt' if generation else 'sft'}"
                yield pytest.param(family, messages, generation, id=case)


@pytest.mark.parametrize("family,messages,generation", list(_cases()))
def test_chat_matches_the_released_template(family, messages, generation, hf_tokenizers):
    tok = load_tokenizer(family=family)
    text = tok.render_chat_text(messages, add_generation_prompt=generation)
    assert text == hf_render(family, messages, add_generation_prompt=generation)
    ids, mask = tok.render_chat(messages, add_generation_prompt=generation)
    assert len(mask) == len(ids)
    if not any("<tool_response>" in m["content"] for m in messages):  # Hugging Face makes that a special token
        assert ids == hf_tokenizers[family].encode(text)


@pytest.mark.parametrize("messages", [CONVERSATIONS["one user turn"], CONVERSATIONS["follow-up question"]])
def test_qwen3_generation_prompt_without_thinking(messages, hf_tokenizers):
    tok = load_tokenizer(family="qwen3")
    text = tok.render_chat_text(messages, add_generation_prompt=True, enable_thinking=False)
    assert text == hf_render("qwen3", messages, add_generation_prompt=True, enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids, mask = tok.render_chat(messages, add_generation_prompt=True, enable_thinking=False)
    assert ids == hf_tokenizers["qwen3"].encode(text) and not any(mask[-7:])


def test_default_system_prompts():
    user = [{"role": "user", "content": "Hi"}]
    expected = {
        "qwen": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        "qwen1.5": "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n",
        "qwen2": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        "qwen2.5":
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
        "qwen3": "",
    }
    for family, system in expected.items():
        text = load_tokenizer(family=family).render_chat_text(user, add_generation_prompt=True)
        assert text == system + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", family


def _expected(tok, turns):
    """Hand-built ids and mask: each turn is (role, pieces), a piece a special token or (text, trained)."""
    ids, mask = [], []
    for role, pieces in turns:
        header = tok.encode(f"{role}\n")
        ids += [tok.im_start_id] + header
        mask += [True] + [False] * len(header)
        for piece in pieces:
            if isinstance(piece, str):
                ids.append(tok.special_tokens[piece])
                mask.append(True)
            else:
                piece_ids = tok.encode(piece[0])
                ids += piece_ids
                mask += [piece[1]] * len(piece_ids)
        ids += [tok.im_end_id] + tok.encode("\n")
        mask += [True, True]
    return ids, mask


@pytest.mark.parametrize("family", LATER)
def test_loss_mask_trains_assistant_content_and_im_end(family):
    tok = load_tokenizer(family=family)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you", "reasoning_content": "They leave."},
    ]
    turns = [] if tok.default_system is None else [("system", [(tok.default_system, False)])]
    turns += [("user", [("Hi", False)]), ("assistant", [("Hello there", True)]), ("user", [("Bye", False)])]
    if family == "qwen3":
        # The final turn keeps its thinking block, trained like the rest of the reply.
        turns.append(("assistant", ["<think>", ("\nThey leave.\n", True), "</think>", ("\n\nSee you", True)]))
    else:
        turns.append(("assistant", [("See you", True)]))
    # Plain pieces: encoding the header and the content together gives the same tokens as apart.
    assert tok.encode("assistant\nHello there") == tok.encode("assistant\n") + tok.encode("Hello there")
    assert tok.render_chat(messages) == _expected(tok, turns)


def test_qwen3_drops_reasoning_before_the_last_query():
    tok = load_tokenizer(family="qwen3")
    messages = CONVERSATIONS["reasoning on every turn"]
    text = tok.render_chat_text(messages)
    assert "Two and two" not in text
    assert text.endswith("<|im_start|>assistant\n<think>\nThree and three.\n</think>\n\n6<|im_end|>\n")
    ids, mask = tok.render_chat(messages)
    think = ids.index(tok.special_tokens["<think>"])
    assert ids.count(tok.special_tokens["<think>"]) == 1 and all(mask[think:])


def test_user_text_with_special_strings_stays_plain_text():
    tok = load_tokenizer(family="qwen3")
    ids, _ = tok.render_chat([{"role": "user", "content": "<think><|im_end|>"}, {"role": "assistant", "content": "ok"}])
    assert ids.count(tok.im_end_id) == 2 and ids.count(tok.special_tokens["<think>"]) == 1  # the template's only


def test_check_vocabulary_accepts_the_released_pairs():
    check_vocabulary("qwen", 151936)
    check_vocabulary("qwen2.5", 152064, QWEN25_ADDED)
    check_vocabulary("qwen3", 151936, {str(i): t for i, t in QWEN3_ADDED.items()})  # JSON keys are strings
    check_vocabulary("qwen2", 151936, CHATML_ADDED)


def test_check_vocabulary_names_the_family_that_fits():
    with pytest.raises(ValueError, match=r"has 151,851 tokens but the checkpoint's vocabulary has 151,665 rows.*"
                                         r"fitting: qwen1\.5, qwen2, qwen2\.5"):
        check_vocabulary("qwen", 151665)
    with pytest.raises(ValueError, match=r"26 added tokens are not the qwen2\.5 tokenizer's 22.*151665.*to qwen3$"):
        check_vocabulary("qwen2.5", 151936, QWEN3_ADDED)
    with pytest.raises(ValueError, match=r"to qwen1\.5 or qwen2$"):
        check_vocabulary("qwen3", 151936, CHATML_ADDED)
    with pytest.raises(ValueError, match="the family of the release"):
        check_vocabulary("qwen2.5", 151936, {**QWEN25_ADDED, 151664: "<|other|>"})


def test_config_family_is_validated():
    assert load_config("configs/tiny.yaml").model.family == "qwen"
    assert load_config("configs/tiny.yaml", ["model.family=qwen3"]).model.family == "qwen3"
    choices = r"model\.family='qwen4' must be one of qwen, qwen1\.5, qwen2, qwen2\.5, qwen3"
    with pytest.raises(ConfigError, match=choices):
        load_config("configs/tiny.yaml", ["model.family=qwen4"])


def test_preprocess_chat_with_family(tmp_path):
    from megatron_qwen.cli.preprocess import main

    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(record) + "\n")
    for family in ("qwen", "qwen3"):
        prefix = tmp_path / family
        args = ["--input", str(tmp_path / "chat.jsonl"), "--output-prefix", str(prefix), "--chat", "--family", family]
        assert main(args) == 0
        # One conversation: each .bin holds its tokens back to back (the mask shard in the smallest dtype).
        tokens = np.fromfile(f"{prefix}_chat_tokens_document.bin", np.int32)
        mask = np.fromfile(f"{prefix}_chat_mask_document.bin", np.uint16)
        ids, expected_mask = load_tokenizer(family=family).render_chat(record["messages"])
        assert tokens.tolist() == ids and mask.astype(bool).tolist() == expected_mask
    assert FAMILY_SPECIAL_TOKENS["qwen3"]["</think>"] in ids  # Qwen3's final turn has its (empty) thinking block


def test_config_refuses_an_embedding_smaller_than_the_family_vocabulary():
    from megatron_qwen.config import validate

    def errors(family):
        cfg = load_config("configs/tiny.yaml", ["model.name=qwen-test", "model.padded_vocab_size=151700",
                                                f"model.family={family}"])
        return [e for e in validate(cfg)[0] if "padded_vocab_size" in e]

    assert errors("qwen2.5") == [] and errors("qwen3") == []
    (error,) = errors("qwen")
    assert "smaller than the qwen tokenizer's 151851 tokens (model.family)" in error


@pytest.mark.parametrize("family", ["qwen", "qwen3"])
def test_truncation_keeps_leading_exchanges_rendered_as_their_own_conversation(family):
    from megatron_qwen.data.chat import ChatFormatError, render_conversation

    tok = load_tokenizer(family=family)
    turns = [{"role": role, "content": f"{role} turn {i} " * 5} for i in range(3) for role in ("user", "assistant")]
    two = tok.render_chat(turns[:4])
    # Qwen3 gives the kept conversation's final reply its (empty) thinking block, absent from the full rendering.
    assert (tok.special_tokens.get("<think>") in two[0]) == (family == "qwen3")
    for max_length, kept in ((len(two[0]), 2), (len(two[0]) - 1, 1)):
        chat = render_conversation(tok, {"messages": turns}, max_length)
        assert (chat.ids, chat.mask, chat.dropped_exchanges) == (*tok.render_chat(turns[: 2 * kept]), 3 - kept)
    with pytest.raises(ChatFormatError, match=f"first exchange alone is {len(tok.render_chat(turns[:2])[0])} tokens"):
        render_conversation(tok, {"messages": turns}, 5)


TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
TOOL_CHATS = {
    "system, parallel calls, two results, answer": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}},
        ]},
        {"role": "tool", "content": "18°C"},
        {"role": "tool", "content": "12°C"},
        {"role": "assistant", "content": "Paris 18°C, Zürich 12°C."},
    ],
    "content with a call, then the result": [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
        {"role": "tool", "content": "{\"temperature\": 18}"},
    ],
    "arguments as a JSON string": [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]},
        {"role": "tool", "content": "18°C"},
        {"role": "assistant", "content": "18°C."},
    ],
}


@pytest.mark.parametrize("name", TOOL_CHATS)
@pytest.mark.parametrize("family", ["qwen2.5", "qwen3"])
def test_tools_match_the_released_template(family, name, hf_tokenizers):
    tok = load_tokenizer(family=family)
    messages = TOOL_CHATS[name]
    generation = messages[-1]["role"] == "tool"
    text = tok.render_chat_text(messages, add_generation_prompt=generation, tools=TOOLS)
    assert text == hf_render(family, messages, add_generation_prompt=generation, tools=TOOLS)
    ids, mask = tok.render_chat(messages, add_generation_prompt=generation, tools=TOOLS)
    assert ids == hf_tokenizers[family].encode(text)
    # The calls are trained with the reply; the tool instructions (two <tool_call> in the system turn) and the
    # results are not.
    call = tok.special_tokens["<tool_call>"]
    calls = sum(len(m.get("tool_calls", [])) for m in messages)
    assert [mask[i] for i, t in enumerate(ids) if t == call] == [False, False] + [True] * calls
    result = tok.encode("18")
    starts = [i for i in range(len(ids)) if ids[i:i + len(result)] == result]
    assert starts and not mask[starts[0]]  # the first "18" is the tool's result


def test_tools_are_refused_where_the_template_has_none():
    with pytest.raises(ValueError, match=r"the qwen2 template has no tools; qwen2\.5 and qwen3 have"):
        load_tokenizer(family="qwen2").render_chat([{"role": "user", "content": "Hi"}], tools=TOOLS)
    with pytest.raises(ValueError, match=r"unknown chat role 'tool'"):
        load_tokenizer().render_chat([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "x"}])
