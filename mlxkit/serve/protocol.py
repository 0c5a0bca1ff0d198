"""The OpenAI wire format: request bodies as pydantic models, the error body every failure gets,
and the response objects.

Requests are validated strictly (a string where a number belongs is an error, not coerced);
fields this server does not know are ignored, as OpenAI-compatible servers do, since clients
send vendor fields of their own. Fields it knows but cannot honour (n > 1, penalties other
than repetition_penalty) are refused with a 400 that says so, rather than silently ignored.
"""

from __future__ import annotations

import json
import time
import typing
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlxkit.generate import MAX_LOGPROBS
from mlxkit.structured import GrammarError, grammar_of

if typing.TYPE_CHECKING:
    from mlxkit.response import DraftReport

MAX_STOP_STRINGS = 16
MAX_JSON_DEPTH = 64  # far more than any request needs; deeper bodies cost recursion, not data


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI error body with this status."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.kind = message, status, param, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param)


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def loads(raw: bytes) -> dict:
    """The request body as a JSON object. NaN and Infinity are not JSON and are refused (Python's
    json module would accept them); so are strings holding a lone UTF-16 surrogate (`"\\udc80"`:
    valid JSON escapes, but not text, and nothing downstream can encode them) and nesting deeper
    than MAX_JSON_DEPTH (100,000 `[` would exhaust the parser's recursion)."""

    def no_constants(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(raw, parse_constant=no_constants)
    except RecursionError:
        raise RequestError(_too_deep()) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    _check_values(data)
    return data


def _too_deep() -> str:
    return f"the request body is nested more than {MAX_JSON_DEPTH} levels deep"


def _check_values(data: dict) -> None:
    """Walks the parsed body without recursion: its depth, and every string (keys too) as
    UTF-8."""
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(
                    "the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff): "
                    "not text"
                ) from None
        elif isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise RequestError(_too_deep())
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)


def parse(model: type[BaseModel], data: dict) -> Any:
    """Validates a body; the deepest problem (a union's other branches fail higher up, on the
    type) becomes a 400 naming the field."""
    try:
        request = model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        err = max(errors, key=lambda x: len(x["loc"]))
        param = _param_name(model, err["loc"])
        raise RequestError(f"{param}: {err['msg']}" if param else err["msg"], param=param) from None
    request.check()
    return request


def _param_name(model: type[BaseModel], loc: tuple) -> str:
    """('messages', 0, 'content', 'list[...]', 0, 'text') -> 'messages[0].content[0].text':
    list indices and the names of fields, followed through the models; pydantic's union branch
    names ('str', 'list[int]', ...) are not fields and are left out."""
    name, models = "", [model]
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
            continue
        field = next((m.model_fields[part] for m in models if part in m.model_fields), None)
        if field is None:
            continue
        name += f".{part}" if name else part
        models = _models_in(field.annotation)
    return name


def _models_in(annotation: object) -> list[type[BaseModel]]:
    """The models a field's type holds (through unions, lists and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    def check(self) -> None:
        """Rules pydantic's field types cannot say."""


# --------------------------------------------------------------------------- chat messages


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Strict):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's format)


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class StreamOptions(_Strict):
    include_usage: bool = False


# --------------------------------------------------------------------------- requests


