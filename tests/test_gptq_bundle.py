"""Learned rounding in plans and bundles (issue 23): `plan`, `convert --target` and `bundle
build` take `--rounding gptq`; the bundle's weights are GPTQ-rounded, and the plan, the
manifest and `mlxkit eval` of the bundle agree on figures of those weights: predicted ones are
labelled nearest rounding's (the sensitivity predicts nothing else), measured ones are GPTQ's
own (kept apart from nearest rounding's by their key); `bundle verify --quality` holds the
bundle to them. The GPTQ bundles are tiny_tied's, built once for the module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from mlxkit.convert import convert, rounding
from mlxkit.ios_bridge import build_bundle
from mlxkit.ios_bridge.choose import choose_plan
from mlxkit.ios_bridge.plan import evaluate
from mlxkit.ios_bridge.report import format_plan
from mlxkit.ios_bridge.serialize import plan_to_dict

from mlxkit.checkpoint import read_config
from mlxkit.cli import main
from mlxkit.quality import (
    cache_dir,
    checkpoint_digest,
    measure_quality,
    model_quantization_key,
    quantization_key,
)
from tests.helpers import FIXTURES
from tests.test_plan_quality import cache_a_measurement

TINY = FIXTURES / "tiny_tied"
TOKENS = 64  # scored evaluation tokens: a fraction of a second on tiny_tied
BOUND = "above the converter's 1.5 GB bound"


@pytest.fixture
def src(tmp_path, monkeypatch) -> Path:
    """tiny_tied with a sensitivity measurement cached in a cache of this test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache_a_measurement(TINY)
    return TINY


def _verify(bundle: Path, *args: str):
    return CliRunner().invoke(main, ["bundle", "verify", str(bundle), *args])


def _keep(figures: dict, key: str) -> None:
    """A kept `mlxkit eval` result of tiny_tied under quantization `key` (as _store keeps one)."""
    name = f"{checkpoint_digest(TINY)}-{key}-{'0' * 16}-{figures['tokens']}.json"
    cache_dir().mkdir(parents=True, exist_ok=True)
    (cache_dir() / name).write_text(json.dumps({"mlxkit_version": "test", **figures}))


# --- without converting: the labels, the kept figures, the memory bound ----------------------


def test_a_gptq_plan_shows_its_rounding_and_labels_the_prediction(src):
    plan = choose_plan(str(src), "iphone15pro", rounding="gptq")
    nearest = choose_plan(str(src), "iphone15pro")
    assert plan.settings.rounding == "gptq" and nearest.settings.rounding == "nearest"
    assert plan_to_dict(plan)["quantization"]["rounding"] == "gptq"
    assert plan_to_dict(nearest)["quantization"]["rounding"] == "nearest"
    # the prediction is the sensitivity's, for nearest rounding, and says so
    assert plan.quality["method"] == "predicted" and plan.quality["rounding"] == "nearest"
    assert plan.quality["kl_mean"] == nearest.quality["kl_mean"]
    text = format_plan(plan)
    assert f"{plan.settings.recipe} recipe, rounding: gptq" in text
    assert f"KL {plan.quality['kl_mean']:.4f} nats/token predicted for nearest rounding" in text
    assert "rounding: gptq is not predicted" in text
    assert "rounding: gptq" not in format_plan(nearest)


def test_gptq_plans_read_only_gptq_measurements(src, tmp_path):
    """Kept figures of nearest rounding are never a GPTQ plan's, and the reverse."""
    model = convert(TINY, tmp_path / "m", recipe="uniform", quiet=True)
    block = read_config(model.output)["quantization"]
    assert model_quantization_key(model.output) == quantization_key(block, "bfloat16")
    common = {"text_digest": "d" * 64, "kl_p99": 0.5, "ppl": 9.0, "tokens": 64}
    common["accumulation"] = "float32"  # as mlxkit eval keeps them
    _keep({"kl_mean": 0.25, "top1": 0.5, **common}, quantization_key(block, "bfloat16"))

    nearest = choose_plan(str(src), "iphone15pro", recipe="uniform")
    gptq = choose_plan(str(src), "iphone15pro", recipe="uniform", rounding="gptq")
    assert nearest.quality["method"] == "measured" and nearest.quality["kl_mean"] == 0.25
    assert gptq.quality["method"] == "predicted" and gptq.quality["rounding"] == "nearest"

    _keep({"kl_mean": 0.125, "top1": 0.75, **common}, quantization_key(block, "bfloat16", "gptq"))
    gptq = choose_plan(str(src), "iphone15pro", recipe="uniform", rounding="gptq")
    assert gptq.quality["method"] == "measured" and gptq.quality["rounding"] == "gptq"
    assert (gptq.quality["kl_mean"], gptq.quality["top1"]) == (0.125, 0.75)
    assert "top-1 75.0%, measured on 64 tokens (mlxkit eval, built-in set, rounding: gptq)" in (
        format_plan(gptq)
    )
    assert choose_plan(str(src), "iphone15pro", recipe="uniform").quality["kl_mean"] == 0.25


def test_the_plan_says_where_gptq_exceeds_the_converter_memory_bound():
    """GPTQ holds its widest linear's Hessian and float64 inverse: past a 0.8B's widths the
    converter's bound does not hold, and the plan (which the bundle's manifest records) says
    so; nearest rounding says nothing."""
    assert rounding.peak_bytes(evaluate("0.8b", "iphone17pro").cfg) < rounding.MEMORY_BOUND
    for size in ("2b", "9b"):
        warned = [w for w in evaluate(size, "iphone17pro", rounding="gptq").warnings if BOUND in w]
        assert len(warned) == 1 and warned[0].startswith("--rounding gptq holds at least")
        assert not [w for w in evaluate(size, "iphone17pro").warnings if BOUND in w]
    assert not [w for w in evaluate("0.8b", "iphone17pro", rounding="gptq").warnings if BOUND in w]


