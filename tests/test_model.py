"""Numerical parity of our Qwen 3.5 model and MTP head with the references.

Tolerances follow the fixtures: random-weight networks amplify float32 rounding, so our
float32 error against the float64 reference may be at most twice what transformers' own
float32 run shows against the same float64 run (both stored in reference.npz).
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tests.helpers import TINY, load_f32, reference


def prompt_then_steps(step, n: int, prompt_len: int) -> list[np.ndarray]:
    """Calls step(positions) on the first prompt_len positions at once, then on each later one
    alone (a cached model must carry its state across); each of step's outputs [1, L, ...] is
    concatenated over positions, as float64."""
    spans = [slice(0, prompt_len)] + [slice(i, i + 1) for i in range(prompt_len, n)]
    outs = [step(span) for span in spans]
    return [
        np.array(mx.concatenate([o[j][0] for o in outs]), dtype=np.float64)
        for j in range(len(outs[0]))
    ]


def run_incremental(model, tokens: np.ndarray, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and hidden states for the prompt in one pass, then one token at a time."""
    cache, ids = model.make_cache(), mx.array(tokens[None])
    logits, hidden = prompt_then_steps(
        lambda span: model.logits_and_hidden(ids[:, span], cache), len(tokens), prompt_len
    )
    return logits, hidden


@pytest.mark.parametrize("name", TINY)
def test_logits_match_transformers_float64(name):
    ref = reference(name)
    model = load_f32(name)
    logits, _ = run_incremental(model, ref["tokens"], int(ref["prompt_len"]))
    assert logits.shape == ref["logits_f64"].shape
    assert len(ref["tokens"]) - int(ref["prompt_len"]) >= 8  # decode steps covered
    err = np.abs(logits - ref["logits_f64"]).max()
    assert err <= 2 * float(ref["err_f32"]), (err, float(ref["err_f32"]))


@pytest.mark.parametrize("name", TINY)
def test_mtp_head_matches_reference(name):
    """Draft logits from the MTP head, prompt positions in one pass then step by step."""
    ref = reference(name)
    model = load_f32(name)
    assert model.has_mtp
    tokens, prompt_len = ref["tokens"], int(ref["prompt_len"])
    _, hidden = run_incremental(model, tokens, prompt_len)
    h = mx.array(hidden[None, :-1].astype(np.float32))
    nxt = mx.array(tokens[None, 1:])
    cache = model.make_mtp_cache()
    (logits,) = prompt_then_steps(
        lambda span: model.mtp_forward(h[:, span], nxt[:, span], cache)[:1],
        h.shape[1],
        prompt_len - 1,
    )
    assert logits.shape == ref["mtp_logits_f64"].shape
    err = np.abs(logits - ref["mtp_logits_f64"]).max()
    assert err <= 2 * float(ref["err_mtp_f32"]), (err, float(ref["err_mtp_f32"]))


@pytest.mark.parametrize("name", TINY)
def test_matches_mlx_lm_on_same_weights(name):
    """mlx-lm's qwen3_5 (which drops MTP and the vision tower) with our loaded float32 weights,
    same layout."""
    import json

    from mlx_lm.models import qwen3_5 as mlx_lm_qwen

    from tests.helpers import FIXTURES

    ref = reference(name)
    model = load_f32(name)
    config = json.loads((FIXTURES / name / "config.json").read_text())
    other = mlx_lm_qwen.Model(mlx_lm_qwen.ModelArgs.from_dict(config))
    ours = [(k, v) for k, v in tree_flatten(model.parameters()) if k.startswith("language_model.")]
    other.load_weights(ours, strict=True)
    tokens, prompt_len = ref["tokens"], int(ref["prompt_len"])
    a, _ = run_incremental(model, tokens, prompt_len)
    cache, ids = other.make_cache(), mx.array(tokens[None])
    (b,) = prompt_then_steps(
        lambda span: (other(ids[:, span], cache=cache),), len(tokens), prompt_len
    )
    assert np.abs(a - b).max() <= float(ref["err_f32"])
    assert (a.argmax(-1) == b.argmax(-1)).all()


def test_chunked_prefill_equals_one_pass():
    """The recurrent and conv states carry across chunk boundaries exactly."""
    ref = reference("tiny_untied")
    model = load_f32("tiny_untied")
    tokens = mx.array(ref["tokens"][None])
    whole = model(tokens)
    cache = model.make_cache()
    parts = [model(tokens[:, s : s + 5], cache) for s in range(0, tokens.shape[1], 5)]
    assert mx.abs(mx.concatenate(parts, axis=1) - whole).max().item() < 1e-5


