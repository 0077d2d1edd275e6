"""Chat and preference records (one JSON object per line) -> ChatML token ids, with the SFT loss mask.

Conversations come in the two common shapes:

- ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
- Qwen's ``{"conversations": [{"from": "human"|"user"|"gpt"|"assistant"|"system", "value": "..."}, ...]}``

either with an optional top-level ``"system"`` string. After an optional leading system turn the turns
alternate user, assistant, ..., and end with an assistant turn; an assistant turn may carry a
``"reasoning_content"`` string (Qwen3's thinking). They are rendered by the tokenizer's `render_chat`: its
family's chat template (v1: QwenLM finetune.py's ChatML, the system prompt defaulting to "You are a helpful
assistant."; Qwen1.5 to Qwen3 as their Hugging Face `chat_template`) and finetune.py's loss mask.

Preference records are ``{"prompt": ..., "chosen": ..., "rejected": ...}`` or ``{"messages": [...],
"chosen": ..., "rejected": ...}``: the prompt is a user string or a list of turns ending with a user
turn; each response is an assistant string or a list of turns continuing the prompt. Without a prompt,
chosen and rejected are whole conversations. Each side is rendered up to and including its final
``<|im_end|>``, the token whose hidden state the reward head reads.

A record that breaks a rule raises `ChatFormatError` with the reason; preprocessing turns it into
``file:line: reason`` (or counts it under --skip-bad-lines).
"""

from __future__ import annotations

from dataclasses import dataclass

# Shards written per input prefix (PREFIX_{key}_document): SFT tokens with a parallel loss-mask shard, and
# the two sides of preference pairs (document i of each is pair i).
SFT_KEYS = ("chat_tokens", "chat_mask")
PREFERENCE_KEYS = ("chosen", "rejected")
PROMPT_KEYS = ("prompt",)

# Qwen's finetune.py data names the roles human/gpt; "messages" data names them user/assistant.
ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
_TURN_RULE = ("after an optional leading system turn, turns alternate user, assistant, ... "
              "and end with an assistant turn")


class ChatFormatError(ValueError):
    """A record that is not a usable conversation or preference pair; the message is the reason."""


@dataclass(frozen=True)
class RenderedChat:
    """A conversation as ChatML ids, ``mask[i]`` True where ids[i] is trained, and the exchanges dropped to fit."""

    ids: list[int]
    mask: list[bool]
    dropped_exchanges: int


def _turns(items, where: str, role_key: str, content_key: str) -> list[dict]:
    if not isinstance(items, list):
        raise ChatFormatError(f"{where} must be a list of turns, found {_type_name(items)}")
    turns = []
    for i, item in enumerate(items):
        strings = isinstance(item, dict) and all(isinstance(item.get(k), str) for k in (role_key, content_key))
        if not strings:
            raise ChatFormatError(
                f"{where}[{i}] must be an object with string {role_key!r} and {content_key!r}, found {item!r:.80}"
            )
        role = ROLE_NAMES.get(item[role_key])
        if role is None:
            raise ChatFormatError(f"{where}[{i}] has role {item[role_key]!r}; known roles: {', '.join(ROLE_NAMES)}")
        turn = {"role": role, "content": item[content_key]}
        reasoning = item.get("reasoning_content")
        if reasoning is not None:
            # Qwen3's template renders it as the reply's thinking block; other families leave it out.
            if role != "assistant" or not isinstance(reasoning, str):
                raise ChatFormatError(
                    f"{where}[{i}]: 'reasoning_content' must be a string on an assistant turn, found {reasoning!r:.80}"
                )
            turn["reasoning_content"] = reasoning
        turns.append(turn)
    return turns


