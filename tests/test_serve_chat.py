"""Chat requests to prompt tokens: the real Qwen 3.5 template rendered as transformers renders
it (tools included), OpenAI messages converted for templates, and where the server keeps its
snapshot for the next turn."""

from __future__ import annotations

import json

import pytest

from mlxkit.micro import micro_dir
from mlxkit.serve.chat import (
    common_prefix,
    image_parts,
    next_turn_prefix,
    render_chat,
    template_messages,
)
from mlxkit.serve.protocol import ChatRequest, RequestError, parse
from mlxkit.tokenizer import load_tokenizer
from tests.helpers import FIXTURES
from tests.serve_helpers import micro_with_template
from tests.test_serve_parse import TOOLS

CONVERSATION = [
    {"role": "system", "content": "Answer in French & keep it <short>."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Look it up.",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": {
                        "city": "Paris",
                        "days": 2,
                        "metric": True,
                        "options": {"lang": "fr"},
                    },
                },
            }
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21°C"},
]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return micro_with_template(
        tmp_path_factory.mktemp("qwen"), FIXTURES / "qwen3_5_chat_template.jinja"
    )


def test_qwen_template_renders_as_in_transformers(qwen_dir):
    """Tools (JSON without HTML escaping, keys in order), tool calls, tool responses, thinking
    on and off: the same text as transformers' apply_chat_template."""
    from transformers import AutoTokenizer

    ours, theirs = load_tokenizer(qwen_dir), AutoTokenizer.from_pretrained(qwen_dir)
    for generation_prompt in (True, False):
        for thinking in (True, False):
            expected = theirs.apply_chat_template(
                CONVERSATION,
                tools=TOOLS,
                add_generation_prompt=generation_prompt,
                enable_thinking=thinking,
                tokenize=False,
            )
            got = ours.apply_chat_template(CONVERSATION, generation_prompt, thinking, tools=TOOLS)
            assert got == expected
    assert '"description": "Weather in a city <for> the next days & more"' in got


def test_template_exceptions_are_template_errors(qwen_dir):
    import jinja2

    tok = load_tokenizer(qwen_dir)
    with pytest.raises(jinja2.TemplateError, match="System message must be at the beginning"):
        tok.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
        )


def request(**body) -> ChatRequest:
    return parse(ChatRequest, {"model": "m", **body})


def test_openai_messages_for_the_template():
    req = request(
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "x",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"k": [1, 2]}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "x", "content": "r"},
        ]
    )
    assert template_messages(req.messages) == [
        {"role": "user", "content": "ab"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "x",
                    "type": "function",
                    "function": {"name": "f", "arguments": {"k": [1, 2]}},
                }
            ],
        },
        {"role": "tool", "content": "r", "tool_call_id": "x"},
    ]


@pytest.mark.parametrize("arguments", ["not json", "[1, 2]"])
def test_tool_call_arguments_must_be_a_json_object(arguments):
    req = request(
        messages=[
            {
                "role": "assistant",
                "tool_calls": [
                    {"type": "function", "function": {"name": "f", "arguments": arguments}}
                ],
            }
        ]
    )
    with pytest.raises(RequestError, match="must be a JSON object") as e:
        template_messages(req.messages)
    assert e.value.param == "messages[0].tool_calls[0].function.arguments"


