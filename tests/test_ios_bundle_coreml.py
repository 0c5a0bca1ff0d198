"""Bundles whose images go through the Core ML vision encoder (`--vision-encoder coreml`):
vision/VisionEncoder.mlpackage beside a text-only model/, the manifest's description of it, the
planner's bytes against the bytes written, `bundle verify` on it and on tampered copies, and
bad input. The tiny fixture (patch 6, merge 3) exports two grids in a few seconds."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlxkit.convert.coreml import (
    WEIGHT_FILE,
    export_vision_encoder,
    package_digest,
    package_files,
    vision_config,
    weight_file_bytes,
)
from mlxkit.ios_bridge import build_bundle, verify_bundle
from mlxkit.ios_bridge.choose import choose_plan
from mlxkit.ios_bridge.manifest import COREML_PATH, file_entries
from mlxkit.ios_bridge.plan import PlanRefused, plan
from mlxkit.ios_bridge.refusal import refusal_message
from mlxkit.ios_bridge.verify import replan, weight_bytes_on_disk

from mlxkit.checkpoint import read_headers, weight_files
from mlxkit.cli import main
from mlxkit.load import load_model
from mlxkit.presets import model_config
from tests.helpers import FIXTURES
from tests.vision_helpers import VISION

NAME = VISION[1]  # tiny_vision_p6: patch 6, temporal 3, merge 3, 5x5 positions
GRIDS = "6x9,9x6"  # landscape and portrait, 6 vision tokens each


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("coreml-bundles") / "tiny-coreml"
    build_bundle(FIXTURES / NAME, out, "iphone15", vision_encoder="coreml", coreml_grids=GRIDS)
    return out


@pytest.fixture
def bundle(built, tmp_path) -> Path:
    return Path(shutil.copytree(built, tmp_path / built.name))


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def failed(bundle: Path) -> dict[str, str]:
    return {c.name: c.detail for c in verify_bundle(bundle, load=False).checks if not c.ok}


def test_the_package_sits_beside_a_text_only_model(built):
    package, model = built / COREML_PATH, built / "model"
    assert (package / WEIGHT_FILE).is_file()
    assert not any(n.startswith("vision_tower.") for n in read_headers(weight_files(model)))
    assert "vision_config" not in json.loads((model / "config.json").read_text())
    assert not load_model(built).has_vision  # model/ loads as the text model it is
    v = manifest_of(built)["vision"]
    assert (v["included"], v["encoder"], v["preprocessor"], v["image_tokens"]) == (
        True,
        "coreml",
        [],
        6,
    )
    c = v["coreml"]
    assert [f["name"] for f in c["functions"]] == ["grid_6x9", "grid_9x6"]
    assert c["functions"][0]["input"] == {
        "name": "patches",
        "shape": [54, 6 * 6 * 3 * 3],
        "dtype": "float32",
    }
    assert c["functions"][1]["output"] == {
        "name": "embeddings",
        "shape": [6, 64],
        "dtype": "float32",
    }
    assert (c["precision"], c["compute_units"], c["path"]) == ("float16", "CPU_AND_NE", COREML_PATH)
    files = package_files(package)
    assert c["sha256"] == package_digest(files)
    assert c["bytes"] == sum((package / f).stat().st_size for f in files)
    assert c["preprocessing"]["merge_size"] == 3 and c["preprocessing"]["image_mean"] == [0.5] * 3
    assert c["token_ids"]["image_token_id"] == 452 and c["vision_config"]["patch_size"] == 6
    listed = {f["path"] for f in manifest_of(built)["files"]}
    assert {f"{COREML_PATH}/{f}" for f in files} <= listed


def test_planner_bytes_equal_the_bytes_written(built):
    manifest = manifest_of(built)
    p = replan(built, manifest)
    on_disk = weight_bytes_on_disk(built, manifest)
    assert on_disk == p.weights == manifest["memory"]["weights_by_part"]
    cfg = vision_config(FIXTURES / NAME)
    package_weights = (built / COREML_PATH / WEIGHT_FILE).stat().st_size
    assert on_disk["vision"] == package_weights == weight_file_bytes(cfg, [(6, 9), (9, 6)])
    assert manifest["vision"]["coreml"]["weight_bytes"] == package_weights
    # the text parts are what a --no-vision bundle holds, tensor for tensor
    text = plan(
        FIXTURES / NAME,
        "iphone15",
        manifest["max_context"],
        vision=False,
        recipe=p.settings.recipe,
        mtp=p.settings.mtp,
    ).weights
    assert {k: v for k, v in on_disk.items() if k != "vision"} == {
        k: v for k, v in text.items() if k != "vision"
    }


def test_the_download_counts_the_package(built):
    import plistlib

    from mlxkit.ios_bridge.bundle import MANIFEST_ALLOWANCE

    info = plistlib.loads((built / "xcode" / "Info-BackgroundAssets.plist").read_bytes())
    files = [f for d in ("model", "mtp", "vision") for f in (built / d).rglob("*") if f.is_file()]
    assert info["BAMaxInstallSize"] == MANIFEST_ALLOWANCE + sum(f.stat().st_size for f in files)


def test_verify_without_coremltools_fails_only_the_spec_check(built, monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)
    problems = {c.name: c.detail for c in verify_bundle(built, load=False).checks if not c.ok}
    assert list(problems) == ["Core ML vision encoder"]
    assert (
        problems["Core ML vision encoder"].startswith("reading a Core ML package needs coremltools")
        and "pip install 'mlxkit[coreml]'" in problems["Core ML vision encoder"]
    )


def test_verify_passes_and_reads_the_spec(built):
    report = verify_bundle(built)
    assert report.ok, [(c.name, c.detail) for c in report.checks]
    detail = {c.name: c.detail for c in report.checks}["Core ML vision encoder"]
    assert detail.startswith("2 functions (grid_6x9, grid_9x6)") and "skip_model_load" in detail
    result = CliRunner().invoke(main, ["bundle", "verify", str(built)])
    assert result.exit_code == 0 and "PASS  Core ML vision encoder" in result.output


@pytest.mark.parametrize("inside", [WEIGHT_FILE, "Data/com.apple.CoreML/model.mlmodel"])
def test_verify_fails_on_a_one_byte_change_inside_the_package(bundle, inside):
    path = bundle / COREML_PATH / inside
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    problems = failed(bundle)
    assert f"{COREML_PATH}/{inside}: sha256 differs" in problems["file sizes and sha256"]
    assert "vision.coreml.sha256: manifest says" in problems["manifest matches a re-plan"]


def test_verify_fails_on_a_grid_missing_from_the_package(bundle):
    """The package swapped for one without the portrait grid, its files listed anew (as if
    re-hashed by hand): the spec check names the missing function."""
    package = bundle / COREML_PATH
    shutil.rmtree(package)
    export_vision_encoder(FIXTURES / NAME, package, [(6, 9)], quiet=True)
    manifest = manifest_of(bundle)
    manifest["files"] = file_entries(bundle)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    problems = failed(bundle)
    assert (
        "grid_9x6 is in the manifest but not in the package" in problems["Core ML vision encoder"]
    )
    assert "file sizes and sha256" not in problems


def test_a_changed_manifest_is_caught_against_the_spec(bundle):
    manifest = manifest_of(bundle)
    manifest["vision"]["coreml"]["functions"][0]["input"]["shape"] = [54, 99]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    problems = failed(bundle)
    assert "grid_6x9: input" in problems["Core ML vision encoder"]
    assert "vision.coreml.functions.0.input.shape" in problems["manifest matches a re-plan"]


def test_the_core_ml_swift_reads_keys_the_manifest_has(built):
    """Each Decodable struct of MLXKitVisionEncoder.swift against the manifest node it reads
    (a dotted path, list items by index)."""
    from tests.test_ios_bundle import _swift_structs

    swift = built / "xcode" / "MLXKitVisionEncoder.swift"
    structs = _swift_structs(swift.read_text())
    assert set(structs) == {
        "vision.coreml",
        "vision.coreml.functions.0",
        "vision.coreml.functions.0.input",
        "vision.coreml.preprocessing",
        "vision.coreml.token_ids",
    }
    manifest = manifest_of(built)
    for path, keys in structs.items():
        node = manifest
        for part in path.split("."):
            node = node[int(part)] if part.isdigit() else node[part]
        assert keys <= set(node), f"{path}: Swift reads {keys - set(node)} absent from manifest"
    assert not (built / "xcode" / "MLXKitVisionEncoder.swift").read_text().count("{{")


def test_the_plan_counts_the_package_and_its_largest_grid():
    p = choose_plan("0.8b", "iphone15", vision_encoder="coreml")
    mlx = choose_plan("0.8b", "iphone15")
    vision = p.vision
    assert p.weights["vision"] == weight_file_bytes(vision, p.coreml_grids)  # nine grids
    assert p.weights["vision"] != mlx.weights["vision"]
    assert p.image_tokens == 1024 and mlx.image_tokens == 1280
    assert p.max_context >= 1024 + 512
    n = 1024 * 4  # patches of the 64x64 grid
    assert p.vision_encoding.total >= 2 * vision.num_heads * n * n * 2  # scores + probabilities
    assert not p.largest_array[0].startswith("vision")  # Core ML arrays are not Metal buffers
    assert p.bits_per_part["vision"] == ["float16 (Core ML)"]


def test_a_refusal_names_fewer_grids():
    with pytest.raises(PlanRefused) as refused:
        choose_plan("2b", "iphone12", vision_encoder="coreml", mtp=False)
    message = refusal_message(refused.value)
    assert "with the Core ML vision encoder at 1,024 tokens per image" in message
    assert "Core ML grids of up to 256 vision tokens (--coreml-grids 32x32,36x26,26x36)" in message
    assert "--image-tokens" not in message and "--vision-bits" not in message


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


CASES = {
    "grid the tower cannot take": (
        NAME,
        ["--coreml-grids", "4x4"],
        "grid 4x4: rows and cols must be positive multiples",
    ),
    "malformed grid": (NAME, ["--coreml-grids", "six"], "write ROWSxCOLS in patches"),
    "model without a vision tower": (
        "text-only",
        [],
        "has no vision tower: --vision-encoder coreml needs one",
    ),
    "no vision": (
        NAME,
        ["--no-vision"],
        "--vision-encoder coreml encodes images: drop --no-vision",
    ),
    "quantized tower": (NAME, ["--vision-bits", "8"], "the Core ML encoder is float16"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, case):
    fixture, args, message = CASES[case]
    src = FIXTURES / fixture
    if fixture == "text-only":  # tiny_tied as a text-only checkpoint: no vision_config
        src = Path(shutil.copytree(FIXTURES / "tiny_tied", tmp_path / "src"))
        config = json.loads((src / "config.json").read_text())
        del config["vision_config"]
        (src / "config.json").write_text(json.dumps(config))
    result = run(
        "convert",
        "--hf-path",
        src,
        "--target",
        "iphone15",
        "--vision-encoder",
        "coreml",
        *args,
        "-o",
        tmp_path / "b",
    )
    assert_one_line_error(result, message)
    assert [p.name for p in tmp_path.iterdir()] == (["src"] if fixture == "text-only" else [])


def test_coremltools_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)  # import coremltools -> ImportError
    result = run(
        "convert",
        "--hf-path",
        FIXTURES / NAME,
        "--target",
        "iphone15",
        "--vision-encoder",
        "coreml",
        "-o",
        tmp_path / "b",
    )
    assert_one_line_error(result, "Core ML export needs torch and coremltools")
    assert "pip install 'mlxkit[coreml]'" in result.stderr and list(tmp_path.iterdir()) == []


def test_the_encoder_options_need_a_target(tmp_path):
    result = run(
        "convert", "--hf-path", FIXTURES / NAME, "--vision-encoder", "coreml", "-o", tmp_path / "m"
    )
    assert_one_line_error(result, "--vision-encoder: only with --target or --memory-budget")
    result = run("plan", "--size", "0.8b", "--target", "iphone15", "--coreml-grids", "32x32")
    assert_one_line_error(result, "--coreml-grids: only with --vision-encoder coreml")


def test_an_untrained_tower_is_refused_not_shipped_unplanned(tmp_path):
    """LayerNorm weights all ones: Core ML stores them once, so the package is smaller than
    planned; the build says why and leaves nothing."""
    src = Path(shutil.copytree(FIXTURES / NAME, tmp_path / "src"))
    weights = mx.load(str(src / "model.safetensors"))
    for name in [n for n in weights if n.startswith("model.visual.") and "norm" in n]:
        weights[name] = mx.ones_like(weights[name]) if name.endswith("weight") else weights[name]
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    result = run(
        "bundle",
        "build",
        src,
        tmp_path / "b",
        "--target",
        "iphone15",
        "--vision-encoder",
        "coreml",
        "--coreml-grids",
        "6x9",
    )
    assert_one_line_error(result, "coremltools stored identical tensors of this vision tower once")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_mlx_stays_the_default():
    p = choose_plan(model_config("0.8b"), "iphone15")
    assert p.vision_encoder == "mlx" and p.coreml_grids == [] and p.mlx_vision is not None
