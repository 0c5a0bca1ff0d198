"""`mlxkit serve` batching concurrent requests (the engine on micro in float32, in this
process): while one long answer streams, other requests join it, one extending a state in the
prompt pool and one dropped by its client; each answer equals the runtime's for its prompt
alone, the dropped one leaves without disturbing the others, and a long prompt arriving is
prefilled in pieces between the running stream's tokens."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import mlx.core as mx
import pytest

from mlxkit import load, stream_generate
from mlxkit.micro import micro_dir
from mlxkit.serve.app import Settings, create_app
from mlxkit.serve.engine import PREFILL_PIECE, Engine
from tests.serve_helpers import openai_client, serve_in_process, sse_lines

ANCHOR = "class Stack:\n    def __init__(self):\n"
OTHERS = ["def fibonacci(n):\n", "import json\n\ndef load(path):\n", "for i in range(3):\n"]
REPEATED = "import os\nimport sys\n"


@pytest.fixture(scope="module")
def micro32():
    return load(str(micro_dir()), dtype=mx.float32)


def runtime_text(model, tok, prompt: str, max_tokens: int) -> str:
    return "".join(r.text for r in stream_generate(model, tok, prompt, max_tokens=max_tokens))


def stream(port: int, prompt: str, max_tokens: int, out: list) -> None:
    """Appends (arrival time, text) of each chunk of a streamed completion to `out`."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
    for line in sse_lines(port, "/v1/completions", body):
        if line == "[DONE]":
            return
        out.append((time.perf_counter(), json.loads(line)["choices"][0]["text"]))


def test_requests_joining_a_running_stream_get_their_own_answers(micro32):
    model, tok = micro32
    engine = Engine(model, tok, max_queue=4, prompt_cache_bytes=2**24)

    def client_side(port: int):
        client = openai_client(port)
        client.completions.create(model="m", prompt=REPEATED, max_tokens=4)  # into the pool
        answers, threads = {}, []
        anchor = sse_lines(
            port, "/v1/completions", {"prompt": ANCHOR, "max_tokens": 96, "stream": True}
        )
        chunks = [next(anchor)]  # the anchor is decoding: the others join it

        def complete(key: str, prompt: str, n: int) -> None:
            answers[key] = client.completions.create(model="m", prompt=prompt, max_tokens=n)

        def dropped() -> None:
            lines = sse_lines(
                port, "/v1/completions", {"prompt": "x = ", "max_tokens": 500, "stream": True}
            )
            for _ in range(3):
                next(lines)
            lines.close()

        jobs = [(complete, (p, p, 24 + 4 * i)) for i, p in enumerate(OTHERS)]
        jobs += [(complete, (REPEATED, REPEATED, 12)), (dropped, ())]
        for target, args in jobs:
            threads.append(threading.Thread(target=target, args=args))
            threads[-1].start()
        chunks += list(anchor)
        for t in threads:
            t.join(120)
        engine_idle = time.perf_counter() + 60
        while engine.busy and time.perf_counter() < engine_idle:
            time.sleep(0.05)
        return chunks, answers, engine.stats()

    app = create_app(engine, Settings("micro", 512))
    chunks, answers, stats = serve_in_process(engine, app, client_side)
    anchor_text = "".join(json.loads(c)["choices"][0]["text"] for c in chunks if c != "[DONE]")
    assert anchor_text == runtime_text(model, tok, ANCHOR, 96)
    for i, p in enumerate(OTHERS):
        assert answers[p].choices[0].text == runtime_text(model, tok, p, 24 + 4 * i), p
    again = answers[REPEATED]
    assert again.choices[0].text == runtime_text(model, tok, REPEATED, 12)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert stats["requests"]["cancelled"] == 1
    assert stats["requests"]["served"] == 2 + len(OTHERS) + 1
    assert max(map(int, stats["batch"]["steps_by_size"])) >= 3  # they were decoded together
    first = stats["recent_requests"][-1]
    assert first["time_to_first_token_s"] >= first["queue_wait_s"] >= 0


def test_a_long_prompt_is_prefilled_between_a_running_streams_tokens(micro32):
    """A 1,100-token prompt arrives while an answer streams: its prefill pieces alternate
    with the stream's decode steps, so the stream's tokens keep coming before the long
    prompt's first token."""
    model, tok = micro32
    engine = Engine(model, tok, max_queue=2, prompt_cache_bytes=0)
    long_prompt = "".join(f"value_{i} = compute({i}, scale={i % 7})\n" for i in range(70))
    n = len(tok.encode(long_prompt))
    assert n > 4 * PREFILL_PIECE

    def client_side(port: int):
        running, long_chunks = [], []
        anchor = threading.Thread(target=stream, args=(port, ANCHOR, 300, running))
        anchor.start()
        while not running:
            time.sleep(0.005)
        sent = time.perf_counter()
        stream(port, long_prompt, 2, long_chunks)
        anchor.join(120)
        return sent, long_chunks[0][0], running

    app = create_app(engine, Settings("micro", 512))
    sent, first_long, running = serve_in_process(engine, app, client_side)
    during = [t for t, _ in running if sent < t < first_long]
    assert len(during) >= n // PREFILL_PIECE - 1, (
        len(during),
        n,
        len(running),
        running[-1][0] - sent,
        first_long - sent,
    )


def test_shutting_down_answers_every_request_in_progress(micro32):
    """Stopped while three requests are being served, the engine gives each its 503 (it
    once walked the list it was removing them from, and skipped every other one)."""
    from mlxkit.serve.engine import SHUTTING_DOWN, Job

    model, tok = micro32
    engine = Engine(model, tok, max_queue=0, prompt_cache_bytes=0)
    loop = asyncio.new_event_loop()
    jobs = [Job(tok.encode(p), {"max_tokens": 500}, loop) for p in OTHERS]
    for job in jobs:
        assert engine.admit()
        engine.submit(job)
    looks = iter(range(40))  # stop() is looked at several times per step
    engine.run(stop=lambda: next(looks, None) is None)
    loop.run_until_complete(asyncio.sleep(0))  # the events sent from the engine arrive
    last = []
    for job in jobs:
        events = []
        while not job.events.empty():
            events.append(job.events.get_nowait())
        last.append(events[-1])
    loop.close()
    assert last == [SHUTTING_DOWN] * len(jobs)
