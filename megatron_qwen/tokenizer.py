"""Qwen (v1) tokenizer: tiktoken BPE over ``qwen.tiktoken`` plus the ChatML template and SFT loss mask.

Follows the released Qwen tokenization_qwen.py and QwenLM finetune.py. Corpus and user text is always
encoded with special tokens treated as plain text; only :meth:`QwenTokenizer.render_chat` inserts them.
"""

from __future__ import annotations

import base64
import binascii
import functools
import importlib.metadata
import os
import pathlib
import unicodedata
from collections.abc import Iterable, Sequence

import tiktoken

PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
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

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
CHAT_ROLES = ("system", "user", "assistant")

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
    """tiktoken-backed Qwen v1 tokenizer with ChatML rendering. Build it with :func:`load_tokenizer`."""

    def __init__(self, path: str | os.PathLike):
        """Load the BPE ranks from ``path`` and build the tiktoken Encoding with Qwen's special tokens."""
        self.path = pathlib.Path(path)
        self._enc = tiktoken.Encoding(
            name="qwen",
            pat_str=PAT_STR,
            mergeable_ranks=_read_mergeable_ranks(self.path),
            special_tokens=SPECIAL_TOKENS,
            explicit_n_vocab=N_VOCAB,
        )
        self.special_tokens: dict[str, int] = dict(SPECIAL_TOKENS)
        self.n_vocab: int = self._enc.n_vocab
        self.eod_id: int = SPECIAL_TOKENS[ENDOFTEXT]
        self.pad_id: int = self.eod_id
        self.im_start_id: int = SPECIAL_TOKENS[IM_START]
        self.im_end_id: int = SPECIAL_TOKENS[IM_END]
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
            raise ValueError(f"token ids outside the Qwen vocabulary [0, {self.n_vocab}): {bad[:8]}")
        return self._enc.decode(ids)

    def _split_system(self, messages: Sequence[dict], system: str | None) -> tuple[str, Sequence[dict]]:
        """Validate roles and return (system prompt, remaining turns)."""
        for i, m in enumerate(messages):
            if m["role"] not in CHAT_ROLES:
                raise ValueError(f"unknown chat role {m['role']!r} in message {i}; allowed roles: {CHAT_ROLES}")
            if m["role"] == "system" and i > 0:
                raise ValueError(f"a system message is only allowed first, found one at message {i}")
        if messages and messages[0]["role"] == "system":
            if system is not None:
                raise ValueError("system prompt given both as the `system` argument and as a leading system message")
            return messages[0]["content"], messages[1:]
        return (DEFAULT_SYSTEM_PROMPT if system is None else system), messages

    def render_chat(
        self, messages: Sequence[dict], system: str | None = None, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Render a conversation as ChatML token ids plus an aligned loss mask (``mask[i]``: ids[i] is a target).

        Mirrors QwenLM finetune.py ``preprocess``: every piece is encoded separately and concatenated;
        ``<|im_start|>``, ``<|im_end|>`` and the ``\\n`` after it are targets in every turn; system and user
        turns are otherwise ignored; assistant turns mask the role tokens (``assistant\\n``) and train the
        content and ``<|im_end|>``. Without a leading system message or ``system``, the system prompt is
        "You are a helpful assistant.". ``add_generation_prompt`` appends ``<|im_start|>assistant\\n``,
        all masked (it is an inference prompt, nothing there is trained).
        """
        system_prompt, turns = self._split_system(messages, system)
        nl = self.encode("\n")
        ids: list[int] = []
        mask: list[bool] = []
        for role, content in [("system", system_prompt)] + [(m["role"], m["content"]) for m in turns]:
            role_ids = self.encode(role) + nl
            content_ids = self.encode(content)
            ids += [self.im_start_id] + role_ids + content_ids + [self.im_end_id] + nl
            # finetune.py: im_start and "<|im_end|>\n" are targets; only assistant content is trained.
            mask += [True] + [False] * len(role_ids) + [role == "assistant"] * len(content_ids)
            mask += [True] * (1 + len(nl))
        if add_generation_prompt:
            prompt = [self.im_start_id] + self.encode("assistant") + nl
            ids += prompt
            mask += [False] * len(prompt)
        return ids, mask

    def render_chat_text(
        self, messages: Sequence[dict], system: str | None = None, add_generation_prompt: bool = False
    ) -> str:
        """Return the ChatML string that :meth:`render_chat` tokenises, for display and logging."""
        system_prompt, turns = self._split_system(messages, system)
        text = "".join(
            f"{IM_START}{role}\n{content}{IM_END}\n"
            for role, content in [("system", system_prompt)] + [(m["role"], m["content"]) for m in turns]
        )
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


@functools.lru_cache(maxsize=None)
def _load_cached(resolved: pathlib.Path) -> QwenTokenizer:
    return QwenTokenizer(resolved)


def load_tokenizer(path: str | os.PathLike | None = None) -> QwenTokenizer:
    """Return the Qwen tokenizer for ``path`` (default: :func:`default_tokenizer_file`), cached per resolved path."""
    resolved = pathlib.Path(path if path is not None else default_tokenizer_file()).resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"Qwen tokenizer file not found: {resolved}")
    return _load_cached(resolved)
