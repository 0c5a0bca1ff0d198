"""`mlxkit export-coreml`: progress and summary, and every bad input as one line, exit 2,
nothing left on disk."""

from __future__ import annotations

import json
import shutil
import sys

import coremltools as ct
import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlxkit.convert import coreml

from mlxkit.cli import main
from mlxkit.info import human_bytes
from tests.helpers import FIXTURES

TOWER = FIXTURES / "tiny_vision_p4"  # 4x4 position grid, spatial merge 2


def run(*args: str):
    return CliRunner().invoke(main, ["export-coreml", *args])


def assert_one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in result.output


def copy_tower(tmp_path, edit_config=None):
    src = tmp_path / "src"
    shutil.copytree(TOWER, src)
    if edit_config is not None:
        config = json.loads((src / "config.json").read_text())
        edit_config(config)
        (src / "config.json").write_text(json.dumps(config))
    return src


def test_export_prints_progress_and_a_summary(tmp_path):
    out = tmp_path / "VisionEncoder.mlpackage"
    result = run(str(TOWER), "-o", str(out), "--grids", "4x4", "--grids", "2x8")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    peak = coreml.export_peak_estimate(45_536, 2)  # the tower's parameters, two grids
    assert lines[0] == (
        "exporting 2 functions; coremltools holds every function's weights until it shares "
        f"them: about {human_bytes(peak)} of memory at the peak"
    )
    assert lines[1].startswith("[1/2] grid_4x4, 4 vision tokens: converted in ")
    assert lines[2].startswith("[2/2] grid_2x8, 4 vision tokens: converted in ")
    assert lines[3] == "writing 2 functions with shared weights"
    assert lines[4].startswith(f"wrote {out} (") and "2 functions (grid_4x4, grid_2x8)" in lines[4]
    assert "float16 compute, CPU_AND_NE" in lines[4]
    assert "shared by all functions (2.0" in lines[5]  # bytes per parameter
    spec = ct.models.MLModel(str(out), skip_model_load=True).get_spec()
    assert [f.name for f in spec.description.functions] == ["grid_4x4", "grid_2x8"]
    assert {p.name for p in tmp_path.iterdir()} == {out.name}


