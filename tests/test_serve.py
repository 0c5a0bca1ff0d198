"""`mlxkit serve` end to end: a real server process on a free loopback port (micro), driven by
the official `openai` client. Outputs are checked against the runtime API on the same prompt."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import openai
import pytest
from click.testing import CliRunner

import mlxkit
from mlxkit.cli import main
from mlxkit.generate import stream_generate
from mlxkit.serve.chat import common_prefix
from tests.helpers import FIXTURES
from tests.serve_helpers import (  # noqa: F401 - time_limit: autouse, bounds every test here
    Server,
    micro_with_template,
    time_limit,
)
from tests.test_serve_parse import TOOLS

USER = "def parse_args(argv):\n    "
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def server():
    s = Server("--size", "micro", "--max-tokens", "256")
    yield s
    assert s.stop() == 0, "".join(s.log)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def micro():
    return mlxkit.load("micro")


SERVER_DRAFTS = "auto"  # `mlxkit serve --num-draft`'s default: sampled tokens depend on the rounds


def reference(micro, prompt, **kw) -> tuple[str, list[int], str]:
    """The runtime's text, token ids and finish reason for a prompt (text, ids or messages),
    drafting as the server does."""
    model, tok = micro
    out = list(stream_generate(model, tok, prompt, num_draft=SERVER_DRAFTS, **kw))
    return "".join(r.text for r in out), [r.token for r in out], out[-1].finish_reason


def chat_ids(micro, messages, thinking=True) -> list[int]:
    _, tok = micro
    return tok.encode(tok.apply_chat_template(messages, True, thinking))


def stream_text(stream) -> tuple[str, str, str | None, object]:
    """(content, reasoning, finish_reason, usage) of a streamed chat completion."""
    content = reasoning = ""
    finish = usage = None
    for i, chunk in enumerate(stream):
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if i == 0:
            assert delta.role == "assistant"
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning_content", None) or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, reasoning, finish, usage


# --------------------------------------------------------------------------- basics


def test_models_health_and_stats(server, client):
    assert [m.id for m in client.models.list().data] == ["micro"]
    assert server.request("GET", "/health")[:3:2] == (200, {"status": "ok", "model": "micro"})
    stats = server.stats()
    assert stats["mtp"]["enabled"] is True and stats["mtp"]["num_draft"] == "auto"
    assert stats["requests"]["max_in_flight"] == 40  # --max-batch 32 + --max-queue 8


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_equals_generate(client, micro, stream):
    messages = [{"role": "user", "content": USER}]
    text, ids, finish = reference(micro, messages, max_tokens=40, enable_thinking=False)
    kw = {
        "model": "micro",
        "messages": messages,
        "max_tokens": 40,
        "temperature": 0,
        "extra_body": NO_THINK,
    }
    if stream:
        content, reasoning, got_finish, usage = stream_text(
            client.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **kw
            )
        )
    else:
        r = client.chat.completions.create(**kw)
        content, got_finish, usage = (
            r.choices[0].message.content,
            r.choices[0].finish_reason,
            r.usage,
        )
        reasoning = getattr(r.choices[0].message, "reasoning_content", None) or ""
    assert content == text.rstrip()  # the server drops trailing whitespace from content
    assert reasoning == "" and got_finish == finish
    assert usage.completion_tokens == len(ids)
    assert usage.prompt_tokens == len(chat_ids(micro, messages, thinking=False))
    details = usage.completion_tokens_details
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens > 0
    mtp = usage.model_extra["mtp"]  # what auto chose and why (issue 24)
    assert mtp["auto"] and sum(mtp["rounds_per_k"][1:]) > 0 and mtp["costs"] == "measured"
    assert len(mtp["acceptance_by_depth"]) == len(mtp["expected_speedup"]) - 1 == 3


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_on_gives_reasoning_content(client, micro, stream):
    """With thinking on the prompt opens a <think> block: what micro writes before it closes
    one (it never does within this budget) is reasoning, not content."""
    messages = [{"role": "user", "content": USER}]
    text, _, _ = reference(micro, messages, max_tokens=30)
    assert "</think>" not in text
    kw = {"model": "micro", "messages": messages, "max_tokens": 30}
    if stream:
        content, reasoning, finish, _ = stream_text(
            client.chat.completions.create(stream=True, **kw)
        )
    else:
        r = client.chat.completions.create(**kw)
        content, finish = r.choices[0].message.content, r.choices[0].finish_reason
        reasoning = r.choices[0].message.reasoning_content
    assert reasoning == text.strip() and content == "" and finish == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_completions_greedy_equals_generate(client, micro, stream):
    prompt = "class Stack:\n    def __init__(self):\n        "
    text, ids, finish = reference(micro, prompt, max_tokens=48)
    if stream:
        chunks = list(
            client.completions.create(model="micro", prompt=prompt, max_tokens=48, stream=True)
        )
        got = "".join(c.choices[0].text for c in chunks)
        got_finish = chunks[-1].choices[0].finish_reason
    else:
        r = client.completions.create(model="micro", prompt=prompt, max_tokens=48)
        got, got_finish = r.choices[0].text, r.choices[0].finish_reason
        assert r.usage.completion_tokens == len(ids)
    assert (got, got_finish) == (text, finish)


def test_token_id_prompts(client, micro):
    _, tok = micro
    ids = tok.encode("import os\n")
    r = client.completions.create(model="micro", prompt=ids, max_tokens=12)
    assert r.choices[0].text == reference(micro, ids, max_tokens=12)[0]
    assert r.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(client, micro, stream):
    prompt = "def f(x):\n    "
    full = reference(micro, prompt, max_tokens=40)[0]
    stop = full[8:12]  # a string the model does write, cut mid-token or not
    expected = reference(micro, prompt, max_tokens=40, stop=[stop])[0]
    assert expected == full[: full.index(stop)]
    if stream:
        chunks = list(
            client.completions.create(
                model="m", prompt=prompt, max_tokens=40, stop=[stop, "never"], stream=True
            )
        )
        got = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = client.completions.create(model="m", prompt=prompt, max_tokens=40, stop=stop)
        got, finish = r.choices[0].text, r.choices[0].finish_reason
    assert (got, finish) == (expected, "stop")


def test_seeds_are_reproducible(client):
    def sample(seed):
        r = client.completions.create(
            model="m",
            prompt="def f(x):\n    ",
            max_tokens=24,
            temperature=1.0,
            top_p=0.95,
            seed=seed,
        )
        return r.choices[0].text

    assert sample(5) == sample(5)
    assert len({sample(s) for s in (1, 2, 3)}) > 1  # and the seed does matter


def test_sampled_chat_matches_the_runtime_with_the_same_seed(client, micro):
    messages = [{"role": "user", "content": "class Queue:\n    "}]
    text = reference(
        micro, messages, max_tokens=24, temperature=0.8, top_k=40, seed=3, enable_thinking=False
    )[0]
    r = client.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=24,
        temperature=0.8,
        seed=3,
        extra_body={**NO_THINK, "top_k": 40},
    )
    assert r.choices[0].message.content == text.rstrip()


# --------------------------------------------------------------------------- prompt reuse


@pytest.mark.parametrize("thinking", [False, True])
def test_second_chat_turn_reuses_the_first(server, client, micro, thinking):
    """While idle after the first turn, the server prefills what the next request will start
    with (the history with the answer as the template renders it back), so the second turn
    processes only its new message and the generation prompt, whatever request came between.
    That is more than the first turn's prompt + completion minus what micro's template rewrites
    (it drops the generation prompt's <think> block from the history)."""
    _, tok = micro
    extra = {"chat_template_kwargs": {"enable_thinking": thinking}}
    first = [
        {"role": "system", "content": f"thinking={thinking}"},
        {"role": "user", "content": "def tokenize(source):\n    "},
    ]
    prepared = server.stats()["tokens"]["prepared"]
    r1 = client.chat.completions.create(model="m", messages=first, max_tokens=20, extra_body=extra)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    server.wait_idle(prepared_after=prepared)
    client.completions.create(model="m", prompt="import re\n", max_tokens=8)  # in between
    answer = r1.choices[0].message
    assistant = {"role": "assistant", "content": answer.content}
    if thinking:
        assistant["reasoning_content"] = answer.reasoning_content
    second = [*first, assistant, {"role": "user", "content": "class Token:\n    "}]
    r2 = client.chat.completions.create(model="m", messages=second, max_tokens=20, extra_body=extra)
    p1, p2 = chat_ids(micro, first, thinking), chat_ids(micro, second, thinking)
    completion = reference(micro, first, max_tokens=20, enable_thinking=thinking)[1]
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert r2.usage.prompt_tokens == len(p2)
    opening = "<think>\n" if thinking else "<think>\n\n</think>\n\n"
    assert tok.decode(p2[cached:]) == (
        "\nclass Token:\n    <|im_end|>\n<|im_start|>assistant\n" + opening
    )
    assert cached > common_prefix(p1 + completion, p2) >= len(p1) - 6
    # the answer is the runtime's for the whole prompt: reuse changes nothing
    text = reference(micro, second, max_tokens=20, enable_thinking=thinking)[0]
    got = r2.choices[0].message
    if thinking:
        assert "</think>" not in text and got.reasoning_content == text.strip()
    else:
        assert got.content == text.rstrip()


def test_a_prompt_extending_prompt_and_completion_processes_only_the_rest(client, micro):
    """Without a template in the way (token-id prompts), the whole first prompt and completion
    are reused."""
    _, tok = micro
    p1 = tok.encode("def merge(left, right):\n    ")
    r1 = client.completions.create(model="m", prompt=p1, max_tokens=16)
    completion = reference(micro, p1, max_tokens=16)[1]
    assert r1.choices[0].text == tok.decode(completion)
    p2 = p1 + completion + tok.encode("\n\n\ndef split(items):\n    ")
    r2 = client.completions.create(model="m", prompt=p2, max_tokens=16)
    assert r2.usage.prompt_tokens_details.cached_tokens == len(p1) + len(completion)
    assert r2.choices[0].text == reference(micro, p2, max_tokens=16)[0]


# --------------------------------------------------------------------------- tools


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory):
    """micro with the chat template Qwen 3.5 checkpoints ship (it renders tools), behind an
    API key."""
    model_dir = micro_with_template(
        tmp_path_factory.mktemp("qwen"), FIXTURES / "qwen3_5_chat_template.jinja"
    )
    s = Server("--model", str(model_dir), "--api-key", "sekret")
    s.model_dir = model_dir
    yield s
    assert s.stop() == 0, "".join(s.log)


