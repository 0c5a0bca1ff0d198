"""Generated text, as it streams, split into reasoning, content and Qwen 3.5 tool calls.

Qwen 3.5 reasons inside `<think>…</think>` (the chat template opens the block in the prompt when
thinking is on) and calls tools in the XML form its chat template teaches:

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Parameter values are text; the tool's JSON schema says which ones are not strings. The template
writes objects and arrays with `tojson` and every other value with Jinja's `string` (so a
boolean reads `True`), and the parser reads them back the same way.

Pieces are cut as the template reads an assistant turn back: reasoning without the blank lines
around it, content without the newlines after `</think>` and without trailing whitespace, so
the history a client sends back renders as what was generated.

Tool calls stream as they are written: the name once `<function=NAME>` is complete, then the
arguments as JSON text in fragments (a string parameter's text as it comes, other values when
their parameter closes), so the fragments of a call joined are exactly its non-streamed
`arguments`. A block commits to being a call at `<function=NAME>`; from there it is read
tolerantly, as small models write it: a missing `</parameter>` or `</function>` ends at the
next tag, text between tags is skipped, a repeated parameter keeps its first value, and a
`<tool_call>` after `</function>` opens the next call. A block in the JSON form of earlier
Qwen models (`{"name": ..., "arguments": {...}}`) is read when it closes. Any other block is
not a call: it comes back whole, as content text, once it closes; never half a call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from mlxkit.structured import Grammar

THINK_CLOSE = "</think>"
THINK_OPEN = "<think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"
PARAMETER_OPEN, PARAMETER_CLOSE = "<parameter=", "</parameter>"
_NAMED = re.compile(r"<(?:function|parameter)=([^<>\n]+)>")  # a name ends at ">", never spans


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = ""
    arguments_json: str = ""  # the arguments as JSON text, as far as they have streamed

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def template(self) -> dict:
        """The call as chat templates read it back (arguments as an object)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }

    def openai(self, index: int | None = None) -> dict:
        call = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments_json},
        }
        return call if index is None else {"index": index, **call}


@dataclass
class CallDelta:
    """A piece of a streamed tool call: the first names it, the others extend its arguments."""

    call: ToolCall
    index: int
    arguments: str  # JSON text that follows what the call's earlier pieces carried
    first: bool = False

    def openai(self) -> dict:
        """OpenAI's streamed `tool_calls` item: id, type and name only in the first."""
        if self.first:
            function = {"name": self.call.name, "arguments": self.arguments}
            return {
                "index": self.index,
                "id": self.call.id,
                "type": "function",
                "function": function,
            }
        return {"index": self.index, "function": {"arguments": self.arguments}}


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_call: CallDelta | None = None


def parse_tool_call(text: str, tools: list[dict] | None) -> ToolCall | None:
    """The call inside one <tool_call> block (its text without the tags), None if it is not a
    call."""
    block = _Block(tools, 0)
    block.feed(text)
    block.finish()
    return block.call


def _properties(name: str, tools: list[dict] | None) -> dict:
    for tool in tools or []:
        function = tool.get("function", {})
        if function.get("name") == name:
            return (function.get("parameters") or {}).get("properties") or {}
    return {}


