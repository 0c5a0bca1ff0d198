"""The HTTP side: Starlette routes for the OpenAI endpoints, on the event loop's thread.

A request is validated, takes a place in the engine's queue (503 with Retry-After when it is
full: before any image is decoded or text tokenized, so that a full server does that work for
no one), is rendered to tokens (in the thread pool) and waits for its first event; only then
is the response started, so that whatever the runtime refuses (a prompt longer than the
context, say) still gets its status code. A stream ends with the OpenAI `[DONE]` line, after
an error event if generation broke (or the server stopped) after it had started. A client that
goes away, while its request waits or generates, stops its generation.
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
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mlxkit.generate import GenerationResponse
from mlxkit.serve.chat import Prompt, TextBound, image_parts, next_turn_prefix, render_chat
from mlxkit.serve.engine import Engine, Failed, Job
from mlxkit.serve.images import request_images
from mlxkit.serve.parse import Delta, OutputParser, tool_call_grammar
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


@dataclass
class Settings:
    model_name: str
    max_tokens: int  # the most a request may ask for, and what it gets when it does not ask
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    media_dirs: tuple[Path, ...] = ()  # where image_url parts may name local files (resolved)


class _ClientGone(Exception):
    """The client closed its connection (answered 499, which it never reads)."""


class _Session:
    """One admitted request: the place it holds in the queue, then its job and its events."""

    def __init__(self, engine: Engine, request: Request) -> None:
        self.engine, self.request = engine, request
        self.job: Job | None = None
        self._pending: asyncio.Task | None = None  # the next event
        self._gone: asyncio.Task | None = None  # ends when the client disconnects
        self._watching = True
        self._closed = False
        self.last: GenerationResponse | None = None

    async def start(self, job: Job, stream: bool) -> AsyncIterator[GenerationResponse]:
        """Queues the job and waits for its first token: the responses from there on. Raises
        RequestError for a refused request or a failed generation, _ClientGone if the client
        went away meanwhile. Once a stream starts, Starlette watches its client instead."""
        self.job = job
        self.engine.submit(job)
        first = await self.next()
        if isinstance(first, Failed):
            raise RequestError(first.message, first.status, kind=_kind(first.status))
        if stream:
            self._watching = False
            self._unwatch()
        return self.responses(first)

    async def next(self) -> GenerationResponse | Failed:
        """The next event, or _ClientGone as soon as the client disconnects (while watching)."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self.job.events.get())
        if self._watching and self._gone is None:
            self._gone = asyncio.ensure_future(_disconnected(self.request))
        waits = {self._pending} if self._gone is None else {self._pending, self._gone}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if not self._pending.done():
            raise _ClientGone
        event, self._pending = self._pending.result(), None
        return event

    async def responses(self, first: GenerationResponse | Failed):
        """GenerationResponses from `first` to the one that finishes; a failure on the way
        raises RequestError (its status tells a broken generation from a refused one)."""
        event = first
        while True:
            if isinstance(event, Failed):
                raise RequestError(event.message, event.status, kind=_kind(event.status))
            self.last = event
            yield event
            if event.finish_reason is not None:
                return
            event = await self.next()

    def _unwatch(self) -> None:
        if self._gone is not None:
            self._gone.cancel()
            self._gone = None

    def close(self) -> None:
        """Stops the generation if it still runs and frees the place (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.job is not None:
            self.job.cancelled.set()
        if self._pending is not None:
            self._pending.cancel()
        self._unwatch()
        self.engine.release()


async def _disconnected(request: Request) -> None:
    """Returns once the client has disconnected. The body has been read by then, so the
    server's next message is the disconnect (a pipelined request's bytes are skipped)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
        context = engine.model.config.max_position_embeddings
        self.text_bound = TextBound.of(engine.tokenizer, context)

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
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
        except ClientDisconnect:  # an upload the client gave up: nobody to answer
            raise _ClientGone from None
        return loads(bytes(body))

    def _render(self, req: ChatRequest) -> Prompt:
        """The request's tokens, its images prepared and their pads expanded (on a worker
        thread: decoding and resizing pictures takes a while)."""
        model, tokenizer = self.engine.model, self.engine.tokenizer
        images = request_images(model, image_parts(req.messages), self.settings.media_dirs)
        return render_chat(tokenizer, req, images, self.text_bound)

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

    def _admit(self, request: Request) -> _Session:
        """A place in the queue, or a 503 with Retry-After when it is full."""
        if not self.engine.admit():
            raise RequestError(
                f"the server is busy ({self.engine.max_in_flight - 1} requests queued); retry later",
                503,
                kind="server_busy",
                headers={"Retry-After": str(self.engine.retry_after())},
            )
        return _Session(self.engine, request)

    def _scored(self, r: GenerationResponse) -> bool:
        """Whether the token gets a log-probability: all but an end-of-turn token (it is not
        text; usage still counts it)."""
        return not (r.finish_reason == "stop" and r.token in self.engine.tokenizer.eos_token_ids)

    def _token_text(self, token: int) -> tuple[str, list[int]]:
        raw = self.engine.tokenizer.token_bytes(token)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _chat_logprobs(self, req: ChatRequest, generated: list) -> dict | None:
        """OpenAI's chat `logprobs` for these tokens (None when the request did not ask)."""
        if req.n_logprobs is None:
            return None

        def entry(token: int, logprob: float) -> dict:
            text, raw = self._token_text(token)
            return {"token": text, "logprob": logprob, "bytes": raw}

        content = [
            {
                **entry(r.token, r.logprobs.logprob),
                "top_logprobs": [entry(t, v) for t, v in r.logprobs.top],
            }
            for r in generated
            if self._scored(r)
        ]
        return {"content": content, "refusal": None}

    def _completion_logprobs(self, req: CompletionRequest, generated: list, offset: int):
        """OpenAI's (legacy) completions `logprobs` for these tokens, the first at `offset` in
        the text (None when the request did not ask)."""
        if req.n_logprobs is None:
            return None
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for r in generated:
            if self._scored(r):
                out["tokens"].append(self._token_text(r.token)[0])
                out["token_logprobs"].append(r.logprobs.logprob)
                top = {self._token_text(t)[0]: v for t, v in r.logprobs.top}
                out["top_logprobs"].append(top)
                out["text_offset"].append(offset)
            offset += len(r.text)
        return out

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
        session, streaming = self._admit(request), False
        try:
            prompt = await run_in_threadpool(self._render, req)
            options = {**req.sampling(), "max_tokens": max_tokens}
            forced, name = req.forced_tool
            if forced:  # the answer is tool calls: a grammar of the offered ones
                parallel = req.parallel_tool_calls is not False
                grammar = tool_call_grammar(self.engine.tokenizer, req.tool_specs, name, parallel)
                options["grammar"] = grammar
            job = Job(
                prompt.tokens,
                options,
                asyncio.get_running_loop(),
                prompt.snapshot_at,
                prompt.images,
            )
            responses = await session.start(job, req.stream)
            parser = OutputParser(prompt.reasoning, req.tool_specs)
            meta = {"id": new_id("chatcmpl"), "created": now(), "model": self.settings.model_name}
            if req.stream:
                streaming = True  # the stream closes the session when it ends
                return _EventStream(
                    self._chat_chunks(session, responses, parser, meta, req), session
                )
            deltas, generated = [], []
            async for r in responses:
                deltas += parser.feed(r.text)
                generated.append(r)
            deltas += parser.finish()
        finally:
            if not streaming:
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
            "logprobs": self._chat_logprobs(req, generated),
            "finish_reason": _finish(session.last, parser),
        }
        return JSONResponse(
            {**meta, "object": "chat.completion", "choices": [choice], "usage": _usage(session)}
        )

    async def _chat_chunks(self, session, responses, parser, meta, req: ChatRequest):
        scored: list[GenerationResponse] = []  # tokens whose log-probabilities are not sent yet

        def chunk(delta: dict, finish: str | None = None) -> str:
            logprobs = self._chat_logprobs(req, scored)
            scored.clear()
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return _sse({**meta, "object": "chat.completion.chunk", "choices": [choice]})

        def wire(d: Delta) -> dict:
            if d.tool_call is not None:
                return {"tool_calls": [d.tool_call.openai()]}
            return {"reasoning_content": d.reasoning} if d.reasoning else {"content": d.content}

        yield chunk({"role": "assistant", "content": ""})
        content = reasoning = ""
        try:
            async for r in responses:
                scored.append(r)
                for d in parser.feed(r.text):
                    content, reasoning = content + d.content, reasoning + d.reasoning
                    yield chunk(wire(d))
            for d in parser.finish():
                content, reasoning = content + d.content, reasoning + d.reasoning
                yield chunk(wire(d))
        except RequestError as e:
            yield _sse(e.body())
            yield _sse("[DONE]")
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
        session, streaming = self._admit(request), False
        try:
            tokens = await self._completion_tokens(req.single_prompt)
            options = {**req.sampling(), "max_tokens": max_tokens}
            # all but the last token kept: the same prompt again reuses it (see chat.py)
            job = Job(tokens, options, asyncio.get_running_loop(), len(tokens) - 1)
            responses = await session.start(job, req.stream)
            meta = {"id": new_id("cmpl"), "created": now(), "model": self.settings.model_name}
            if req.stream:
                streaming = True  # the stream closes the session when it ends
                return _EventStream(self._completion_chunks(session, responses, meta, req), session)
            generated = [r async for r in responses]
        finally:
            if not streaming:
                session.close()
        text = "".join(r.text for r in generated)
        logprobs = self._completion_logprobs(req, generated, 0)
        choice = _text_choice(text, session.last.finish_reason, logprobs)
        body = {**meta, "object": "text_completion", "choices": [choice]}
        return JSONResponse({**body, "usage": _usage(session)})

    async def _completion_tokens(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            self.text_bound.check(prompt, "prompt")
            return await run_in_threadpool(self.engine.tokenizer.encode, prompt)
        vocab = self.engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise RequestError(f"token ids must be in [0, {vocab})", param="prompt")
        return list(prompt)

    async def _completion_chunks(self, session, responses, meta: dict, req: CompletionRequest):
        offset = 0  # of this token's text in the completion
        try:
            async for r in responses:
                logprobs = self._completion_logprobs(req, [r], offset)
                choice = _text_choice(r.text, r.finish_reason, logprobs)
                offset += len(r.text)
                yield _sse({**meta, "object": "text_completion", "choices": [choice]})
        except RequestError as e:
            yield _sse(e.body())
            yield _sse("[DONE]")
            return
        if req.include_usage:
            usage_chunk = {"object": "text_completion", "choices": [], "usage": _usage(session)}
            yield _sse({**meta, **usage_chunk})
        yield _sse("[DONE]")


def _text_choice(text: str, finish: str | None, logprobs: dict | None) -> dict:
    return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}


def _finish(last: GenerationResponse, parser: OutputParser) -> str:
    return "tool_calls" if parser.calls and last.finish_reason == "stop" else last.finish_reason


def _usage(session: _Session) -> dict:
    r = session.last
    return usage(
        r.prompt_tokens, session.job.cached, r.generation_tokens, r.drafted, r.accepted, r.drafting
    )


async def _request_error(request: Request, exc: RequestError) -> Response:
    return JSONResponse(exc.body(), exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {
        404: f"no such endpoint: {request.method} {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }
    body = error_body(message.get(exc.status_code, str(exc.detail)), "invalid_request_error")
    return JSONResponse(body, exc.status_code, headers=exc.headers)


async def _client_gone(request: Request, exc: _ClientGone) -> Response:
    return Response(status_code=499)


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
    handlers = {
        RequestError: _request_error,
        HTTPException: _http_error,
        _ClientGone: _client_gone,
        Exception: _server_error,
    }
    return Starlette(routes=routes, exception_handlers=handlers)