# --- one GPTQ bundle built, measured, built again (slow: two GPTQ runs, ~17 s here) ----------


@pytest.fixture(scope="module")
def gptq(tmp_path_factory):
    """tiny_tied bundled for the iPhone 12 with GPTQ (by build_bundle), its plan before and
    after `mlxkit eval` of it, and the bundle `convert --target --rounding gptq` builds once
    that measurement is kept (a nearest-rounding bundle beside them)."""
    root = tmp_path_factory.mktemp("gptq")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        mp.setattr(rounding, "MAX_TOKENS", 512)  # 2 calibration windows: seconds
        cache_a_measurement(TINY)
        first_plan = choose_plan(str(TINY), "iphone12", rounding="gptq")
        first = build_bundle(TINY, root / "b1", "iphone12", rounding="gptq")
        measured = measure_quality(root / "b1", TINY, max_tokens=TOKENS, quiet=True, keep=True)
        second_plan = choose_plan(str(TINY), "iphone12", rounding="gptq")
        args = ["convert", "--hf-path", str(TINY), "--target", "iphone12", "--rounding", "gptq"]
        cli = CliRunner().invoke(main, [*args, "-o", str(root / "b2")])
        assert cli.exit_code == 0, cli.output
        build_bundle(TINY, root / "nearest", "iphone12")
        yield SimpleNamespace(
            root=root,
            first_plan=first_plan,
            first=first,
            measured=measured,
            second_plan=second_plan,
            second=json.loads((root / "b2" / "manifest.json").read_text()),
            output=cli.output,
        )


def _sha(manifest: dict, path: str) -> str:
    return next(f["sha256"] for f in manifest["files"] if f["path"] == path)


@pytest.mark.slow
def test_the_bundle_holds_gptq_rounded_weights(gptq):
    model = gptq.root / "b1" / "model"
    index = json.loads((model / "model.safetensors.index.json").read_text())
    assert index["metadata"]["rounding"] == "gptq"
    assert gptq.first["quantization"]["rounding"] == "gptq"
    block = read_config(model)["quantization"]
    assert model_quantization_key(model) == quantization_key(block, "bfloat16", "gptq")
    nearest = json.loads((gptq.root / "nearest" / "manifest.json").read_text())
    assert nearest["quantization"] == {**gptq.first["quantization"], "rounding": "nearest"}
    weights = "model/model.safetensors"
    assert _sha(gptq.first, weights) != _sha(nearest, weights)  # the decoder layers, rounded
    assert _sha(gptq.first, "mtp/model.safetensors") == _sha(nearest, "mtp/model.safetensors")


@pytest.mark.slow
def test_plan_manifest_and_eval_agree_on_the_gptq_figures(gptq):
    # before any measurement: the prediction, labelled nearest rounding's, in plan and manifest
    assert gptq.first["quality"] == json.loads(json.dumps(gptq.first_plan.quality))
    assert gptq.first["quality"]["rounding"] == "nearest"
    # `mlxkit eval` of the bundle is kept as GPTQ's: the plan and the next bundle carry it
    q, r = gptq.second_plan.quality, gptq.measured
    assert q["method"] == "measured" and q["rounding"] == "gptq"
    assert (q["kl_mean"], q["kl_p99"], q["top1"], q["ppl"]) == (r.kl_mean, r.kl_p99, r.top1, r.ppl)
    assert (q["tokens"], q["eval_set_digest"]) == (TOKENS, r.text_digest)
    assert gptq.second["quality"] == json.loads(json.dumps(q))
    # of THOSE weights: GPTQ on the same calibration text writes the same bytes again
    weights = "model/model.safetensors"
    assert _sha(gptq.second, weights) == _sha(gptq.first, weights)
    assert f"bundle {gptq.root / 'b2'}: " in gptq.output
    assert "recipe, rounding: gptq, MTP" in gptq.output


@pytest.mark.slow
def test_verify_quality_passes_on_the_gptq_bundles(gptq):
    reference = ["--quality", "--reference", str(TINY)]
    predicted = _verify(gptq.root / "b1", "--no-load", *reference)
    assert predicted.exit_code == 0, predicted.output
    assert "(the manifest's, predicted for nearest rounding: " in predicted.stdout
    assert "within 6x the prediction" in predicted.stdout
    measured = _verify(gptq.root / "b2", *reference)  # every check, model loading included
    assert measured.exit_code == 0, measured.output
    assert "PASS  manifest matches a re-plan" in measured.stdout
    assert "(the manifest's, measured for gptq rounding: " in measured.stdout
    assert "within tolerance" in measured.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tamper", "failed"),
    [
        (lambda m: m["quality"].update(kl_mean=m["quality"]["kl_mean"] * 1.5), "kl_mean "),
        (
            lambda m: m["quality"].update(rounding="nearest"),
            (
                "quality.rounding: the manifest's figures are measured for 'nearest' rounding, "
                "and model/ holds gptq rounding's weights"
            ),
        ),
        (
            lambda m: m["quantization"].update(rounding="nearest"),
            "quantization.rounding: manifest says 'nearest', re-derived 'gptq'",
        ),
    ],
    ids=["a measured figure", "the figures' rounding", "the bundle's rounding"],
)
def test_verify_fails_a_gptq_bundle_with_tampered_figures(gptq, tmp_path, tamper, failed):
    bundle = Path(shutil.copytree(gptq.root / "b2", tmp_path / "b"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    tamper(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = _verify(bundle, "--no-load", "--quality", "--reference", str(TINY))
    assert result.exit_code == 1, result.output
    assert failed in result.stdout
    assert "bundle FAILED" in result.stderr
