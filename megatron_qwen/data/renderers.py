"""How each kind of JSONL record becomes documents: one renderer class per preprocessing ``mode``.

- ``text`` (`TextRenderer`): the NFC-normalised string at each of ``--json-keys`` (default ``text``) is one
  document in ``PREFIX_{key}_document``, special tokens encoded as plain text, plus ``<|endoftext|>`` with
  ``--append-eod`` when the document is not empty (Megatron-LM's rule).
- ``chat`` (`ChatRenderer`, ``--chat``): each line is a conversation (see `megatron_qwen.data.chat`), rendered
  with ChatML into ``PREFIX_chat_tokens_document`` and a parallel loss-mask shard ``PREFIX_chat_mask_document``
  (document i of each is conversation i; mask 1 where the token is trained, QwenLM finetune.py's rule). With
  ``max_length`` a longer conversation keeps its leading whole exchanges (counted as truncated); one whose
  first exchange does not fit, like any record breaking the chat rules, is a bad line.
- ``preference`` (`PreferenceRenderer`, ``--preference``): each line is a pair, written as
  ``PREFIX_chosen_document`` and ``PREFIX_rejected_document``; a side over ``max_length`` is a bad line.
- ``prompts`` (`PromptRenderer`, ``--prompts``): each line is a PPO prompt, ``{"prompt": "..."}`` or
  ``{"messages": [...]}`` ending with a user turn (optional ``system``), written to ``PREFIX_prompt_document``
  as ChatML up to ``<|im_start|>assistant\n``; a prompt over ``max_length`` is a bad line.

A renderer declares its shard keys, which of them hold token ids, each shard's vocabulary (which sets its
dtype), checks its options, checks and renders lines, and adds its own lines to the run's summary. The
preprocessing loop (`megatron_qwen.data.preprocess`) is the same for every mode; `RENDERERS` is the one place
a mode's name is looked up, so a new mode is one class here and one entry there.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np

from megatron_qwen.data.chat import (
    PREFERENCE_KEYS,
    PROMPT_KEYS,
    SFT_KEYS,
    ChatFormatError,
    render_conversation,
    render_preference,
    render_prompt,
)
from megatron_qwen.data.jsonl_input import json_type, record_of
from megatron_qwen.errors import PreprocessError



class Renderer(ABC):
    """A mode's rules, fixed by its options; picklable, since every worker process gets a copy.

    The loop calls `check` on each line and, once per batch of good lines, `render` and `count` on what
    `check` returned for them. A renderer keeps no state between calls.
    """

    mode: ClassVar[str]  # the `preprocess(mode=...)` value; --MODE on the command line for all but text
    unit: ClassVar[str]  # what one good line is, in the summary ("documents", "conversations", ...)
    cli_help: ClassVar[str] = ""  # the --MODE flag's help
    stat_names: ClassVar[tuple[str, ...]] = ()  # the PreprocessResult counters that `count` adds up
    keys: tuple[str, ...]  # one shard per key, written as shard_prefix(output_prefix, key)

    @classmethod
    @abstractmethod
    def from_options(cls, json_keys, append_eod, max_length) -> Renderer:
        """The renderer for these `preprocess` options; raises PreprocessError for one that does not apply."""

    @property
    def token_keys(self) -> tuple[str, ...]:
        """The keys whose shards hold token ids (counted in PreprocessResult.tokens)."""
        return self.keys

    def vocab_size(self, key: str, tokenizer) -> int:
        """The values shard ``key`` holds are in [0, vocab_size): it sets the shard's dtype as megatron-core does."""
        return tokenizer.n_vocab

    @property
    def columns(self) -> tuple[str, ...] | None:
        """The fields this mode reads by name, checked up front in columnar files (None: it reads whole records)."""
        return None

    @abstractmethod
    def check(self, tokenizer, line: bytes | dict):
        """What `render` needs of one JSON line or row record (never a str), or a str: the reason it is unusable."""

    @abstractmethod
    def render(self, tokenizer, items: list, with_tokens: bool) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
        """Yield (key, document lengths, their tokens back to back) for each of `keys` in turn: one document per
        checked item, in order. The tokens are None unless ``with_tokens`` (counting needs only the lengths)."""

    def count(self, items: list) -> dict[str, int]:
        """The `stat_names` counters of a batch of checked items."""
        return {}

    @classmethod
    def summary_lines(cls, result) -> list[str]:
        """This mode's lines in the end-of-run summary (of a `preprocess.PreprocessResult`), after the token counts."""
        return []


