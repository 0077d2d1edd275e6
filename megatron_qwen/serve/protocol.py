"""OpenAI's completions and chat-completions requests and responses, as plain functions (no model, no HTTP).

A request body becomes a `Job`: its prompts as token ids, one row per prompt and choice (``n``), the sampling
settings and the output options, checked against the served model's limits. Anything out of range raises
`RequestError` with OpenAI's error shape (``{"error": {"message", "type", "param", "code"}}``) and an HTTP
status: 400 for a bad request, 401 without the API key, 503 when the queue is full or the server is draining.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import threading
import time
from typing import Any

# OpenAI's default max_tokens for /v1/completions; chat completions default to the room the context leaves.
COMPLETION_DEFAULT_MAX_TOKENS = 16
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_LOGPROBS = 5  # legacy completions: logprobs in 0..5
MAX_TOP_LOGPROBS = 20  # chat: top_logprobs in 0..20
# Accepted and ignored: OpenAI fields with no effect on this server's output.
IGNORED_FIELDS = {"user", "service_tier", "store", "metadata", "parallel_tool_calls"}


class RequestError(Exception):
    """A refused request: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.retry_after = retry_after

    def body(self) -> dict:
        """OpenAI's error shape."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the served model accepts."""

    model: str  # the id /v1/models lists; requests may name it or leave it out
    vocab_limit: int  # ids the model may take and produce
    max_positions: int  # prompt + new tokens
    stop_ids: tuple[int, ...]  # the family's end-of-turn / end-of-text ids
    max_rows: int  # rows (prompts x n) one request may ask for


