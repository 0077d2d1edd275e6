"""Qwen tokenizers: tiktoken BPE over ``qwen.tiktoken`` plus each family's special tokens, chat template and
SFT loss mask.

Every family (`FAMILIES`) shares v1's 151,643 BPE ranks; they differ in the special/added tokens after them
and in the chat template. v1 follows the released tokenization_qwen.py and QwenLM finetune.py; Qwen1.5 to
Qwen3 follow their Hugging Face tokenizer_config.json (added tokens, `chat_template`) and transformers'
Qwen2Tokenizer (NFC normalisation). Corpus and user text is always encoded with special tokens treated as
plain text; only :meth:`QwenTokenizer.render_chat` inserts them.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import functools
import importlib.metadata
import itertools
import json
import os
import pathlib
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence

import tiktoken

from megatron_qwen.config import TOKENIZER_FAMILIES, TOKENIZER_VOCAB_SIZES

PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501 (Qwen's pattern, verbatim)
N_MERGEABLE = 151_643
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
N_EXTRA = 205
SPECIAL_TOKENS: dict[str, int] = {
    tok: N_MERGEABLE + i
    for i, tok in enumerate([ENDOFTEXT, IM_START, IM_END] + [f"<|extra_{j}|>" for j in range(N_EXTRA)])
}
N_VOCAB = N_MERGEABLE + len(SPECIAL_TOKENS)  # 151,851

FAMILIES = TOKENIZER_FAMILIES
THINK = "<think>"
END_THINK = "</think>"
# Added tokens of the Hugging Face releases, ids from 151643 on (tokenizer_config.json `added_tokens_decoder`):
# Qwen1.5 and Qwen2 have ChatML's three; Qwen2.5 adds vision, tool-call and FIM tokens; Qwen3 tool responses
# and thinking blocks.
_CHATML = [ENDOFTEXT, IM_START, IM_END]
_QWEN25_ADDED = _CHATML + [
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
    "<|file_sep|>",
]
_FAMILY_ADDED = {
    "qwen": list(SPECIAL_TOKENS),
    "qwen1.5": _CHATML,
    "qwen2": _CHATML,
    "qwen2.5": _QWEN25_ADDED,
    "qwen3": _QWEN25_ADDED + ["<tool_response>", "</tool_response>", THINK, END_THINK],
}
FAMILY_SPECIAL_TOKENS: dict[str, dict[str, int]] = {
    family: {tok: N_MERGEABLE + i for i, tok in enumerate(added)} for family, added in _FAMILY_ADDED.items()
}

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# The system prompt each family's template inserts when the conversation has none (Qwen3 inserts none).
FAMILY_DEFAULT_SYSTEM: dict[str, str | None] = {
    "qwen": DEFAULT_SYSTEM_PROMPT,
    "qwen1.5": "You are a helpful assistant",  # sic: Qwen1.5's template has no full stop
    "qwen2": DEFAULT_SYSTEM_PROMPT,
    "qwen2.5": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "qwen3": None,
}
CHAT_ROLES = ("system", "user", "assistant")
# Families whose templates render tools, tool calls and tool results.
TOOL_FAMILIES = ("qwen2.5", "qwen3")
_TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call>"
)

_DASHSCOPE_RESOURCE = "dashscope/resources/qwen.tiktoken"
_INSTALL_HINT = "pip install --no-deps dashscope==2.0.2"


def default_tokenizer_file() -> pathlib.Path:
    """Return the path of ``qwen.tiktoken`` shipped in the ``dashscope==2.0.2`` wheel.

    The file is located through the installed distribution's metadata rather than by importing dashscope,
    whose ``__init__`` needs dependencies that a ``--no-deps`` install leaves out.
    """
    try:
        path = pathlib.Path(importlib.metadata.distribution("dashscope").locate_file(_DASHSCOPE_RESOURCE))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"Qwen tokenizer file not found: the 'dashscope' package is not installed. "
            f"Run `{_INSTALL_HINT}` or pass the path of a qwen.tiktoken file explicitly."
        ) from None
    if not path.is_file():
        raise FileNotFoundError(
            f"Qwen tokenizer file not found at {path} (dashscope is installed but lacks {_DASHSCOPE_RESOURCE}). "
            f"Run `{_INSTALL_HINT}` or pass the path of a qwen.tiktoken file explicitly."
        )
    return path


def _read_mergeable_ranks(path: pathlib.Path) -> dict[bytes, int]:
    """Parse ``base64(token) rank`` lines and check they form the 151,643 contiguous Qwen ranks."""
    not_qwen = f"{path} is not a Qwen qwen.tiktoken file"
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
            except (ValueError, binascii.Error):
                raise ValueError(f"{not_qwen}: line {lineno} is not 'base64(token) rank'") from None
    if len(ranks) != N_MERGEABLE or set(ranks.values()) != set(range(N_MERGEABLE)):
        raise ValueError(
            f"{not_qwen}: expected {N_MERGEABLE} distinct tokens with ranks 0..{N_MERGEABLE - 1}, "
            f"found {len(ranks)} tokens"
        )
    return ranks


class QwenTokenizer:
    """tiktoken-backed Qwen tokenizer of one family, with its chat template. Build it with :func:`load_tokenizer`."""

    def __init__(self, path: str | os.PathLike, family: str = "qwen"):
        """Load the BPE ranks from ``path`` and build the tiktoken Encoding with `family`'s special tokens."""
        check_family(family)
        self.path = pathlib.Path(path)
        self.family = family
        specials = FAMILY_SPECIAL_TOKENS[family]
        self._enc = tiktoken.Encoding(
            name=f"qwen-{family}",
            pat_str=PAT_STR,
            mergeable_ranks=_read_mergeable_ranks(self.path),
            special_tokens=specials,
            explicit_n_vocab=N_MERGEABLE + len(specials),
        )
        self.special_tokens: dict[str, int] = dict(specials)
        self.n_vocab: int = self._enc.n_vocab
        self.eod_id: int = specials[ENDOFTEXT]
        self.pad_id: int = self.eod_id
        self.im_start_id: int = specials[IM_START]
        self.im_end_id: int = specials[IM_END]
        self.default_system: str | None = FAMILY_DEFAULT_SYSTEM[family]
        # A generated reply ends at ChatML's end (or start) of a turn, or at the end of the document.
        self.stop_ids: tuple[int, ...] = (self.im_end_id, self.im_start_id, self.eod_id)

    def generation_stop_ids(self, vocab_limit: int, ids: Iterable[int] | None = None) -> tuple[int, ...]:
        """The ids that end generation for a model of `vocab_limit` ids: `ids` (default `stop_ids`), less those
        the model's vocabulary does not have (a small test model's cannot produce them)."""
        return tuple(int(i) for i in (ids or self.stop_ids) if int(i) < vocab_limit)

    def encode(self, text: str) -> list[int]:
        """Encode NFC-normalised ``text``; special-token strings in it are encoded as plain text."""
        return self._enc.encode_ordinary(unicodedata.normalize("NFC", text))

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Encode each text like :meth:`encode`; with `num_threads` > 1 through tiktoken's threaded batch API."""
        normalized = [unicodedata.normalize("NFC", t) for t in texts]
        if num_threads <= 1:
            # tiktoken's batch API goes through a thread pool even for one thread: ~27 us per text.
            return [self._enc.encode_ordinary(t) for t in normalized]
        return self._enc.encode_ordinary_batch(normalized, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode token ids (list, tuple, numpy array, ...) to text; special ids become their literal text.

        Raises ValueError for ids outside ``[0, n_vocab)``, e.g. embedding padding rows.
        Bytes that are not valid UTF-8 (a sequence cut mid-character) decode to U+FFFD.
        """
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token ids outside the {self.family} vocabulary [0, {self.n_vocab}): {bad[:8]}")
        return self._enc.decode(ids)

    def _split_system(self, messages: Sequence[dict], system: str | None) -> tuple[str | None, Sequence[dict]]:
        """Validate roles and return (system prompt or None for no system turn, remaining turns)."""
        roles = CHAT_ROLES + (("tool",) if self.family in TOOL_FAMILIES else ())
        for i, m in enumerate(messages):
            if m["role"] not in roles:
                raise ValueError(
                    f"unknown chat role {m['role']!r} in message {i}; the {self.family} template's roles: {roles}"
                )
            if m["role"] == "system" and i > 0:
                raise ValueError(f"a system message is only allowed first, found one at message {i}")
            if m.get("tool_calls") and (m["role"] != "assistant" or self.family not in TOOL_FAMILIES):
                raise ValueError(
                    f"message {i} has tool calls: only assistant messages of {' and '.join(TOOL_FAMILIES)} have them"
                )
        if messages and messages[0]["role"] == "system":
            if system is not None:
                raise ValueError("system prompt given both as the `system` argument and as a leading system message")
            return messages[0]["content"], messages[1:]
        return (self.default_system if system is None else system), messages

    def _template_text(self, text: str, trained: bool) -> list[tuple[bool, str, bool]]:
        """Pieces of text the template itself writes (tool instructions and wrappers): the family's special-token
        strings in it are special tokens, as Hugging Face encodes them. Message text never goes through here."""
        parts = re.split("(" + "|".join(map(re.escape, self.special_tokens)) + ")", text)
        return [(part in self.special_tokens, part, trained) for part in parts if part]

    def _tools_header(self, system_prompt: str | None, tools: Sequence[dict]) -> list[tuple[bool, str, bool]]:
        """The system turn listing `tools` (Qwen2.5: after the system prompt or its default; Qwen3: after the
        system prompt, if any)."""
        if self.family == "qwen2.5":
            text = system_prompt + "\n\n"
        else:
            text = "" if system_prompt is None else system_prompt + "\n\n"
        text += _TOOLS_INTRO + "".join("\n" + _tojson(tool) for tool in tools) + _TOOLS_OUTRO
        return [(True, IM_START, True), (False, "system\n", False)] + self._template_text(text, False) + [
            (True, IM_END, True), (False, "\n", True)
        ]

    def _tool_calls(self, calls: Sequence[dict], content: str) -> list[tuple[bool, str, bool]]:
        """An assistant message's tool calls, after its content (trained, as the reply they are part of)."""
        text = ""
        for k, call in enumerate(calls):
            call = call.get("function", call)
            arguments = call["arguments"]
            if self.family == "qwen3":
                text += "\n" if (k == 0 and content) or k > 0 else ""
                arguments = arguments if isinstance(arguments, str) else _tojson(arguments)
            else:
                text += "\n"
                arguments = _tojson(arguments)
            text += '<tool_call>\n{"name": "' + call["name"] + '", "arguments": ' + arguments + "}\n</tool_call>"
        return self._template_text(text, True)

    def _pieces(
        self,
        messages: Sequence[dict],
        system: str | None,
        add_generation_prompt: bool,
        enable_thinking: bool,
        tools: Sequence[dict] | None = None,
    ) -> list[tuple[bool, str, bool]]:
        """The rendered conversation as (is a special token, text, trained) pieces, in order.

        Every turn is ``<|im_start|>role\\ncontent<|im_end|>\\n``; ``<|im_start|>`` and ``<|im_end|>\\n`` are
        trained in every turn and the content in assistant turns only (finetune.py's rule, for every family).
        Tool results (Qwen2.5, Qwen3) are a user turn of ``\\n<tool_response>\\n...\\n</tool_response>`` blocks.
        """
        if tools and self.family not in TOOL_FAMILIES:
            raise ValueError(f"the {self.family} template has no tools; {' and '.join(TOOL_FAMILIES)} have")
        system_prompt, turns = self._split_system(messages, system)
        convo = ([] if system_prompt is None else [{"role": "system", "content": system_prompt}]) + list(turns)
        # Qwen3 keeps the thinking block only in assistant turns after the last user query (a user turn that is
        # all one <tool_response> block is a tool's answer, not a query).
        users = [i for i, m in enumerate(convo) if m["role"] == "user" and not _is_tool_response(m["content"])]
        last_query = users[-1] if users else len(convo) - 1
        pieces: list[tuple[bool, str, bool]] = self._tools_header(system_prompt, tools) if tools else []
        for i, m in enumerate(convo):
            if tools and m["role"] == "system":
                continue  # the tools header holds it
            if m["role"] == "tool":
                if i == 0 or convo[i - 1]["role"] != "tool":
                    pieces += [(True, IM_START, True), (False, "user", False)]
                pieces += self._template_text("\n<tool_response>\n", False) + [(False, m["content"], False)]
                pieces += self._template_text("\n</tool_response>", False)
                if i == len(convo) - 1 or convo[i + 1]["role"] != "tool":
                    pieces += [(True, IM_END, True), (False, "\n", True)]
                continue
            trained = m["role"] == "assistant"
            calls = m.get("tool_calls") or []
            content = m["content"] or ""
            pieces += [(True, IM_START, True), (False, m["role"], False)]
            if trained and self.family == "qwen3":
                reply, content = self._qwen3_reply(m, after_last_query=i > last_query, last=i == len(convo) - 1)
                pieces += [(False, "\n", False)] + reply
            elif calls:
                pieces += [(False, "\n", False), (False, content, True)] if content else []
            else:
                pieces += [(False, "\n", False), (False, content, trained)]
            pieces += self._tool_calls(calls, content) + [(True, IM_END, True), (False, "\n", True)]
        if add_generation_prompt:
            pieces += [(True, IM_START, False), (False, "assistant", False), (False, "\n", False)]
            if self.family == "qwen3" and not enable_thinking:
                pieces += [(True, THINK, False), (False, "\n\n", False)]
                pieces += [(True, END_THINK, False), (False, "\n\n", False)]
        return pieces

    @staticmethod
    def _qwen3_reply(message: dict, after_last_query: bool, last: bool) -> tuple[list[tuple[bool, str, bool]], str]:
        """Qwen3's assistant content pieces and the content without its thinking: ``<think>\\nreasoning\\n</think>
        \\n\\ncontent`` for the final turn (an empty block without reasoning) and for later turns with reasoning
        after the last user query; the reasoning is dropped elsewhere. It comes from ``reasoning_content`` or a
        ``</think>`` in the content."""
        content, reasoning = message["content"] or "", message.get("reasoning_content")
        if reasoning is None:
            reasoning = ""
            if END_THINK in content:
                head, content = content.split(END_THINK)[0], content.split(END_THINK)[-1].lstrip("\n")
                reasoning = head.rstrip("\n").split(THINK)[-1].lstrip("\n")
        if after_last_query and (last or reasoning):
            return [
                (True, THINK, True), (False, "\n" + reasoning.strip("\n") + "\n", True), (True, END_THINK, True),
                (False, "\n\n" + content.lstrip("\n"), True),
            ], content
        return [(False, content, True)], content

    def _encode_pieces(self, pieces: list[tuple[bool, str, bool]]) -> tuple[list[int], list[bool]]:
        if self.family == "qwen":
            # finetune.py encodes every piece on its own.
            ids: list[int] = []
            mask: list[bool] = []
            for special, text, trained in pieces:
                piece_ids = [self.special_tokens[text]] if special else self.encode(text)
                ids += piece_ids
                mask += [trained] * len(piece_ids)
            return ids, mask
        # Hugging Face encodes the text between special tokens in one go; a token is trained when it starts in
        # trained text.
        ids, mask, run = [], [], []
        for special, text, trained in pieces + [(True, "", False)]:
            if not special:
                run.append((unicodedata.normalize("NFC", text), trained))
                continue
            if run:
                run_ids = self._enc.encode_ordinary("".join(t for t, _ in run))
                _, offsets = self._enc.decode_with_offsets(run_ids)
                bounds = list(itertools.accumulate(len(t) for t, _ in run))
                ids += run_ids
                mask += [run[bisect.bisect_right(bounds, start)][1] for start in offsets]
                run = []
            if text:
                ids.append(self.special_tokens[text])
                mask.append(trained)
        return ids, mask

    def render_chat(
        self,
        messages: Sequence[dict],
        system: str | None = None,
        add_generation_prompt: bool = False,
        enable_thinking: bool = True,
        tools: Sequence[dict] | None = None,
    ) -> tuple[list[int], list[bool]]:
        """Render a conversation with the family's chat template as token ids plus an aligned loss mask
        (``mask[i]``: ids[i] is a target).

        The text is :meth:`render_chat_text`'s. The mask mirrors QwenLM finetune.py ``preprocess`` for every
        family: ``<|im_start|>``, ``<|im_end|>`` and the ``\\n`` after it are targets in every turn; system and
        user turns are otherwise ignored; assistant turns mask the role tokens (``assistant\\n``) and train the
        content (Qwen3: with its thinking block) and ``<|im_end|>``. v1 encodes every piece on its own, as
        finetune.py does; later families encode the text between special tokens in one go, as Hugging Face
        does. Without a leading system message or ``system``, the family's default system prompt is used
        (Qwen3 has none). ``add_generation_prompt`` appends ``<|im_start|>assistant\\n`` (Qwen3 with
        ``enable_thinking=False``: and an empty thinking block), all masked.

        Qwen2.5 and Qwen3 also take `tools` (JSON schemas, listed in the system turn), assistant messages with
        ``tool_calls`` (``{"name", "arguments"}``, optionally under ``"function"``; trained with the reply) and
        ``tool`` messages (their results, rendered as a user turn, not trained).
        """
        return self._encode_pieces(self._pieces(messages, system, add_generation_prompt, enable_thinking, tools))

    def render_chat_text(
        self,
        messages: Sequence[dict],
        system: str | None = None,
        add_generation_prompt: bool = False,
        enable_thinking: bool = True,
        tools: Sequence[dict] | None = None,
    ) -> str:
        """Return the string that :meth:`render_chat` tokenises: the family's Hugging Face `chat_template`
        rendering of the conversation (v1: QwenLM's ChatML)."""
        pieces = self._pieces(messages, system, add_generation_prompt, enable_thinking, tools)
        return "".join(text for _, text, _ in pieces)


def _tojson(value) -> str:
    # The templates' `tojson` as transformers defines it: json.dumps, non-ASCII kept.
    return json.dumps(value, ensure_ascii=False)


def _is_tool_response(text: str) -> bool:
    return text.startswith("<tool_response>") and text.endswith("</tool_response>")


def check_family(family: str) -> None:
    """Raise ValueError naming the choices when `family` is not a tokenizer family."""
    if family not in FAMILIES:
        raise ValueError(f"tokenizer family {family!r} is not one of {', '.join(FAMILIES)} (model.family / --family)")


def check_vocabulary(family: str, vocab_size: int, added_tokens: Mapping[int, str] | None = None) -> None:
    """Refuse a checkpoint whose vocabulary does not fit tokenizer `family`, naming the family that fits.

    `vocab_size` is the embedding's row count (config.json ``vocab_size``); `added_tokens` the checkpoint
    tokenizer's added tokens by id (tokenizer_config.json ``added_tokens_decoder``), when it has them.
    """
    check_family(family)
    fitting = [f for f in FAMILIES if TOKENIZER_VOCAB_SIZES[f] <= vocab_size]
    if TOKENIZER_VOCAB_SIZES[family] > vocab_size:
        raise ValueError(
            f"the {family} tokenizer has {TOKENIZER_VOCAB_SIZES[family]:,} tokens but the checkpoint's vocabulary "
            f"has {vocab_size:,} rows: its special tokens have no embedding. Use the family the checkpoint was "
            f"trained with (model.family / --family; fitting: {', '.join(fitting) or 'none'})"
        )
    if added_tokens is None:
        return
    added = {int(i): str(t) for i, t in added_tokens.items()}
    expected = {i: t for t, i in FAMILY_SPECIAL_TOKENS[family].items()}
    if added != expected:
        matches = [f for f in FAMILIES if {i: t for t, i in FAMILY_SPECIAL_TOKENS[f].items()} == added]
        diff = sorted(set(added.items()) ^ set(expected.items()))[:4]
        raise ValueError(
            f"the checkpoint's {len(added)} added tokens are not the {family} tokenizer's {len(expected)} "
            f"(first differences, as (id, token): {diff}); set model.family / --family to "
            f"{' or '.join(matches) if matches else 'the family of the release the checkpoint comes from'}"
        )


@functools.lru_cache(maxsize=None)
def _load_cached(resolved: pathlib.Path, family: str) -> QwenTokenizer:
    return QwenTokenizer(resolved, family)


def load_tokenizer(path: str | os.PathLike | None = None, family: str = "qwen") -> QwenTokenizer:
    """Return the `family` tokenizer (see `FAMILIES`) over the BPE ranks at ``path`` (default:
    :func:`default_tokenizer_file`), cached per (resolved path, family)."""
    check_family(family)
    resolved = pathlib.Path(path if path is not None else default_tokenizer_file()).resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"Qwen tokenizer file not found: {resolved}")
    return _load_cached(resolved, family)
