"""Bundles with the vision tower: what MLX Swift's VLM loader reads is in model/, the manifest
says whether the tower is in, `bundle verify` checks it, and --no-vision makes text-only
bundles."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from mlxkit.ios_bridge import build_bundle, plan, verify_bundle
from mlxkit.ios_bridge.verify import SWIFT_PREPROCESSOR_KEYS, weight_bytes_on_disk

from mlxkit.checkpoint import read_headers, weight_files
from mlxkit.layout import VISION_TOKEN_KEYS
from mlxkit.load import load_model
from mlxkit.vision import PREPROCESSOR_FILES
from tests.helpers import FIXTURES
from tests.swift_loading import vision_tower_keys
from tests.vision_helpers import VISION, config

NAME = VISION[1]  # patch 6, merge 3, 5×5 position grid, the tiny tokenizer's token ids


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision-bundles")
    return {
        "vision": _built(root / "vision", {}),
        "text": _built(root / "text", {"vision": False}),
    }


def _built(out: Path, options: dict) -> Path:
    build_bundle(FIXTURES / NAME, out, "iphone15", **options)
    return out


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_a_vision_bundle_holds_what_the_swift_vlm_loader_reads(bundles):
    b = bundles["vision"]
    manifest, model = manifest_of(b), b / "model"
    assert manifest["vision"]["included"] and manifest["vision"]["image_tokens"] == 1280
    assert manifest["vision"]["preprocessor"] == list(PREPROCESSOR_FILES)
    source, written = config(NAME), json.loads((model / "config.json").read_text())
    assert (
        written["model_type"] == "qwen3_5" and written["vision_config"] == source["vision_config"]
    )
    assert all(written[k] == source[k] for k in VISION_TOKEN_KEYS)
    headers = read_headers(weight_files(model))
    tower = {n: i for n, i in headers.items() if n.startswith("vision_tower.")}
    assert set(tower) == vision_tower_keys(written["vision_config"])
    assert tower["vision_tower.patch_embed.proj.weight"].shape == (48, 3, 6, 6, 3)
    assert all(i.dtype == "BF16" for i in tower.values())  # not quantized by default
    assert {i.file.name for i in tower.values()} <= {f.name for f in weight_files(model)}
    pre = json.loads((model / PREPROCESSOR_FILES[0]).read_text())
    assert set(SWIFT_PREPROCESSOR_KEYS) <= set(pre) and pre["processor_class"] == "Qwen3VLProcessor"
    for f in PREPROCESSOR_FILES:
        assert (model / f).read_bytes() == (FIXTURES / NAME / f).read_bytes()
    listed = {f["path"] for f in manifest["files"]}
    assert {f"model/{f}" for f in PREPROCESSOR_FILES} <= listed


def test_vision_bundle_verifies_loads_and_is_what_was_planned(bundles):
    b = bundles["vision"]
    report = verify_bundle(b)
    assert report.ok, [(c.name, c.detail) for c in report.checks]
    checks = {c.name: c.detail for c in report.checks}
    assert (
        "token ids (image 452, video 453, vision_start 449, vision_end 450)"
        in checks["vision tower"]
    )
    assert "with the vision tower" in checks["model loads"]
    model = load_model(b)
    assert model.has_vision and model.vision_tokens.image == 452
    manifest = manifest_of(b)
    q = manifest["quantization"]
    p = plan(
        b / "model",
        "iphone15",
        manifest["max_context"],
        recipe=q["recipe"],
        bits=q["bits"],
        mtp=manifest["mtp"]["included"],
    )
    assert weight_bytes_on_disk(b, manifest) == p.weights and p.weights["vision"] > 0
    assert (
        manifest["memory"]["breakdown"]["activations"] >= manifest["vision"]["encoding_peak_bytes"]
    )


def test_no_vision_makes_a_text_only_bundle(bundles):
    b = bundles["text"]
    manifest = manifest_of(b)
    assert not manifest["vision"]["included"] and manifest["vision"]["image_tokens"] is None
    assert not any(n.startswith("vision_tower.") for n in read_headers(weight_files(b / "model")))
    assert "vision_config" not in json.loads((b / "model" / "config.json").read_text())
    assert not any((b / "model" / f).exists() for f in PREPROCESSOR_FILES)
    report = verify_bundle(b)
    assert report.ok and "text only" in {c.name: c.detail for c in report.checks}["vision tower"]
    assert not load_model(b).has_vision


def _tampered(bundle: Path, tmp_path: Path, edit) -> Path:
    copy = Path(shutil.copytree(bundle, tmp_path / bundle.name))
    edit(copy)
    return copy


def _failed(bundle: Path) -> dict[str, str]:
    return {c.name: c.detail for c in verify_bundle(bundle, load=False).checks if not c.ok}


def test_verify_catches_a_vision_bundle_that_lost_its_preprocessor(bundles, tmp_path):
    b = _tampered(
        bundles["vision"], tmp_path, lambda d: (d / "model" / PREPROCESSOR_FILES[0]).unlink()
    )
    failed = _failed(b)
    assert "preprocessor_config.json is not readable JSON" in failed["vision tower"]
    assert "model/preprocessor_config.json is missing" in failed["file sizes and sha256"]


def test_verify_catches_a_preprocessor_swift_cannot_decode(bundles, tmp_path):
    def edit(d: Path) -> None:
        path = d / "model" / PREPROCESSOR_FILES[0]
        data = json.loads(path.read_text())
        del data["image_processor_type"]
        path.write_text(json.dumps(data))

    failed = _failed(_tampered(bundles["vision"], tmp_path, edit))
    assert "lacks image_processor_type (MLX Swift requires them)" in failed["vision tower"]


def test_verify_catches_a_manifest_that_disagrees_about_vision(bundles, tmp_path):
    def claim_text_only(d: Path) -> None:
        manifest = manifest_of(d)
        manifest["vision"]["included"] = False
        (d / "manifest.json").write_text(json.dumps(manifest))

    failed = _failed(_tampered(bundles["vision"], tmp_path, claim_text_only))
    assert failed["vision tower"] == "the manifest says text only, but model/ has a vision tower"
    # re-planned without the tower, the manifest's other fields and the tensors disagree too
    assert (
        "tensor 'vision_tower.patch_embed.proj.weight' is not planned"
        in failed["tensors as planned"]
    )
    assert "vision.image_tokens" in failed["manifest matches a re-plan"]


def test_the_swift_loads_vision_bundles_with_the_vlm_loader(bundles):
    """MLXKitBundle.load picks mlx-swift-lm's loader from manifest.json → vision.encoder: the
    VLM one ("mlx": the tower is in model/) or the text one (text-only bundles, null)."""
    vision, text = manifest_of(bundles["vision"])["vision"], manifest_of(bundles["text"])["vision"]
    assert (vision["encoder"], text["encoder"]) == ("mlx", None)
    assert (vision["patch_size"], vision["spatial_merge_size"]) == (6, 3)
    swift = (bundles["vision"] / "xcode" / "MLXKitBundle.swift").read_text()
    branch = swift.split('if manifest.vision.encoder == "mlx" {')[1].split("} else {")
    assert "VLMModelFactory.shared.loadContainer(" in branch[0]
    assert "LLMModelFactory.shared.loadContainer(" in branch[1].split("}")[0]
    readme = (bundles["vision"] / "xcode" / "README.md").read_text()
    assert "`VLMModelFactory.shared.loadContainer(from:using:)` (MLXVLM)" in readme
    assert ".user(prompt, images: [.ciImage(image)])" in readme
    assert (
        "`LLMModelFactory.shared.loadContainer(from:using:)` (MLXLLM)"
        in (bundles["text"] / "xcode" / "README.md").read_text()
    )
    assert not (bundles["vision"] / "xcode" / "MLXKitVisionEncoder.swift").exists()


def swift_image_box(width: int, height: int, tokens: int, side: int) -> tuple[float, float]:
    """MLXKitLoaded.imageProcessing(width:height:) in MLXKitBundle.swift, line for line."""
    scale = min(1.0, math.sqrt(tokens / (width * height)) * side)
    cols = max(1, math.floor(width * scale / side))
    rows = max(1, min(math.floor(height * scale / side), tokens // cols))
    cols = max(1, min(cols, tokens // rows))
    return cols * side, rows * side


def swift_target_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int):
    """mlx-swift-lm's QwenVL.targetSize (Libraries/MLXVLM/Models/QwenVL.swift, snapshot
    14a5dcf), which Qwen3VLProcessor resizes with: None where it throws."""
    if height < factor or width < factor or max(height, width) // min(height, width) > 200:
        return None
    h = max(factor, math.floor(height / factor + 0.5) * factor)
    w = max(factor, math.floor(width / factor + 0.5) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = (
            math.floor(height / beta / factor) * factor,
            math.floor(width / beta / factor) * factor,
        )
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


@pytest.mark.parametrize("cap", [256, 1280])
def test_the_swift_image_box_keeps_pictures_within_the_planned_cap(cap):
    """mlx-swift-lm scales a picture into `UserInput.Processing.resize` (MediaProcessing.apply:
    bestFitScale, the smaller of the two ratios), then Qwen3VLProcessor resizes it with
    targetSize within preprocessor_config.json's pixel bounds (Qwen 3.5's: 65,536 to
    16,777,216); through the box no picture it accepts comes out above the cap."""
    side, seen = 32, []  # patch 16 x merge 2: Qwen 3.5's token side
    sizes = [
        (w, h)
        for w in (31, 33, 100, 640, 1179, 3024, 4032, 20000)
        for h in (47, 480, 1920, 2556, 4032, 9000)
    ]
    for width, height in sizes:
        box_w, box_h = swift_image_box(width, height, cap, side)
        fit = min(box_w / width, box_h / height)
        size = swift_target_size(int(height * fit), int(width * fit), side, 65_536, 16_777_216)
        unboxed = swift_target_size(height, width, side, 65_536, 16_777_216)
        if size is None:
            continue  # a picture mlx-swift-lm refuses (a side under 32 px, or over 200:1)
        seen.append(size[0] * size[1] // side**2)
        assert seen[-1] <= cap, (width, height, seen[-1])
        if unboxed is not None and width * height > 4 * cap * side**2:
            assert unboxed[0] * unboxed[1] // side**2 > cap  # what the box prevents
    assert len(seen) > 30 and max(seen) >= 0.9 * cap
