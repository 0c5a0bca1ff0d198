"""The server under load and when things go wrong: concurrent clients, a full queue, malformed
requests, a client killed mid-stream or gone mid-answer, a generation that breaks, the server
stopped mid-stream. Kept fast (micro, a dozen tokens a request). Nothing asserts on timing: a
busy machine changes how often the queue fills, never what each request gets. Where an
outcome depends on what runs when, the server runs in this process with a generation held
at a gate, so that the order is the test's."""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest

import mlxkit
import mlxkit.serve.app as app_module
from mlxkit.generate import Generation, PromptCache, prefill, stream_generate
from mlxkit.serve.app import Settings, create_app
from mlxkit.serve.chat import render_chat
from mlxkit.serve.engine import Engine
from mlxkit.serve.protocol import ChatRequest, parse
from tests.serve_helpers import (  # noqa: F401 - time_limit: autouse, bounds every test here
    REQUEST_TIMEOUT_S,
    Server,
    openai_client,
    serve_in_process,
    sse_lines,
    time_limit,
)
from tests.test_serve import SERVER_DRAFTS

MAX_BATCH, MAX_QUEUE = 3, 2  # 8 clients: batches of 3, a full queue, some 503s
CLIENTS, MAX_TOKENS = 8, 12
MAX_PER_CLIENT = 5  # requests of one client are numbered c * MAX_PER_CLIENT + i
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
        "--max-batch",
        str(MAX_BATCH),
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
    """Request i of client c: chat or completion, streamed or not, its own prompt and seed,
    greedy (decoded in batches) or sampled (with MTP and a seed: decoded alone, beside them)."""
    n = c * MAX_PER_CLIENT + i
    text = f"# job {c} {i}\n{STARTS[n % len(STARTS)]}"
    return {
        "chat": n % 3 == 0,
        "stream": n % 2 == 0,
        "text": text,
        "seed": 100 + n,
        "temperature": 1.0 if n % 4 in (1, 2) else 0.0,
        "max_tokens": max_tokens,
    }


