"""`mlxkit serve --kv-bits / --kv-group-size / --quantized-kv-start`: every request decodes on
a cache kept as the server was told (answers equal `stream_generate` with the same settings),
and every state the prompt-cache pool keeps and hands back is of that one setting."""

from __future__ import annotations

import pytest

import mlxkit
from mlxkit.cache import KVCache, KVQuantization
from mlxkit.generate import stream_generate
from mlxkit.serve.app import Settings, create_app
from mlxkit.serve.engine import Engine
from tests.badinput import cli, run_row
from tests.serve_helpers import (  # noqa: F401 - time_limit: autouse, bounds every test here
    REQUEST_TIMEOUT_S,
    Server,
    openai_client,
    serve_in_process,
    time_limit,
)

PROMPT = "def merge(left, right):\n    "
KV = {"kv_bits": 4, "kv_group_size": 32}  # micro's head dim is 32: the only group size it takes
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def micro():
    return mlxkit.load("micro")


def reference(micro, prompt: str, **kw) -> str:
    """The runtime's greedy text, drafting as the server does."""
    model, tok = micro
    out = stream_generate(model, tok, prompt, max_tokens=MAX_TOKENS, num_draft="auto", **kw)
    return "".join(r.text for r in out)


def test_every_request_and_pooled_state_keeps_the_server_setting(micro):
    """Two requests, the second extending the first's prompt and answer: both answer as
    stream_generate does with a 4-bit cache (not as with a full-precision one: micro's ninth
    token differs), the second continues the first's pooled state, and that state and the one
    kept after it are 4-bit."""
    model, tok = micro
    first = reference(micro, PROMPT, **KV)
    assert first != reference(micro, PROMPT)  # else this test could not tell the caches apart
    second_prompt = PROMPT + first + "\n\n\ndef split(items):\n    "
    engine = Engine(model, tok, max_queue=1, prompt_cache_bytes=2**22, **KV)

    def client_side(port: int) -> list:
        client = openai_client(port)
        return [
            client.completions.create(model="m", prompt=p, max_tokens=MAX_TOKENS, temperature=0)
            for p in (PROMPT, second_prompt)
        ]

    answers = serve_in_process(engine, create_app(engine, Settings("micro", 64)), client_side)
    assert [a.choices[0].text for a in answers] == [first, reference(micro, second_prompt, **KV)]
    assert answers[1].usage.prompt_tokens_details.cached_tokens > len(tok.encode(PROMPT))
    kept = engine.pool.take(tok.encode(second_prompt + answers[1].choices[0].text) + [0])
    assert kept is not None and kept.kv == KVQuantization(4, 32, 0) == engine.kv
    layers = [c for c in kept.main + kept.mtp if isinstance(c, KVCache)]
    assert layers and all(c.quantized and c.quantization == engine.kv for c in layers)


def test_serve_command_passes_the_settings(micro):
    s = Server("--size", "micro", "--max-tokens", "64", "--kv-bits", "4", "--kv-group-size", "32")
    try:
        r = s.client().completions.create(
            model="micro", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
        )
        assert r.choices[0].text == reference(micro, PROMPT, **KV)
        assert "KV cache 4-bit" in "".join(s.log)
    finally:
        assert s.stop() == 0, "".join(s.log)


def serve(id: str, *args: str, **kw):
    return cli(f"serve: {id}", "serve", "--size", "micro", *args, needs=(), **kw)


# fmt: off
BAD_ROWS = [
    serve("--kv-bits 3", "--kv-bits", "3", message="kv_bits must be 4, 8 or None"),
    serve("--kv-group-size 48", "--kv-bits", "8", "--kv-group-size", "48",
          message="kv_group_size must be 32, 64 or 128, got 48"),
    serve("--quantized-kv-start -1", "--kv-bits", "8", "--kv-group-size", "32",
          "--quantized-kv-start", "-1", message="quantized_kv_start must be an integer >= 0"),
    serve("group size past the head dim", "--kv-bits", "8",
          message="kv_group_size 64 does not divide this model's head dim 32"),
]
# fmt: on


@pytest.mark.parametrize("row", BAD_ROWS, ids=lambda r: r.id)
def test_bad_kv_option(row, tmp_path, monkeypatch):
    run_row(row, tmp_path, monkeypatch, {})
