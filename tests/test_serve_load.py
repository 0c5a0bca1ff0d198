"""The server under load and when things go wrong: concurrent clients, a full queue, malformed
requests, a client killed mid-stream, a generation that breaks. Kept fast (micro, a dozen
tokens a request); timings are asserted only where the behaviour is about time."""

from __future__ import annotations

import _thread
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest

import mlxkit
import mlxkit.serve.engine as engine_module
from mlxkit.generate import PromptCache, prefill, stream_generate
from mlxkit.serve.app import Settings, create_app
from mlxkit.serve.chat import render_chat
from mlxkit.serve.cli import run
from mlxkit.serve.engine import Engine
from mlxkit.serve.protocol import ChatRequest, parse
from tests.serve_helpers import Server

MAX_QUEUE = 3
CLIENTS, PER_CLIENT, MAX_TOKENS = 8, 10, 12
STARTS = [
    "def f(x):\n    ",
    "class Node:\n    ",
    "import os\n",
    "for i in range(10):\n    ",
    "with open(path) as f:\n    ",
    "try:\n    ",
]


@pytest.fixture(scope="module")
def server():
    s = Server(
        "--size",
        "micro",
        "--max-queue",
        str(MAX_QUEUE),
        "--prompt-cache-size",
        "2MB",
        "--max-tokens",
        "4096",
    )
    yield s
    assert s.stop() == 0, "".join(s.log)


@pytest.fixture(scope="module")
def micro():
    return mlxkit.load("micro")


def spec(c: int, i: int, max_tokens: int = MAX_TOKENS) -> dict:
    """Request i of client c: chat or completion, streamed or not, its own prompt and seed."""
    n = c * PER_CLIENT + i
    text = f"# job {c} {i}\n{STARTS[n % len(STARTS)]}"
    return {
        "chat": n % 3 == 0,
        "stream": n % 2 == 0,
        "text": text,
        "seed": 100 + n,
        "max_tokens": max_tokens,
    }


def expected_text(micro, s: dict) -> str:
    """What the runtime writes for the request, prefilled the way the server prefills it."""
    model, tok = micro
    options = {"max_tokens": s["max_tokens"], "temperature": 1.0, "seed": s["seed"]}
    if not s["chat"]:
        return "".join(r.text for r in stream_generate(model, tok, s["text"], **options))
    req = parse(
        ChatRequest,
        {
            "messages": [{"role": "user", "content": s["text"]}],
            "chat_template_kwargs": {"enable_thinking": False},
        },
    )
    prompt = render_chat(tok, req)
    cache = PromptCache.new(model)
    prefill(model, cache, prompt.tokens[: prompt.snapshot_at])
    out = stream_generate(model, tok, prompt.tokens, prompt_cache=cache, **options)
    return "".join(r.text for r in out).lstrip("\n").rstrip()  # as the server hands it out


def send(client: openai.OpenAI, s: dict) -> str:
    """The whole answer; raises openai.APIStatusError for an error status."""
    kw = {"model": "micro", "max_tokens": s["max_tokens"], "temperature": 1.0, "seed": s["seed"]}
    if s["chat"]:
        kw |= {
            "messages": [{"role": "user", "content": s["text"]}],
            "extra_body": {"chat_template_kwargs": {"enable_thinking": False}},
        }
        if not s["stream"]:
            r = client.chat.completions.create(**kw)
            assert r.choices[0].finish_reason in ("stop", "length")
            return r.choices[0].message.content
        chunks = list(client.chat.completions.create(stream=True, **kw))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        return "".join(c.choices[0].delta.content or "" for c in chunks)
    kw["prompt"] = s["text"]
    if not s["stream"]:
        r = client.completions.create(**kw)
        assert r.choices[0].finish_reason in ("stop", "length")
        return r.choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    return "".join(c.choices[0].text for c in chunks)


def warm_up(server: Server, micro) -> None:
    client = server.client()
    for c in range(4):  # every kind of request once, so that later memory is not first use
        send(
            client,
            {**spec(c, 0), "text": f"# warm {c}\nx = 1\n", "chat": c < 2, "stream": c % 2 == 0},
        )


