"""The shortlist draft head (`mlxkit convert --draft-vocab N`, mlxkit/draft_vocab.py): the
converter ranks the calibration set's tokens and writes the shortlist beside the drafter, the
loader reads it, drafts come only from it, and decoding stays lossless: greedy tokens equal
plain decoding's in float32, and sampling passes the chi-square tests of
tests/test_speculative_sampling.py with q the draft's softmax over the shortlist."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlxkit.convert import convert
from mlxkit.convert.converter import format_summary
from mlxkit.convert.shortlist import calibration_ids, rank

from mlxkit import draft_vocab
from mlxkit.generate import stream_generate
from mlxkit.load import load, load_model
from mlxkit.sample import speculative_accept
from tests.helpers import FIXTURES
from tests.test_generate import PROMPTS, fixture_model
from tests.test_speculative_sampling import (
    exact_distributions,
    loop_p_values,
    p_value,
    small_vocab_model,
)

SHORT = [0, 2, 3, 5]  # of the 6-token model's vocabulary


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """tiny_untied in float32 with a 256-of-512-token draft vocabulary."""
    out = tmp_path_factory.mktemp("draft-vocab") / "out"
    result = convert(
        FIXTURES / "tiny_untied", out, quantize=False, dtype="float32", draft_vocab=256
    )
    return out, result


def test_the_converter_writes_the_calibration_sets_most_frequent_tokens(converted):
    out, result = converted
    path = out / "mtp" / draft_vocab.FILE
    vocab = load_model(out).config.vocab_size
    ids = draft_vocab.read(path, vocab)
    counts = np.bincount(calibration_ids(FIXTURES / "tiny_untied"), minlength=vocab)
    expected = rank(calibration_ids(FIXTURES / "tiny_untied"), vocab)[:256]
    assert ids.tolist() == sorted(expected.tolist())
    # every token the calibration set holds more often than the least frequent one kept is in
    assert counts[ids].min() >= counts[np.setdiff1d(np.arange(vocab), ids)].max()
    assert path.stat().st_size == draft_vocab.file_bytes(vocab, 256)
    assert json.loads(path.read_text())["calibration"] == result.draft_vocab.calibration
    d = result.draft_vocab
    assert d.covered == np.isin(calibration_ids(FIXTURES / "tiny_untied"), ids).sum()
    assert f"draft vocabulary: 256 tokens ({draft_vocab.FILE}), covering {d.coverage:.1%}" in (
        format_summary(result)
    )


def test_the_planned_bytes_count_the_file(converted, tmp_path):
    out, result = converted
    plain = convert(FIXTURES / "tiny_untied", tmp_path / "o", quantize=False, dtype="float32")
    assert result.bytes_by_part["mtp"] - plain.bytes_by_part["mtp"] == (
        (out / "mtp" / draft_vocab.FILE).stat().st_size
    )
    assert not (tmp_path / "o" / "mtp" / draft_vocab.FILE).exists()
    for r in (result, plain):  # the summary's drafter lines (one said "no MTP head" too)
        assert "MTP drafter in" in format_summary(r) and "no MTP head" not in format_summary(r)
    assert load_model(tmp_path / "o").draft_head is None


def test_the_loader_drafts_over_the_file(converted):
    out, _ = converted
    model = load_model(out)
    ids = draft_vocab.read(out / "mtp" / draft_vocab.FILE, model.config.vocab_size)
    assert model.draft_head is not None and model.draft_head.ids.tolist() == ids.tolist()
    assert load_model(out, drafter=False).draft_head is None  # no drafter, no shortlist


@pytest.mark.parametrize("quantized", [False, True])
def test_shortlist_logits_are_the_heads_rows_and_minus_inf_elsewhere(quantized):
    model, _ = load(FIXTURES / "tiny_tied", dtype=mx.float32)
    if quantized:
        nn.quantize(model.language_model, group_size=32, bits=4)
    ids = mx.array([1, 7, 40, 300], dtype=mx.int32)
    h = mx.random.normal((1, 3, model.config.hidden_size), key=mx.random.key(0))
    full = model.language_model.logits(h)
    model.use_draft_vocab(ids)
    short = model.draft_logits(h)
    assert short.shape == full.shape
    assert mx.allclose(short[..., ids], full[..., ids], atol=1e-5).item()
    outside = np.setdiff1d(np.arange(full.shape[-1]), np.array(ids))
    assert np.all(np.isneginf(np.array(short)[..., outside]))
    model.use_draft_vocab(None)
    assert mx.array_equal(model.draft_logits(h), full).item()


def _recording_greedy_accept(monkeypatch) -> list[tuple[np.ndarray, int]]:
    """Each verified round's drafts and how many were accepted."""
    import mlxkit.decode

    rounds, real = [], mlxkit.decode.greedy_accept

    def record(logits, drafts):
        n, nxt = real(logits, drafts)
        rounds.append((np.array(drafts).ravel(), n))
        return n, nxt

    monkeypatch.setattr(mlxkit.decode, "greedy_accept", record)
    return rounds


