"""Batched decoding (`mlxkit.batch`) against each generation decoded alone, in float32: members
of different prompt lengths join at different steps and leave as they finish; the last one
left goes on alone with MTP rounds from the state the batch left (its MTP head fed the hidden
states of every batch step). Greedy tokens, seeded sampled tokens, a quantized KV cache and an
image request among text requests all come out as they do alone."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlxkit import load
from mlxkit.batch import Batch, Member
from mlxkit.errors import MlxkitError
from mlxkit.generate import PromptCache, encode_prompt, start_generation, stream_generate
from mlxkit.micro import micro_dir
from mlxkit.models.qwen3_5 import Rotary
from mlxkit.response import GenerationResponse
from tests.helpers import FIXTURES, assert_equal_up_to_a_near_tie

PROMPTS = [
    "def fibonacci(n):\n",
    "import json\n\nclass Parser:\n    def __init__(self",
    "# A tiny web server\nfrom http",
    "x = [i * i for i in range(10)]\nprint(",
]


@pytest.fixture(scope="module")
def micro32():
    return load(str(micro_dir()), dtype=mx.float32)


def batched(model, tokenizer, requests: list[tuple[object, dict]], joins: list[int]):
    """Each request's responses, request i joining the batch at step joins[i]; once one member
    is left and none is still to join, it decodes alone (`Generation.decode`) to its end.
    Also returns the largest batch a step ran."""
    generations = [start_generation(model, tokenizer, p, **kw) for p, kw in requests]
    responses: list[list] = [[] for _ in requests]
    live: dict[int, Member] = {}
    batch, step, widest = Batch(model), 0, 0
    while live or step <= max(joins):
        for i, g in enumerate(generations):
            if joins[i] == step:
                live[i] = Member(g, g.finish_prefill())
        step += 1
        if len(live) == 1 and step > max(joins):
            ((i, m),) = live.items()
            batch.release()
            m.settle()
            responses[i] += list(generations[i].decode(m.next_token()))
            break
        if not live:
            continue
        order = sorted(live)
        batch.set_members([live[i] for i in order])
        widest = max(widest, len(order))
        for i, r in zip(order, batch.step()):
            responses[i].append(r)
            if r.finish_reason is not None:
                live.pop(i).settle()
    return responses, generations, widest


def token_ids(responses: list[list]) -> list[list[int]]:
    return [[r.token for r in rs] for rs in responses]


def alone(model, tokenizer, requests) -> list[list]:
    """Each request's responses, generated alone."""
    return [list(stream_generate(model, tokenizer, p, **kw)) for p, kw in requests]


def assert_same_state(a: PromptCache, b: PromptCache) -> None:
    """Two decoding states after the same tokens: the main model's caches hold the same
    positions with the same values (to float32 rounding), and the MTP head has seen, or holds
    pending, the hidden state of every position (when it feeds on them depends on the draft
    schedule, which differs between a batch and decoding alone)."""
    assert a.tokens == b.tokens
    for x, y in zip(a.main, b.main, strict=True):
        sx, sy = x.state, y.state
        assert sx.keys() == sy.keys()
        for name in sx:
            assert sx[name].shape == sy[name].shape, name
            assert mx.allclose(sx[name], sy[name], atol=1e-4).item(), name
    fed = [c.mtp[0].offset + c.mtp_pending.shape[1] for c in (a, b)]
    assert fed == [len(a.tokens)] * 2, fed


