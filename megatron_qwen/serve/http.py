"""The HTTP side of `megatron-qwen serve`: aiohttp on rank 0, in a thread of its own with its own event loop.

aiohttp is one well-kept package that is both the server and the streaming response (server-sent events), with
no ASGI layer between: the model runs in the main thread (collectives must), so the HTTP side only parses,
queues and writes. Handlers are cancelled when their client disconnects (aiohttp's ``handler_cancellation``),
which frees the request's rows. An API key, when set, is compared in constant time (`hmac.compare_digest`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading

from aiohttp import web

from megatron_qwen.serve import protocol
from megatron_qwen.serve.batching import Scheduler
from megatron_qwen.serve.protocol import Job, Limits, RequestError


def _error(exc: RequestError) -> web.Response:
    headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after is not None else None
    return web.json_response(exc.body(), status=exc.status, headers=headers)


class Api:
    """The routes: /v1/models, /v1/completions, /v1/chat/completions, /health."""

    def __init__(self, scheduler: Scheduler, tokenizer, limits: Limits, api_key: str | None):
        self.scheduler, self.tokenizer, self.limits = scheduler, tokenizer, limits
        self.api_key = api_key.encode() if api_key else None

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/health", self.health)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        if self.api_key is not None and request.path != "/health":
            given = request.headers.get("Authorization", "")
            token = given[7:].encode() if given.startswith("Bearer ") else b""
            if not hmac.compare_digest(token, self.api_key):
                return _error(RequestError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                           code="invalid_api_key"))
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status == 404 or exc.status == 405:
                return _error(RequestError(exc.status, f"{request.method} {request.path}: {exc.reason}"))
            raise
        except RequestError as exc:
            return _error(exc)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.limits.model, "object": "model", "created": 0, "owned_by": "megatron-qwen",
             "max_model_len": self.limits.max_positions},
        ]})

    async def health(self, request: web.Request) -> web.Response:
        queued, running = self.scheduler.rows_in_use()
        return web.json_response({"status": "draining" if self.scheduler.draining else "ok",
                                  "queued_rows": queued, "running_rows": running, **self.scheduler.stats})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, protocol.parse_completion, protocol.completion_response)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, protocol.parse_chat, protocol.chat_response)

    async def _serve(self, request: web.Request, parse, respond) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"the request body is not valid JSON: {exc}") from exc
        job = parse(body, self.tokenizer, self.limits)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job.sink = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        self.scheduler.submit(job)
        done = False
        try:
            if job.stream:
                response = await self._stream(request, job, events)
            else:
                while True:
                    kind, payload = await events.get()
                    if kind == "error":
                        raise payload
                    if kind == "done":
                        response = web.json_response(respond(job, payload, self.tokenizer))
                        break
            done = True
            return response
        finally:
            if not done:  # the client went away (the handler was cancelled) or the batch failed
                self.scheduler.cancel(job)

    async def _stream(self, request: web.Request, job: Job, events: asyncio.Queue) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        first = set()

        async def send(data: dict) -> None:
            await response.write(f"data: {json.dumps(data)}\n\n".encode())

        if job.kind == "chat":
            for choice in range(job.rows):
                await send(protocol.stream_chunk(job, choice, "", None, first=True))
                first.add(choice)
        while True:
            kind, payload = await events.get()
            if kind == "error":
                await send(payload.body())
                break
            if kind == "text":
                choice, piece, finish = payload
                if piece:
                    await send(protocol.stream_chunk(job, choice, piece, None))
                if finish:
                    await send(protocol.stream_chunk(job, choice, None, finish))
            elif kind == "done":
                if job.include_usage:
                    await send(protocol.usage_chunk(job, payload))
                break
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


class HttpThread:
    """The aiohttp server in a daemon thread; `port` is the bound one (useful with port 0)."""

    def __init__(self, api: Api, host: str, port: int):
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(api.application(), handler_cancellation=True, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, host, port)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, name="http", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Close the listener and the connections (every answer has been delivered by then)."""
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
