"""`megatron-qwen serve`: the OpenAI-compatible server on gloo CPU ranks, checked through the `openai` client and
plain HTTP.

The references: `megatron-qwen forward`'s logits (echo + logprobs), `megatron-qwen generate`'s greedy text, the
same prompts sent one at a time (16 concurrent clients), the server at TP=1 (TP=2 x PP=2). The request parsing,
the queue's batching policy and the stop-string cutting are unit-tested without a model.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from spawn import REPO, cpu_env, free_port, kill_tree

MODEL = ["model.hidden_size=128", "model.ffn_hidden_size=256", "model.max_position_embeddings=4096"]
API_KEY = "test-key"
MAX_QUEUE = 16
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "1, 2, 3, 4,", "Qwen is a",
           "In the beginning", "The quick brown fox", "import torch", "Dear Sir or Madam,", "Roses are red,",
           "SELECT * FROM", "The mitochondria is", "To be or not to be", "Hello, world", "Once more", "Why is the sky"]


# --------------------------------------------------------------------------- without a model


@pytest.fixture(scope="module")
def tokenizer():
    from megatron_qwen.tokenizer import load_tokenizer

    return load_tokenizer()


def limits(**changes):
    from megatron_qwen.serve.protocol import Limits

    base = dict(model="m", vocab_limit=151851, max_positions=64, stop_ids=(151643, 151645), max_rows=8)
    return Limits(**{**base, **changes})


@pytest.mark.parametrize("body, status, fragment", [
    ({"prompt": "hi", "temperature": 3}, 400, "'temperature'=3 is out of range"),
    ({"prompt": "hi", "n": 0}, 400, "'n'=0 is out of range"),
    ({"prompt": "hi", "n": 5, "max_tokens": 1}, 400, "2 prompt(s)"),  # with two prompts below
    ({"prompt": 7}, 400, "'prompt' must be"),
    ({"prompt": [1, 2, 999999]}, 400, "not a token id of this model [0, 151851)"),
    ({"prompt": "hi", "max_tokens": 64}, 400, "asks for 65 positions, over this model's context of 64"),
    ({"prompt": "hi", "model": "other"}, 404, "serves 'm'"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"prompt": "hi", "stream": True, "logprobs": 1}, 400, "logprobs are not streamed"),
    ({"prompt": "hi", "logprobs": 6}, 400, "'logprobs'=6 is out of range"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "use it with echo=true"),
    ({"prompt": "hi", "frequency_penalty": 0.5}, 400, "'frequency_penalty' is not supported"),
    ({"prompt": "hi", "best_of": 2}, 400, "unsupported field(s): best_of"),
    ({"prompt": "hi", "top_p": 0}, 400, "'top_p' must be > 0"),
])
def test_completion_requests_are_checked(tokenizer, body, status, fragment):
    from megatron_qwen.serve.protocol import RequestError, parse_completion

    if body.get("n") == 5:
        body = {**body, "prompt": ["a", "b"]}
    with pytest.raises(RequestError) as info:
        parse_completion(body, tokenizer, limits())
    assert info.value.status == status and fragment in info.value.message, info.value.message
    assert set(info.value.body()["error"]) == {"message", "type", "param", "code"}


def test_chat_request_renders_the_family_template(tokenizer):
    from megatron_qwen.serve.protocol import RequestError, parse_chat

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    job = parse_chat({"messages": messages, "max_tokens": 4}, tokenizer, limits(max_positions=4096))
    expected, _ = tokenizer.render_chat([messages[1]], system="Be brief.", add_generation_prompt=True)
    assert job.prompts == [list(expected)] and job.max_tokens == 4
    # No max_tokens: what the context leaves.
    assert parse_chat({"messages": messages}, tokenizer, limits(max_positions=4096)).max_tokens == 4096 - len(expected)
    with pytest.raises(RequestError, match="last message must be the user's"):
        parse_chat({"messages": messages + [{"role": "assistant", "content": "x"}]}, tokenizer, limits())


def test_stop_strings_cut_the_text_and_hold_back_what_may_become_one(tokenizer):
    from megatron_qwen.serve.batching import RowText

    ids = tokenizer.encode("alpha beta gamma delta")
    row = RowText(tokenizer, ("gam",), (151643,), max_tokens=100)
    released = ""
    for token in ids:
        row.add(token)
        released += row.release()
        if row.finish_reason:
            break
    assert row.finish_reason == "stop" and row.text == "alpha beta "
    # Never released past the cut, and all of it by the end.
    assert released == "alpha beta "
    # A stop id ends the row without text; the token limit ends it with "length".
    row = RowText(tokenizer, (), (151643,), max_tokens=100)
    row.add(ids[0])
    row.add(151643)
    assert (row.finish_reason, row.text, row.generated) == ("stop", "alpha", 2)
    row = RowText(tokenizer, (), (), max_tokens=2)
    for token in ids[:3]:
        row.add(token)
    assert (row.finish_reason, row.generated) == ("length", 2)


def test_half_a_character_is_not_released(tokenizer):
    from megatron_qwen.serve.batching import RowText

    ids = tokenizer.encode("好")
    pieces = [tokenizer._enc.decode_single_token_bytes(t) for t in ids]
    assert len(ids) > 1 or len(pieces[0]) == 3
    row = RowText(tokenizer, (), (), max_tokens=10)
    out = []
    for token in ids:
        row.add(token)
        out.append(row.release())
    assert "".join(out) == "好" and all("\ufffd" not in piece for piece in out)


def job(rows=1, temperature=0.0):
    from megatron_qwen.serve.protocol import Job

    return Job(kind="completion", prompts=[[1]] * rows, temperature=temperature)


def test_batches_take_compatible_jobs_in_order_up_to_max_batch():
    from megatron_qwen.serve.batching import Scheduler
    from megatron_qwen.serve.protocol import RequestError

    queue = Scheduler(max_queue=12, max_batch=4, wait_s=0.0)
    a, b, c, d = job(2), job(1, temperature=1.0), job(3), job(2)
    for j in (a, b, c, d):
        queue.submit(j)
    assert queue.next_batch(0.1) == [a, d]  # c (3 rows) does not fit beside a; b samples otherwise
    queue.finished()
    assert queue.next_batch(0.1) == [b]
    queue.finished()
    assert queue.next_batch(0.1) == [c]
    queue.finished()
    assert queue.next_batch(0.01) == []
    # Full: 503 with Retry-After; a cancelled job frees its rows.
    big = job(12)
    queue.submit(big)
    with pytest.raises(RequestError) as info:
        queue.submit(job(1))
    assert info.value.status == 503 and info.value.retry_after == 1
    queue.cancel(big)
    queue.submit(job(1))
    queue.drain()
    with pytest.raises(RequestError, match="shutting down"):
        queue.submit(job(1))


# --------------------------------------------------------------------------- a served checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, single_rank):
    import yaml

    from megatron_qwen.checkpoint.io import save_model
    from megatron_qwen.config import load_config
    from megatron_qwen.model.qwen import build_model
    from megatron_qwen.platform.runtime import Runtime

    path = tmp_path_factory.mktemp("serve") / "tiny-chat"
    cfg = load_config("configs/tiny.yaml", MODEL)
    torch.manual_seed(0)
    save_model(build_model(cfg, Runtime.cpu()), path)
    (path / "model_config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    return path


class Server:
    """`tools/serve.py` in a subprocess (its own session, so its ranks die with it)."""

    def __init__(self, ckpt: Path, *args, nproc: int = 1):
        cmd = [sys.executable, "tools/serve.py", "--ckpt", str(ckpt), "--port", "0", *map(str, args)]
        if nproc > 1:
            cmd += ["--nproc", str(nproc)]
        # A port of its own for the rank-0 store: the default one may be held by another server of this module.
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(MASTER_PORT=str(free_port())),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.log: list[str] = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError("the server exited before serving:\n" + "".join(self.log))
            self.log.append(line)
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            if found:
                self.url = found.group(1)
                break
        else:
            raise AssertionError("the server did not start in time")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self):
        """Kill the server and every process below it (torchrun's ranks run in sessions of their own)."""
        kill_tree(self.proc.pid)
        self.proc.wait()


@pytest.fixture(scope="module")
def server(ckpt):
    served = Server(ckpt, "--api-key", API_KEY, "--max-queue", MAX_QUEUE, "--max-batch", MAX_QUEUE)
    yield served
    served.stop()


def post(server, path, body, key=API_KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=300, **kw)


def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, timeout=300, max_retries=0)


