"""A plan, the bundle's manifest and `mlxkit eval` on that bundle agree on its quality (issue 23):
on micro with a sensitivity measurement cached (its probe KLs made up, its bytes and weight
errors micro's own), the planner picks recipe auto and carries its predicted KL; the bundle
records it; `eval` of the bundle is kept, after which the plan carries the measured figures,
and so does a bundle built again; `bundle verify --quality` re-measures them."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlxkit.convert.reader import SourceCheckpoint
from mlxkit.ios_bridge import build_bundle
from mlxkit.ios_bridge.choose import choose_plan
from mlxkit.ios_bridge.report import format_plan

from mlxkit.cli import main
from mlxkit.micro import micro_dir
from mlxkit.quality import measure_quality
from tests.test_plan_quality import cache_a_measurement

TOKENS = 64  # scored evaluation tokens: enough to compare figures, a few seconds on micro


@pytest.fixture
def micro(tmp_path, monkeypatch) -> Path:
    """micro, with a sensitivity measurement cached in a cache of this test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ckpt = SourceCheckpoint.open(micro_dir(), include_mtp=True, include_vision=False)
    text = sum(math.prod(i.shape) for p, i in ckpt.tensors.items() if p.startswith("language_"))
    cache_a_measurement(micro_dir(), text_parameters=text)
    return micro_dir()


def _round_trip(block: dict | None) -> dict | None:
    return json.loads(json.dumps(block))


def test_plan_manifest_and_eval_agree(micro, tmp_path):
    planned = choose_plan(str(micro), "iphone12")
    assert planned.settings.recipe == "auto" and planned.bits_per_weight == 5.0  # least KL
    assert planned.quality["method"] == "predicted"
    manifest = build_bundle(micro, tmp_path / "b", "iphone12")
    assert manifest["quantization"]["recipe"] == "auto"
    assert manifest["quality"] == _round_trip(planned.quality)

    r = measure_quality(tmp_path / "b", micro, max_tokens=TOKENS, quiet=True, keep=True)
    measured = choose_plan(str(micro), "iphone12")
    q = measured.quality
    assert q["method"] == "measured" and measured.bits_per_weight == 5.0
    assert (q["kl_mean"], q["kl_p99"], q["top1"], q["ppl"]) == (r.kl_mean, r.kl_p99, r.top1, r.ppl)
    assert (q["tokens"], q["eval_set_digest"]) == (TOKENS, r.text_digest)
    line = f"KL {r.kl_mean:.4f} nats/token, top-1 {r.top1:.1%}, measured on {TOKENS} tokens"
    assert line in format_plan(measured)

    again = build_bundle(micro, tmp_path / "b", "iphone12", force=True)
    assert again["quality"] == _round_trip(q)


def test_a_measured_figure_beyond_the_tolerance_fails_verify(micro, tmp_path):
    bundle = tmp_path / "b"
    build_bundle(micro, bundle, "iphone12")
    r = measure_quality(bundle, micro, max_tokens=TOKENS, quiet=True, keep=True)
    build_bundle(micro, bundle, "iphone12", force=True)  # now with the measured figures
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["quality"]["kl_mean"] = r.kl_mean * 1.5
    path.write_text(json.dumps(manifest))
    args = ["bundle", "verify", str(bundle), "--no-load", "--quality", "--reference", str(micro)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert f"FAIL  quality vs the source: kl_mean {r.kl_mean:.5g} measured" in result.stdout
    assert "bundle FAILED: quality vs the source" in result.stderr


@pytest.mark.slow
def test_verify_quality_passes_on_the_bundle_as_built(micro, tmp_path):
    """Both kinds of figures: the predicted KL within PREDICTION_FACTOR of the measurement, and
    the measured ones re-measured within the tolerance."""
    bundle = tmp_path / "b"
    args = ["bundle", "verify", str(bundle), "--quality", "--reference", str(micro)]
    build_bundle(micro, bundle, "iphone12")
    predicted = CliRunner().invoke(main, args)
    assert predicted.exit_code == 0, predicted.output
    assert "PASS  quality vs the source" in predicted.stdout and "prediction" in predicted.stdout

    measure_quality(bundle, micro, max_tokens=TOKENS, quiet=True, keep=True)
    build_bundle(micro, bundle, "iphone12", force=True)
    assert json.loads((bundle / "manifest.json").read_text())["quality"]["method"] == "measured"
    measured = CliRunner().invoke(main, args)
    assert measured.exit_code == 0, measured.output
    assert "within tolerance" in measured.stdout


def test_without_a_measurement_the_plan_and_manifest_carry_no_quality(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = Path(shutil.copytree(micro_dir(), tmp_path / "src"))
    assert choose_plan(str(src), "iphone12").quality is None
    assert build_bundle(src, tmp_path / "b", "iphone12")["quality"] is None


def test_tiers_show_the_recipe_picked_for_micro_and_published_figures():
    from mlxkit.ios_bridge.devices import load_catalog
    from mlxkit.ios_bridge.report import format_tiers, micro_pick

    tiers = list(load_catalog().tiers.values())
    assert [micro_pick(t)[0] for t in tiers] == ["auto 5 bpw"] * len(tiers)  # micro fits all
    text = format_tiers()
    line = "gets recipe auto 5 bpw: KL 0.0161 nats/token, top-1 84.6% vs bf16, measured on 1,024"
    assert text.count(line) == len(tiers)
    assert "published for the real models (mlx-community OptiQ model cards" in text
