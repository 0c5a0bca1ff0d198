"""The server's output parser on real Qwen 3.5 format text: reasoning, content and tool calls,
fed whole and in every kind of piece, as a stream delivers them."""

from __future__ import annotations

import json
import random

import pytest

from mlxkit.micro import micro_dir
from mlxkit.serve.parse import OutputParser, parse_tool_call
from mlxkit.tokenizer import load_tokenizer
from tests.helpers import FIXTURES
from tests.serve_helpers import micro_with_template

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city <for> the next days & more",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "code": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "hours": {"type": "array", "items": {"type": "integer"}},
                    "options": {"type": "object"},
                    "ratio": {"type": ["number", "null"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "now", "parameters": {"type": "object", "properties": {}}},
    },
]

CALLS = [
    (
        "get_weather",
        {
            "city": "Paris\nTexas",
            "code": "007",
            "days": 3,
            "metric": True,
            "hours": [6, 12],
            "options": {"lang": "fr", "n": 2},
            "ratio": None,
        },
    ),
    ("now", {}),
]


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
    """micro's tokenizer with the chat template Qwen 3.5 checkpoints ship."""
    model_dir = micro_with_template(
        tmp_path_factory.mktemp("qwen_template"), FIXTURES / "qwen3_5_chat_template.jinja"
    )
    return load_tokenizer(model_dir)


def generated_text(tok, assistant: dict, enable_thinking: bool = True) -> str:
    """What the model generates for this assistant turn, as Qwen's template writes the turn:
    the rendered conversation minus the rendered prompt, without the closing <|im_end|>."""
    user = [{"role": "user", "content": "What is the weather?"}]
    prompt = tok.apply_chat_template(user, True, enable_thinking, tools=TOOLS)
    full = tok.apply_chat_template([*user, assistant], False, enable_thinking, tools=TOOLS)
    assert full.startswith(prompt)
    text = full[len(prompt) :]
    assert text.endswith("<|im_end|>\n")
    return text[: -len("<|im_end|>\n")]


def reassemble(items: list[dict]) -> list[dict]:
    """Streamed OpenAI `tool_calls` items put together as a client does: by index, id, type
    and name from the first, the arguments' fragments joined."""
    calls: dict[int, dict] = {}
    for item in items:
        call = calls.get(item["index"])
        if call is None:
            assert set(item) == {"index", "id", "type", "function"}, item  # the first names it
            calls[item["index"]] = json.loads(json.dumps(item))
            del calls[item["index"]]["index"]
        else:
            assert set(item) == {"index", "function"} and set(item["function"]) == {"arguments"}
            call["function"]["arguments"] += item["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return [calls[i] for i in sorted(calls)]


def run(parser: OutputParser, pieces: list[str]) -> tuple[str, str, list]:
    """(reasoning, content, calls) of text fed in these pieces; the streamed calls reassembled
    equal the parser's whole calls, their arguments the JSON of the parsed values."""
    deltas = [d for p in pieces for d in parser.feed(p)] + parser.finish()
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    streamed = reassemble([d.tool_call.openai() for d in deltas if d.tool_call is not None])
    assert streamed == [c.openai() for c in parser.calls]
    for c in parser.calls:
        assert c.arguments_json == json.dumps(c.arguments, ensure_ascii=False)
    return reasoning, content, [(c.name, c.arguments) for c in parser.calls]


def chunkings(text: str, seed: int = 0) -> list[list[str]]:
    """Whole, one character at a time, and random cuts."""
    rng = random.Random(seed)
    out = [[text], list(text)]
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 30))))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return out