@pytest.mark.parallel
def test_openai_client_gets_completions_and_streamed_chat(server, tokenizer):
    api = client(server)
    assert [m.id for m in api.models.list().data] == ["tiny-chat"]
    done = api.completions.create(model="tiny-chat", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens <= 8
    assert done.usage.prompt_tokens == len(tokenizer.encode(PROMPTS[0]))
    messages = [{"role": "user", "content": "Say something."}]
    whole = api.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0)
    pieces, finish = [], None
    for chunk in api.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0,
                                             stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert len(pieces) > 2  # streamed, not one block
    assert "".join(pieces) == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    # n choices, each from its own seed: the same seed gives the same choices, another seed others.
    one = api.completions.create(prompt=PROMPTS[1], max_tokens=6, temperature=1.0, n=3, seed=11, model="tiny-chat")
    two = api.completions.create(prompt=PROMPTS[1], max_tokens=6, temperature=1.0, n=3, seed=11, model="tiny-chat")
    other = api.completions.create(prompt=PROMPTS[1], max_tokens=6, temperature=1.0, n=3, seed=12, model="tiny-chat")
    texts = [c.text for c in one.choices]
    assert texts == [c.text for c in two.choices] and texts != [c.text for c in other.choices]
    assert len(set(texts)) > 1 and one.usage.completion_tokens == 18