def test_image_parts_are_written_as_the_template_writes_an_image():
    """An image_url part becomes vision_start, pad, vision_end (what Qwen's template writes for
    an image part, and the Python API's chat parts), its URL listed in prompt order."""
    req = request(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/a.png"}}]},
        ]
    )
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    assert [m["content"] for m in template_messages(req.messages)] == [
        "what is this?" + image,
        image,
    ]
    assert image_parts(req.messages) == [
        ("data:image/png;base64,AAAA", "messages[0].content[1]"),
        ("/a.png", "messages[1].content[0]"),
    ]


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("template", ["micro", "qwen"])
def test_snapshot_is_where_the_next_turn_parts(qwen_dir, template, thinking):
    """The next turn's prompt (this conversation, the answer, a new question) shares exactly
    `snapshot_at` tokens with this prompt, whatever the answer (as the server hands answers
    out: without leading newlines, which BPE would merge with the template's)."""
    tok = load_tokenizer(micro_dir() if template == "micro" else qwen_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    kwargs = {"chat_template_kwargs": {"enable_thinking": thinking}}
    prompt = render_chat(tok, request(messages=messages, **kwargs))
    assert tok.encode(tok.apply_chat_template(messages, True, thinking)) == prompt.tokens
    assert prompt.reasoning is thinking
    for answer in ("Hello!", "<think>\nhm\n</think>\n\nHello", "  indented", ""):
        turn = [
            *messages,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "Bye"},
        ]
        following = render_chat(tok, request(messages=turn, **kwargs)).tokens
        assert common_prefix(prompt.tokens, following) == prompt.snapshot_at


def test_a_template_that_ignores_tools_is_refused():
    tok = load_tokenizer(micro_dir())
    req = request(messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
    with pytest.raises(RequestError, match="does not render tools"):
        render_chat(tok, req)
    # tool_choice "none": the tools are not offered, so nothing to refuse
    assert render_chat(
        tok, request(messages=[{"role": "user", "content": "hi"}], tools=TOOLS, tool_choice="none")
    ).tokens


def test_template_errors_are_400s(qwen_dir):
    tok = load_tokenizer(qwen_dir)
    req = request(messages=[{"role": "assistant", "content": "no question before me"}])
    with pytest.raises(RequestError, match="cannot render these messages: No user query") as e:
        render_chat(tok, req)
    assert e.value.status == 400


def test_tools_reach_the_prompt(qwen_dir):
    tok = load_tokenizer(qwen_dir)
    prompt = render_chat(tok, request(messages=CONVERSATION[:2], tools=TOOLS))
    text = tok.decode(prompt.tokens)
    assert json.dumps(TOOLS[0], ensure_ascii=False) in text
    assert text.endswith("<|im_start|>assistant\n<think>\n")


@pytest.mark.parametrize("template", ["micro", "qwen"])
def test_next_turn_prefix_starts_the_next_request(qwen_dir, template):
    """What the server prepares after answering is a strict prefix of the next request,
    whatever the next message says, and leaves only that message and the generation prompt to
    process."""
    tok = load_tokenizer(micro_dir() if template == "micro" else qwen_dir)
    question = [{"role": "user", "content": "Weather in Paris?"}]
    reply = {"role": "assistant", "content": "Sunny."}
    prefix = next_turn_prefix(tok, request(messages=question), reply)
    for follow_up in ("Thanks!", "\n\nindented\n", "<think>odd</think>"):
        turn = [*question, reply, {"role": "user", "content": follow_up}]
        following = render_chat(tok, request(messages=turn)).tokens
        assert following[: len(prefix)] == prefix and len(following) > len(prefix)
        rest = tok.decode(following[len(prefix) :])
        assert rest.startswith("\n") and "<|im_start|>user" not in rest


def test_next_turn_prefix_after_tool_calls(qwen_dir):
    """After tool calls the next message is a tool result: the prefix reaches into its
    <tool_response> opening."""
    tok = load_tokenizer(qwen_dir)
    question = [{"role": "user", "content": "Weather in Paris?"}]
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    assistant = {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Look it up.",
        "tool_calls": [call],
    }
    reply = template_messages(request(messages=[assistant]).messages)[0]
    prefix = next_turn_prefix(tok, request(messages=question, tools=TOOLS), reply)
    turn = [*question, assistant, {"role": "tool", "tool_call_id": "c1", "content": "21°C"}]
    following = render_chat(tok, request(messages=turn, tools=TOOLS)).tokens
    assert following[: len(prefix)] == prefix
    assert tok.decode(following[len(prefix) :]) == (
        "\n21°C\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