def _type_name(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string"}
    return names.get(type(value), "null" if value is None else type(value).__name__)


def _system_of(record: dict, turns: list[dict]) -> tuple[str | None, list[dict]]:
    """(system prompt or None for the default, turns without a leading system turn)."""
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ChatFormatError(f"'system' must be a string, found {_type_name(system)}")
    if turns and turns[0]["role"] == "system":
        if system is not None:
            raise ChatFormatError(
                "the system prompt is given twice: as the 'system' field and as a leading system turn; keep one"
            )
        system, turns = turns[0]["content"], turns[1:]
    for i, turn in enumerate(turns):
        if turn["role"] == "system":
            raise ChatFormatError(f"turn {i} is a system turn; only the first turn may be one")
    return system, turns


def _check_alternation(turns: list[dict], where: str) -> None:
    if not turns:
        raise ChatFormatError(f"{where} has no user/assistant turns")
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise ChatFormatError(f"{where}: turn {i} is {turn['role']!r} where {expected!r} is due ({_TURN_RULE})")
    if turns[-1]["role"] != "assistant":
        raise ChatFormatError(f"{where} ends with a user turn; {_TURN_RULE}")


def conversation_of(record: dict) -> tuple[str | None, list[dict]]:
    """The (system prompt or None, user/assistant turns) of a chat record; raises ChatFormatError."""
    shapes = [key for key in ("messages", "conversations") if key in record]
    if len(shapes) != 1:
        present = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        raise ChatFormatError(
            "a conversation needs exactly one of 'messages' (role/content) or 'conversations' (from/value); keys "
            f"present: {present}"
        )
    key = shapes[0]
    turns = _turns(record[key], key, *(("role", "content") if key == "messages" else ("from", "value")))
    system, turns = _system_of(record, turns)
    _check_alternation(turns, "the conversation")
    return system, turns


def render_conversation(tokenizer, record: dict, max_length: int | None = None) -> RenderedChat:
    """Render a chat record with the tokenizer family's chat template and its loss mask, keeping at most
    `max_length` tokens.

    Too long a conversation keeps its leading whole exchanges (user + assistant) that fit, rendered as a
    conversation of their own (Qwen3 renders a conversation's final reply with its thinking block); one whose
    first exchange does not fit raises ChatFormatError.
    """
    system, turns = conversation_of(record)
    ids, mask = tokenizer.render_chat(turns, system=system)
    if max_length is None or len(ids) <= max_length:
        return RenderedChat(ids, mask, 0)
    # A conversation grows with every exchange: bisect for the most leading exchanges that fit.
    fits, too_long = 0, len(turns) // 2
    rendered = {}
    while too_long - fits > 1:
        kept = (fits + too_long) // 2
        rendered[kept] = tokenizer.render_chat(turns[: 2 * kept], system=system)
        fits, too_long = (kept, too_long) if len(rendered[kept][0]) <= max_length else (fits, kept)
    if fits == 0:
        first = len(rendered.get(1, (ids,))[0])
        raise ChatFormatError(
            f"the first exchange alone is {first} tokens (system prompt included), over --max-length {max_length}; "
            "shorten it or raise --max-length"
        )
    return RenderedChat(*rendered[fits], len(turns) // 2 - fits)


def _response(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return _turns(value, where, "role", "content")


def preference_of(record: dict) -> tuple[str | None, list[dict], list[dict]]:
    """(system prompt or None, chosen conversation, rejected conversation) of a preference record."""
    for key in ("chosen", "rejected"):
        if key not in record:
            present = ", ".join(repr(k) for k in list(record)[:8]) or "none"
            raise ChatFormatError(
                f"a preference pair needs 'chosen' and 'rejected'; missing {key!r} (keys present: {present})"
            )
    prompts = [key for key in ("prompt", "messages") if key in record]
    if len(prompts) > 1:
        raise ChatFormatError("give the prompt once: as 'prompt' or as 'messages', not both")
    prompt: list[dict] = []
    if prompts:
        value = record[prompts[0]]
        if isinstance(value, str):
            prompt = [{"role": "user", "content": value}]
        else:
            prompt = _turns(value, prompts[0], "role", "content")
        if not prompt:
            raise ChatFormatError(f"{prompts[0]!r} is empty")
    system, prompt = _system_of(record, prompt)
    # Without a prompt, a side may carry its own leading system turn; both sides must then agree.
    sides = [_system_of({"system": system}, prompt + _response(record[key], key)) for key in ("chosen", "rejected")]
    for key, (_, turns) in zip(("chosen", "rejected"), sides):
        _check_alternation(turns, f"the {key} conversation")
    if sides[0][0] != sides[1][0]:
        raise ChatFormatError(
            "chosen and rejected have different system prompts; a pair compares two answers to one prompt"
        )
    return sides[0][0], sides[0][1], sides[1][1]


def render_preference(tokenizer, record: dict, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """ChatML ids of the chosen and rejected conversations, each ending at its final ``<|im_end|>``.

    A side longer than `max_length` tokens raises ChatFormatError: cutting a response would change what
    is being compared.
    """
    system, chosen, rejected = preference_of(record)
    out = []
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        ids, _ = tokenizer.render_chat(turns, system=system)
        ids = ids[: len(ids) - ids[::-1].index(tokenizer.im_end_id)]  # drop the "\n" after the final <|im_end|>
        if max_length is not None and len(ids) > max_length:
            raise ChatFormatError(f"the {name} conversation is {len(ids)} tokens, over --max-length {max_length}; "
                                  "shorten it or raise --max-length")
        out.append(ids)
    if out[0] == out[1]:
        raise ChatFormatError("chosen and rejected are the same conversation; a pair must differ")
    return out[0], out[1]


def prompt_of(record: dict) -> tuple[str | None, list[dict]]:
    """(system prompt or None, the conversation so far) of a prompt record: ``{"prompt": "..."}`` (one user
    turn) or ``{"messages": [...]}`` ending with a user turn, with an optional ``system``."""
    keys = [key for key in ("prompt", "messages") if key in record]
    if len(keys) != 1:
        present = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        raise ChatFormatError("a prompt needs exactly one of 'prompt' (a string) or 'messages' (role/content "
                              f"turns); keys present: {present}")
    value = record[keys[0]]
    if keys[0] == "prompt":
        if not isinstance(value, str):
            raise ChatFormatError(f"'prompt' must be a string, found {_type_name(value)}")
        turns = [{"role": "user", "content": value}]
    else:
        turns = _turns(value, "messages", "role", "content")
    system, turns = _system_of(record, turns)
    if not turns:
        raise ChatFormatError("the prompt has no user turn")
    if turns[-1]["role"] != "user":
        raise ChatFormatError(
            "the prompt ends with an assistant turn; a prompt ends with the user turn the model answers"
        )
    # The conversation so far alternates user, assistant, ..., user.
    _check_alternation(turns + [{"role": "assistant", "content": ""}], "the prompt")
    return system, turns


def render_prompt(tokenizer, record: dict, max_length: int | None = None) -> list[int]:
    """ChatML ids of a prompt record up to and including ``<|im_start|>assistant\\n``: what a chat model
    continues. A prompt longer than `max_length` tokens raises ChatFormatError."""
    system, turns = prompt_of(record)
    ids, _ = tokenizer.render_chat(turns, system=system, add_generation_prompt=True)
    if max_length is not None and len(ids) > max_length:
        raise ChatFormatError(
            f"the prompt is {len(ids)} tokens, over --max-length {max_length}; shorten it or raise --max-length"
        )
    return ids
