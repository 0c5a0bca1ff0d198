"""Streamed tool calls: OpenAI `tool_calls` deltas (the name first, then argument fragments) as
the model writes Qwen 3.5's XML, reassembling to exactly the non-streamed calls, on well-formed
and malformed outputs of the kinds small models write; a block that is not a call comes back
whole as content once it closes, and the XML never leaks into content."""

from __future__ import annotations

import json

import pytest

from mlxkit.serve.parse import OutputParser
from tests.helpers import FIXTURES
from tests.serve_helpers import (  # noqa: F401 - time_limit: autouse, bounds every test here
    REQUEST_TIMEOUT_S,
    micro_with_template,
    openai_client,
    serve_in_process,
    sse_lines,
    time_limit,
)
from tests.test_serve_parse import TOOLS, chunkings, reassemble, run

CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
NOW = "<tool_call>\n<function=now>\n</function>\n</tool_call>"

# (id, generated text, expected content, expected calls)
# fmt: off
CASES = [
    ("well formed", CALL + "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
     "", [("get_weather", {"city": "Paris", "days": 3})]),
    ("content, then two calls", "Checking.\n\n" + NOW + "\n" + NOW,
     "Checking.", [("now", {}), ("now", {})]),
    ("no </parameter>", ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
     "<parameter=days>\n3\n</function>\n</tool_call>"),
     "", [("get_weather", {"city": "Paris", "days": 3})]),
    ("no </function>", CALL + "</tool_call>", "", [("get_weather", {"city": "Paris"})]),
    ("no </tool_call> before the end", "<tool_call>\n<function=now>\n</function>",
     "", [("now", {})]),
    ("cut off inside a value", "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
     "", [("get_weather", {"city": "Par"})]),
    ("the next <tool_call> without </tool_call>",
     "<tool_call>\n<function=now>\n</function>\n" + NOW, "", [("now", {}), ("now", {})]),
    ("a repeated parameter keeps the first", CALL + "<parameter=city>\nLyon\n</parameter>\n"
     "</function>\n</tool_call>", "", [("get_weather", {"city": "Paris"})]),
    ("text between parameters", CALL + "and also\n<parameter=metric>\nTrue\n</parameter>\n"
     "</function>\n</tool_call>", "", [("get_weather", {"city": "Paris", "metric": True})]),
    ("a quoted name, no newlines", '<tool_call><function="now"></function></tool_call>',
     "", [("now", {})]),
    ("escapes and tags in a string", ("<tool_call>\n<function=get_weather>\n<parameter=city>\n"
     'He said "a < b" \\ é\n\n</parameter>\n</function>\n</tool_call>'),
     "", [("get_weather", {"city": 'He said "a < b" \\ é\n'})]),
    ("values typed by the schema, or text", ("<tool_call>\n<function=get_weather>\n"
     "<parameter=days>\nthree\n</parameter>\n<parameter=hours>\n[1, 2]\n</parameter>\n"
     '<parameter=extra>\n{"a": null}\n</parameter>\n<parameter=ratio>\nNone\n</parameter>\n'
     "</function>\n</tool_call>"), "",
     [("get_weather", {"days": "three", "hours": [1, 2], "extra": {"a": None}, "ratio": None})]),
    ("the JSON form", ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
     "</tool_call>"), "", [("get_weather", {"city": "Oslo"})]),
    ("the JSON form, arguments as text", ('<tool_call>{"name": "now", "arguments": "{}"}'
     "</tool_call>"), "", [("now", {})]),
    ("not a call", "<tool_call>\nnot a call\n</tool_call>",
     "<tool_call>\nnot a call\n</tool_call>", []),
    ("a name broken by a newline", "<tool_call>\n<function=get\nweather>\n</tool_call> after",
     "<tool_call>\n<function=get\nweather>\n</tool_call> after", []),
    ("JSON without a name", '<tool_call>\n{"arguments": {}}\n</tool_call>',
     '<tool_call>\n{"arguments": {}}\n</tool_call>', []),
    ("a bad block, then a call", "<tool_call>\nhm\n</tool_call>\n" + NOW,
     "<tool_call>\nhm\n</tool_call>", [("now", {})]),
    ("an unclosed bad block at the end", "Sure. <tool_call>\nhm", "Sure. <tool_call>\nhm", []),
]
# fmt: on


