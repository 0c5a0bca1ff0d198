"""`measure_quality` / `mlxkit eval`: the figures against an independent float64 computation
on the same logits, known cases (identical models, known distributions), a 4-bit micro, the
memory bound (the reference released and read back from disk), bundles and the CLI."""

from __future__ import annotations

import json
import math
import weakref

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.special import log_softmax

from mlxkit import quality
from mlxkit.cli import main
from mlxkit.errors import ConfigError
from mlxkit.micro import micro_dir
from mlxkit.quality import BUILTIN_SETS, measure_quality
from tests.helpers import FIXTURES, conversions

TINY = FIXTURES / "tiny_tied"
VOCAB = 512  # tiny_tied's config vocab_size
CODE = (FIXTURES.parent / "helpers.py").read_text()[:600]  # ~400 tokens


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return conversions(tmp_path_factory)


def _recording(monkeypatch) -> dict[str, list]:
    """Every batch's logits each side produced, as (first row, [L-1, V] float32) per window."""
    seen: dict[str, list] = {"reference": [], "model": []}
    real = quality._run_batch

    def run(model, batch, what, *kv):
        logits, accepted = real(model, batch, what, *kv)
        seen[what] += [(w.row, rows.copy()) for w, rows in zip(batch, logits)]
        return logits, accepted

    monkeypatch.setattr(quality, "_run_batch", run)
    return seen


def _stacked(windows: list) -> np.ndarray:
    return np.concatenate([rows for _, rows in sorted(windows, key=lambda w: w[0])])


def _targets(text: str, window: int) -> np.ndarray:
    """The next tokens scored, window after window, as measure_quality cuts `text`."""
    from mlxkit.tokenizer import load_tokenizer

    ids = load_tokenizer(TINY).encode(text)
    pieces = [ids[i : i + window] for i in range(0, len(ids), window) if len(ids) - i >= 2]
    return np.array([t for p in pieces for t in p[1:]])


def test_figures_equal_a_float64_numpy_computation_on_the_same_logits(monkeypatch, converted):
    seen = _recording(monkeypatch)
    result = measure_quality(converted("tiny_tied"), TINY, text=CODE, window=96, quiet=True)
    ref = log_softmax(_stacked(seen["reference"]).astype(np.float64), axis=-1)
    mod = log_softmax(_stacked(seen["model"]).astype(np.float64), axis=-1)
    targets = _targets(CODE, 96)
    kl = (np.exp(ref) * (ref - mod)).sum(-1)
    rows = np.arange(len(targets))
    assert result.tokens == len(targets) == len(kl)
    assert result.kl_mean == pytest.approx(kl.mean(), rel=1e-6)
    assert result.kl_p99 == pytest.approx(np.percentile(kl, 99), rel=1e-6)
    assert result.top1 == pytest.approx((ref.argmax(-1) == mod.argmax(-1)).mean(), rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(-mod[rows, targets].mean()), rel=1e-6)
    assert result.ppl_reference == pytest.approx(math.exp(-ref[rows, targets].mean()), rel=1e-6)
    assert 0 < result.kl_mean and result.top1 < 1  # a 4-bit model differs from its source


def test_identical_models_give_kl_0_and_top1_1(converted):
    """A float32 conversion against itself: the reference (float32) and the model (as stored,
    float32) are the same weights giving the same logits."""
    f32 = converted("tiny_tied", quantize=False, dtype="float32")
    r = measure_quality(f32, f32, text=CODE, quiet=True)
    assert (r.kl_mean, r.kl_p99, r.top1) == (0.0, 0.0, 1.0)
    assert r.ppl == r.ppl_reference
    assert r.mtp_acceptance == r.mtp_acceptance_reference is not None
    assert r.bits_per_weight == pytest.approx(32, rel=1e-3)


def test_known_distributions_give_their_known_kl(monkeypatch):
    """Reference: logit 2 at token 1, 0 elsewhere; model: logit 1 at token 0 (exact in
    float32): closed forms."""
    V = VOCAB

    def fake(model, batch, what, *kv):
        logits = np.zeros((len(batch), len(batch[0].tokens) - 1, V), np.float32)
        logits[..., 1 if what == "reference" else 0] = 2.0 if what == "reference" else 1.0
        return logits, 0

    monkeypatch.setattr(quality, "_run_batch", fake)
    r = measure_quality(TINY, TINY, text=CODE, window=64, quiet=True)
    p = np.full(V, 1 / (math.e**2 + V - 1))
    p[1] = math.e**2 / (math.e**2 + V - 1)
    q = np.full(V, 1 / (math.e + V - 1))
    q[0] = math.e / (math.e + V - 1)
    known = float((p * np.log(p / q)).sum())
    targets = _targets(CODE, 64)
    assert r.kl_mean == pytest.approx(known, rel=1e-9) and r.kl_p99 == pytest.approx(known)
    assert r.top1 == 0.0
    assert r.ppl == pytest.approx(math.exp(-np.log(q[targets]).mean()), rel=1e-9)
    assert r.ppl_reference == pytest.approx(math.exp(-np.log(p[targets]).mean()), rel=1e-9)
    assert r.mtp_acceptance == r.mtp_acceptance_reference == 0.0


