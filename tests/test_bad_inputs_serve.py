"""Bad inputs to `mlxkit serve`: its options through the shared harness (tests/badinput.py:
one line, exit 2, nothing left behind), and bad requests to a running server, each a 400 in
the OpenAI error shape naming the field (never a 500, a traceback in the log, or minutes of
work before the answer)."""

from __future__ import annotations

import json
import socket

import pytest

from tests.badinput import cli, run_row
from tests.serve_helpers import (  # noqa: F401 - time_limit: autouse, bounds every test here
    REQUEST_TIMEOUT_S,
    Server,
    time_limit,
)


def serve(id: str, *args: str, **kw):
    return cli(f"serve: {id}", "serve", *args, needs=(), **kw)


# fmt: off
OPTION_ROWS = [
    serve("no model", message="pass either --model PATH or --size SIZE"),
    serve("--model and --size", "--size", "micro", "--model", "{src}",
          message="pass either --model PATH or --size SIZE"),
    serve("--model missing", "--model", "{root}/nope", message="not a directory"),
    serve("--size unknown", "--size", "nope", message="unknown size 'nope'"),
    *(serve(f"--prompt-cache-size {v}", "--size", "micro", "--prompt-cache-size", v,
            message=m) for v, m in [
        ("lots", "not a memory size"), ("-5", "not a memory size"),
        ("1e400GB", "not a memory size"), ("nanGB", "not a memory size"),
        ("99999999999999999999999999TB", "at most 10 TB")]),
    *(serve(f"{o} {v}", "--size", "micro", o, v, message=f"Invalid value for '{o}'")
      for o, v in [("--num-draft", "0"), ("--num-draft", "9"), ("--port", "70000"),
                   ("--max-tokens", "0"), ("--max-queue", "-1"), ("--max-batch", "0"),
                   ("--max-batch", "many")]),
    serve("--allowed-local-media-path missing", "--size", "micro",
          "--allowed-local-media-path", "{root}/nope", message="not a directory"),
    serve("--allowed-local-media-path a file", "--size", "micro",
          "--allowed-local-media-path", "{root}/f", message="not a directory",
          setup=lambda i: (i.root / "f").write_text("x")),
]
# fmt: on


@pytest.mark.parametrize("row", OPTION_ROWS, ids=lambda r: r.id)
def test_bad_serve_option(row, tmp_path, monkeypatch):
    run_row(row, tmp_path, monkeypatch, {})


# --------------------------------------------------------------------------- requests

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = '{"role": "user", "content": "x"}'
SIX_MB = "x = 1\n" * (2**20)
NOW = {"type": "function", "function": {"name": "now"}}


def chat(**fields) -> bytes:
    return json.dumps({"messages": [json.loads(USER)], **fields}).encode()


def user(content) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}]}).encode()


def nested(depth: int) -> bytes:
    return b'{"messages": [' + USER.encode() + b'], "x": ' + b"[" * depth + b"]" * depth + b"}"