def test_tool_call_round_trip(qwen_server, micro):
    """Tools go into the prompt exactly as transformers renders them, and so does the history
    of a tool call and its result: the same tokens and the same answer as the runtime. (micro
    writes no tool calls itself; parsing them from Qwen 3.5 text is in test_serve_parse.)"""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(qwen_server.model_dir)
    client = qwen_server.client(api_key="sekret")
    model, tok = micro  # the same tokenizer; only the template differs
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 2})},
    }
    history = [
        *question,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    for messages in (question, history):
        r = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, max_tokens=16)
        hf_messages = json.loads(json.dumps(messages))
        for m in hf_messages:
            for c in m.get("tool_calls", []):
                c["function"]["arguments"] = json.loads(c["function"]["arguments"])
        ids = hf.apply_chat_template(
            hf_messages, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert r.usage.prompt_tokens == len(ids)
        text = "".join(x.text for x in stream_generate(model, tok, list(ids), max_tokens=16))
        assert r.choices[0].message.reasoning_content == text.strip()
        assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls


def test_api_key(qwen_server):
    status, _, body = qwen_server.request("GET", "/v1/models")
    assert status == 401 and "API key" in body["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        qwen_server.client(api_key="wrong").models.list()
    assert qwen_server.request("GET", "/health")[0] == 200  # health checks need no key


def test_tools_on_a_template_that_ignores_them(client):
    with pytest.raises(openai.BadRequestError, match="does not render tools") as e:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS, max_tokens=4
        )
    assert e.value.body["param"] == "tools"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"messages": []}, "messages", "at least 1 item"),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            "max_tokens",
            "greater than or equal to 1",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 257},
            "max_tokens",
            "at most 256",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            "temperature",
            "valid number",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n", "only n=1"),
        (
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
            "needs logprobs",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "file:///etc/hosts"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0]",
            "reads no local image files",
        ),
    ],
)
def test_bad_requests_get_400_in_the_openai_shape(server, body, param, message):
    status, _, reply = server.request("POST", "/v1/chat/completions", body)
    assert status == 400
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["param"] == param and message in reply["error"]["message"]


