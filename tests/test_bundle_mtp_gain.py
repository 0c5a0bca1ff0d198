"""The phone's expected MTP gain (issue 24 item 4): the planner predicts it from its cost model
(roofline.py: 1 greedy draft per round in mlx-swift-lm, at --acceptance), prints it, and below
MIN_MTP_GAIN the bundle's manifest says so (mtp.recommended false, predicted_gain) and its
Swift skips the drafter. Also: the planner's --num-draft takes "auto"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlxkit.ios_bridge import build_bundle, verify_bundle
from mlxkit.ios_bridge.plan import evaluate
from mlxkit.ios_bridge.report import format_plan
from mlxkit.ios_bridge.roofline import MIN_MTP_GAIN, mtp_recommended

from mlxkit.cli import main
from mlxkit.draft_control import K_MAX
from tests.helpers import FIXTURES
from tests.swift_loading import load_bundle


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_the_recommendation_threshold():
    assert MIN_MTP_GAIN == 1.05
    assert mtp_recommended(1.05) and mtp_recommended(1.3) and mtp_recommended(None)
    assert not mtp_recommended(1.049) and not mtp_recommended(0.7)


@pytest.mark.parametrize("acceptance, recommended", [(0.7, True), (0.3, False)])
def test_the_plan_prints_the_phone_gain_and_whether_the_drafter_runs(acceptance, recommended):
    """0.8B on an iPhone 15: at 70 % acceptance one draft is predicted to pay; at 30 % the
    draft step (whose lm_head is a third of the weights) costs more than it gains."""
    p = evaluate("0.8b", "iphone15", 4096, acceptance=acceptance)
    gain = p.speed.mtp_speedup
    assert p.speed.num_draft == 1 and p.speed.runtime.name == "mlx-swift-lm"
    assert (gain >= MIN_MTP_GAIN) is recommended and (1.1 < gain < 1.3 if recommended else gain < 1)
    text = format_plan(p)
    assert f"acceptance {acceptance:.0%} (--acceptance): x{gain:.2f}" in text
    if recommended:
        assert "; recommended (x1.05 or more)" in text
    else:
        assert "; not recommended (below x1.05): a bundle's Swift decodes without the drafter" in (
            text
        )


def test_a_mac_plan_says_nothing_of_recommendation():
    text = format_plan(evaluate("0.8b", "m4pro-24gb", 4096, acceptance=0.3))
    assert "MTP on the Mac" in text and "recommended (" not in text


def test_the_planner_takes_num_draft_auto():
    """auto: the speed of the k in 1..K_MAX the cost model predicts fastest, the memory of
    K_MAX drafts (what auto may draft in a round)."""
    auto = evaluate("2b", "m4pro-24gb", 4096, num_draft="auto")
    fixed = {k: evaluate("2b", "m4pro-24gb", 4096, num_draft=k) for k in range(1, K_MAX + 1)}
    best = max(fixed, key=lambda k: fixed[k].speed.mtp_speedup)
    assert auto.speed.num_draft == best and auto.speed.mtp_speedup == fixed[best].speed.mtp_speedup
    assert auto.num_draft == K_MAX and auto.total == fixed[K_MAX].total
    # on a phone mlx-swift-lm drafts one per round whatever it says; mlxkit's loop is shown too
    phone = evaluate("2b", "iphone15", 4096, num_draft="auto")
    assert phone.num_draft == 1 and phone.mlxkit_speed.num_draft == best

    result = run("plan", "--size", "2b", "--target", "m4pro-24gb", "--num-draft", "auto")
    assert result.exit_code == 0, result.output
    assert f"MTP: on, auto, up to {K_MAX} drafts per round in mlxkit" in result.output
    assert f"(auto: {best} drafts per round predicted fastest, greedy or sampled)" in (
        result.output
    )


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """tiny_tied for the iPhone 12 at the default acceptance (70 %: the drafter pays) and at 5 %
    (it does not), built through the CLI."""
    root = tmp_path_factory.mktemp("gain")
    out = {}
    for name, acceptance in (("pays", "0.7"), ("loses", "0.05")):
        args = ["bundle", "build", FIXTURES / "tiny_tied", root / name, "--target", "iphone12"]
        result = run(*args, "--acceptance", acceptance)
        assert result.exit_code == 0, result.output
        out[name] = root / name
        out[f"{name} line"] = result.stderr
    return out


def test_the_manifest_says_whether_the_drafter_pays(bundles):
    for name, recommended in (("pays", True), ("loses", False)):
        m = json.loads((bundles[name] / "manifest.json").read_text())
        p = evaluate(
            FIXTURES / "tiny_tied",
            "iphone12",
            m["max_context"],
            acceptance=m["performance"]["mtp_acceptance"],
            recipe=m["quantization"]["recipe"],
            kv_bits=m["kv_cache"]["bits"],
            prefill_chunk=m["prefill_chunk"],
        )
        assert m["mtp"]["included"] and m["mtp"]["num_draft"] == 1
        assert m["mtp"]["predicted_gain"] == round(p.speed.mtp_speedup, 3)
        assert m["mtp"]["predicted_gain"] == pytest.approx(
            m["performance"]["mtp_speedup"], abs=5e-4
        )
        assert m["mtp"]["recommended"] is recommended is (m["mtp"]["predicted_gain"] >= 1.05)
        assert verify_bundle(bundles[name], load=False).ok
    assert "not recommended" not in bundles["pays line"]
    assert (
        "not recommended: predicted x0.83, below x1.05, so the Swift glue does not load it"
        in bundles["loses line"]
    )


def test_a_manifest_that_recommends_a_losing_drafter_fails_verify(bundles, tmp_path):
    bundle = Path(shutil.copytree(bundles["loses"], tmp_path / "b"))
    m = json.loads((bundle / "manifest.json").read_text())
    m["mtp"]["recommended"] = True
    (bundle / "manifest.json").write_text(json.dumps(m))
    report = verify_bundle(bundle, load=False)
    detail = next(c.detail for c in report.checks if c.name == "manifest matches a re-plan")
    assert "mtp.recommended: manifest says True, re-derived False" in detail


def test_the_glue_skips_a_drafter_the_plan_does_not_recommend(bundles):
    """Both bundles get the same Swift (the decision is read from manifest.json at load): the
    drafter's URL only when mtp.recommended, and loadDrafter returns nil without it."""
    swift = (bundles["loses"] / "xcode" / "MLXKitBundle.swift").read_text()
    pays = (bundles["pays"] / "xcode" / "MLXKitBundle.swift").read_text()
    assert swift == pays.replace('"pays"', '"loses"')  # but for the bundle's name
    assert (
        "if manifest.mtp.included, manifest.mtp.recommended, let path = manifest.model.mtpPath {"
        in swift
    )
    assert "guard let url = loaded.mtpURL else { return nil }" in swift
    assert 'case predictedGain = "predicted_gain"' in swift and "case recommended\n" in swift
    readme = (bundles["loses"] / "xcode" / "README.md").read_text()
    assert "**The plan does not recommend it on iPhone 12 (4 GB)**: it predicts\nx0.83" in readme
    assert (
        "The plan predicts x1.35 with it on"
        in (bundles["pays"] / "xcode" / "README.md").read_text()
    )


def test_a_bundle_without_a_drafter_recommends_none(tmp_path):
    m = build_bundle(FIXTURES / "tiny_tied", tmp_path / "b", "iphone12", swift_runtime="3.31.4")
    assert m["mtp"] == {
        "included": False,
        "path": None,
        "num_draft": 0,
        "recommended": False,
        "predicted_gain": None,
        "draft_vocab": None,
    }


def test_the_loading_model_builds_no_drafter_the_plan_does_not_recommend(bundles):
    """tests/swift_loading.py's model of MLXKitBundle.load + loadDrafter on both bundles."""
    for name, drafter in (("pays", "MLXVLM.Qwen35VLMNextNDraftModel"), ("loses", None)):
        glue = (bundles[name] / "xcode" / "MLXKitBundle.swift").read_text()
        assert load_bundle(bundles[name], glue).drafter == drafter