@dataclass(frozen=True)
class TextRenderer(Renderer):
    """Plain text: one document per JSON key and line (see the module docstring)."""

    mode: ClassVar[str] = "text"
    unit: ClassVar[str] = "documents"
    keys: tuple[str, ...] = ("text",)
    append_eod: bool = False

    @classmethod
    def from_options(cls, json_keys, append_eod, max_length) -> TextRenderer:
        keys = ("text",) if json_keys is None else tuple(json_keys)
        if not keys or len(set(keys)) != len(keys):
            raise PreprocessError(f"--json-keys must name one or more distinct keys, got {list(keys)}")
        if max_length is not None:
            raise PreprocessError("--max-length applies to --chat and --preference data; drop it for plain text")
        return cls(keys, append_eod)

    @property
    def columns(self) -> tuple[str, ...]:
        return self.keys

    def check(self, tokenizer, line: bytes | dict) -> list[str] | str:
        """The string values of `keys`, or the reason the line is unusable (tokenized later, in batches)."""
        record = record_of(line) if isinstance(line, bytes) else line
        if isinstance(record, str):
            return record
        texts = []
        for key in self.keys:
            if key not in record:
                present = ", ".join(repr(k) for k in list(record)[:8]) or "none"
                return f"missing key {key!r} (keys present: {present}); choose the keys with --json-keys"
            value = record[key]
            if not isinstance(value, str):
                return f"the value of {key!r} is a JSON {json_type(value)}, not a string"
            texts.append(value)
        return texts

    def render(self, tokenizer, items: list[list[str]], with_tokens: bool):
        # One tokenizer call per key and batch; one thread, since every worker process is already busy.
        for k, key in enumerate(self.keys):
            ids = tokenizer.encode_batch([texts[k] for texts in items], num_threads=1)
            if self.append_eod:
                for doc in ids:
                    if doc:  # Megatron-LM leaves empty documents empty
                        doc.append(tokenizer.eod_id)
            lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
            flat = None
            if with_tokens:
                flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=int(lengths.sum()))
            yield key, lengths, flat


class Rendered(NamedTuple):
    """One record rendered with ChatML: a document per shard key (in `keys` order), and the exchanges dropped."""

    docs: tuple[np.ndarray, ...]
    dropped_exchanges: int = 0


@dataclass(frozen=True)
class ChatMLRenderer(Renderer):
    """Records rendered whole with ChatML, one at a time: keys, EOD and length come from the chat rules."""

    max_length: int | None = None

    @classmethod
    def from_options(cls, json_keys, append_eod, max_length) -> ChatMLRenderer:
        for given, flag in ((json_keys is not None, "--json-keys"), (append_eod, "--append-eod")):
            if given:
                raise PreprocessError(
                    f"{flag} does not apply to --{cls.mode} data (records are rendered with ChatML); drop it"
                )
        positive = isinstance(max_length, int) and not isinstance(max_length, bool) and max_length >= 1
        if max_length is not None and not positive:
            raise PreprocessError(
                f"--max-length must be a positive integer (the model.seq_length to train at), got {max_length!r}"
            )
        return cls(max_length)

    @abstractmethod
    def render_record(self, tokenizer, record: dict) -> Rendered:
        """The record's documents; raises ChatFormatError with the reason when it breaks a rule."""

    def check(self, tokenizer, line: bytes | dict) -> Rendered | str:
        record = record_of(line) if isinstance(line, bytes) else line
        if isinstance(record, str):
            return record
        try:
            return self.render_record(tokenizer, record)
        except ChatFormatError as e:
            return str(e)

    def render(self, tokenizer, items: list[Rendered], with_tokens: bool):
        for k, key in enumerate(self.keys):
            docs = [item.docs[k] for item in items]
            lengths = np.fromiter(map(len, docs), np.int64, count=len(docs))
            yield key, lengths, np.concatenate(docs) if with_tokens else None