# (id, path, raw body, param, a substring of the message)
# fmt: off
REQUEST_ROWS = [
    ("lone surrogate in content", CHAT,
     b'{"messages": [{"role": "user", "content": "a\\udc80b"}]}', None, "surrogate"),
    ("lone surrogate in a key", CHAT, b'{"messages": [' + USER.encode() + b'], "\\ud800": 1}',
     None, "surrogate"),
    ("lone surrogate in a prompt", COMPLETIONS, b'{"prompt": "\\udfff"}', None, "surrogate"),
    ("high surrogate then a letter", CHAT,
     b'{"messages": [{"role": "user", "content": "\\ud83dx"}]}', None, "surrogate"),
    ("JSON nested 100,000 deep", CHAT, nested(100_000), None, "nested more than 64"),
    ("JSON nested 500 deep", CHAT, nested(500), None, "nested more than 64"),
    ("a body nested 100,000 deep", CHAT, b"[" * 100_000, None, "nested more than 64"),
    ("chat_template_kwargs nested 100 deep", CHAT,
     chat(chat_template_kwargs={"a": json.loads("[" * 100 + "]" * 100)}), None, "nested"),
    ("a 6 MB message", CHAT, user(SIX_MB), "messages", "bytes of text"),
    ("a 6 MB prompt", COMPLETIONS, json.dumps({"prompt": SIX_MB}).encode(), "prompt",
     "bytes of text"),
    ("logit_bias a word", CHAT, chat(logit_bias={"x": 5}), "logit_bias", "must be token ids"),
    ("logit_bias -101 on completions", COMPLETIONS,
     json.dumps({"prompt": "x", "logit_bias": {"1": -101}}).encode(), "logit_bias",
     "[-100, 100]"),
    ("logit_bias past the vocabulary", CHAT, chat(logit_bias={"999999": 1}), None,
     "logit_bias token id must be between 0 and"),
    ("logprobs 21 on completions", COMPLETIONS,
     json.dumps({"prompt": "x", "logprobs": 21}).encode(), "logprobs", "less than or equal"),
    ("stop ''", CHAT, chat(stop=""), "stop", "may not be empty"),
    ("stop ['a', '']", COMPLETIONS, json.dumps({"prompt": "x", "stop": ["a", ""]}).encode(),
     "stop", "may not be empty"),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=3), "top_logprobs",
     "needs logprobs"),
    ("top_logprobs 21", CHAT, chat(logprobs=True, top_logprobs=21), "top_logprobs",
     "less than or equal"),
    ("response_format xml", CHAT, chat(response_format={"type": "xml"}), "response_format",
     "response_format type must be"),
    ("response_format json_schema without one", CHAT,
     chat(response_format={"type": "json_schema"}), "response_format", 'needs {"json_schema"'),
    ("tool_choice required without tools", CHAT, chat(tool_choice="required"), "tool_choice",
     "a forced tool_choice needs tools"),
    ("tool_choice naming no tool offered", CHAT, chat(tools=[NOW], tool_choice={
        "type": "function", "function": {"name": "later"}}), "tool_choice", "names no tool"),
    ("tool_choice without a name", CHAT, chat(tools=[NOW], tool_choice={"type": "function"}),
     "tool_choice", 'tool_choice must be "auto"'),
    ("response_format with tool_choice required", CHAT, chat(
        tools=[NOW], tool_choice="required", response_format={"type": "json_object"}),
     "response_format", "cannot be combined with a forced tool_choice"),
    ("a schema that is not an object", CHAT,
     chat(response_format={"type": "json_schema", "json_schema": {"schema": [1]}}),
     "response_format", "a JSON Schema must be a JSON object"),
    ("content a number", CHAT, user(5), "messages[0].content", "valid string"),
    ("a text part's text a number", CHAT, user([{"type": "text", "text": 5}]),
     "messages[0].content[0].text", "valid string"),
    ("an image part's url a number", CHAT,
     user([{"type": "image_url", "image_url": {"url": 5}}]),
     "messages[0].content[0].image_url.url", "valid string"),
    ("a stop string a number", CHAT, chat(stop=[1]), "stop[0]", "valid string"),
    ("a tool call's name a number", CHAT, json.dumps({"messages": [{
        "role": "assistant", "tool_calls": [{"function": {"name": 1, "arguments": "{}"}}]}]
    }).encode(), "messages[0].tool_calls[0].function.name", "valid string"),
    ("a token-id prompt of strings and ids", COMPLETIONS, b'{"prompt": [1, "a"]}', "prompt[1]",
     "valid"),
]
# fmt: on


@pytest.fixture(scope="module")
def server():
    s = Server("--size", "micro", "--max-tokens", "16")
    yield s
    assert s.stop() == 0, "".join(s.log)


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [row[1:] for row in REQUEST_ROWS],
    ids=[row[0] for row in REQUEST_ROWS],
)
def test_bad_request(server, path, body, param, message):
    logged = len(server.log)
    status, _, reply = server.request("POST", path, body)
    assert status == 400, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert message in error["message"] and len(error["message"].splitlines()) == 1
    assert "Traceback" not in "".join(server.log[logged:])


def test_an_aborted_upload_is_not_a_traceback(server):
    """A client that closes its connection halfway through its body: nothing to answer, and
    no traceback in the log (one used to follow each)."""
    logged = len(server.log)
    with socket.create_connection(("127.0.0.1", server.port), timeout=REQUEST_TIMEOUT_S) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: 100000\r\n\r\n" + chat()[:20]
        )
    reply = server.client().completions.create(model="m", prompt="x = ", max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert "Traceback" not in "".join(server.log[logged:]), "".join(server.log[logged:])
