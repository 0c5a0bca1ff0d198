"""The prompt-cache pool and the two runtime hooks it stands on (`PromptCache.copy`,
`prefill`), on micro: a state taken from the pool continues exactly as a fresh one would."""

from __future__ import annotations

import pytest

import mlxkit
from mlxkit.generate import PromptCache, prefill, stream_generate
from mlxkit.serve.pool import PromptPool, cache_nbytes

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "


@pytest.fixture(scope="module")
def micro():
    return mlxkit.load("micro")


def tokens_of(model, tok, prompt, cache=None, mtp=True, **kw):
    out = list(
        stream_generate(model, tok, prompt, max_tokens=24, mtp=mtp, prompt_cache=cache, **kw)
    )
    return [r.token for r in out], out[-1]


@pytest.mark.parametrize("mtp", [True, False])
def test_prefill_then_generate_equals_generating_at_once(micro, mtp):
    model, tok = micro
    ids = tok.encode(PROMPT)
    fresh, _ = tokens_of(model, tok, ids, mtp=mtp)
    cache = PromptCache.new(model)
    if not mtp:
        cache.mtp = None
    prefill(model, cache, ids[:9])
    assert cache.tokens == ids[:9]
    got, last = tokens_of(model, tok, ids, cache, mtp=mtp)
    assert got == fresh
    assert last.prompt_cached == 9
    assert cache.tokens == ids + got  # the cache holds the prompt and what was generated


def test_copy_is_an_independent_snapshot(micro):
    model, tok = micro
    ids = tok.encode(PROMPT)
    fresh, _ = tokens_of(model, tok, ids)
    cache = PromptCache.new(model)
    prefill(model, cache, ids[:12])
    snapshot = cache.copy()
    assert snapshot.tokens == cache.tokens and snapshot.tokens is not cache.tokens
    assert cache_nbytes(snapshot) > 0
    # decoding on from the original must not disturb the snapshot, and the other way round
    assert tokens_of(model, tok, ids, cache)[0] == fresh
    assert tokens_of(model, tok, ids, snapshot)[0] == fresh
    assert snapshot.tokens == ids + fresh


def test_sampled_generation_with_a_seed_is_reproducible_from_a_snapshot(micro):
    model, tok = micro
    ids = tok.encode(PROMPT)
    kw = {"temperature": 0.9, "top_p": 0.95, "seed": 11}
    fresh, _ = tokens_of(model, tok, ids, **kw)
    cache = PromptCache.new(model)
    prefill(model, cache, ids[:10])
    assert tokens_of(model, tok, ids, cache.copy(), **kw)[0] == fresh


TEXT = "def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n"


def states(model, token_lists: list[list[int]]) -> list[PromptCache]:
    out = []
    for ids in token_lists:
        cache = PromptCache.new(model)
        prefill(model, cache, ids)
        out.append(cache)
    return out


def test_take_finds_the_longest_strict_prefix(micro):
    model, tok = micro
    ids = tok.encode(TEXT)
    pool = PromptPool(max_bytes=10**9)
    short, long, other = states(model, [ids[:3], ids[:8], tok.encode("import os")])
    for c in (short, long, other):
        pool.put(c, shared=True)  # shared: a longer state does not replace the shorter
    assert len(pool) == 3
    # a prompt extending `long` (and so `short`) gets `long`
    assert pool.take(ids[:10]).tokens == ids[:8]
    assert pool.take(ids[:5]).tokens == ids[:3]
    # a prompt equal to a state's tokens cannot use it (nothing would be left to process)
    assert pool.take(list(other.tokens)) is None
    assert pool.take(tok.encode("while True:")) is None
    assert (pool.hits, pool.misses) == (2, 2)


def test_shared_snapshots_are_copied_and_stay_others_are_handed_over(micro):
    model, tok = micro
    ids = tok.encode(TEXT)
    pool = PromptPool(max_bytes=10**9)
    snap, turn = states(model, [ids[:4], tok.encode("import os")])
    pool.put(snap, shared=True)
    pool.put(turn)
    first, second = pool.take(ids[:9]), pool.take(ids[:9])
    assert first is not snap and second is not snap and first is not second
    assert first.tokens == second.tokens == snap.tokens
    assert pool.take(tok.encode("import os\nimport sys")) is turn
    assert len(pool) == 1


def test_a_longer_state_replaces_the_one_it_extends(micro):
    model, tok = micro
    ids = tok.encode(TEXT)
    pool = PromptPool(max_bytes=10**9)
    snap, short, long = states(model, [ids[:2], ids[:5], ids[:9]])
    pool.put(snap, shared=True)
    pool.put(short)
    pool.put(long)  # the conversation moved on: `short` is superseded, the snapshot stays
    assert [e.tokens for e in pool._entries] == [ids[:2], ids[:9]]


def test_byte_budget_evicts_least_recently_used(micro):
    model, tok = micro
    a, b, c = states(model, [tok.encode(t) for t in ("alpha = 1", "beta = 2", "gamma = 3")])
    size = cache_nbytes(a)
    assert size == cache_nbytes(b) == cache_nbytes(c) > 0
    pool = PromptPool(max_bytes=2 * size)
    pool.put(a, shared=True)
    pool.put(b, shared=True)
    pool.take(a.tokens + [10])  # touches a: b is now the least recently used
    pool.put(c, shared=True)
    assert [e.tokens for e in pool._entries] == [a.tokens, c.tokens]
    assert pool.nbytes == 2 * size
    tiny = PromptPool(max_bytes=size - 1)
    tiny.put(a)
    assert len(tiny) == 0 and tiny.nbytes == 0