def test_prompt_longer_than_the_context_is_a_400_even_when_streaming(server, micro):
    _, tok = micro
    context = micro[0].config.max_position_embeddings
    ids = (tok.encode("x = 1\n") * context)[:context]
    for stream in (False, True):
        status, _, reply = server.request(
            "POST", "/v1/completions", {"prompt": ids, "stream": stream}
        )
        assert status == 400 and "context" in reply["error"]["message"]


def test_other_http_errors(server):
    assert server.request("GET", "/v1/nothing")[0] == 404
    status, _, reply = server.request("GET", "/v1/chat/completions")
    assert status == 405 and reply["error"]["message"].startswith("GET is not allowed")
    big = b'{"prompt": "' + b"x" * (8 * 2**20) + b'"}'
    status, _, reply = server.request("POST", "/v1/completions", big)
    assert status == 413 and "larger than" in reply["error"]["message"]


# --------------------------------------------------------------------------- the command


def test_serve_command_errors():
    runner = CliRunner()
    r = runner.invoke(main, ["serve"])
    assert r.exit_code == 2 and "pass either --model PATH or --size SIZE" in r.output
    r = runner.invoke(main, ["serve", "--size", "micro", "--prompt-cache-size", "lots"])
    assert r.exit_code == 2 and "not a memory size" in r.output


def test_missing_server_stack_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a)
    )
    r = CliRunner().invoke(main, ["serve", "--size", "micro"])
    assert r.exit_code == 2
    assert r.output.strip() == "error: mlxkit serve needs uvicorn: pip install 'mlxkit[serve]'"


def test_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "mlxkit", "serve", "--size", "micro", "--port", str(port)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2
    assert f"error: cannot listen on 127.0.0.1:{port}" in r.stderr