class _Generation(_Strict):
    """What chat and text completions share: sampling, stop strings, streaming."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # -1 (vLLM's "off") is the same as 0
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    logit_bias: dict[str, float] | None = None

    def check(self) -> None:
        if self.n != 1:
            raise RequestError("only n=1 is supported", param="n")
        for key, bias in (self.logit_bias or {}).items():
            if not key.isascii() or not key.isdigit():
                raise RequestError(
                    f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
                )
            if not -100 <= bias <= 100:
                raise RequestError(
                    f"logit_bias values must be in [-100, 100], got {bias}", param="logit_bias"
                )
        if "" in self.stop_strings:
            raise RequestError("a stop string may not be empty", param="stop")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise RequestError(f"{name} is not supported; use repetition_penalty", param=name)
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self) -> dict:
        """stream_generate's keyword arguments (max_tokens is the server's to settle)."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": max(self.top_k, 0),
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "stop": self.stop_strings,
            "logit_bias": {int(k): v for k, v in (self.logit_bias or {}).items()} or None,
            "logprobs": self.n_logprobs,
        }


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        self._check_tool_choice()
        if self.response_format is not None:
            try:
                grammar_of(self.response_format, None)
            except GrammarError as e:
                raise RequestError(str(e), param="response_format") from None
        thinking = (self.chat_template_kwargs or {}).get("enable_thinking", True)
        if not isinstance(thinking, bool):
            raise RequestError(
                "chat_template_kwargs.enable_thinking must be true or false",
                param="chat_template_kwargs.enable_thinking",
            )

    @property
    def n_logprobs(self) -> int | None:
        """How many top alternatives to give with each token's log-probability (None: none)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def sampling(self) -> dict:
        return {**super().sampling(), "response_format": self.response_format}

    def _check_tool_choice(self) -> None:
        """ "required" or {"type": "function", "function": {"name": ...}} naming an offered
        tool; not together with a response_format (both would constrain the answer)."""
        choice = self.tool_choice
        if choice in (None, "auto", "none"):
            return
        if not self.tools:
            raise RequestError("a forced tool_choice needs tools", param="tool_choice")
        if isinstance(choice, dict):
            function = choice.get("function")
            named = function.get("name") if isinstance(function, dict) else None
            if choice.get("type") != "function" or not isinstance(named, str):
                raise RequestError(
                    'tool_choice must be "auto", "none", "required" or '
                    '{"type": "function", "function": {"name": ...}}',
                    param="tool_choice",
                )
            if named not in [t.function.name for t in self.tools]:
                raise RequestError(
                    f"tool_choice names no tool offered: {named!r}", param="tool_choice"
                )
        if self.response_format not in (None, {"type": "text"}):
            raise RequestError(
                "response_format cannot be combined with a forced tool_choice",
                param="response_format",
            )

    @property
    def forced_tool(self) -> tuple[bool, str | None]:
        """(whether the answer must be tool calls, the one function it must call if named)."""
        if isinstance(self.tool_choice, dict):
            return True, self.tool_choice["function"]["name"]
        return self.tool_choice == "required", None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def tool_specs(self) -> list[dict] | None:
        """The tools as the chat template reads them (None when there are none to offer)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    @property
    def template_kwargs(self) -> dict[str, Any]:
        """chat_template_kwargs without the names the server passes itself."""
        reserved = {"messages", "tools", "add_generation_prompt", "enable_thinking"}
        return {k: v for k, v in (self.chat_template_kwargs or {}).items() if k not in reserved}

    @property
    def enable_thinking(self) -> bool:
        return (self.chat_template_kwargs or {}).get("enable_thinking", True)


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def check(self) -> None:
        super().check()
        batch = (
            isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int)
        )
        if batch and len(self.prompt) != 1:
            raise RequestError("only one prompt per request is supported", param="prompt")
        if self.echo:
            raise RequestError("echo is not supported", param="echo")
        if self.suffix:
            raise RequestError("suffix is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise RequestError("only best_of=1 is supported", param="best_of")

    @property
    def n_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        return p[0] if isinstance(p, list) and p and isinstance(p[0], str | list) else p


# --------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(
    prompt_tokens: int,
    cached: int,
    completion_tokens: int,
    drafted: int,
    accepted: int,
    drafting: DraftReport | None = None,
) -> dict:
    """Token counts; MTP drafts appear as OpenAI's predicted-output counts (accepted and
    rejected draft tokens), and what the drafting chose and why under "mtp"."""
    mtp = {"mtp": drafting.as_dict()} if drafting is not None else {}
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {
            "accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": drafted - accepted,
        },
        **mtp,
    }