@pytest.mark.parametrize(
    ("text", "content", "calls"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_streamed_calls_reassemble_to_the_whole_ones(text, content, calls):
    """Fed whole, a character at a time and in random pieces: the same content and calls, and
    the streamed pieces of each call reassemble to its non-streamed form (checked in `run`)."""
    for pieces in chunkings(text, seed=7):
        assert run(OutputParser(False, TOOLS), pieces) == ("", content, calls)


def test_the_name_and_a_string_value_stream_as_written():
    """The name goes out once `<function=NAME>` is complete; a string value's text goes out as
    it is written, before its parameter closes; nothing of the XML is content."""
    parser = OutputParser(False, TOOLS)
    head = "<tool_call>\n<function=get_weather>\n"
    first = [d for d in parser.feed(head)]
    assert [d.tool_call.openai() for d in first] == [
        {
            "index": 0,
            "id": first[0].tool_call.call.id,
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        }
    ]
    sent = [d.tool_call.arguments for d in parser.feed("<parameter=city>\nSan Fran")]
    assert "".join(sent) == '{"city": "San Fran'
    sent = [d.tool_call.arguments for d in parser.feed("cisco\n")]
    assert sent == ["cisco"]  # the newline may be the template's, before </parameter>: held
    rest = parser.feed("</parameter>\n</function>\n</tool_call>") + parser.finish()
    assert [d.tool_call.arguments for d in rest] == ['"', "}"]
    assert not any(d.content or d.reasoning for d in first + rest)
    assert parser.calls[0].openai()["function"]["arguments"] == '{"city": "San Francisco"}'


def test_reasoning_then_a_call_after_think(tmp_path):
    text = "Let me see.\n</think>\n\n" + NOW
    for pieces in chunkings(text, seed=8):
        assert run(OutputParser(True, TOOLS), pieces) == ("Let me see.", "", [("now", {})])


# --------------------------------------------------------------------------- the server

SCRIPT = "I will check.\n\n<tool_call>\nnope\n</tool_call>\n" + CASES[0][1] + "\n" + NOW


@pytest.fixture(scope="module")
def qwen_micro(tmp_path_factory):
    import mlxkit

    model_dir = micro_with_template(
        tmp_path_factory.mktemp("qwen"), FIXTURES / "qwen3_5_chat_template.jinja"
    )
    return mlxkit.load(str(model_dir))


def scripted_decode(text: str):
    """A stand-in for `Generation.decode` (how the engine decodes a request alone) that
    "generates" `text` token by token (through the request's real detokenizing Responses),
    then the end-of-turn token."""

    def fake(self, y):
        tokenizer = self.tokenizer
        for token in [*tokenizer.encode(text), tokenizer.eos_token_ids[0]]:
            r = self.out.push(token)
            yield r
            if r.finish_reason is not None:
                return None

    return fake


def test_server_streams_calls_that_reassemble_to_the_whole_answer(qwen_micro, monkeypatch):
    """Through `mlxkit serve`'s app: the streamed chunks' tool_calls reassemble to the
    non-streamed answer's (ids aside: two requests), content equal and free of the calls' XML,
    finish_reason "tool_calls"; the first piece of each call arrives before its last."""
    from mlxkit.generate import Generation
    from mlxkit.serve.app import Settings, create_app
    from mlxkit.serve.engine import Engine

    monkeypatch.setattr(Generation, "decode", scripted_decode(SCRIPT))
    model, tok = qwen_micro
    engine = Engine(model, tok, max_queue=1, prompt_cache_bytes=0)
    body = {
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": TOOLS,
        "chat_template_kwargs": {"enable_thinking": False},
    }

    def client_side(port: int):
        client = openai_client(port)
        whole = client.chat.completions.create(
            model="m",
            messages=body["messages"],
            tools=TOOLS,
            extra_body={"chat_template_kwargs": body["chat_template_kwargs"]},
        )
        chunks = [
            json.loads(x)
            for x in sse_lines(port, "/v1/chat/completions", {**body, "stream": True})
            if x != "[DONE]"
        ]
        return whole, chunks

    whole, chunks = serve_in_process(
        engine, create_app(engine, Settings("micro", 512)), client_side
    )
    deltas = [c["choices"][0]["delta"] for c in chunks]
    items = [item for d in deltas for item in d.get("tool_calls", [])]
    streamed = reassemble(items)
    expected = [c.model_dump() for c in whole.choices[0].message.tool_calls]
    assert [{**c, "id": None} for c in streamed] == [{**c, "id": None} for c in expected]
    assert [json.loads(c["function"]["arguments"]) for c in streamed] == [
        {"city": "Paris", "days": 3},
        {},
    ]
    content = "".join(d.get("content") or "" for d in deltas)
    assert (
        content
        == whole.choices[0].message.content
        == ("I will check.\n\n<tool_call>\nnope\n</tool_call>")
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert whole.choices[0].finish_reason == "tool_calls"
    pieces = [i for i in items if i["index"] == 0]
    assert len(pieces) >= 4  # the name, then fragments: not one whole call at the end


# --------------------------------------------------------------------------- forced tool_choice


@pytest.mark.parametrize(
    ("name", "parallel"),
    [(None, True), (None, False), ("now", True)],
    ids=["required", "one", "named"],
)
def test_forced_tool_choice_grammar(name, parallel):
    """tool_choice "required" / a named function as a grammar: the answer is tool calls in
    Qwen's format from its first token (MTP's greedy tokens equal plain's, float32), parsed
    into calls of the offered (or named) function with only its declared parameters."""
    import mlx.core as mx

    import mlxkit
    from mlxkit.serve.parse import tool_call_grammar

    model, tok = mlxkit.load("micro", dtype=mx.float32)
    grammar = tool_call_grammar(tok, TOOLS, name, parallel)
    runs = []
    for mtp in (False, True):
        out = list(
            mlxkit.stream_generate(
                model,
                tok,
                [{"role": "user", "content": "Weather?"}],
                enable_thinking=False,
                max_tokens=40,
                grammar=grammar,
                mtp=mtp,
                num_draft=2,
            )
        )
        runs.append([r.token for r in out])
    assert runs[0] == runs[1]
    text = tok.decode([t for t in runs[0] if t not in tok.eos_token_ids])
    assert text.startswith("<tool_call>\n<function=")
    parser = OutputParser(False, TOOLS)
    _, content, calls = run(parser, [text])
    assert content == "" and calls
    offered = {t["function"]["name"]: t["function"]["parameters"]["properties"] for t in TOOLS}
    for call_name, arguments in calls:
        assert call_name == (name or call_name) and call_name in offered
        assert set(arguments) <= set(offered[call_name])
    if name is not None or not parallel:
        assert len(calls) == 1


def test_server_named_tool_choice(qwen_micro):
    """A named function through the server (the real engine, micro with Qwen's template): the
    answer is that call, streamed and not, finish_reason "tool_calls"."""
    from mlxkit.serve.app import Settings, create_app
    from mlxkit.serve.engine import Engine

    model, tok = qwen_micro
    engine = Engine(model, tok, max_queue=1, prompt_cache_bytes=0)
    choice = {"type": "function", "function": {"name": "now"}}

    def client_side(port: int):
        client = openai_client(port)
        kw = {
            "model": "m",
            "messages": [{"role": "user", "content": "What time is it?"}],
            "tools": TOOLS,
            "tool_choice": choice,
            "max_tokens": 64,
            "extra_body": {"chat_template_kwargs": {"enable_thinking": False}},
        }
        whole = client.chat.completions.create(**kw)
        body = {k: v for k, v in kw.items() if k != "extra_body"}
        raw = sse_lines(port, "/v1/chat/completions", {**body, **kw["extra_body"], "stream": True})
        return whole, [json.loads(x) for x in raw if x != "[DONE]"]

    whole, chunks = serve_in_process(engine, create_app(engine, Settings("micro", 64)), client_side)
    message = whole.choices[0].message
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [("now", "{}")]
    assert whole.choices[0].finish_reason == "tool_calls" and not message.content
    items = [i for c in chunks for i in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [c["function"] for c in reassemble(items)] == [{"name": "now", "arguments": "{}"}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