def test_verify_rollback_restores_states():
    """accept(n_kept) after a recorded pass leaves the caches as if only n_kept tokens ran."""
    ref = reference("tiny_untied")
    model = load_f32("tiny_untied")
    tokens = mx.array(ref["tokens"][None])
    prefix, extra = tokens[:, :10], tokens[:, 10:15]
    cache = model.make_cache()
    model(prefix, cache)
    for c in cache:
        c.begin_verify()
    model(extra, cache)
    for c in cache:
        c.accept(2, 5)
    expected = model.make_cache()
    model(tokens[:, :12], expected)
    for got, want in zip(cache, expected):
        for key, value in want.state.items():
            assert mx.abs(got.state[key] - value).max().item() <= 1e-5, key
        assert got.offset == want.offset == 12
    # and decoding continues identically
    a = model(tokens[:, 12:13], cache)
    b = model(tokens[:, 12:13], expected)
    assert mx.abs(a - b).max().item() <= 1e-5


@pytest.mark.parametrize("record", [False, True])
def test_metal_branch_calls_mlx_lm_kernel_as_installed(monkeypatch, record):
    """The Metal kernel cannot run here: the Metal branch is taken with a stand-in that binds
    the arguments it receives to the installed mlx-lm's `gated_delta_kernel` signature (so an
    mlx-lm update that changes it fails here) and computes with `gated_delta_ops`."""
    import inspect

    from mlx_lm.models import gated_delta

    from mlxkit.models import qwen3_5

    kernel_signature = inspect.signature(gated_delta.gated_delta_kernel)
    calls = []

    def kernel(*args, **kwargs):
        calls.append(kernel_signature.bind(*args, **kwargs))
        return gated_delta.gated_delta_ops(*args, **kwargs)

    B, T, Hk, Hv, Dk, Dv = 1, 3, 2, 4, 32, 8
    mx.random.seed(0)
    q, k = mx.random.normal((2, B, T, Hk, Dk)) * 0.2
    v = mx.random.normal((B, T, Hv, Dv))
    g, beta = mx.random.uniform(shape=(2, B, T, Hv))
    state = mx.random.normal((B, Hv, Dv, Dk))
    expected = qwen3_5.gated_delta_rule(q, k, v, g, beta, state, record=True)
    monkeypatch.setattr(qwen3_5, "_use_metal_kernel", lambda q: True)
    monkeypatch.setattr(gated_delta, "gated_delta_kernel", kernel)
    y, final, states = qwen3_5.gated_delta_rule(q, k, v, g, beta, state, record=record)
    assert len(calls) == (T if record else 1)
    assert mx.array_equal(y, expected[0]).item() and mx.array_equal(final, expected[1]).item()
    if record:
        assert mx.array_equal(states, expected[2]).item()
        assert mx.array_equal(states[:, -1], final).item()


def test_recorded_gated_delta_rule_equals_a_float64_recurrence():
    """y and the per-step states of S ← g·S + β·(v − g·S k) kᵀ, y = S q, from mlx-lm's ops."""
    from mlxkit.models.qwen3_5 import gated_delta_rule

    B, T, Hk, Hv, Dk, Dv = 1, 4, 1, 2, 8, 4
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, B, T, Hk, Dk)) * 0.3
    v = rng.normal(size=(B, T, Hv, Dv))
    g, beta = rng.uniform(size=(2, B, T, Hv))
    S = rng.normal(size=(B, Hv, Dv, Dk))
    f32 = [mx.array(a, dtype=mx.float32) for a in (q, k, v, g, beta, S)]
    y, final, states = gated_delta_rule(*f32, record=True)
    for t in range(T):
        qt, kt = np.repeat(q[:, t], Hv // Hk, axis=1), np.repeat(k[:, t], Hv // Hk, axis=1)
        S = S * g[:, t, :, None, None]
        delta = (v[:, t] - np.einsum("bhvk,bhk->bhv", S, kt)) * beta[:, t, :, None]
        S = S + delta[..., None] * kt[:, :, None, :]
        assert np.abs(np.array(states[:, t]) - S).max() < 1e-5
        assert np.abs(np.array(y[:, t]) - np.einsum("bhvk,bhk->bhv", S, qt)).max() < 1e-5
    assert np.abs(np.array(final) - S).max() < 1e-5