@dataclasses.dataclass
class Job:
    """One request, parsed: ``prompts[i]`` is generated ``n`` times (choice ``i * n + j``)."""

    kind: str  # "completion" or "chat"
    prompts: list[list[int]]
    n: int = 1
    max_tokens: int = COMPLETION_DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()  # ids that end a row, the family's included
    echo: bool = False
    logprobs: int | None = None  # top alternatives per token (0: only the chosen token's); None: no log-probs
    stream: bool = False
    include_usage: bool = False
    model: str = ""
    id: str = dataclasses.field(default_factory=lambda: "cmpl-" + secrets.token_hex(12))
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    # Set by the HTTP side when the client goes away; read by the rank loop (another thread).
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    # Set by the HTTP side: called from the rank loop's thread with ("text", (choice, piece)), ("done", choices)
    # or ("error", RequestError); it hands the event over to the HTTP thread.
    sink: Any = dataclasses.field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    @property
    def sampling_key(self) -> tuple:
        """Jobs with the same key can share one engine batch (the engine samples a batch with one setting)."""
        return (self.temperature, self.top_p, self.top_k)

    def row_prompt(self, choice: int) -> list[int]:
        return self.prompts[choice // self.n]


def _field(body: dict, name: str, kinds: tuple, default: Any, low: float | None = None, high: float | None = None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise RequestError(400, f"'{name}' must be {names}, got {value!r}", param=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(400, f"'{name}' must be finite, got {value!r}", param=name)
    if low is not None and value < low or high is not None and value > high:
        raise RequestError(400, f"'{name}'={value!r} is out of range [{low}, {high}]", param=name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(400, "'stop' must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    return tuple(stops)


def _stop_ids(body: dict, limits: Limits) -> tuple[int, ...]:
    ids = body.get("stop_token_ids") or []
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise RequestError(400, "'stop_token_ids' must be a list of token ids", param="stop_token_ids")
    bad = [i for i in ids if not 0 <= i < limits.vocab_limit]
    if bad:
        raise RequestError(400, f"'stop_token_ids' holds {bad[0]}, outside the model's vocabulary "
                                f"[0, {limits.vocab_limit})", param="stop_token_ids")
    return tuple(dict.fromkeys((*limits.stop_ids, *ids)))


def _model(body: dict, limits: Limits) -> str:
    model = body.get("model", limits.model)
    if model not in (None, limits.model):
        raise RequestError(404, f"the model '{model}' does not exist; this server serves '{limits.model}'",
                           param="model", code="model_not_found")
    return limits.model


def _common(body: dict, limits: Limits, kind: str, prompts: list[list[int]], max_tokens_default: int | None) -> Job:
    check_penalties(body)
    n = _field(body, "n", (int,), 1, 1, 128)
    if len(prompts) * n > limits.max_rows:
        raise RequestError(400, f"{len(prompts)} prompt(s) x n={n} is {len(prompts) * n} rows, over this server's "
                                f"--max-queue {limits.max_rows}; send fewer prompts or a smaller n", param="n")
    temperature = float(_field(body, "temperature", (int, float), 1.0, 0.0, 2.0))
    top_p = float(_field(body, "top_p", (int, float), 1.0, 0.0, 1.0))
    if top_p == 0.0:
        raise RequestError(400, "'top_p' must be > 0 (1 keeps every token)", param="top_p")
    top_k = _field(body, "top_k", (int,), 0, 0, None)
    if top_k == -1:  # vLLM's spelling of "off"
        top_k = 0
    seed = _field(body, "seed", (int,), None, 0, 2 ** 63 - 1)
    stream = _field(body, "stream", (bool,), False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, "'stream_options' must be an object", param="stream_options")
    longest = max(len(p) for p in prompts)
    room = limits.max_positions - longest
    if room < 0 or (room == 0 and max_tokens_default is None):
        raise RequestError(400, f"the prompt has {longest} tokens; this model's context is {limits.max_positions} "
                                "tokens (model.max_position_embeddings); shorten the prompt", param="messages"
                           if kind == "chat" else "prompt", code="context_length_exceeded")
    name = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _field(body, name, (int,), max_tokens_default if max_tokens_default is not None else room, 0, None)
    if longest + max_tokens > limits.max_positions:
        raise RequestError(400, f"the prompt has {longest} tokens and {name}={max_tokens} asks for "
                                f"{longest + max_tokens} positions, over this model's context of "
                                f"{limits.max_positions} tokens (model.max_position_embeddings); shorten the prompt "
                                f"or lower {name}", param=name, code="context_length_exceeded")
    return Job(kind=kind, prompts=prompts, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
               top_k=top_k, seed=seed, stop_strings=_stop(body), stop_ids=_stop_ids(body, limits), stream=stream,
               include_usage=bool(options.get("include_usage", False)), model=_model(body, limits))


def _token_prompt(value, limits: Limits, where: str) -> list[int]:
    if not value:
        raise RequestError(400, f"{where} is empty; give at least one token", param="prompt")
    bad = [t for t in value if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < limits.vocab_limit]
    if bad:
        raise RequestError(400, f"{where} holds {bad[0]!r}, not a token id of this model [0, {limits.vocab_limit})",
                           param="prompt")
    return list(value)


def parse_completion(body: dict, tokenizer, limits: Limits) -> Job:
    """A /v1/completions body (``prompt``: a string, a list of strings, a list of ids or a list of id lists)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        texts, token_lists = [prompt], None
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        texts, token_lists = prompt, None
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        texts, token_lists = None, [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        texts, token_lists = None, prompt
    else:
        raise RequestError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                                "such lists", param="prompt")
    if texts is not None:
        prompts = [tokenizer.encode(t) for t in texts]
        if not all(prompts):
            raise RequestError(400, "a prompt is empty; give at least one character", param="prompt")
    else:
        prompts = [_token_prompt(p, limits, f"prompt {i}") for i, p in enumerate(token_lists)]
    job = _common(body, limits, "completion", prompts, COMPLETION_DEFAULT_MAX_TOKENS)
    job.echo = _field(body, "echo", (bool,), False)
    logprobs = _field(body, "logprobs", (int,), None, 0, MAX_LOGPROBS)
    job.logprobs = logprobs
    if job.max_tokens == 0 and not job.echo:
        raise RequestError(400, "max_tokens=0 generates nothing; use it with echo=true to score a prompt",
                           param="max_tokens")
    _check_stream(job, body)
    return job


def parse_chat(body: dict, tokenizer, limits: Limits) -> Job:
    """A /v1/chat/completions body: ``messages`` rendered with the served family's chat template."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI's content parts: only text parts carry meaning here
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise RequestError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise RequestError(400, f"messages[{i}].content must be a string", param="messages")
        turns.append({"role": message["role"], "content": content})
    if turns[-1]["role"] != "user" and turns[-1]["role"] != "tool":
        raise RequestError(400, "the last message must be the user's turn the model answers", param="messages")
    system = None
    if turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    try:
        prompt, _ = tokenizer.render_chat(turns, system=system, add_generation_prompt=True)
    except (ValueError, KeyError) as exc:
        raise RequestError(400, f"messages: {exc}", param="messages") from exc
    bad = [t for t in prompt if t >= limits.vocab_limit]
    if bad:
        raise RequestError(400, f"the chat template's token {bad[0]} is outside this model's vocabulary "
                                f"[0, {limits.vocab_limit}); this model cannot chat", param="messages")
    job = _common(body, limits, "chat", [list(prompt)], None)
    job.id = "chatcmpl-" + job.id.split("-", 1)[1]
    if _field(body, "logprobs", (bool,), False):
        job.logprobs = _field(body, "top_logprobs", (int,), 0, 0, MAX_TOP_LOGPROBS)
    if job.max_tokens == 0:
        raise RequestError(400, "max_tokens must be >= 1 for a chat completion", param="max_tokens")
    _check_stream(job, body)
    return job


def _check_stream(job: Job, body: dict) -> None:
    if job.stream and job.logprobs is not None:
        raise RequestError(400, "logprobs are not streamed by this server; ask without stream, or without logprobs",
                           param="logprobs")
    unknown = set(body) - KNOWN_FIELDS[job.kind] - IGNORED_FIELDS
    if unknown:
        raise RequestError(400, f"unsupported field(s): {', '.join(sorted(unknown))}", param=sorted(unknown)[0])


COMMON_FIELDS = {"model", "n", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "stream",
                 "stream_options", "max_tokens", "frequency_penalty", "presence_penalty"}
KNOWN_FIELDS = {
    "completion": COMMON_FIELDS | {"prompt", "echo", "logprobs"},
    "chat": COMMON_FIELDS | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"},
}


def check_penalties(body: dict) -> None:
    """Penalties are accepted only at their neutral value 0 (the engine has none)."""
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise RequestError(400, f"'{name}' is not supported (only 0)", param=name)


# --------------------------------------------------------------------------- responses


@dataclasses.dataclass
class Choice:
    """What the rank loop produced for one row."""

    text: str
    tokens: list[int]  # the generated ids kept (cut at a stop string or stop id; the stop id not included)
    finish_reason: str  # "stop" or "length"
    generated: int  # ids the engine produced for the row (usage counts them)
    # Per token of (echo: prompt +) completion: (token id, log p, [(alternative id, log p), ...]); None first.
    logprobs: list | None = None


def usage(job: Job, choices: list[Choice]) -> dict:
    prompt = sum(len(p) for p in job.prompts)
    completion = sum(c.generated for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(job: Job, choice: Choice, tokenizer, prompt: list[int]) -> dict:
    ids = (prompt if job.echo else []) + choice.tokens
    pieces = [tokenizer.decode([t]) for t in ids]
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    entries = choice.logprobs or []
    return {
        "tokens": pieces,
        "token_logprobs": [None if e is None else e[1] for e in entries],
        "top_logprobs": [None if e is None else {tokenizer.decode([a]): lp for a, lp in e[2]} for e in entries]
        if job.logprobs else None,
        "text_offset": offsets,
    }


def completion_response(job: Job, choices: list[Choice], tokenizer) -> dict:
    """The /v1/completions response body."""
    out = []
    for i, choice in enumerate(choices):
        prompt = job.row_prompt(i)
        text = (tokenizer.decode(prompt) if job.echo else "") + choice.text
        item = {"index": i, "text": text, "finish_reason": choice.finish_reason, "logprobs": None}
        if job.logprobs is not None:
            item["logprobs"] = _completion_logprobs(job, choice, tokenizer, prompt)
        out.append(item)
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
            "choices": out, "usage": usage(job, choices)}


def _chat_token(tokenizer, token: int, logprob: float) -> dict:
    text = tokenizer.decode([token])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_response(job: Job, choices: list[Choice], tokenizer) -> dict:
    """The /v1/chat/completions response body."""
    out = []
    for i, choice in enumerate(choices):
        item = {"index": i, "message": {"role": "assistant", "content": choice.text},
                "finish_reason": choice.finish_reason, "logprobs": None}
        if job.logprobs is not None:
            item["logprobs"] = {"content": [
                {**_chat_token(tokenizer, e[0], e[1]),
                 "top_logprobs": [_chat_token(tokenizer, a, lp) for a, lp in e[2]]}
                for e in choice.logprobs or []
            ]}
        out.append(item)
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
            "choices": out, "usage": usage(job, choices)}


def stream_chunk(job: Job, index: int, text: str | None, finish_reason: str | None, first: bool = False) -> dict:
    """One server-sent event's body while streaming."""
    if job.kind == "chat":
        delta = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        kind = "text_completion"
    return {"id": job.id, "object": kind, "created": job.created, "model": job.model, "choices": [choice]}


def usage_chunk(job: Job, choices: list[Choice]) -> dict:
    """The last event of a stream with ``stream_options.include_usage``: no choices, the usage."""
    kind = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    return {"id": job.id, "object": kind, "created": job.created, "model": job.model, "choices": [],
            "usage": usage(job, choices)}