def test_concurrent_clients_get_their_own_answers_or_503(server, micro):
    """8 clients x 10 requests, chat and completions, streamed and not: each request gets its
    own complete answer (the one the runtime gives for its prompt and seed) or a 503 with
    Retry-After, which the client honours before its next request. The queue never holds more
    than it may, and afterwards the server's memory is back where it was."""
    load(server, micro, MAX_TOKENS)


@pytest.mark.slow
def test_concurrent_clients_with_long_answers(server, micro):
    """The same with answers of up to 256 tokens: the prompt-cache pool evicts all along."""
    load(server, micro, 256)


def load(server: Server, micro, max_tokens: int) -> None:
    warm_up(server, micro)
    base = server.wait_idle()
    base_rss = server.rss()
    specs = {(c, i): spec(c, i, max_tokens) for c in range(CLIENTS) for i in range(PER_CLIENT)}
    expected = {k: expected_text(micro, s) for k, s in specs.items()}
    assert len(set(expected.values())) >= 0.9 * len(expected)  # answers tell requests apart

    results: dict = {}

    def client_loop(c: int) -> None:
        client = server.client(timeout=120)
        for i in range(PER_CLIENT):
            try:
                results[c, i] = ("ok", send(client, specs[c, i]))
            except openai.APIStatusError as e:
                retry = e.response.headers.get("retry-after", "")
                results[c, i] = (e.status_code, retry)
                if retry.isdigit():
                    time.sleep(int(retry))
            except Exception as e:  # noqa: BLE001 - reported below with the request
                results[c, i] = ("broken", repr(e))

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    ok = {k for k, (outcome, _) in results.items() if outcome == "ok"}
    busy = {k for k, (outcome, _) in results.items() if outcome == 503}
    assert ok | busy == set(specs), {k: v for k, v in results.items() if k not in ok | busy}
    for k in ok:
        assert results[k][1] == expected[k], (k, specs[k])
    assert busy, "8 clients never filled a queue of 3"
    assert all(int(results[k][1]) >= 1 for k in busy)
    assert len(ok) >= len(specs) // 2

    stats = server.wait_idle()
    assert stats["requests"]["most_in_flight"] <= 1 + MAX_QUEUE
    assert stats["requests"]["rejected"] - base["requests"]["rejected"] == len(busy)
    assert stats["requests"]["served"] - base["requests"]["served"] == len(ok)
    assert stats["prompt_cache"]["bytes"] <= stats["prompt_cache"]["max_bytes"] == 2 * 10**6

    # memory: what MLX holds beyond the prompt cache is what it held before; the process as a
    # whole grew by no more than the prompt cache did, plus allocator slack
    extra = stats["memory"]["active"] - stats["prompt_cache"]["bytes"]
    base_extra = base["memory"]["active"] - base["prompt_cache"]["bytes"]
    assert abs(extra - base_extra) <= 2**20, (base["memory"], stats["memory"])
    grown = stats["prompt_cache"]["bytes"] - base["prompt_cache"]["bytes"]
    assert server.rss() - base_rss <= max(grown, 0) + 16 * 2**20


MALFORMED = [
    b"",
    b"{",
    b"[1, 2]",
    b'{"messages": "hi"}',
    b'{"messages": [{"role": "user"}], "temperature": NaN}',
    b'{"messages": [{"content": "x"}]}',
    b'{"messages": [{"role": "robot", "content": "x"}]}',
    b'{"messages": [{"role": "user", "content": 5}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "audio"}]}]}',
    b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
    b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}',
    b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}',
    b'{"messages": [{"role": "user", "content": "x"}], "top_p": 0}',
    b'{"messages": [{"role": "user", "content": "x"}], "temperature": 3}',
    b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
    b'{"messages": [{"role": "user", "content": "x"}], "stop": [1, 2]}',
    b'{"messages": [{"role": "user", "content": "x"}], "seed": -4}',
    b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}',
    b'{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"enable_thinking": 0}}',
    b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
]


