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
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

THINK_CLOSE = "</think>"
THINK_OPEN = "<think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = ""

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
            "function": {
                "name": self.name,
                "arguments": json.dumps(self.arguments, ensure_ascii=False),
            },
        }
        return call if index is None else {"index": index, **call}


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_call: ToolCall | None = None


def parse_tool_call(text: str, tools: list[dict] | None) -> ToolCall | None:
    """The call inside one <tool_call> block, None if it is not in the format."""
    m = _FUNCTION.search(text)
    if m is None:
        return None
    name = m.group(1).strip()
    schema = _properties(name, tools)
    arguments = {}
    for p in _PARAMETER.finditer(m.group(2)):
        key = p.group(1).strip()
        arguments[key] = _value(p.group(2), schema.get(key, {}).get("type"))
    return ToolCall(name, arguments)


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
    types = set(json_type) if isinstance(json_type, list) else {json_type}
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


_PYTHON_BOOLS = {"True": True, "False": False, "true": True, "false": False}


class OutputParser:
    """Feed it each piece of generated text; it returns what can be handed out so far."""

    def __init__(self, reasoning: bool, tools: list[dict] | None) -> None:
        # start: content, unless the model opens a <think> block itself; after_think: the
        # newlines after </think>; call: inside <tool_call>
        self.mode = "reasoning" if reasoning else "start"
        self.tools = tools
        self.calls: list[ToolCall] = []
        self._buf = ""  # text not handed out yet
        self._ws = ""  # trailing whitespace held back: dropped if nothing follows it
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
                self.mode = "call"
            else:
                end = self._buf.find(CALL_CLOSE)
                if end < 0:
                    return out
                self._call(self._buf[:end], CALL_CLOSE, out)
                self._buf, self.mode = self._buf[end + len(CALL_CLOSE) :].lstrip(), "content"

    def finish(self) -> list[Delta]:
        """What is left when generation ends; an unclosed block is handed out as it is."""
        out: list[Delta] = []
        if self.mode == "call":
            self._call(self._buf, "", out)
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
            self._emit(kind, self._buf[:i].rstrip(), out)
            self._buf, self._ws = self._buf[i + len(tag) :], ""
            return True
        keep = next(
            (
                n
                for n in range(min(len(tag) - 1, len(self._buf)), 0, -1)
                if tag.startswith(self._buf[-n:])
            ),
            0,
        )
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

    def _call(self, block: str, close: str, out: list[Delta]) -> None:
        call = parse_tool_call(block, self.tools)
        if call is None:  # not in the format: keep the text rather than lose it
            self._emit("content", CALL_OPEN + block + close, out)
            return
        self.calls.append(call)
        out.append(Delta(tool_call=call))
