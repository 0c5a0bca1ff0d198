"""Rendering a checkpoint's chat template: Jinja code that came with a download.

Templates run in Jinja's immutable sandbox (no Python internals, no changes to the messages)
with what Hugging Face templates expect of their environment (`raise_exception`, a `tojson`
that keeps non-ASCII text, `{% break %}` and `{% continue %}`), and within bounds, so that
a broken or hostile template ends in one CheckpointError line, never in a traceback, a hang
or an exhausted machine:
- a syntax error, a sandbox violation or any other exception while rendering is reported
  with Jinja's or Python's message, and `raise_exception(...)` (a template rejecting the
  conversation) with the template's own words: a ChatTemplateError either way;
- one render executes at most MAX_STEPS lines of template code. Jinja compiles a template
  to Python, so the lines are counted by a trace function on the template's frames alone:
  loops inside loops are caught even when they print nothing;
- `*`, `+`, `**` and `~` make no value of more than MAX_ITEMS items (or digits), which also
  keeps Jinja from folding `2 ** (10 ** 10)` at compile time, and the prompt is at most
  MAX_OUTPUT characters (Jinja's own `range` stops at 100,000 items).
What the bounds do not see is a width or count argument of a string method or filter
(`'x'.center(10**12)`): Python's MemoryError, when the machine cannot give that much, is
reported like any other failure.
"""

from __future__ import annotations

import json
import math
import sys
from types import FrameType

from jinja2 import TemplateError, TemplateSyntaxError
from jinja2.compiler import CodeGenerator
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from mlxkit.errors import CheckpointError

MAX_STEPS = 2_000_000  # lines of template code per render: a long conversation is ~20 each
MAX_ITEMS = 1 << 24  # characters, list items or digits one operator may make
MAX_OUTPUT = 1 << 26  # characters of rendered prompt
_FILENAME = "<chat template>"


class ChatTemplateError(CheckpointError, TemplateError):
    """A template that cannot compile or render. Also a jinja2.TemplateError, so that callers
    catching Jinja's errors (the server, which answers 400) keep catching it."""


class _OutOfSteps(Exception):
    pass


class _Refused(TemplateError):
    """`raise_exception(...)`: the template rejects the conversation, in its own words."""


class _BoundedJoins(CodeGenerator):
    """Compiles `a ~ b` through `environment.joined`, which checks the result's size."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.joined(")
        super().visit_Concat(node, frame)
        self.write(")")


class _Bounded(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedJoins
    intercepted_binops = frozenset(("*", "+", "**"))

    def joined(self, value: str) -> str:
        if len(value) > MAX_ITEMS:
            raise SecurityError(f"~: a string of more than {MAX_ITEMS:,} characters")
        return value

    def call_binop(self, context, op: str, left, right):
        if op == "**" and _is_int(left) and _is_int(right) and abs(left) > 1 and right > 0:
            if right * math.log10(abs(left)) > MAX_ITEMS:
                raise SecurityError(f"{op}: a number of more than {MAX_ITEMS:,} digits")
        elif op == "*" and (_is_int(left) or _is_int(right)):
            seq, n = (right, left) if _is_int(left) else (left, right)
            if _sized(seq) and len(seq) * max(n, 0) > MAX_ITEMS:
                raise SecurityError(f"{op}: a value of more than {MAX_ITEMS:,} items")
        elif op == "+" and _sized(left) and _sized(right) and len(left) + len(right) > MAX_ITEMS:
            raise SecurityError(f"{op}: a value of more than {MAX_ITEMS:,} items")
        return super().call_binop(context, op, left, right)


def _sized(value: object) -> bool:
    return isinstance(value, (str, list, tuple))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _raise_exception(message: object):
    raise _Refused(" ".join(str(message).split())[:300])


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> _Bounded:
    env = _Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = _tojson
    return env


def _failed(e: BaseException, hint: str = "") -> ChatTemplateError:
    if isinstance(e, _Refused):
        return ChatTemplateError(str(e))
    where = f" (line {e.lineno})" if isinstance(e, TemplateSyntaxError) and e.lineno else ""
    reason = " ".join((str(e) or type(e).__name__).split())[:300]
    return ChatTemplateError(
        f"the model's chat template failed{where}: {reason}; fix its chat_template.jinja{hint}"
    )


_RENDERING = ", or pass plain text instead of messages"


class ChatTemplate:
    """A compiled chat template. `render` returns the prompt text or raises CheckpointError."""

    def __init__(self, source: str) -> None:
        env = _environment()
        try:
            code = env.compile(source, filename=_FILENAME)
        except (TemplateError, RecursionError, MemoryError, ValueError) as e:
            raise _failed(e) from None
        self._template = env.template_class.from_code(env, code, env.make_globals(None))

    def render(self, **context) -> str:
        steps = MAX_STEPS

        def trace(frame: FrameType, event: str, arg):
            nonlocal steps
            if event == "line":
                steps -= 1
                if steps < 0:
                    raise _OutOfSteps
            return trace

        def calls(frame: FrameType, event: str, arg):
            return trace if frame.f_code.co_filename == _FILENAME else None

        outer = sys.gettrace()
        sys.settrace(calls)
        try:
            out, size = [], 0
            for piece in self._template.generate(**context):
                size += len(piece)
                if size > MAX_OUTPUT:
                    raise SecurityError(f"a prompt of more than {MAX_OUTPUT:,} characters")
                out.append(piece)
            return "".join(out)
        except _OutOfSteps:
            raise _failed(
                _OutOfSteps(f"it ran more than {MAX_STEPS:,} steps"), _RENDERING
            ) from None
        except Exception as e:  # noqa: BLE001 - template code raises anything Python can
            raise _failed(e, _RENDERING) from None
        finally:
            sys.settrace(outer)


__all__ = ["MAX_ITEMS", "MAX_OUTPUT", "MAX_STEPS", "ChatTemplate", "ChatTemplateError"]