def test_one_batch_step_gives_each_row_its_own_logits(micro32):
    """The logits of a batch step's rows equal each sequence's own pass, at its own length
    and its own M-RoPE shift (a shift given to the wrong row moves its positions)."""
    model, tok = micro32
    gens = [start_generation(model, tok, p, max_tokens=4, mtp=False) for p in PROMPTS]
    ys = [g.finish_prefill() for g in gens]
    for g, shift in zip(gens, (0, 5, -3, 2)):  # as images before them would have left them
        g.cache.rope_delta = shift
    own = [
        model(mx.array([[y]]), g.cache.copy().main, Rotary.text(g.cache.rope_delta))[0, -1]
        for g, y in zip(gens, ys)
    ]
    batch = Batch(model)
    batch.set_members([Member(g, y) for g, y in zip(gens, ys)])
    stacked = batch._stacked()
    shifts = mx.array([g.cache.rope_delta for g in gens], dtype=mx.int32)
    logits = model(mx.array([[y] for y in ys]), stacked, Rotary(shifts))
    for b, expected in enumerate(own):
        assert mx.allclose(logits[b, -1], expected, atol=1e-4).item(), b
        assert not mx.allclose(logits[b, -1], own[(b + 1) % len(own)], atol=1e-2).item()


def test_greedy_tokens_in_a_batch_equal_each_alone(micro32):
    """With MTP on (its head fed through the batch steps), the last member drafting alone."""
    model, tok = micro32
    requests = [(p, {"max_tokens": 16 + 6 * i, "num_draft": 2}) for i, p in enumerate(PROMPTS)]
    responses, generations, widest = batched(model, tok, requests, joins=[0, 0, 3, 7])
    assert token_ids(responses) == token_ids(alone(model, tok, requests))
    assert widest == 4
    last = generations[-1].out
    assert last.drafted > 0  # it went on alone, drafting from the MTP state the batch kept
    for g, (p, kw) in zip(generations, requests):  # and every state is the one alone leaves
        cache = PromptCache.new(model)
        list(stream_generate(model, tok, p, prompt_cache=cache, **kw))
        g_cache = g.cache.copy()
        assert_same_state(g_cache, cache)


def test_seeded_sampling_in_a_batch_equals_each_alone(micro32):
    """Without MTP a seeded sampled request draws one key per token, batched or not."""
    model, tok = micro32
    requests = [
        (p, {"max_tokens": 20, "temperature": 0.9, "top_p": 0.95, "seed": 11 + i, "mtp": False})
        for i, p in enumerate(PROMPTS)
    ]
    responses, _, _ = batched(model, tok, requests, joins=[0, 1, 1, 5])
    assert token_ids(responses) == token_ids(alone(model, tok, requests))
    assert len({tuple(t) for t in token_ids(responses)}) == len(responses)


def test_a_quantized_kv_cache_in_a_batch(micro32):
    model, tok = micro32
    kv = {"kv_bits": 8, "kv_group_size": 32}
    requests = [(p, {"max_tokens": 14, "mtp": False, **kv}) for p in PROMPTS[:3]]
    responses, generations, _ = batched(model, tok, requests, joins=[0, 2, 2])
    assert token_ids(responses) == token_ids(alone(model, tok, requests))
    assert all(g.cache.main[3].quantized for g in generations)  # a full-attention layer


def test_an_image_request_among_text_requests():
    """M-RoPE: the image request's text positions are shifted by its image (rope_delta), the
    others' are not; each row attends at its own shift."""
    src = FIXTURES / "tiny_vision_p4"
    model, tok = load(src, dtype=mx.float32)
    chat = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}],
        }
    ]
    requests = [
        ("def f(x):\n    return", {"max_tokens": 12, "mtp": False}),
        (chat, {"max_tokens": 16, "mtp": False, "images": [src / "image0.png"]}),
        ("import os\n", {"max_tokens": 12, "mtp": False}),
    ]
    responses, generations, _ = batched(model, tok, requests, joins=[0, 0, 2])
    assert generations[1].cache.rope_delta != 0  # the image moved its positions
    assert token_ids(responses) == token_ids(alone(model, tok, requests))