@dataclass(frozen=True)
class ChatRenderer(ChatMLRenderer):
    """SFT conversations: ChatML tokens and their loss mask, document i of each shard being conversation i."""

    mode: ClassVar[str] = "chat"
    unit: ClassVar[str] = "conversations"
    cli_help: ClassVar[str] = "conversations -> PREFIX_chat_tokens/_chat_mask_document"
    stat_names: ClassVar[tuple[str, ...]] = ("truncated", "trained_tokens")
    keys: ClassVar[tuple[str, ...]] = SFT_KEYS

    @property
    def token_keys(self) -> tuple[str, ...]:
        return SFT_KEYS[:1]  # the mask shard holds 0/1

    def vocab_size(self, key: str, tokenizer) -> int:
        # The smallest vocabulary for the 0/1 mask, so megatron-core's smallest dtype.
        return 2 if key == SFT_KEYS[1] else tokenizer.n_vocab

    def render_record(self, tokenizer, record: dict) -> Rendered:
        chat = render_conversation(tokenizer, record, self.max_length)
        return Rendered((np.asarray(chat.ids, np.int32), np.asarray(chat.mask, np.int32)), chat.dropped_exchanges)

    def count(self, items: list[Rendered]) -> dict[str, int]:
        return {
            "truncated": sum(item.dropped_exchanges > 0 for item in items),
            "trained_tokens": sum(int(item.docs[1].sum()) for item in items),
        }

    @classmethod
    def summary_lines(cls, result) -> list[str]:
        total = max(sum(result.tokens.values()), 1)
        return [
            f"trained tokens (loss mask): {result.trained_tokens:,} ({100 * result.trained_tokens / total:.1f} %)",
            f"conversations truncated to --max-length (trailing exchanges dropped): {result.truncated:,}",
        ]


@dataclass(frozen=True)
class PreferenceRenderer(ChatMLRenderer):
    """Preference pairs for a reward model: the chosen and the rejected conversation, each in its own shard."""

    mode: ClassVar[str] = "preference"
    unit: ClassVar[str] = "pairs"
    cli_help: ClassVar[str] = "preference pairs -> PREFIX_chosen/_rejected_document"
    keys: ClassVar[tuple[str, ...]] = PREFERENCE_KEYS

    def render_record(self, tokenizer, record: dict) -> Rendered:
        pair = render_preference(tokenizer, record, self.max_length)
        return Rendered(tuple(np.asarray(ids, np.int32) for ids in pair))


@dataclass(frozen=True)
class PromptRenderer(ChatMLRenderer):
    """PPO prompts: the optional system prompt and the conversation so far, ending with ``<|im_start|>assistant\\n``."""

    mode: ClassVar[str] = "prompts"
    unit: ClassVar[str] = "prompts"
    cli_help: ClassVar[str] = 'prompts ({"prompt": ...} or {"messages": [...]}) -> PREFIX_prompt_document'
    keys: ClassVar[tuple[str, ...]] = PROMPT_KEYS

    def render_record(self, tokenizer, record: dict) -> Rendered:
        return Rendered((np.asarray(render_prompt(tokenizer, record, self.max_length), np.int32),))


RENDERERS: dict[str, type[Renderer]] = {
    cls.mode: cls for cls in (TextRenderer, ChatRenderer, PreferenceRenderer, PromptRenderer)
}
MODES = tuple(RENDERERS)


def renderer_for(mode: str, json_keys=None, append_eod: bool = False, max_length: int | None = None) -> Renderer:
    """The renderer of ``mode`` with these options; raises PreprocessError naming the mode or option that does not
    fit."""
    if mode not in MODES:
        raise PreprocessError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    return RENDERERS[mode].from_options(json_keys, append_eod, max_length)
