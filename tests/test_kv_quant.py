"""The quantized KV cache (`kv_bits`): the same numbers as mlx-lm's QuantizedKVCache and its
quantized attention, MTP still lossless on it, prompt caches that keep it, chunked prefill and
M-RoPE on it, and the bytes it holds equal to the planner's."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxkit.cache import KVCache, KVQuantization
from mlxkit.decode import run_prompt
from mlxkit.errors import MlxkitError
from mlxkit.generate import PromptCache, stream_generate
from mlxkit.load import load
from mlxkit.models.qwen3_5 import quantized_attention
from tests.helpers import FIXTURES, load_f32, reference
from tests.test_generate import PROMPTS, fixture_model
from tests.test_model import prompt_then_steps
from tests.test_vision_logits import fixture_input

SETTINGS = [KVQuantization(8, 32), KVQuantization(4, 32), KVQuantization(4, 64)]


def _mlx_lm():
    from mlx_lm.models import base, cache

    return base, cache


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("kv", SETTINGS, ids=str)
def test_cache_and_attention_equal_mlx_lm(kv, dtype):
    """Random queries, keys and values through a prefill of 260 (past one 256-step growth) and
    single and multi-token steps: the stored integers, scales and biases are mlx-lm's, and the
    attention output is its quantized attention's within float rounding."""
    base, lm_cache = _mlx_lm()
    B, nh, nkv, hd = 1, 4, 2, 64
    ours, theirs = KVCache(quantization=kv), lm_cache.QuantizedKVCache(kv.group_size, kv.bits)
    key = mx.random.key(3)
    for L in (260, 1, 1, 5, 1):
        key, kq, kk, kv_ = mx.random.split(key, 4)
        q, k, v = (
            mx.random.normal((B, n, L, hd), key=r).astype(dtype)
            for n, r in ((nh, kq), (nkv, kk), (nkv, kv_))
        )
        ours.reserve(B, nkv, L, hd, dtype)
        k_q, v_q, mask = ours.update_and_fetch(k, v)
        got = quantized_attention(q, k_q, v_q, hd**-0.5, mask, kv)
        lk, lv = theirs.update_and_fetch(k, v)
        want = base.quantized_scaled_dot_product_attention(
            q, lk, lv, hd**-0.5, "causal" if L > 1 else None, kv.group_size, kv.bits
        )
        tol = 1e-5 if dtype == mx.float32 else 2e-2
        assert mx.allclose(got, want, atol=tol, rtol=tol).item(), (L, mx.abs(got - want).max())
        state = ours.state
        for name, triple in (("keys", lk), ("values", lv)):
            for suffix, part in zip(("", "_scales", "_biases"), triple):
                assert mx.array_equal(state[name + suffix], part), (L, name + suffix)
    assert ours.offset == theirs.offset == 268


@pytest.mark.parametrize("name", ["tiny_untied"])
@pytest.mark.parametrize("bits", [8, 4])
def test_model_equals_mlx_lm_model_with_quantized_cache(name, bits):
    """Our float32 model with a quantized cache against mlx-lm's qwen3_5 on the same weights with
    its QuantizedKVCache on the full-attention layers: prompt in one pass, then token by token
    (our compiled cached attention block, theirs eager)."""
    from mlx_lm.models import qwen3_5 as mlx_lm_qwen

    _, lm_cache = _mlx_lm()
    ref, model = reference(name), load_f32(name)
    config = json.loads((FIXTURES / name / "config.json").read_text())
    other = mlx_lm_qwen.Model(mlx_lm_qwen.ModelArgs.from_dict(config))
    ours = [(k, v) for k, v in tree_flatten(model.parameters()) if k.startswith("language_model.")]
    other.load_weights(ours, strict=True)
    tokens, prompt_len = ref["tokens"], int(ref["prompt_len"])
    ids = mx.array(tokens[None])
    kv = KVQuantization(bits, 32)
    cache = model.make_cache(kv)
    (a,) = prompt_then_steps(lambda span: (model(ids[:, span], cache),), len(tokens), prompt_len)
    theirs = [
        c if isinstance(c, lm_cache.ArraysCache) else lm_cache.QuantizedKVCache(32, bits)
        for c in other.make_cache()
    ]
    (b,) = prompt_then_steps(
        lambda span: (other(ids[:, span], cache=theirs),), len(tokens), prompt_len
    )
    assert all(c.quantized for c in cache if isinstance(c, KVCache))
    assert np.abs(a - b).max() <= 1e-4, np.abs(a - b).max()
    assert (a.argmax(-1) == b.argmax(-1)).all()
    # and quantizing changed something: the check is not a full-precision run twice
    plain_cache = model.make_cache()
    (plain,) = prompt_then_steps(
        lambda span: (model(ids[:, span], plain_cache),), len(tokens), prompt_len
    )
    assert np.abs(a - plain).max() > 1e-4