def test_grammar_logprobs_and_logit_bias_per_member(micro32):
    """Each member's own grammar mask, log-probabilities and logit_bias, beside a member
    without any: the same tokens and log-probabilities as alone."""
    model, tok = micro32
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    chat = [{"role": "user", "content": "Reply in JSON."}]
    base = {"max_tokens": 40, "mtp": False, "enable_thinking": False}
    requests = [
        (chat, {**base, "response_format": fmt, "logprobs": 2}),
        (PROMPTS[0], {**base, "max_tokens": 24}),
        (PROMPTS[1], {**base, "max_tokens": 24, "logprobs": 1, "logit_bias": {11: 5.0}}),
    ]
    responses, _, _ = batched(model, tok, requests, joins=[0, 0, 1])
    expected = alone(model, tok, requests)
    assert token_ids(responses) == token_ids(expected)
    assert tok.decode(token_ids(responses)[0]).startswith("{")  # the grammar held
    for got, want in zip(responses, expected):
        for a, b in zip(got, want):
            assert (a.logprobs is None) == (b.logprobs is None)
            if a.logprobs is not None:
                assert abs(a.logprobs.logprob - b.logprobs.logprob) < 1e-4
                assert [t for t, _ in a.logprobs.top] == [t for t, _ in b.logprobs.top]


def test_rows_growing_past_the_buffers_step(micro32):
    """A member whose cache crosses the 256-position growth step mid-batch (the shared
    buffer grows for every row) beside a short one."""
    model, tok = micro32
    long = "".join(f"v{i} = {i}\n" for i in range(33))
    n = len(tok.encode(long))
    assert 230 < n < 256
    requests = [(long, {"max_tokens": 40, "mtp": False}), (PROMPTS[2], {"max_tokens": 40})]
    responses, _, _ = batched(model, tok, requests, joins=[0, 0])
    assert token_ids(responses) == token_ids(alone(model, tok, requests))
    assert n + len(responses[0]) > 256


def test_a_member_whose_logits_break_ends_alone(micro32):
    """A member whose state turns NaN ends with the non-finite-logits error at the step that
    hands out the broken pick; the members beside it finish with their own tokens."""
    model, tok = micro32
    requests = [(p, {"max_tokens": 10, "mtp": False}) for p in PROMPTS[:3]]
    gens = [start_generation(model, tok, p, **kw) for p, kw in requests]
    members = [Member(g, g.finish_prefill()) for g in gens]
    state = gens[1].cache.main[0]  # a Gated-DeltaNet layer: only its own row goes NaN
    state.recurrent_state = mx.full(state.recurrent_state.shape, mx.nan, mx.float32)
    batch, results = Batch(model), [[], [], []]
    live = dict(enumerate(members))
    while live:
        order = sorted(live)
        batch.set_members([live[i] for i in order])
        for i, r in zip(order, batch.step()):
            results[i].append(r)
            if isinstance(r, MlxkitError) or r.finish_reason is not None:
                del live[i]
    *ran, broken = results[1]
    assert [type(r) for r in ran] == [GenerationResponse]  # the first token, from the prefill
    assert isinstance(broken, MlxkitError) and "non-finite logits" in str(broken)
    kept = [results[0], results[2]]
    assert token_ids(kept) == token_ids(alone(model, tok, [requests[0], requests[2]]))


def test_bfloat16_batch_equals_each_alone_up_to_a_near_tie():
    """micro as served (bfloat16): a pass over B rows rounds differently from one row, so a
    member's greedy tokens may leave its tokens alone only where the top two logits are a
    near-tie (on this CPU they have been equal throughout: benchmarks/results/serve.md)."""
    model, tok = load(str(micro_dir()))
    requests = [(p, {"max_tokens": 24, "mtp": False}) for p in PROMPTS]
    responses, _, widest = batched(model, tok, requests, joins=[0, 0, 2, 5])
    assert widest == 4
    for (prompt, _), got, want in zip(requests, responses, alone(model, tok, requests)):
        ids = encode_prompt(tok, prompt, enable_thinking=False).tokens
        assert_equal_up_to_a_near_tie(model, ids, [r.token for r in got], [r.token for r in want])