def forward_logprobs(ckpt: Path, ids: list[int], tmp_path: Path, nproc: int = 1) -> np.ndarray:
    tokens, out = tmp_path / "tokens.npy", tmp_path / "logits.npy"
    np.save(tokens, np.array([ids]))
    subprocess.run([sys.executable, "tools/forward.py", "--ckpt", str(ckpt), "--tokens", str(tokens), "--out",
                    str(out)], cwd=REPO, env=cpu_env(MASTER_PORT=str(free_port())), check=True, capture_output=True,
                   timeout=600)
    return torch.log_softmax(torch.from_numpy(np.load(out)[0]).double(), dim=-1).numpy()


@pytest.mark.parallel
def test_echo_logprobs_equal_the_forward_tool(server, ckpt, tmp_path, tokenizer):
    ids = tokenizer.encode("Scoring a prompt the way lm-eval does it, token by token.")
    reply = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 3}).json()
    logprobs = reply["choices"][0]["logprobs"]
    assert reply["choices"][0]["text"] == tokenizer.decode(ids) and logprobs["token_logprobs"][0] is None
    reference = forward_logprobs(ckpt, ids, tmp_path)
    expected = reference[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(logprobs["token_logprobs"][1:], expected, atol=1e-5, rtol=0)
    for position, top in enumerate(logprobs["top_logprobs"][1:]):
        best = np.sort(reference[position])[::-1][:3]
        np.testing.assert_allclose(sorted(top.values(), reverse=True), best[:len(top)], atol=1e-5, rtol=0)
    # Generated tokens' log-probabilities: those of the same forward over prompt + completion.
    reply = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 5, "temperature": 0, "logprobs": 0}).json()
    new = [tokenizer.encode(t) for t in reply["choices"][0]["logprobs"]["tokens"]]
    assert all(len(t) == 1 for t in new)
    full = ids + [t[0] for t in new]
    reference = forward_logprobs(ckpt, full, tmp_path)
    expected = reference[np.arange(len(ids) - 1, len(full) - 1), full[len(ids):]]
    np.testing.assert_allclose(reply["choices"][0]["logprobs"]["token_logprobs"], expected, atol=1e-5, rtol=0)
    # Greedy: each chosen token is the most likely one.
    assert all(np.argmax(reference[p]) == full[p + 1] for p in range(len(ids) - 1, len(full) - 1))