def test_4bit_micro_loses_a_plausible_amount(tmp_path):
    from mlxkit.convert import convert

    convert(micro_dir(), tmp_path / "m4", quiet=True)
    r = measure_quality(tmp_path / "m4", "micro", max_tokens=255, quiet=True)
    assert r.tokens == 255 and r.windows == 1
    assert 0.005 < r.kl_mean < 0.5 and r.kl_p99 > r.kl_mean
    assert 0.6 < r.top1 < 0.99
    assert 0.8 < r.ppl / r.ppl_reference < 1.25
    assert 4.25 < r.bits_per_weight < 5.0  # 4-bit, group 64, plus the bf16 norms
    assert 0.2 < r.mtp_acceptance < 0.7 and 0.2 < r.mtp_acceptance_reference < 0.7
    assert list(r.sets) == ["code"]  # max_tokens takes the sets in turn: the first window


def test_the_reference_is_released_and_read_back_from_disk(tmp_path, monkeypatch):
    """When the model loads, the reference model is gone and its logits are in the temporary
    file; zeroing that file then makes the reference uniform: ppl_reference = the vocabulary,
    which shows the comparison reads the reference from disk."""
    loaded: list[weakref.ref] = []
    real = quality.load_model

    def load_model(path, dtype=None):
        if loaded:
            assert loaded[0]() is None, "the reference is still alive when the model loads"
            (f,) = tmp_path.iterdir()
            stored = np.memmap(f, dtype=np.float32, mode="r+")
            assert stored.size % VOCAB == 0 and np.abs(stored).max() > 0
            stored[:] = 0
            stored.flush()
        model = real(path, dtype=dtype)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(quality, "load_model", load_model)
    r = measure_quality(TINY, TINY, text=CODE, tmp_dir=tmp_path, quiet=True)
    assert len(loaded) == 2
    assert r.ppl_reference == pytest.approx(VOCAB, rel=1e-9)
    assert list(tmp_path.iterdir()) == []  # the file is gone afterwards


def test_too_little_disk_for_the_reference_logits_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(quality.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000}))
    with pytest.raises(ConfigError, match="reference's logits need .* --max-tokens"):
        measure_quality(TINY, TINY, text=CODE, tmp_dir=tmp_path, quiet=True)


def test_max_tokens_takes_windows_from_every_set_in_turn():
    ids = {"a": list(range(10)), "b": list(range(20)), "c": list(range(3))}
    windows = quality._windows(ids, 4, max_tokens=12)
    assert [(w.set, len(w.tokens)) for w in windows] == [
        ("a", 4),
        ("b", 4),
        ("c", 3),
        ("a", 4),
        ("b", 2),
    ]
    assert sum(w.scored for w in windows) == 12
    assert [w.row for w in windows] == [0, 3, 6, 8, 11]
    # a set's last piece of 1 token scores nothing and is dropped
    assert [len(w.tokens) for w in quality._windows({"a": list(range(9))}, 4, None)] == [4, 4]


def test_the_builtin_set_covers_every_kind_and_has_its_provenance():
    readme = (quality.EVAL_DIR / "README.md").read_text()
    for files in BUILTIN_SETS.values():
        for f in files:
            assert (quality.EVAL_DIR / f).stat().st_size > 0 and f"`{f}`" in readme
    assert (quality.EVAL_DIR / "LICENSE-PSF.txt").is_file()
    r = measure_quality(TINY, TINY, window=64, max_tokens=5 * 63, quiet=True)
    assert list(r.sets) == list(BUILTIN_SETS) and all(s.tokens == 63 for s in r.sets.values())


def test_chat_turns_are_rendered_by_the_models_template():
    chat = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]
    r = measure_quality(TINY, TINY, chat=chat, quiet=True)
    from mlxkit.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TINY)
    rendered = tokenizer.apply_chat_template(chat[0]["messages"], add_generation_prompt=False)
    assert "<|im_start|>assistant" in rendered
    assert r.tokens == len(tokenizer.encode(rendered)) - 1 and list(r.sets) == ["chat"]


def test_a_bundle_is_measured_like_its_model_dir(tmp_path):
    from mlxkit.ios_bridge import build_bundle

    bundle = tmp_path / "bundle"
    build_bundle(TINY, bundle, "iphone12")
    on_bundle = measure_quality(bundle, TINY, text=CODE, quiet=True)
    on_dir = measure_quality(bundle / "model", TINY, text=CODE, quiet=True)
    assert on_bundle.mtp_acceptance is not None  # the bundle's mtp/ drafter is found
    assert on_bundle.kl_mean > 0 and on_bundle.kl_mean == on_dir.kl_mean
    assert 4 < on_bundle.bits_per_weight < 9


def test_cli_prints_the_figures_and_writes_json(tmp_path, converted):
    text = tmp_path / "code.txt"
    text.write_text(CODE)
    out = tmp_path / "q.json"
    model = converted("tiny_tied")
    result = CliRunner().invoke(
        main,
        ["eval", str(model), "--reference", str(TINY), "--text", str(text), "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    expected = measure_quality(model, TINY, text=CODE, quiet=True).to_dict()
    assert written == expected
    assert f"mean {written['kl_mean']:.5f} nats/token" in result.stdout
    assert f"top-1 agreement        {written['top1']:.1%}" in result.stdout


def test_conversations_read_from_jsonl(tmp_path):
    path = tmp_path / "chat.jsonl"
    line = {"messages": [{"role": "user", "content": "hi"}], "tools": []}
    path.write_text(json.dumps(line) + "\n\n" + json.dumps(line) + "\n")
    assert quality.read_chat(path) == [line, line]


def test_results_name_their_text():
    a = measure_quality(TINY, TINY, text=CODE, max_tokens=20, quiet=True)
    b = measure_quality(TINY, TINY, text=CODE + " ", max_tokens=20, quiet=True)
    assert a.text_digest != b.text_digest and len(a.text_digest) == 64
