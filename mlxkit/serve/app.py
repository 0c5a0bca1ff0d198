"""The HTTP side: Starlette routes for the OpenAI endpoints, on the event loop's thread.

A request is validated and rendered to tokens here (rendering runs in the thread pool), takes a
place in the engine's queue (503 with Retry-After when it is full) and waits for its first
event; only then is the response started, so that whatever the runtime refuses (a prompt
longer than the context, say) still gets its status code. A stream ends with the OpenAI
`[DONE]` line, or with an error event if generation broke after it had started.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mlxkit.generate import GenerationResponse
from mlxkit.serve.chat import Prompt, image_parts, next_turn_prefix, render_chat
from mlxkit.serve.engine import Engine, Failed, Job
from mlxkit.serve.images import request_images
from mlxkit.serve.parse import Delta, OutputParser
from mlxkit.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    error_body,
    loads,
    new_id,
    now,
    parse,
    usage,
)

log = logging.getLogger("mlxkit.serve")
MAX_BODY_BYTES = 8 * 2**20
_DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks its client


@dataclass
class Settings:
    model_name: str
    max_tokens: int  # the most a request may ask for, and what it gets when it does not ask
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    media_dirs: tuple[Path, ...] = ()  # where image_url parts may name local files (resolved)


class _ClientGone(Exception):
    pass


class _Session:
    """One admitted request: its job, its events, and the place it holds in the queue."""

    def __init__(self, engine: Engine, job: Job, request: Request) -> None:
        self.engine, self.job, self.request = engine, job, request
        self._pending: asyncio.Task | None = None
        self._closed = False
        self.last: GenerationResponse | None = None

    async def next(self, watch_client: bool) -> GenerationResponse | Failed:
        """The next event. A non-streaming wait checks now and then that the client is still
        there (a streaming response is cancelled by Starlette when it goes)."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self.job.events.get())
        while True:
            done, _ = await asyncio.wait({self._pending}, timeout=_DISCONNECT_POLL_S)
            if done:
                event, self._pending = self._pending.result(), None
                return event
            if watch_client and await self.request.is_disconnected():
                raise _ClientGone

    async def responses(self, first: GenerationResponse, watch_client: bool):
        """GenerationResponses from `first` to the one that finishes; a failure on the way
        raises RequestError (its status tells a broken generation from a refused one)."""
        event: GenerationResponse | Failed = first
        while True:
            if isinstance(event, Failed):
                raise RequestError(event.message, event.status, kind=_kind(event.status))
            self.last = event
            yield event
            if event.finish_reason is not None:
                return
            event = await self.next(watch_client)

    def close(self) -> None:
        """Stops the generation if it still runs and frees the place (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.job.cancelled.set()
        if self._pending is not None:
            self._pending.cancel()
        self.engine.release()


def _kind(status: int) -> str:
    return {400: "invalid_request_error", 503: "server_busy"}.get(status, "server_error")


class _EventStream(StreamingResponse):
    """Server-sent events whose session is closed however the response ends."""

    def __init__(self, events: AsyncIterator[str], session: _Session) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.session = session

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.session.close()


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


class Api:
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine, self.settings = engine, settings

    # ------------------------------------------------------------------ request plumbing

    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise RequestError("invalid or missing API key (Authorization: Bearer KEY)", 401)

    async def _body(self, request: Request) -> dict:
        self._authorize(request)
        limit = self.settings.max_body_bytes
        too_large = RequestError(f"the request body is larger than {limit} bytes", 413)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return loads(bytes(body))

    def _render(self, req: ChatRequest) -> Prompt:
        """The request's tokens, its images prepared and their pads expanded (on a worker
        thread: decoding and resizing pictures takes a while)."""
        model, tokenizer = self.engine.model, self.engine.tokenizer
        images = request_images(model, image_parts(req.messages), self.settings.media_dirs)
        return render_chat(tokenizer, req, images)

    def _prepare_next_turn(
        self, req: ChatRequest, job: Job, parser: OutputParser, content: str, reasoning: str
    ) -> None:
        """Has the engine prefill, while idle, what the conversation's next request will start
        with (runs on a worker thread after the answer is out)."""
        reply: dict = {"role": "assistant", "content": content}
        if reasoning:
            reply["reasoning_content"] = reasoning
        if parser.calls:
            reply["tool_calls"] = [c.template() for c in parser.calls]
        try:
            images = job.images if self.engine.model.has_vision else None
            tokens = next_turn_prefix(self.engine.tokenizer, req, reply, images)
        except Exception:  # only an optimisation: never let it disturb serving
            log.exception("rendering the next turn failed")
            return
        if tokens:
            self.engine.prepare(tokens, [v.key for v in job.images])

    def _after_answer(self, req, job: Job, parser, content: str, reasoning: str) -> None:
        if self.engine.pool.max_bytes:
            asyncio.get_running_loop().run_in_executor(
                None, self._prepare_next_turn, req, job, parser, content, reasoning
            )

    def _max_tokens(self, requested: int | None, param: str) -> int:
        cap = self.settings.max_tokens
        if requested is not None and requested > cap:
            raise RequestError(
                f"{param} must be at most {cap} (the server's --max-tokens)", param=param
            )
        return requested or cap

    async def _start(self, request: Request, job: Job, stream: bool) -> tuple[_Session, object]:
        """Queues the job and waits for its first token; raises RequestError for a full queue,
        a refused request or a failed generation."""
        if not self.engine.admit():
            raise RequestError(
                f"the server is busy ({self.engine.max_in_flight - 1} requests queued); retry later",
                503,
                kind="server_busy",
                headers={"Retry-After": str(self.engine.retry_after())},
            )
        session = _Session(self.engine, job, request)
        try:
            self.engine.submit(job)
            first = await session.next(watch_client=True)
            if isinstance(first, Failed):
                raise RequestError(first.message, first.status, kind=_kind(first.status))
            return session, session.responses(first, watch_client=not stream)
        except BaseException:
            session.close()
            raise

    # ------------------------------------------------------------------ endpoints

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.settings.model_name})

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        model = {
            "id": self.settings.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "mlxkit",
        }
        return JSONResponse({"object": "list", "data": [model]})

    async def stats(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"model": self.settings.model_name, **self.engine.stats()})

    async def chat(self, request: Request) -> Response:
        req = parse(ChatRequest, await self._body(request))
        max_tokens = self._max_tokens(
            req.requested_max_tokens,
            "max_completion_tokens" if req.max_completion_tokens else "max_tokens",
        )
        prompt = await run_in_threadpool(self._render, req)
        parser = OutputParser(prompt.reasoning, req.tool_specs)
        job = Job(
            prompt.tokens,
            {**req.sampling(), "max_tokens": max_tokens},
            asyncio.get_running_loop(),
            prompt.snapshot_at,
            prompt.images,
        )
        try:
            session, responses = await self._start(request, job, req.stream)
        except _ClientGone:
            return Response(status_code=499)
        meta = {"id": new_id("chatcmpl"), "created": now(), "model": self.settings.model_name}
        if req.stream:
            chunks = self._chat_chunks(session, responses, parser, meta, req)
            return _EventStream(chunks, session)
        try:
            deltas = []
            async for r in responses:
                deltas += parser.feed(r.text)
            deltas += parser.finish()
        except _ClientGone:
            return Response(status_code=499)
        finally:
            session.close()
        message: dict = {"role": "assistant", "content": "".join(d.content for d in deltas) or None}
        if parser.calls:
            message["tool_calls"] = [c.openai() for c in parser.calls]
        elif message["content"] is None:
            message["content"] = ""
        reasoning = "".join(d.reasoning for d in deltas)
        if reasoning:
            message["reasoning_content"] = reasoning
        self._after_answer(req, session.job, parser, message["content"] or "", reasoning)
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": _finish(session.last, parser),
        }
        return JSONResponse(
            {**meta, "object": "chat.completion", "choices": [choice], "usage": _usage(session)}
        )

    async def _chat_chunks(self, session, responses, parser, meta, req: ChatRequest):
        def chunk(delta: dict, finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse({**meta, "object": "chat.completion.chunk", "choices": [choice]})

        def wire(d: Delta) -> dict:
            if d.tool_call is not None:
                index = next(i for i, c in enumerate(parser.calls) if c is d.tool_call)
                return {"tool_calls": [d.tool_call.openai(index)]}
            return {"reasoning_content": d.reasoning} if d.reasoning else {"content": d.content}

        yield chunk({"role": "assistant", "content": ""})
        content = reasoning = ""
        try:
            async for r in responses:
                for d in parser.feed(r.text):
                    content, reasoning = content + d.content, reasoning + d.reasoning
                    yield chunk(wire(d))
            for d in parser.finish():
                content, reasoning = content + d.content, reasoning + d.reasoning
                yield chunk(wire(d))
        except RequestError as e:
            yield _sse(e.body())
            return
        self._after_answer(req, session.job, parser, content, reasoning)
        yield chunk({}, _finish(session.last, parser))
        if req.include_usage:
            yield _sse(
                {**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(session)}
            )
        yield _sse("[DONE]")

    async def completions(self, request: Request) -> Response:
        req = parse(CompletionRequest, await self._body(request))
        max_tokens = self._max_tokens(req.max_tokens, "max_tokens")
        tokens = await self._completion_tokens(req.single_prompt)
        job = Job(tokens, {**req.sampling(), "max_tokens": max_tokens}, asyncio.get_running_loop())
        try:
            session, responses = await self._start(request, job, req.stream)
        except _ClientGone:
            return Response(status_code=499)
        meta = {"id": new_id("cmpl"), "created": now(), "model": self.settings.model_name}
        if req.stream:
            return _EventStream(self._completion_chunks(session, responses, meta, req), session)
        try:
            text = "".join([r.text async for r in responses])
        except _ClientGone:
            return Response(status_code=499)
        finally:
            session.close()
        choice = _text_choice(text, session.last.finish_reason)
        body = {**meta, "object": "text_completion", "choices": [choice]}
        return JSONResponse({**body, "usage": _usage(session)})

    async def _completion_tokens(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return await run_in_threadpool(self.engine.tokenizer.encode, prompt)
        vocab = self.engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise RequestError(f"token ids must be in [0, {vocab})", param="prompt")
        return list(prompt)

    async def _completion_chunks(self, session, responses, meta: dict, req: CompletionRequest):
        try:
            async for r in responses:
                choice = _text_choice(r.text, r.finish_reason)
                yield _sse({**meta, "object": "text_completion", "choices": [choice]})
        except RequestError as e:
            yield _sse(e.body())
            return
        if req.include_usage:
            usage_chunk = {"object": "text_completion", "choices": [], "usage": _usage(session)}
            yield _sse({**meta, **usage_chunk})
        yield _sse("[DONE]")


def _text_choice(text: str, finish: str | None) -> dict:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


def _finish(last: GenerationResponse, parser: OutputParser) -> str:
    return "tool_calls" if parser.calls and last.finish_reason == "stop" else last.finish_reason


def _usage(session: _Session) -> dict:
    r = session.last
    return usage(r.prompt_tokens, session.job.cached, r.generation_tokens, r.drafted, r.accepted)


async def _request_error(request: Request, exc: RequestError) -> Response:
    return JSONResponse(exc.body(), exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {
        404: f"no such endpoint: {request.method} {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }
    body = error_body(message.get(exc.status_code, str(exc.detail)), "invalid_request_error")
    return JSONResponse(body, exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    return JSONResponse(error_body(f"{type(exc).__name__}: {exc}", "server_error"), 500)


def create_app(engine: Engine, settings: Settings) -> Starlette:
    api = Api(engine, settings)
    routes = [
        Route("/health", api.health),
        Route("/v1/models", api.models),
        Route("/v1/stats", api.stats),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ]
    handlers = {RequestError: _request_error, HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, exception_handlers=handlers)