@pytest.mark.parallel
def test_greedy_text_equals_the_generate_tool(server, ckpt, tmp_path):
    out = tmp_path / "out.jsonl"
    subprocess.run([sys.executable, "tools/generate.py", "--ckpt", str(ckpt), "--prompt", PROMPTS[2],
                    "--max-new-tokens", "12", "--temperature", "0", "--out", str(out)], cwd=REPO,
                   env=cpu_env(MASTER_PORT=str(free_port())),
                   check=True, capture_output=True, timeout=600)
    expected = json.loads(out.read_text())["text"]
    reply = post(server, "/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 12, "temperature": 0}).json()
    assert reply["choices"][0]["text"] == expected


@pytest.mark.parallel
def test_sixteen_concurrent_clients_get_what_each_gets_alone(server):
    def ask(prompt):
        return post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0}).json()

    alone = [ask(p)["choices"][0]["text"] for p in PROMPTS]
    before = httpx.get(server.url + "/health").json()["batches"]
    answers = [None] * len(PROMPTS)

    def worker(i):
        answers[i] = ask(PROMPTS[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a["choices"][0]["text"] for a in answers] == alone
    batches = httpx.get(server.url + "/health").json()["batches"] - before
    assert batches < len(PROMPTS), f"16 concurrent requests ran in {batches} batches: nothing was batched"


@pytest.mark.parallel
def test_bad_requests_get_their_status(server):
    cases = [
        (post(server, "/v1/completions", {"prompt": "x"}, key=None), 401, "invalid_api_key"),
        (post(server, "/v1/completions", {"prompt": "x"}, key="wrong"), 401, "invalid_api_key"),
        (httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=60,
                    headers={"Authorization": f"Bearer {API_KEY}"}), 400, None),
        (post(server, "/v1/completions", {"prompt": "x", "max_tokens": 5000}), 400, "context_length_exceeded"),
        (post(server, "/v1/chat/completions", {"messages": []}), 400, None),
        (post(server, "/v1/completions", {"prompt": "x", "model": "gpt-4"}), 404, "model_not_found"),
        (post(server, "/v1/embeddings", {"input": "x"}), 404, None),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and (code is None or error["code"] == code)


@pytest.mark.parallel
def test_full_queue_is_503_and_a_disconnect_frees_its_rows(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    long = {"prompt": PROMPTS[3], "max_tokens": 4000, "temperature": 1.0, "n": MAX_QUEUE, "stream": True}
    with httpx.Client(timeout=300) as http:
        with http.stream("POST", server.url + "/v1/completions", json=long, headers=headers) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            busy = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2})
            assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
            assert busy.json()["error"]["code"] == "queue_full"
    # The client has gone: its rows are given back within a few steps, long before 4000 tokens each.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        health = httpx.get(server.url + "/health").json()
        if health["queued_rows"] == health["running_rows"] == 0 and health["rows_cancelled"] >= MAX_QUEUE:
            break
        time.sleep(0.2)
    assert health["rows_cancelled"] >= MAX_QUEUE and health["running_rows"] == 0, health
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200
    assert httpx.get(server.url + "/health").json()["new_tokens"] - health["new_tokens"] == 2
    assert health["new_tokens"] < MAX_QUEUE * 4000 // 2