def _value(text: str, json_type: str | list | None):
    """A parameter's value: text for strings; JSON where the schema says so, or (without a
    schema) where the text is a JSON object or array; the text itself when it does not parse.
    The template writes booleans and null with Python's str(), so True/False/None count too."""
    types = _types(json_type)
    if "string" in types:
        return text
    if "boolean" in types and text in _PYTHON_BOOLS:
        return _PYTHON_BOOLS[text]
    if "null" in types and text in ("None", "null"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if types == {None} and not isinstance(value, dict | list):
        return text
    return value


def _types(json_type: str | list | None) -> set:
    return set(json_type) if isinstance(json_type, list) else {json_type}


_PYTHON_BOOLS = {"True": True, "False": False, "true": True, "false": False}


def _held(text: str, tags: tuple[str, ...]) -> int:
    """How many characters at the end of `text` may be the start of one of `tags`."""
    return max(
        (
            n
            for tag in tags
            for n in range(min(len(tag) - 1, len(text)), 0, -1)
            if tag.startswith(text[-n:])
        ),
        default=0,
    )


def _first(text: str, tags: tuple[str, ...]) -> tuple[int, str]:
    """The first of `tags` in `text`: (position, tag), (-1, "") if none is there."""
    found = [(i, tag) for tag in tags if (i := text.find(tag)) >= 0]
    return min(found) if found else (-1, "")


class _Block:
    """One `<tool_call>` block read as it streams (see the module docstring). `feed` returns
    the call's pieces; once the block has ended, `closed` is set, `rest` holds the text after
    it, `reopen` says a `<tool_call>` ended it, and `content` is the block's text when it is
    not a call (to be handed out as content)."""

    _BODY_TAGS = (PARAMETER_OPEN, FUNCTION_CLOSE, CALL_CLOSE)
    _VALUE_TAGS = (PARAMETER_CLOSE, PARAMETER_OPEN, FUNCTION_CLOSE, CALL_CLOSE)

    def __init__(self, tools: list[dict] | None, index: int) -> None:
        self.tools, self.index = tools, index
        self.state = "head"  # head, json, text: not a call yet; body, value, tail: a call
        self.call: ToolCall | None = None
        self.closed = self.reopen = False
        self.rest = ""
        self.content: str | None = None
        self._text = ""  # everything fed before the call committed (its text if it is none)
        self._buf = ""  # unread
        self._schema: dict = {}
        self._key: str | None = None  # the open parameter (None: a repeated one, skipped)
        self._value = ""  # its text so far
        self._started = False  # the newline after <parameter=...> is behind

    def feed(self, text: str) -> list[Delta]:
        self._buf += text
        if self.call is None:
            self._text += text
        out: list[Delta] = []
        while not self.closed and self._step(out):
            pass
        return out

    def finish(self) -> list[Delta]:
        """Generation ended inside the block: an open call is closed, anything else is text."""
        out: list[Delta] = []
        if self.state == "value":
            self._end_value(self._buf, out)
        if self.state in ("body", "value"):
            self._close_arguments(out)
        elif self.state != "tail" and not self._json_call(self._text, out):
            self.content = CALL_OPEN + self._text
        self._buf, self.closed = "", True
        return out

    def _step(self, out: list[Delta]) -> bool:
        """Reads what it can of the buffer; False when it must wait for more text."""
        buf = self._buf
        if self.state == "head":
            s = buf.lstrip()
            m = _NAMED.match(s)
            if m and s.startswith(FUNCTION_OPEN):
                self._commit(m.group(1).strip().strip("\"'"), out)
                self._buf, self.state = s[m.end() :], "body"
                return True
            name = s[len(FUNCTION_OPEN) :]
            if (FUNCTION_OPEN.startswith(s) or s.startswith(FUNCTION_OPEN)) and not any(
                c in name for c in "<>\n"
            ):
                return False  # may still become <function=NAME>
            self.state = "json" if s.startswith("{") else "text"
            return True
        if self.state in ("json", "text"):
            end = buf.find(CALL_CLOSE)
            if end < 0:
                return False
            text = self._text[: len(self._text) - len(buf) + end]
            if self.state == "text" or not self._json_call(text, out):
                self.content = CALL_OPEN + text + CALL_CLOSE
            self._close(buf[end + len(CALL_CLOSE) :])
            return True
        if self.state == "body":
            i, tag = _first(buf, self._BODY_TAGS)
            if i < 0:
                self._buf = buf[len(buf) - _held(buf, self._BODY_TAGS) :]  # text between tags
                return False
            if tag == PARAMETER_OPEN:
                m = _NAMED.match(buf, i)
                if m is None and not any(c in buf[i + len(tag) :] for c in "<>\n"):
                    self._buf = buf[i:]
                    return False  # the name is still coming
                self._buf = buf[m.end() :] if m else buf[i + len(tag) :]
                if m:
                    self._open_value(m.group(1).strip().strip("\"'"), out)
                return True
            self._close_arguments(out)
            if tag == FUNCTION_CLOSE:
                self._buf, self.state = buf[i + len(tag) :], "tail"
            else:
                self._close(buf[i + len(tag) :])
            return True
        if self.state == "value":
            if not self._started:
                if not buf:
                    return False
                self._buf = buf = buf.removeprefix("\n")
                self._started = True
            i, tag = _first(buf, self._VALUE_TAGS)
            if i < 0:
                self._stream_value(buf, out)
                return False
            self._end_value(buf[:i], out)
            self._buf = buf[i + len(tag) :] if tag == PARAMETER_CLOSE else buf[i:]
            return True
        # tail: after </function>, only </tool_call> or the next <tool_call> counts
        i, tag = _first(buf, (CALL_CLOSE, CALL_OPEN))
        if i < 0:
            self._buf = buf[len(buf) - _held(buf, (CALL_CLOSE, CALL_OPEN)) :]
            return False
        self.reopen = tag == CALL_OPEN
        self._close(buf[i + len(tag) :])
        return True

    def _commit(self, name: str, out: list[Delta]) -> None:
        self.call = ToolCall(name, {})
        self._schema = _properties(name, self.tools)
        out.append(Delta(tool_call=CallDelta(self.call, self.index, "", first=True)))

    def _close(self, rest: str) -> None:
        self.rest, self._buf, self.closed = rest, "", True

    def _args(self, text: str, out: list[Delta]) -> None:
        if text:
            self.call.arguments_json += text
            out.append(Delta(tool_call=CallDelta(self.call, self.index, text)))

    def _open_value(self, key: str, out: list[Delta]) -> None:
        self.state, self._value, self._started = "value", "", False
        self._key = None if key in self.call.arguments else key
        if self._key is not None:
            self.call.arguments[key] = None  # holds its place: keys keep the order written
            sep = ", " if self.call.arguments_json else "{"
            self._args(f"{sep}{json.dumps(key, ensure_ascii=False)}: ", out)
            if self._is_string():
                self._args('"', out)

    def _is_string(self) -> bool:
        return "string" in _types(self._schema.get(self._key, {}).get("type"))

    def _stream_value(self, buf: str, out: list[Delta]) -> None:
        """A string value's text as it comes, less what may be its last newline or the start
        of the tag that ends it."""
        keep = _held(buf, tuple("\n" + t for t in self._VALUE_TAGS) + self._VALUE_TAGS)
        keep = max(keep, 1 if buf.endswith("\n") else 0)
        piece, self._buf = buf[: len(buf) - keep], buf[len(buf) - keep :]
        self._value += piece
        if self._key is not None and self._is_string():
            self._args(json.dumps(piece, ensure_ascii=False)[1:-1], out)

    def _end_value(self, tail: str, out: list[Delta]) -> None:
        """The value ends with `tail` (its last newline, if any, is the template's)."""
        tail = tail.removesuffix("\n")
        text = self._value + tail
        self.state, self._buf = "body", ""
        if self._key is None:
            return
        value = _value(text, self._schema.get(self._key, {}).get("type"))
        self.call.arguments[self._key] = value
        if self._is_string():
            self._args(json.dumps(tail, ensure_ascii=False)[1:-1] + '"', out)
        else:
            self._args(json.dumps(value, ensure_ascii=False), out)

    def _close_arguments(self, out: list[Delta]) -> None:
        self._args("}" if self.call.arguments_json else "{}", out)
        self.state = "tail"

    def _json_call(self, text: str, out: list[Delta]) -> bool:
        """A block in the JSON form ({"name": ..., "arguments": {...}}): the call, whole."""
        try:
            data = json.loads(text)
        except ValueError:
            return False
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return False
        arguments = data.get("arguments", data.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return False
        if not isinstance(arguments, dict):
            return False
        self._commit(data["name"], out)
        self.call.arguments = arguments
        self._args(json.dumps(arguments, ensure_ascii=False), out)
        self.state = "tail"
        return True


def tool_call_grammar(
    tokenizer, tools: list[dict], name: str | None, parallel: bool = True
) -> Grammar:
    """A Lark grammar (llguidance's dialect) for answers that are only tool calls in the
    format above: tool_choice "required" (one call or more; one with `parallel` false) or
    a named function (one call to it). Each call names an offered function and only the
    parameters its schema declares (any, if it declares no properties); a value is any text
    without `</parameter>`. `<tool_call>` and `</tool_call>` are special tokens, named by id."""
    call_open = f"<[{tokenizer.token_to_id(CALL_OPEN)}]>"
    call_close = f"<[{tokenizer.token_to_id(CALL_CLOSE)}]>"
    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    rules = []
    for i, function in enumerate(functions):
        properties = (function.get("parameters") or {}).get("properties")
        head = _lark(f"\n{FUNCTION_OPEN}{function['name']}>\n")
        params = f" param{i}*" if properties is None or properties else ""
        rules.append(
            f"call{i}: {call_open} {head}{params} {_lark(FUNCTION_CLOSE + chr(10))} {call_close}"
        )
        if params:
            keys = " | ".join(_lark(k) for k in properties) if properties else "KEY"
            rules.append(
                f"param{i}: {_lark(PARAMETER_OPEN)} ({keys}) {_lark('>' + chr(10))} VALUE {_lark(chr(10) + PARAMETER_CLOSE + chr(10))}"
            )
    calls = " | ".join(f"call{i}" for i in range(len(functions)))
    start = f"start: call ({_lark(chr(10))} call)*" if parallel and name is None else "start: call"
    lexemes = ["KEY: /[^<>\\n]+/", "VALUE: /(?s:.*)/ & ~/(?s:.*<\\/parameter>.*)/"]
    return Grammar.lark("\n".join([start, f"call: {calls}", *rules, *lexemes]))


def _lark(text: str) -> str:
    """A Lark string literal (JSON's escapes are Lark's)."""
    return json.dumps(text, ensure_ascii=False)


class OutputParser:
    """Feed it each piece of generated text; it returns what can be handed out so far."""

    def __init__(self, reasoning: bool, tools: list[dict] | None) -> None:
        # start: content, unless the model opens a <think> block itself; after_think: the
        # newlines after </think>; call: inside <tool_call>
        self.mode = "reasoning" if reasoning else "start"
        self.tools = tools
        self.calls: list[ToolCall] = []  # the calls complete so far
        self._block: _Block | None = None  # the <tool_call> block being read
        self._buf = ""  # text not handed out yet
        self._ws = ""  # trailing whitespace held back: dropped if nothing follows it
        self._dropped = ""  # the whitespace before the last tag: kept if the tag is text
        self._reasoning_started = False

    def feed(self, text: str) -> list[Delta]:
        self._buf += text
        out: list[Delta] = []
        while True:
            if self.mode == "start":
                stripped = self._buf.lstrip()
                if not stripped or THINK_OPEN.startswith(stripped):
                    return out
                if stripped.startswith(THINK_OPEN):
                    self._buf, self.mode = stripped[len(THINK_OPEN) :], "reasoning"
                else:
                    self._buf, self.mode = self._buf.lstrip("\n"), "content"
            elif self.mode == "reasoning":
                if not self._until(THINK_CLOSE, "reasoning", out):
                    return out
                self.mode = "after_think"
            elif self.mode == "after_think":
                self._buf = self._buf.lstrip("\n")
                if not self._buf:
                    return out
                self.mode = "content"
            elif self.mode == "content":
                if not self.tools:
                    text, self._buf = self._buf, ""
                    self._emit("content", text, out)
                    return out
                if not self._until(CALL_OPEN, "content", out):
                    return out
                self._open_block()
            else:
                text, self._buf = self._buf, ""
                out += self._block.feed(text)
                if not self._block.closed:
                    return out
                self._end_block(out)

    def finish(self) -> list[Delta]:
        """What is left when generation ends; an unclosed block is handed out as it is."""
        out: list[Delta] = []
        if self.mode == "call":
            out += self._block.finish()
            self._end_block(out)
        elif self.mode == "reasoning":
            self._emit("reasoning", self._buf.rstrip(), out)
        elif self._buf.strip():
            self._emit("content", self._buf.rstrip(), out)
        self._buf = self._ws = ""
        return out

    def _until(self, tag: str, kind: str, out: list[Delta]) -> bool:
        """Hands out the text before `tag` as `kind` and consumes the tag: True once it is
        there. Until then, text that may be the start of the tag is held back."""
        i = self._buf.find(tag)
        if i >= 0:
            before = self._buf[:i]
            self._emit(kind, before.rstrip(), out)
            self._dropped = self._ws + before[len(before.rstrip()) :]
            self._buf, self._ws = self._buf[i + len(tag) :], ""
            return True
        keep = _held(self._buf, (tag,))
        text, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
        self._emit(kind, text, out)
        return False

    def _emit(self, kind: str, text: str, out: list[Delta]) -> None:
        if kind == "reasoning" and not self._reasoning_started:
            text = text.lstrip()
            self._reasoning_started = bool(text)
        body = text.rstrip()
        if not body:
            self._ws += text
            return
        piece, self._ws = self._ws + body, text[len(body) :]
        out.append(Delta(reasoning=piece) if kind == "reasoning" else Delta(content=piece))

    def _open_block(self) -> None:
        self.mode, self._block = "call", _Block(self.tools, len(self.calls))

    def _end_block(self, out: list[Delta]) -> None:
        """After a block: its call counted, or its text handed out (not a call: keep the text
        rather than lose it); then content, or the next block."""
        block = self._block
        if block.call is not None:
            self.calls.append(block.call)
            self._buf = block.rest.lstrip() + self._buf
        else:
            self._emit("content", self._dropped + block.content, out)
            self._buf = block.rest + self._buf
        if block.reopen:
            self._open_block()
        else:
            self.mode = "content"