def test_greedy_shortlist_decoding_equals_plain_decoding(monkeypatch):
    """float32: fixed k and auto give plain decoding's tokens; every draft comes from the
    shortlist, some are accepted, and the output holds tokens outside it (made by
    verification, which keeps the whole vocabulary)."""
    model, tokenizer = fixture_model("mixed")
    V = model.config.vocab_size
    ids = np.sort(rank(calibration_ids(FIXTURES / "tiny_untied"), V)[:256])
    model.use_draft_vocab(mx.array(ids, dtype=mx.int32))
    rounds = _recording_greedy_accept(monkeypatch)
    outside = 0
    for prompt in PROMPTS:
        plain = [
            r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=24, mtp=False)
        ]
        for k in (1, 2, 3, "auto"):
            spec = stream_generate(model, tokenizer, prompt, max_tokens=24, num_draft=k, seed=0)
            assert [r.token for r in spec] == plain, (prompt, k)
        outside += int((~np.isin(plain, ids)).sum())
    drafts = np.concatenate([d for d, _ in rounds])
    assert np.isin(drafts, ids).all()
    assert sum(n.item() for _, n in rounds) > 0 and outside > 0


def test_shortlist_sampling_matches_plain_sampling():
    """Speculative sampling with q the draft's softmax over the shortlist, zero elsewhere."""
    model = small_vocab_model()
    model.use_draft_vocab(mx.array(SHORT, dtype=mx.int32))
    _p1, q, p2 = exact_distributions(model, [1, 4, 2, 0, 3])
    off = [t for t in range(q.shape[-1]) if t not in SHORT]
    assert mx.all(q[:, off] == 0).item() and mx.all(p2[:, off] > 0).item()
    assert p_value(model, speculative_accept) > 0.01


@pytest.mark.parametrize(
    "num_draft, runs",
    [
        ("auto", 200),  # auto drafts 0..3 per round: the fixed k=2 runs only with -m slow
        pytest.param(2, 200, marks=pytest.mark.slow),
        pytest.param(2, 4000, marks=pytest.mark.slow),
        pytest.param("auto", 4000, marks=pytest.mark.slow),
    ],
)
def test_shortlist_decode_loop_samples_the_model_distribution(monkeypatch, num_draft, runs):
    """The real decode loop, drafts drawn from the shortlist (checked): the first 4 tokens'
    joint and marginals are the main model's own."""
    import mlxkit.decode

    drafted, real = [], mlxkit.decode.speculative_accept

    def record(target, draft, drafts, key):
        drafted.append(np.array(drafts).ravel())
        return real(target, draft, drafts, key)

    monkeypatch.setattr(mlxkit.decode, "speculative_accept", record)
    model = small_vocab_model()
    model.use_draft_vocab(mx.array(SHORT, dtype=mx.int32))
    p_values = loop_p_values(model, 3, runs, num_draft=num_draft)
    assert min(p_values) > 0.01 / len(p_values), p_values
    assert drafted and np.isin(np.concatenate(drafted), SHORT).all()
