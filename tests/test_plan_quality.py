"""The planner and quality: with a cached sensitivity measurement of the checkpoint, `plan`
carries (and prints) the KL predicted for the recipe it picked, the same figure the measurement
gives for that recipe; without one it prints no quality line and plans as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlxkit.convert.quantize import load_recipe
from mlxkit.convert.reader import SourceCheckpoint
from mlxkit.convert.sensitivity import (
    DEFAULT_TOKENS,
    Sensitivity,
    _calibration,
    _groups,
    cache_dir,
    source_digest,
)
from mlxkit.ios_bridge.choose import choose_plan
from mlxkit.ios_bridge.report import format_plan

from tests.helpers import FIXTURES


def cache_a_measurement(src: Path, text_parameters: int = 1) -> Sensitivity:
    """A measurement of `src` as `measure_sensitivity` caches it (under the calibration digest
    `convert --recipe auto` looks for), its probe KLs made up (the bytes and weight errors are
    the checkpoint's own). `text_parameters` 1 puts every auto budget out of reach."""
    from mlxkit.tokenizer import load_tokenizer

    ckpt = SourceCheckpoint.open(src, include_mtp=True, include_vision=False)
    _, calibration = _calibration(load_tokenizer(src), DEFAULT_TOKENS, "bfloat16")
    groups, mtp, fixed = _groups(ckpt, "bfloat16")
    for i, g in enumerate(groups):
        g.probe_kl = 0.001 * (i + 1)
    s = Sensitivity(
        source_digest=source_digest(ckpt),
        calibration_digest=calibration,
        tokens=512,
        seconds=1.0,
        text_parameters=text_parameters,
        fixed_bytes=fixed["text"],
        groups=groups,
        mtp=mtp,
        mtp_parameters=1,
        mtp_fixed_bytes=fixed["mtp"],
    )
    cache_dir().mkdir(parents=True, exist_ok=True)
    (cache_dir() / f"{s.source_digest}-{calibration}.json").write_text(json.dumps(s.to_dict()))
    return s


@pytest.fixture
def src(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return Path(shutil.copytree(FIXTURES / "tiny_tied", tmp_path / "src"))


def test_plan_carries_the_predicted_kl_of_its_recipe(src):
    s = cache_a_measurement(src)
    plan = choose_plan(str(src), "iphone15pro")
    want = s.predicted_kl(load_recipe(plan.settings.recipe, None, plan.settings.group_size))
    assert plan.quality["method"] == "predicted" and plan.quality["tokens"] == 512
    assert plan.quality["kl_mean"] == pytest.approx(want)
    assert plan.settings.recipe == "quality"  # the least KL of those that fit
    assert f"quality vs bf16: KL {want:.4f} nats/token, predicted" in format_plan(plan)
    explicit = choose_plan(str(src), "iphone15pro", recipe="uniform")
    assert explicit.quality["kl_mean"] == pytest.approx(s.predicted_kl(load_recipe("uniform")))
    assert explicit.quality["kl_mean"] > plan.quality["kl_mean"]


def test_unmeasured_checkpoint_plans_without_a_quality_line(src):
    plan = choose_plan(str(src), "iphone15pro")
    assert plan.quality is None
    assert "quality vs bf16" not in format_plan(plan)
