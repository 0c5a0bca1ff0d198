"""Log-probabilities and logit_bias in the Python API: each response's log-probabilities equal a
float64 log-softmax of the model's logits at the emitted token (float32 micro, within 1e-5),
with and without MTP, greedy and sampled, whatever the temperature, penalties and bias; the
top alternatives are the most likely tokens, best first; logit_bias moves the choice."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxkit.generate import stream_generate
from mlxkit.load import load

PROMPT = "def parse_args(argv):\n    "
TOP = 5


@pytest.fixture(scope="module")
def micro_f32():
    return load("micro", dtype=mx.float32)


def reference(model, tokens: list[int], n_prompt: int) -> np.ndarray:
    """float64 log-softmax of the model's logits for each generated position [n, V], from one
    pass over the prompt and the generated tokens."""
    logits = np.array(model(mx.array([tokens[:-1]]))[0, n_prompt - 1 :], dtype=np.float64)
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


def check_logprobs(model, tok, responses) -> None:
    prompt = tok.encode(PROMPT)
    tokens = [r.token for r in responses]
    ref = reference(model, prompt + tokens, len(prompt))
    for i, r in enumerate(responses):
        assert abs(r.logprobs.logprob - ref[i, r.token]) < 1e-5, i
        ids = [t for t, _ in r.logprobs.top]
        values = np.array([v for _, v in r.logprobs.top])
        assert len(ids) == TOP and np.all(np.diff(values) <= 0)  # best first
        np.testing.assert_allclose(values, ref[i, ids], atol=1e-5)
        np.testing.assert_allclose(values, np.sort(ref[i])[::-1][:TOP], atol=1e-5)


SETTINGS = {
    "greedy": {},
    "sampled, penalized, biased": {
        "temperature": 0.9,
        "top_k": 50,
        "repetition_penalty": 1.3,
        "logit_bias": {220: -3.0, 13: 2.0},
        "seed": 3,
    },
}


@pytest.mark.parametrize("mtp", [False, True], ids=["plain", "mtp"])
@pytest.mark.parametrize("setting", SETTINGS, ids=list(SETTINGS))
def test_logprobs_are_the_models_raw_log_softmax(micro_f32, mtp, setting):
    """The emitted token's log-probability and the top 5, from the model's own logits, before
    temperature, penalties and bias; with MTP from the main model's verification (drafts were
    made and accepted, so those tokens' log-probabilities came from verification rows)."""
    model, tok = micro_f32
    out = list(
        stream_generate(
            model,
            tok,
            PROMPT,
            max_tokens=24,
            mtp=mtp,
            num_draft=3,
            logprobs=TOP,
            **SETTINGS[setting],
        )
    )
    assert len(out) == 24
    if mtp:
        assert out[-1].accepted > 0
    check_logprobs(model, tok, out)


def test_logprobs_off_and_zero(micro_f32):
    model, tok = micro_f32
    assert all(r.logprobs is None for r in stream_generate(model, tok, PROMPT, max_tokens=3))
    out = list(stream_generate(model, tok, PROMPT, max_tokens=3, logprobs=0))
    assert all(r.logprobs.top == () and r.logprobs.logprob <= 0 for r in out)


def test_logit_bias_moves_the_choice_and_mtp_agrees(micro_f32):
    """+100 on a token makes greedy pick it every time; -100 on greedy's first token makes it
    pick another; MTP's greedy text equals plain's under the same bias (float32)."""
    model, tok = micro_f32
    plain = [r.token for r in stream_generate(model, tok, PROMPT, max_tokens=8, mtp=False)]
    forced = [
        r.token for r in stream_generate(model, tok, PROMPT, max_tokens=6, logit_bias={42: 100})
    ]
    assert forced == [42] * 6
    banned = {plain[0]: -100}
    runs = [
        [
            r.token
            for r in stream_generate(
                model, tok, PROMPT, max_tokens=8, mtp=mtp, num_draft=2, logit_bias=banned
            )
        ]
        for mtp in (False, True)
    ]
    assert runs[0][0] != plain[0] and plain[0] not in runs[0]
    assert runs[1] == runs[0]


# --------------------------------------------------------------------------- the server


def test_server_logprobs_and_logit_bias(micro_f32):
    """Chat (streamed and not) and completions give the Python API's log-probabilities in
    OpenAI's shapes (float32 micro, MTP with 2 drafts on both sides), the end-of-turn token
    left out; logit_bias reaches the sampler."""

    from mlxkit.serve.app import Settings, create_app
    from mlxkit.serve.engine import Engine
    from tests.serve_helpers import openai_client, serve_in_process

    model, tok = micro_f32
    engine = Engine(model, tok, max_queue=1, prompt_cache_bytes=0, num_draft=2)
    messages = [{"role": "user", "content": PROMPT}]
    no_think = {"chat_template_kwargs": {"enable_thinking": False}}

    def client_side(port: int):
        client = openai_client(port)
        kw = {"model": "m", "messages": messages, "max_tokens": 12, "extra_body": no_think}
        whole = client.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
        chunks = list(
            client.chat.completions.create(**kw, logprobs=True, top_logprobs=3, stream=True)
        )
        text = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, logprobs=2)
        biased = client.completions.create(
            model="m", prompt=PROMPT, max_tokens=4, logit_bias={"42": 100}
        )
        return whole, chunks, text, biased

    whole, chunks, text, biased = serve_in_process(
        engine, create_app(engine, Settings("micro", 64)), client_side
    )
    chat_ids = tok.encode(tok.apply_chat_template(messages, True, False))
    api = list(stream_generate(model, tok, chat_ids, max_tokens=12, num_draft=2, logprobs=3))
    api = [r for r in api if r.token not in tok.eos_token_ids]
    got = whole.choices[0].logprobs.content
    assert [e.bytes for e in got] == [list(tok.token_bytes(r.token)) for r in api]
    for e, r in zip(got, api):
        assert abs(e.logprob - r.logprobs.logprob) < 1e-5
        assert [list(t.bytes) for t in e.top_logprobs] == [
            list(tok.token_bytes(t)) for t, _ in r.logprobs.top
        ]
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in got]

    api = list(stream_generate(model, tok, PROMPT, max_tokens=12, num_draft=2, logprobs=2))
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(api) == 12
    assert all(abs(a - r.logprobs.logprob) < 1e-5 for a, r in zip(lp.token_logprobs, api))
    assert all(len(top) == 2 for top in lp.top_logprobs)
    offsets = [sum(len(r.text) for r in api[:i]) for i in range(len(api))]
    assert lp.text_offset == offsets
    assert [
        r.token for r in stream_generate(model, tok, PROMPT, max_tokens=4, logit_bias={42: 100})
    ] == [42] * 4
    assert biased.choices[0].text == tok.decode([42] * 4)