def test_malformed_requests_get_400s_and_the_server_still_answers(server):
    assert len(MALFORMED) == 20
    for body in MALFORMED:
        status, _, reply = server.request("POST", "/v1/chat/completions", body)
        assert status == 400, (body, reply)
        error = reply["error"]
        assert set(error) == {"message", "type", "param", "code"}, body
        assert error["type"] == "invalid_request_error" and error["message"], body
    r = server.client().completions.create(model="m", prompt="x = ", max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")


KILLED_CLIENT = """
import http.client, json, sys
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
conn.request("POST", "/v1/completions", json.dumps({"prompt": "def f(x):\\n    ",
             "max_tokens": 4000, "stream": True}), {"Content-Type": "application/json"})
response = conn.getresponse()
response.readline()
print("streaming", flush=True)
sys.stdin.read()
"""


def test_a_killed_client_frees_the_slot_within_a_second(server):
    client = server.client()
    t0 = time.perf_counter()
    r = client.completions.create(model="m", prompt="x = 1\n", max_tokens=200)
    rate = r.usage.completion_tokens / (time.perf_counter() - t0)
    assert 4000 / rate > 3, "4000 tokens would not keep the server busy for long enough"
    before = server.wait_idle()["requests"]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, str(server.port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "streaming"
    assert server.stats()["busy"]
    proc.kill()
    killed = time.perf_counter()
    proc.wait()
    while True:
        stats = server.stats()
        if not stats["busy"] and stats["requests"]["in_flight"] == 0:
            break
        assert time.perf_counter() - killed < 1.0, stats
        time.sleep(0.02)
    assert stats["requests"]["cancelled"] == before["cancelled"] + 1
    assert stats["requests"]["served"] == before["served"]
    r = client.completions.create(model="m", prompt="y = 2\n", max_tokens=4)  # still serving
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_failing_generation_is_a_500_and_the_server_keeps_serving(micro, monkeypatch):
    """The engine and uvicorn in this process (the engine on the main thread, as `mlxkit
    serve` runs them), with a generation that breaks before its first token and one that
    breaks mid-stream."""
    model, tok = micro
    calls = []

    def broken_after_two(stream):
        for i, r in enumerate(stream):
            if i == 2:
                raise RuntimeError("mid-stream")
            yield r

    def breaking(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of cheese")
        stream = stream_generate(*args, **kwargs)
        return broken_after_two(stream) if len(calls) == 2 else stream

    monkeypatch.setattr(engine_module, "stream_generate", breaking)
    engine = Engine(model, tok, max_queue=2, prompt_cache_bytes=2**20)
    app = create_app(engine, Settings("micro", 64))
    ports: list[int] = []
    outcome: dict = {}

    def client_side() -> None:
        try:
            while not ports:
                time.sleep(0.01)
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{ports[0]}/v1", api_key="x", max_retries=0
            )
            with pytest.raises(openai.InternalServerError) as e:
                client.completions.create(model="m", prompt="a = ", max_tokens=8)
            outcome["first"] = e.value.body
            with pytest.raises(openai.APIError) as e:
                list(client.completions.create(model="m", prompt="b = ", max_tokens=8, stream=True))
            outcome["second"] = str(e.value)
            outcome["third"] = client.completions.create(model="m", prompt="c = ", max_tokens=8)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = e
        finally:
            _thread.interrupt_main()  # stops run(), as Ctrl-C does

    sigterm = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=client_side)
    thread.start()
    try:
        run(engine, app, "127.0.0.1", 0, "warning", banner=lambda port: ports.append(port) or "")
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        thread.join()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["first"]["type"] == "server_error"
    assert outcome["first"]["message"] == "generation failed: RuntimeError: out of cheese"
    assert "mid-stream" in outcome["second"]
    assert outcome["third"].choices[0].finish_reason in ("stop", "length")
    assert engine.counters.failed == 2 and engine.counters.served == 1