def expected_text(micro, s: dict) -> str:
    """What the runtime writes for the request, prefilled the way the server prefills it."""
    model, tok = micro
    options = {"max_tokens": s["max_tokens"], "temperature": s["temperature"], "seed": s["seed"]}
    options["num_draft"] = SERVER_DRAFTS
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
    kw = {"model": "micro", "max_tokens": s["max_tokens"], "seed": s["seed"]}
    kw["temperature"] = s["temperature"]
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
    """Every kind of request once, then batches of each size, so that later memory is not
    first use (a batch size's first step compiles its blocks)."""
    client = server.client()
    warm = [
        {**spec(c, 0), "text": f"# warm {c}\nx = 1\n", "chat": c < 2, "stream": c % 2 == 0}
        for c in range(4)
    ]
    for s in warm:
        send(client, s)
    for size in range(2, MAX_BATCH + 1):
        threads = [threading.Thread(target=send, args=(client, warm[i])) for i in range(size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(REQUEST_TIMEOUT_S)


def test_concurrent_clients_get_their_own_answers_or_503(server, micro):
    """8 clients x 3 requests, chat and completions, streamed and not: each request gets its
    own complete answer (the one the runtime gives for its prompt and seed) or a 503 with
    Retry-After, which the client honours before its next request. The queue never holds more
    than it may, every 503 is counted, and afterwards the server's memory is back where it was.
    (How many get a 503 depends on the machine's load: that a full queue answers 503 is
    `test_a_full_queue_is_a_503_before_any_image_is_decoded`.)"""
    load(server, micro, MAX_TOKENS, per_client=3)


@pytest.mark.slow
def test_concurrent_clients_with_long_answers(server, micro):
    """The same with 5 requests each and answers of up to 256 tokens: the prompt-cache pool
    evicts all along."""
    load(server, micro, 256, per_client=5)


def load(server: Server, micro, max_tokens: int, per_client: int) -> None:
    assert per_client <= MAX_PER_CLIENT
    warm_up(server, micro)
    base = server.wait_idle()
    base_rss = server.rss()
    specs = {(c, i): spec(c, i, max_tokens) for c in range(CLIENTS) for i in range(per_client)}
    expected = {k: expected_text(micro, s) for k, s in specs.items()}
    assert len(set(expected.values())) >= 0.7 * len(expected)  # answers tell requests apart

    results: dict = {}

    def client_loop(c: int) -> None:
        client = server.client(timeout=120)
        for i in range(per_client):
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
        t.join(len(specs) * REQUEST_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a client hung"

    ok = {k for k, (outcome, _) in results.items() if outcome == "ok"}
    busy = {k for k, (outcome, _) in results.items() if outcome == 503}
    assert ok | busy == set(specs), {k: v for k, v in results.items() if k not in ok | busy}
    for k in ok:
        assert results[k][1] == expected[k], (k, specs[k])
    assert all(int(results[k][1]) >= 1 for k in busy)
    assert ok

    stats = server.wait_idle()
    assert stats["requests"]["most_in_flight"] <= MAX_BATCH + MAX_QUEUE
    assert max(map(int, stats["batch"]["steps_by_size"])) > 1  # requests were batched
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


def wait_for(condition, what: str, timeout: float = REQUEST_TIMEOUT_S) -> None:
    """Polls `condition()` until it holds; fails the test if it does not within `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout} s")
        time.sleep(0.01)


def test_a_killed_client_frees_the_slot(server):
    """A client killed mid-stream stops its generation: cancelled, not served."""
    client = server.client()
    before = server.wait_idle()["requests"]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, str(server.port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "streaming"
    proc.kill()
    proc.wait()
    stats = server.wait_idle()
    assert stats["requests"]["cancelled"] == before["cancelled"] + 1
    assert stats["requests"]["served"] == before["served"]
    r = client.completions.create(model="m", prompt="y = 2\n", max_tokens=4)  # still serving
    assert r.choices[0].finish_reason in ("stop", "length")


def test_ctrl_c_stops_a_server_that_started_with_sigint_ignored():
    """A process started in the background by a non-interactive shell (as test runners and
    service managers start them) inherits SIGINT ignored; Python then installs no
    KeyboardInterrupt handler, and Ctrl-C (or `_thread.interrupt_main`) did nothing."""
    s = Server("--size", "micro", sigint_ignored=True)
    s.proc.send_signal(signal.SIGINT)
    try:
        code = s.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        s.stop()
        pytest.fail("SIGINT did not stop the server")
    assert code == 0, "".join(s.log)


# --------------------------------------------------------------------------- in this process


def endless(release: threading.Event | None = None):
    """A `Generation.decode` stand-in (how the engine decodes a request alone): the runtime's
    first token, then (once `release` is set, if given) the same token again and again, never
    finishing."""
    real = Generation.decode

    def decode(self, y):
        first = dataclasses.replace(next(real(self, y)), finish_reason=None)
        yield first
        if release is not None:
            assert release.wait(REQUEST_TIMEOUT_S), "the test never opened the gate"
        while True:
            time.sleep(0.002)
            yield first

    return decode


def post(port: int, path: str, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_a_failing_generation_is_a_500_and_the_server_keeps_serving(micro, monkeypatch):
    """A generation that breaks before its first token, and one that breaks mid-stream (its
    stream then ends with an error event and [DONE])."""
    model, tok = micro
    calls = []

    real = Generation.decode

    def breaking(self, y):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of cheese")
        for i, r in enumerate(real(self, y)):
            if i == 2 and len(calls) == 2:
                raise RuntimeError("mid-stream")
            yield r

    monkeypatch.setattr(Generation, "decode", breaking)
    engine = Engine(model, tok, max_queue=2, prompt_cache_bytes=2**20)

    def client_side(port: int) -> dict:
        client = openai_client(port)
        outcome = {}
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="m", prompt="a = ", max_tokens=8)
        outcome["first"] = e.value.body
        body = {"prompt": "b = ", "max_tokens": 8, "stream": True}
        outcome["second"] = list(sse_lines(port, "/v1/completions", body))
        outcome["third"] = client.completions.create(model="m", prompt="c = ", max_tokens=8)
        return outcome

    outcome = serve_in_process(engine, create_app(engine, Settings("micro", 64)), client_side)
    assert outcome["first"]["type"] == "server_error"
    assert outcome["first"]["message"] == "generation failed: RuntimeError: out of cheese"
    *tokens, error, done = outcome["second"]
    assert len(tokens) == 2 and done == "[DONE]"
    assert json.loads(error)["error"]["message"] == "generation failed: RuntimeError: mid-stream"
    assert outcome["third"].choices[0].finish_reason in ("stop", "length")
    assert engine.counters.failed == 2 and engine.counters.served == 1


def test_sigterm_mid_stream_ends_it_with_an_error_and_done(micro, monkeypatch):
    """SIGTERM while one request streams and another waits for its first token: the stream
    ends with an error event and [DONE], the waiting request gets a 503 in the OpenAI error
    shape, and the server stops."""
    release = threading.Event()
    monkeypatch.setattr(Generation, "decode", endless(release))
    engine = Engine(*micro, max_batch=1, max_queue=2, prompt_cache_bytes=0)

    def client_side(port: int) -> tuple[list[str], tuple]:
        waiting: list = []
        lines = sse_lines(port, "/v1/completions", {"prompt": "a = ", "stream": True})
        seen = [next(lines)]  # generating, held at the gate
        other = threading.Thread(
            target=lambda: waiting.append(post(port, "/v1/completions", {"prompt": "b = "})),
            daemon=True,
        )
        other.start()
        wait_for(lambda: engine.in_flight == 2, "the second request admitted")
        signal.raise_signal(signal.SIGTERM)
        release.set()
        seen += list(lines)
        other.join(REQUEST_TIMEOUT_S)
        return seen, waiting[0]

    app = create_app(engine, Settings("micro", 64))
    seen, (status, body) = serve_in_process(engine, app, client_side, ctrl_c=False)
    assert seen[-1] == "[DONE]"
    error = json.loads(seen[-2])["error"]
    assert error["message"] == "the server is shutting down; retry later"
    assert all(json.loads(x)["object"] == "text_completion" for x in seen[:-2])
    assert status == 503 and body["error"]["message"] == error["message"]


def test_a_full_queue_is_a_503_before_any_image_is_decoded(micro, monkeypatch):
    """With the one place taken, a request with an image is refused with 503 and Retry-After
    before its image is looked at (decoding pictures for requests that then get a 503 took
    gigabytes)."""
    release = threading.Event()
    monkeypatch.setattr(Generation, "decode", endless(release))
    decoded = []
    real = app_module.request_images
    monkeypatch.setattr(app_module, "request_images", lambda *a: decoded.append(a[1]) or real(*a))
    engine = Engine(*micro, max_batch=1, max_queue=0, prompt_cache_bytes=0)
    png = "data:image/png;base64," + base64.b64encode(b"\x89PNG not really").decode()
    image_chat = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}}]}
        ]
    }

    def client_side(port: int) -> tuple:
        lines = sse_lines(port, "/v1/completions", {"prompt": "a = ", "stream": True})
        next(lines)  # the only place is taken
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
        conn.request("POST", "/v1/chat/completions", json.dumps(image_chat))
        response = conn.getresponse()
        refused = response.status, response.getheader("Retry-After"), json.loads(response.read())
        conn.close()
        release.set()
        lines.close()
        return refused

    app = create_app(engine, Settings("micro", 64))
    status, retry_after, body = serve_in_process(engine, app, client_side)
    assert status == 503 and int(retry_after) >= 1
    assert body["error"]["type"] == "server_busy" and "busy" in body["error"]["message"]
    assert decoded == []
    assert engine.counters.rejected == 1


def test_a_non_streaming_client_that_disconnects_stops_its_generation(micro, monkeypatch):
    """Its generation is cancelled while tokens keep coming (the check for a gone client once
    waited for a quarter second without a token, which a generation never leaves), and the
    place is freed."""
    monkeypatch.setattr(Generation, "decode", endless())
    engine = Engine(*micro, max_queue=1, prompt_cache_bytes=0)

    def client_side(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S) as sock:
            body = json.dumps({"prompt": "a = "}).encode()
            head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
            sock.sendall(head.encode() + b"\r\nContent-Type: application/json\r\n\r\n" + body)
            wait_for(lambda: engine.busy, "generating")
        wait_for(lambda: engine.counters.cancelled == 1, "cancelled")
        wait_for(lambda: engine.in_flight == 0 and not engine.busy, "the place freed")

    serve_in_process(engine, create_app(engine, Settings("micro", 64)), client_side)
    assert engine.counters.served == 0 and engine.counters.cancelled == 1