def openai_calls(calls):
    return [
        {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
        for i, (n, a) in enumerate(calls)
    ]


def template_calls(calls):
    return [
        {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
        for i, (n, a) in enumerate(calls)
    ]


@pytest.mark.parametrize("content", ["", "Let me look that up."])
def test_tool_calls_round_trip_through_the_qwen_template(qwen_tok, content):
    """OpenAI tool calls -> Qwen 3.5 template text -> parser -> the same calls, typed by the
    tools' schemas, whatever pieces the text arrives in."""
    assistant = {
        "role": "assistant",
        "content": content,
        "reasoning_content": "The user asks.",
        "tool_calls": template_calls(CALLS),
    }
    text = generated_text(qwen_tok, assistant)
    assert (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\nTexas\n</parameter>" in text
    )
    for pieces in chunkings(text):
        reasoning, got_content, calls = run(OutputParser(True, TOOLS), pieces)
        assert reasoning == "The user asks."
        assert got_content == content
        assert calls == CALLS


def test_parsed_turn_renders_back_as_generated(qwen_tok):
    """The pieces the parser hands out, sent back as the assistant message, render as the text
    the model generated: the next turn's prompt extends this one's state."""
    assistant = {
        "role": "assistant",
        "content": "Checking.",
        "reasoning_content": "Think.",
        "tool_calls": template_calls(CALLS[:1]),
    }
    text = generated_text(qwen_tok, assistant)
    parser = OutputParser(True, TOOLS)
    reasoning, content, calls = run(parser, list(text))
    back = {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": template_calls(calls),
    }
    assert generated_text(qwen_tok, back) == text


def test_reasoning_and_content_without_tools(qwen_tok):
    assistant = {"role": "assistant", "content": "It is  sunny.", "reasoning_content": "Hm.\n\nOk."}
    user = [{"role": "user", "content": "q"}]
    # the turn after the last user message keeps its reasoning
    full = qwen_tok.apply_chat_template([*user, assistant], False, True)
    prompt = qwen_tok.apply_chat_template(user, True, True)
    text = full[len(prompt) :].removesuffix("<|im_end|>\n")
    assert text == "Hm.\n\nOk.\n</think>\n\nIt is  sunny."
    for pieces in chunkings(text, seed=1):
        assert run(OutputParser(True, None), pieces) == ("Hm.\n\nOk.", "It is  sunny.", [])


def test_thinking_off_output_is_content():
    for pieces in chunkings("def f(x):\n    return x  \n\n", seed=2):
        assert run(OutputParser(False, None), pieces) == ("", "def f(x):\n    return x", [])


def test_model_opening_a_think_block_itself():
    text = "\n<think>\nplan\n</think>\n\nanswer"
    for pieces in chunkings(text, seed=3):
        assert run(OutputParser(False, None), pieces) == ("plan", "answer", [])


def test_text_that_only_looks_like_a_tag_is_content():
    text = "<thing> a < b </thin and <tool_cal x"
    for pieces in chunkings(text, seed=4):
        assert run(OutputParser(False, TOOLS), pieces) == ("", text, [])


def test_unfinished_reasoning_is_reasoning():
    """Cut off by max_tokens inside <think>: what was generated is reasoning, not content."""
    assert run(OutputParser(True, None), ["step one", "\nstep tw"]) == ("step one\nstep tw", "", [])


def test_malformed_tool_call_is_kept_as_content():
    text = "<tool_call>\nnot a call\n</tool_call>"
    _, content, calls = run(OutputParser(False, TOOLS), [text])
    assert calls == [] and content == text


def test_unclosed_tool_call_at_the_end_is_still_parsed():
    text = "<tool_call>\n<function=now>\n</function>\n"
    assert run(OutputParser(False, TOOLS), [text]) == ("", "", [("now", {})])


def test_values_without_a_schema():
    """Without a schema a value is text unless it is a JSON object or array (the template
    writes those with tojson); with one, the schema decides."""
    block = (
        "<function=unknown>\n<parameter=n>\n42\n</parameter>\n<parameter=o>\n"
        '{"a": [1, 2]}\n</parameter>\n<parameter=s>\nnot json {\n</parameter>\n</function>'
    )
    call = parse_tool_call(block, TOOLS)
    assert (call.name, call.arguments) == (
        "unknown",
        {"n": "42", "o": {"a": [1, 2]}, "s": "not json {"},
    )
    bad_int = parse_tool_call(
        "<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n</function>", TOOLS
    )
    assert bad_int.arguments == {"days": "three"}
    assert parse_tool_call("no function here", TOOLS) is None


def test_openai_form_of_a_call():
    call = parse_tool_call(
        "<function=get_weather>\n<parameter=city>\nZürich\n</parameter>\n</function>", TOOLS
    )
    wire = call.openai(index=1)
    assert wire["index"] == 1 and wire["type"] == "function" and wire["id"].startswith("call_")
    assert wire["function"] == {"name": "get_weather", "arguments": '{"city": "Zürich"}'}


def test_micro_template_is_not_the_qwen_one():
    """micro's own template renders no tools: the server tests need the Qwen template for the
    tool round trip (and the server refuses tools a template ignores, tested in test_serve)."""
    tok = load_tokenizer(micro_dir())
    msgs = [{"role": "user", "content": "q"}]
    assert tok.apply_chat_template(msgs, tools=TOOLS) == tok.apply_chat_template(msgs)