@pytest.mark.parallel
def test_tp2_pp2_serves_the_same_tokens_as_tp1(server, ckpt):
    requests = [
        {"prompt": PROMPTS[:4], "max_tokens": 10, "temperature": 0},
        {"prompt": PROMPTS[4], "max_tokens": 10, "temperature": 0.8, "top_p": 0.9, "top_k": 50, "n": 2, "seed": 5},
        {"prompt": PROMPTS[5], "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2},
    ]
    tp1 = [post(server, "/v1/completions", body).json() for body in requests]
    wide = Server(ckpt, "--tp", 2, "--pp", 2, nproc=4)
    try:
        tp2pp2 = [httpx.post(wide.url + "/v1/completions", json=body, timeout=600).json() for body in requests]
    finally:
        wide.stop()
    for a, b in zip(tp1, tp2pp2):
        assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    a, b = tp1[2]["choices"][0]["logprobs"], tp2pp2[2]["choices"][0]["logprobs"]
    np.testing.assert_allclose(a["token_logprobs"][1:], b["token_logprobs"][1:], atol=1e-5, rtol=0)


@pytest.mark.parallel
def test_a_moe_served_at_ep2_answers_as_the_model_at_ep1(tmp_path, single_rank):
    """A tiny Qwen2-MoE served at --ep 2 (2 ranks, each with half of every MoE layer's experts): the greedy tokens
    equal the saved model's generation engine in this process (EP=1), their log-probabilities its plain forward."""
    from moe_reference import save_moe_checkpoint

    from megatron_qwen.config import TOKENIZER_VOCAB_SIZES
    from megatron_qwen.inference.engine import GenerationEngine
    from megatron_qwen.inference.sampling import SamplingParams
    from megatron_qwen.tokenizer import load_tokenizer

    ckpt = tmp_path / "tiny-moe"
    chunks = save_moe_checkpoint(ckpt)
    tokenizer = load_tokenizer(family="qwen1.5")
    vocab = TOKENIZER_VOCAB_SIZES["qwen1.5"]
    prompts = [tokenizer.encode(text) for text in PROMPTS[:3]]
    params = SamplingParams(max_new_tokens=8, temperature=0, stop_ids=tokenizer.generation_stop_ids(vocab))
    expected = GenerationEngine(chunks, vocab).generate(prompts, params)
    served = Server(ckpt, "--ep", 2, nproc=2)
    try:
        replies = [httpx.post(served.url + "/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0,
                                                                    "logprobs": 0}, timeout=600).json()
                   for ids in prompts]
    finally:
        served.stop()
    assert any("ep 2" in line for line in served.log)
    for reply, prompt, tokens in zip(replies, prompts, expected.tokens):
        choice = reply["choices"][0]
        assert choice["text"] == tokenizer.decode(tokens), (choice["text"], tokens)
        full = torch.tensor([prompt + tokens])
        with torch.no_grad():
            logits = chunks[0](full, torch.arange(full.shape[1])[None], None)[0].double()  # [s, vocab]
        reference = torch.log_softmax(logits, dim=-1)[torch.arange(len(prompt) - 1, full.shape[1] - 1), tokens]
        np.testing.assert_allclose(choice["logprobs"]["token_logprobs"], reference.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parallel
def test_sigterm_answers_the_requests_in_flight_then_exits(server):
    # The module's server, last: it is stopped here.
    answers = []
    asking = threading.Thread(target=lambda: answers.append(
        post(server, "/v1/completions", {"prompt": PROMPTS[6], "max_tokens": 100, "temperature": 0})))
    asking.start()
    deadline = time.monotonic() + 120
    while httpx.get(server.url + "/health").json()["running_rows"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    asking.join(timeout=300)
    assert server.proc.wait(timeout=120) == 0, "".join(server.log)
    reply = answers[0].json()
    assert answers[0].status_code == 200 and reply["choices"][0]["finish_reason"] in ("length", "stop"), reply
    assert any("finishing the queued requests" in line for line in server.log)