def _run(model, tokenizer, prompt, kv: KVQuantization | None, **kw):
    cache = PromptCache.new(model, kv)
    options = {} if kv is None else {"kv_bits": kv.bits, "kv_group_size": kv.group_size}
    options["quantized_kv_start"] = 0 if kv is None else kv.start
    responses = list(stream_generate(model, tokenizer, prompt, prompt_cache=cache, **options, **kw))
    return [r.token for r in responses], responses, cache


@pytest.mark.parametrize("kv", SETTINGS[:2], ids=str)
def test_greedy_mtp_equals_plain_with_a_quantized_cache(kv):
    """float32, drafts partly accepted: MTP decoding gives plain decoding's tokens with the same
    cache settings (rejected drafts are trimmed off the quantized main and MTP caches) and the
    caches end equal."""
    model, tokenizer = fixture_model("mixed")
    accepted = drafted = 0
    for prompt in PROMPTS[:3]:
        plain, _, plain_cache = _run(model, tokenizer, prompt, kv, max_tokens=24, mtp=False)
        for k in (1, 2, 3):
            spec, responses, cache = _run(model, tokenizer, prompt, kv, max_tokens=24, num_draft=k)
            assert spec == plain, (prompt, k)
            for a, b in zip(cache.main, plain_cache.main):
                assert_same_state(a, b)
            assert all(c.quantized for c in cache.mtp)
            accepted += responses[-1].accepted
            drafted += responses[-1].drafted
    assert 0 < accepted < drafted


def test_quantized_mtp_cache_is_a_pass_over_the_sequence():
    """The MTP head's quantized cache after speculative decoding equals one made by a pass over
    the verified sequence (what plain decoding's MTP would hold)."""
    model, tokenizer = fixture_model("mixed")
    kv = KVQuantization(8, 32)
    _, responses, cache = _run(model, tokenizer, PROMPTS[0], kv, max_tokens=20, num_draft=2)
    assert 0 < responses[-1].accepted < responses[-1].drafted
    tokens = mx.array([cache.tokens])
    hidden = model.hidden(tokens, model.make_cache(kv))
    n_pending = cache.mtp_pending.shape[1]
    expected = model.make_mtp_cache(kv)
    known = tokens.shape[1] - n_pending
    model.mtp_hidden(hidden[:, :known], tokens[:, 1 : known + 1], expected)
    assert cache.mtp[0].offset == expected[0].offset == known
    assert_same_state(cache.mtp[0], expected[0])
    assert mx.abs(cache.mtp_pending - hidden[:, known:]).max().item() <= 1e-5


def dequantized(cache: KVCache, name: str) -> mx.array:
    state, q = cache.state, cache.quantization
    parts = (state[name], state[name + "_scales"], state[name + "_biases"])
    return mx.dequantize(*parts, group_size=q.group_size, bits=q.bits)


def assert_same_state(a: KVCache, b: KVCache) -> None:
    """Equal caches: float states within 1e-5; quantized keys and values within one level of
    their group (float32 rounding of a many-token pass against one-token ones can move a value
    across a rounding boundary) and equal in at least 99% of their integers."""
    if not isinstance(b, KVCache):
        for key, value in b.state.items():
            assert mx.abs(a.state[key] - value).max().item() <= 1e-5, key
        return
    assert a.quantized and b.quantized and a.offset == b.offset
    for name in ("keys", "values"):
        level = mx.abs(b.state[name + "_scales"]).max().item()
        diff = mx.abs(dequantized(a, name) - dequantized(b, name)).max().item()
        assert diff <= 1.01 * level + 1e-5, name
        same = (a.state[name] == b.state[name]).astype(mx.float32).mean().item()
        assert same >= 0.99, (name, same)