def test_force_replaces_only_a_package_export_coreml_wrote(tmp_path):
    out = tmp_path / "e.mlpackage"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(run(str(TOWER), "-o", str(out), "--grids", "4x4"), "already exists")
    assert_one_line_error(
        run(str(TOWER), "-o", str(out), "--grids", "4x4", "--force"), "was not written by mlxkit"
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()  # an empty folder may be replaced, and then our own package
    for _ in range(2):
        result = run(str(TOWER), "-o", str(out), "--grids", "4x4", "--force", "--quiet")
        assert result.exit_code == 0 and result.output == ""
        assert coreml.written_by_export(out)
    assert {p.name for p in tmp_path.iterdir()} == {out.name}


OUT = "e.mlpackage"
CASES = {  # output name, extra arguments, config edit, message
    "grid not a multiple of the merge size": (
        OUT,
        ["--grids", "4x3"],
        None,
        "grid 4x3: rows and cols must be positive multiples of the spatial merge size 2",
    ),
    "grid too large": (OUT, ["--grids", "200x200"], None, "10000 vision tokens; at most 4096"),
    "malformed grid": (OUT, ["--grids", "4by4"], None, "write ROWSxCOLS in patches"),
    "grid of 5,000 digits": (
        OUT,
        ["--grids", "4" * 5000 + "x4"],
        None,
        "rows and cols have at most 6 digits",
    ),
    "grid listed twice": (OUT, ["--grids", "4x4,4x4"], None, "a grid is listed twice"),
    "no vision_config": (
        OUT,
        [],
        lambda c: c.pop("vision_config"),
        "this model has no vision tower",
    ),
    "no vision_config, with --grids": (
        OUT,
        ["--grids", "4x4"],
        lambda c: c.pop("vision_config"),
        "this model has no vision tower",
    ),
    "not a square position grid": (
        OUT,
        [],
        lambda c: c["vision_config"].update(num_position_embeddings=12),
        "num_position_embeddings must be a square",
    ),
    "weights unlike the config": (
        OUT,
        [],
        lambda c: c["vision_config"].update(intermediate_size=48),
        "linear_fc1.bias has shape (64,) in mlxkit's layout, expected (48,) from vision_config",
    ),
    "deepstack tower": (
        OUT,
        [],
        lambda c: c["vision_config"].update(deepstack_visual_indexes=[1]),
        "DeepStack vision towers (Qwen3-VL) are not supported",
    ),
    "not a .mlpackage": ("e.mlmodel", [], None, "must be a .mlpackage path"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, case):
    out, args, edit, message = CASES[case]
    src = copy_tower(tmp_path, edit)
    assert_one_line_error(run(str(src), "-o", str(tmp_path / out), *args), message)
    assert {p.name for p in tmp_path.iterdir()} == {"src"}


def test_a_model_without_vision_weights(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(TOWER / "config.json", src)
    weights = mx.load(str(TOWER / "model.safetensors"))
    text = {k: v for k, v in weights.items() if not k.startswith("model.visual.")}
    mx.save_safetensors(str(src / "model.safetensors"), text)
    assert_one_line_error(
        run(str(src), "-o", str(tmp_path / "e.mlpackage")),
        "no vision tower weights (model.visual.* or vision_tower.*)",
    )
    assert {p.name for p in tmp_path.iterdir()} == {"src"}


WEIGHT_CASES = {  # an edit of the checkpoint's tensors, the message
    "quantized": (
        lambda w: w.update({"model.visual.blocks.0.attn.qkv.scales": mx.ones((96, 1))}),
        "the vision tower is quantized",
    ),
    "missing tensor": (
        lambda w: w.pop("model.visual.merger.norm.bias"),
        "missing tensor vision_tower.merger.norm.bias",
    ),
    "unknown tensor": (
        lambda w: w.update({"model.visual.extra.weight": mx.ones(2)}),
        "model.visual.extra.weight is not a Qwen 3.5 vision-tower tensor",
    ),
    "integer weights": (
        lambda w: w.update({"model.visual.merger.norm.bias": mx.ones(32, mx.int32)}),
        "merger.norm.bias has dtype I32; expected a float",
    ),
    "patch weight of the wrong rank": (
        lambda w: w.update({"model.visual.patch_embed.proj.weight": mx.ones((32, 96))}),
        "expected a 5-D Conv3d",
    ),
    "NaN in a weight": (
        lambda w: w.update({"model.visual.blocks.0.attn.qkv.weight": nan_at_first(w)}),
        "model.visual.blocks.0.attn.qkv.weight holds NaN or infinite values",
    ),
    "infinity in a bias": (
        lambda w: w.update({"model.visual.merger.norm.bias": mx.full((32,), float("inf"))}),
        "model.visual.merger.norm.bias holds NaN or infinite values",
    ),
    "a value beyond float16": (
        lambda w: w.update({"model.visual.merger.norm.bias": mx.full((32,), 1e5)}),
        "model.visual.merger.norm.bias has values beyond float16's range",
    ),
}


def nan_at_first(w: dict) -> mx.array:
    """The qkv weight of block 0 with its first value NaN (the tracer's AssertionError)."""
    name = "model.visual.blocks.0.attn.qkv.weight"
    flat = w[name].astype(mx.float32).flatten()
    flat[0] = float("nan")
    return flat.reshape(w[name].shape).astype(w[name].dtype)


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=list(WEIGHT_CASES))
def test_bad_vision_weights(tmp_path, case):
    edit, message = WEIGHT_CASES[case]
    src = copy_tower(tmp_path)
    weights = mx.load(str(src / "model.safetensors"))
    edit(weights)
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    assert_one_line_error(run(str(src), "-o", str(tmp_path / "e.mlpackage")), message)
    assert {p.name for p in tmp_path.iterdir()} == {"src"}


def test_a_value_beyond_float16_exports_in_float32(tmp_path):
    """The float16 range is the package's, not the checkpoint's: float32 takes the tower."""
    src = copy_tower(tmp_path)
    weights = mx.load(str(src / "model.safetensors"))
    weights["model.visual.merger.norm.bias"] = mx.full((32,), 1e5)
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    out = tmp_path / "e.mlpackage"
    result = run(str(src), "-o", str(out), "--grids", "4x4", "--precision", "float32", "--quiet")
    assert result.exit_code == 0, result.output
    assert coreml.written_by_export(out)


def test_coremltools_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)  # import coremltools -> ImportError
    out = tmp_path / "e.mlpackage"
    assert_one_line_error(
        run(str(TOWER), "-o", str(out)), "Core ML export needs torch and coremltools"
    )
    assert "pip install 'mlxkit[coreml]'" in run(str(TOWER), "-o", str(out)).stderr
    assert not any(tmp_path.iterdir())


def test_an_interrupted_export_leaves_nothing_and_keeps_the_old_package(tmp_path, monkeypatch):
    out = tmp_path / "a" / "b" / "e.mlpackage"
    assert run(str(TOWER), "-o", str(out), "--grids", "4x4", "--quiet").exit_code == 0
    before = coreml.package_files(out)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(coreml, "_save_multifunction", interrupted)
    with pytest.raises(KeyboardInterrupt):
        coreml.export_vision_encoder(TOWER, out, [(2, 8)], force=True, quiet=True)
    assert coreml.package_files(out) == before
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    with pytest.raises(KeyboardInterrupt):
        coreml.export_vision_encoder(TOWER, tmp_path / "x" / "y.mlpackage", [(4, 4)], quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # x/ was made for it, and went


def test_not_enough_disk(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=100_000))
    assert_one_line_error(
        run(str(TOWER), "-o", str(tmp_path / "e.mlpackage")), "not enough disk space"
    )
    assert not any(tmp_path.iterdir())
