"""The calibrated speed model, the runtime each target runs, the Mac targets, and one story
told by `mlxkit plan` and `mlxkit convert --target`."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from mlxkit.convert import sensitivity
from mlxkit.convert.sensitivity import Sensitivity
from mlxkit.ios_bridge import build_bundle, plan, resolve_target
from mlxkit.ios_bridge.cli import bundle_build, plan_command
from mlxkit.ios_bridge.devices import load_catalog
from mlxkit.ios_bridge.report import micro_quality
from mlxkit.ios_bridge.roofline import SHORT_CONTEXT, speed_model, step_bytes
from mlxkit.ios_bridge.runtimes import MLX_SWIFT_LM, MLXKIT
from mlxkit.ios_bridge.settings import knobs

from benchmarks import fit_speed_model as fitting
from mlxkit.cli import main
from tests.helpers import FIXTURES

ROOT = Path(__file__).resolve().parents[1]


def run(*args) -> click.testing.Result:
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------ the speed model


@pytest.fixture(scope="module")
def fit():
    return fitting.fit_table(fitting.TABLE)


def test_committed_parameters_and_residual_table_are_the_fit_of_the_calibration_table(fit):
    assert fitting.TABLE == ROOT / "benchmarks" / "data" / "mac_decode_speeds.md"
    assert fitting.SPEED_MODEL_FILE.read_text() == fitting.render_parameters(fit)
    table = fitting.render_results(fit)
    assert fitting.RESULTS.read_text() == table, "run python benchmarks/fit_speed_model.py"
    model = speed_model()
    assert model.efficiency == pytest.approx(fit.efficiency, rel=1e-3)
    assert model.fixed_seconds == pytest.approx(fit.fixed_seconds, rel=1e-3)
    assert model.rows == 20 == sum(r.fitted for r in fit.rows)  # the MLX rows; GGUF shown only
    assert len(fit.rows) == 25


def test_leave_one_out_median_error_is_within_25_percent(fit):
    assert fit.loo_median_abs_error <= 0.25
    assert 0.5 < fit.efficiency < 1.0 and 0 < fit.fixed_seconds < 5e-3


def test_the_fit_recovers_a_known_model():
    """Rows made from e = 0.7 and 2 ms per token give back e = 0.7 and 2 ms."""
    rows = []
    machines = [("0.8b", 120e9), ("2b", 400e9), ("4b", 273e9), ("9b", 819e9), ("9b", 120e9)]
    for i, (size, bandwidth) in enumerate(machines):
        seconds = fitting.bytes_per_token(size) / (0.7 * bandwidth) + 2e-3
        rows.append(fitting.Row(i, size, "M4", "synthetic", bandwidth, 1 / seconds, True))
    efficiency, fixed = fitting.fit(rows)
    assert efficiency == pytest.approx(0.7, rel=1e-9) and fixed == pytest.approx(2e-3, rel=1e-9)


def test_a_phone_is_the_fitted_model_at_its_own_bandwidth():
    p = plan("2b", "iphone15", vision=False)
    model = speed_model()
    seconds = (
        step_bytes(p.cfg, p.weight_reads, SHORT_CONTEXT, 2)
        / (model.efficiency * p.target.bandwidth)
        + model.fixed_seconds
    )
    assert p.speed.decode_tps == pytest.approx(1 / seconds, rel=1e-12)
    slower = plan("2b", "iphone12", vision=False)  # the same model, 34.1 instead of 51.2 GB/s
    assert slower.speed.decode_tps < p.speed.decode_tps


# ---------------------------------------------------------- the runtime that runs the model


def test_a_phone_plans_mlx_swift_lm_and_shows_mlxkits_loop_beside_it():
    p = plan("2b", "iphone15", num_draft=3)
    assert p.runtime is MLX_SWIFT_LM and p.num_draft == 1 == p.speed.num_draft
    assert p.mlxkit_speed.runtime is MLXKIT and p.mlxkit_speed.num_draft == 3
    assert p.speed.decode_tps == p.mlxkit_speed.decode_tps  # same weights, same reads
    assert p.speed.mtp_speedup != p.mlxkit_speed.mtp_speedup
    text = run("plan", "--size", "2b", "--target", "iphone15", "--recipe", "uniform").output
    assert "MTP on the phone in mlx-swift-lm (1 draft per round, greedy sampling only" in text
    assert "MTP in mlxkit's own loop (2 drafts per round" in text


def test_a_mac_plans_mlxkits_own_loop():
    p = plan("9b", "m4pro-24gb", num_draft=3)
    assert p.runtime is MLXKIT and p.num_draft == 3 and p.mlxkit_speed is None
    assert not p.entitlement_required and p.usable == p.usable_without_entitlement
    # memory at mlxkit's k: 4095 + 3 draft positions cross a 256-token step, 4095 + 1 does not
    k3, k1 = (plan("9b", "m4pro-24gb", 4095, num_draft=k).kv_cache_bytes for k in (3, 1))
    assert k3 > k1


def test_the_manifest_records_what_the_phone_runs(tmp_path):
    manifest = build_bundle(FIXTURES / "tiny_tied", tmp_path / "b", "iphone15", num_draft=3)
    drafter = {k: manifest["mtp"][k] for k in ("included", "path", "num_draft")}
    assert drafter == {"included": True, "path": "mtp", "num_draft": 1}
    perf = manifest["performance"]
    assert perf["runtime"] == "mlx-swift-lm" and perf["num_draft"] == 1 and perf["mtp_greedy_only"]
    assert perf["mlxkit_loop"]["num_draft"] == 3 and not perf["mlxkit_loop"]["mtp_greedy_only"]
    assert perf["speed_model"]["efficiency"] == speed_model().efficiency


# -------------------------------------------------------------------------------- the Macs


def test_every_chip_of_the_calibration_table_is_a_target_with_its_bandwidth():
    text = fitting.TABLE.read_text()
    published = {
        m.group(1): float(m.group(2)) * 1e9
        for m in re.finditer(r"^\| (M\d(?: Pro| Max| Ultra)?) \| (\d+)", text, re.MULTILINE)
    }
    macs = load_catalog().macs.values()
    for chip, bandwidth in published.items():
        options = [m for m in macs if m.chip.split(" (")[0] == chip]
        assert options, f"{chip} is not a target"
        assert bandwidth in {m.bandwidth for m in options}
    smallest = resolve_target("m4pro")
    assert smallest.name == "m4pro-24gb" and smallest.kind == "mac"
    assert resolve_target("M4 Max 36GB").bandwidth == 410e9  # the 36 GB bin


def test_tiers_mac_and_a_mac_bundle_refused(tmp_path):
    result = run("tiers", "--mac")
    assert result.exit_code == 0 and "m4pro-24gb" in result.output and "M5 Max" in result.output
    never = tmp_path / "never"
    refused = run("convert", "--hf-path", FIXTURES / "tiny_tied", "--target", "m4pro", "-o", never)
    assert refused.exit_code == 2 and "is a Mac" in refused.output
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------- one story, one definition


@pytest.mark.parametrize("measured", [False, True])
def test_plan_and_convert_target_tell_one_story(tmp_path, monkeypatch, measured):
    """The quickstart's first two commands: same recipe, MTP, memory limit and wording, with
    and without micro's sensitivity measurement cached (with it both pick `auto`: `plan
    --size micro` read no measurement before, as if micro were a bare size)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if measured:  # what `convert --recipe auto` of micro leaves in the cache
        sensitivity._store(Sensitivity.from_dict(micro_quality()["sensitivity"]))
    shown = json.loads(run("plan", "--size", "micro", "--target", "iphone15", "--json").output)
    text = run("plan", "--size", "micro", "--target", "iphone15").output
    out = tmp_path / "b"
    line = run("convert", "--size", "micro", "--target", "iphone15", "-o", out).output
    manifest = json.loads((out / "manifest.json").read_text())
    assert shown["quantization"] == manifest["quantization"]
    assert shown["mtp"]["num_draft"] == manifest["mtp"]["num_draft"] == 1
    assert shown["memory"]["usable_bytes"] == manifest["memory"]["usable_bytes"] == 3_100_000_000
    assert shown["max_context"] == manifest["max_context"]
    assert not shown["entitlement_required"] and not manifest["entitlement_required"]
    recipe = manifest["quantization"]["recipe"]
    assert recipe == ("auto" if measured else "quality")
    assert f"quantization: {recipe} recipe" in text and f"{recipe} recipe" in line
    assert re.search(r"usable without the entitlement +3\.100 GB", text)
    assert "of 3.10 GB usable without the entitlement (not required)" in line
    assert "usable (with the entitlement)" not in text


def test_every_knob_is_one_option_of_plan_convert_and_bundle_build():
    from mlxkit.convert.cli import convert

    for command in (plan_command, bundle_build, convert):
        names = {p.name for p in command.params}
        for knob in knobs():
            assert (knob.name in names) == bool(knob.metadata["flag"]), (command.name, knob.name)
    result = run("convert", "--hf-path", FIXTURES / "tiny_tied", "--num-draft", "3", "-o", "/x")
    assert result.exit_code == 2 and "--num-draft: only with --target" in result.output


def test_plan_and_refusal_do_not_import_each_other():
    def imported(module: str) -> set[str]:
        tree = ast.parse((ROOT / "ios_bridge" / f"{module}.py").read_text())
        return {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}

    assert "refusal" not in imported("plan") and "plan" in imported("refusal")