@pytest.mark.parametrize("kv", [KVQuantization(4, 32), KVQuantization(8, 32, start=12)], ids=str)
def test_prompt_cache_save_and_load_round_trip(tmp_path, kv):
    """A quantized prompt cache saved and loaded holds the same arrays and settings, and goes on
    to the same tokens; under other settings it is refused in one line naming its own."""
    model, tokenizer = load(FIXTURES / "tiny_tied", dtype=mx.float32)
    _, _, cache = _run(model, tokenizer, PROMPTS[2], kv, max_tokens=8)
    assert all(c.quantized for c in cache.main if isinstance(c, KVCache))
    cache.save(tmp_path / "cache.safetensors")
    restored = PromptCache.load(tmp_path / "cache.safetensors", model)
    assert restored.kv == kv and restored.tokens == cache.tokens
    for a, b in zip(restored.main + restored.mtp, cache.main + cache.mtp):
        assert a.state.keys() == b.state.keys()
        assert all(mx.array_equal(a.state[k], b.state[k]) for k in a.state)
    more = cache.tokens + tokenizer.encode("\n    return")
    options = {"kv_bits": kv.bits, "kv_group_size": kv.group_size, "quantized_kv_start": kv.start}
    a = [
        r.token
        for r in stream_generate(
            model, tokenizer, more, max_tokens=8, prompt_cache=cache, **options
        )
    ]
    b = [
        r.token
        for r in stream_generate(
            model, tokenizer, more, max_tokens=8, prompt_cache=restored, **options
        )
    ]
    assert a == b
    with pytest.raises(MlxkitError, match=f"kv_bits={kv.bits}, kv_group_size=32"):
        extended = restored.tokens + tokenizer.encode(" x")
        list(stream_generate(model, tokenizer, extended, max_tokens=2, prompt_cache=restored))


def test_a_full_precision_cache_is_quantized_at_the_start_position():
    """quantized_kv_start: full precision until the cache holds that many positions, then the
    whole cache is quantized (mlx-lm's maybe_quantize_kv_cache) and stays so after a trim."""
    model = load_f32("tiny_tied")
    cache = model.make_cache(KVQuantization(4, 32, start=10))
    kv_layers = [c for c in cache if isinstance(c, KVCache)]
    model(mx.array([[5, 6, 7, 8]]), cache)
    assert not any(c.quantized for c in kv_layers)
    model(mx.array([[9, 10, 11, 12, 13, 14]]), cache)
    assert all(c.quantized and c.offset == 10 for c in kv_layers)
    for c in kv_layers:
        c.trim(3)
    model(mx.array([[15]]), cache)
    assert all(c.quantized and c.offset == 8 for c in kv_layers)


@pytest.mark.parametrize("name", ["tiny_vision_p4"])
def test_chunked_prefill_with_images_on_a_quantized_cache(name):
    """A prompt with two images (M-RoPE positions, the eager attention block) prefilled in chunks
    of 7 that cut through them gives the caches and last hidden state of one pass: each row is
    quantized on its own, whatever chunk it came in; and it stays near the full-precision run."""
    ref, model = reference(name), load_f32(name)
    ids = ref["two_images_ids"].tolist()
    images = [fixture_input(name, p) for p in ("image0", "image1")]
    kv = KVQuantization(8, 32)
    runs = {}
    for chunk, settings in ((512, kv), (7, kv), (512, None)):
        cache = PromptCache.new(model, settings)
        hidden = run_prompt(model, cache, ids, chunk, images)
        runs[chunk, settings] = (model.logits(hidden)[0, -1], cache)
    (one, one_cache), (chunked, chunked_cache) = runs[512, kv], runs[7, kv]
    assert mx.abs(one - chunked).max().item() <= 1e-4
    for a, b in zip(one_cache.main + one_cache.mtp, chunked_cache.main + chunked_cache.mtp):
        assert a.offset == b.offset >= len(ids) - 1
        assert not isinstance(a, KVCache) or (a.quantized and b.quantized)
    full = runs[512, None][0]
    assert 0 < mx.abs(one - full).max().item() <= 0.05 * mx.abs(full).max().item()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kv_bits": 3}, "kv_bits must be 4, 8 or None"),
        ({"kv_bits": True}, "kv_bits must be 4, 8 or None"),
        ({"kv_bits": 4, "kv_group_size": 48}, "kv_group_size must be 32, 64 or 128"),
        ({"kv_bits": 4, "kv_group_size": 64}, "does not divide this model's head dim 32"),
        ({"kv_bits": 8, "kv_group_size": 32, "quantized_kv_start": -1}, "quantized_kv_start"),
    ],
)
def test_bad_settings_are_refused_in_one_line(options, message):
    model, tokenizer = load(FIXTURES / "tiny_tied")
    with pytest.raises(MlxkitError, match=message):
        next(stream_generate(model, tokenizer, "hi", max_tokens=1, **options))


def test_cli_generate_with_a_quantized_cache():
    from click.testing import CliRunner

    from mlxkit.cli import main

    args = ["generate", "--size", "micro", "--prompt", "Once upon", "--max-tokens", "6"]
    out = CliRunner().invoke(main, [*args, "--kv-bits", "8", "--kv-group-size", "32"])
    assert out.exit_code == 0, out.output
    assert "6 tokens" in out.output
    bad = CliRunner().invoke(main, [*args, "--kv-bits", "3"])
    assert bad.exit_code == 2 and "kv_bits must be 4, 8 or None" in bad.output
