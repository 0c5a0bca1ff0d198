"""The MTP drafter an iPhone bundle ships in mtp/, checked against the three loaders that
read it: mlx-swift-lm (the model of its loading in tests/swift_loading.py, cited from its
source), mlx-vlm (its loader run), and mlxkit.load. mlx-swift-lm itself cannot run here.

Layouts (convert.converter.DRAFTER_LAYOUTS): bundles use "checkpoint" (the head as the
Hugging Face checkpoint stores it: `mtp.*` names, norms w, model_type qwen3_5, plus model/'s
vision_config when model/ holds the tower); OUT/mtp/ of a plain conversion keeps "mlx-vlm"
(mlx-vlm's split drafter: no prefix, norms 1 + w), which mlx-swift-lm cannot load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlxkit.convert.converter import convert
from mlxkit.ios_bridge import build_bundle
from mlxkit.ios_bridge.manifest import file_entries

from mlxkit import load, stream_generate
from mlxkit.checkpoint import weight_files
from mlxkit.load import load_model
from tests.helpers import FIXTURES, mlx_vlm_mtp_logits, reference
from tests.swift_loading import (
    TEXT_REGISTRATION,
    VLM_REGISTRATION,
    SwiftRefuses,
    drafter_built,
    drafter_keys,
    load_bundle,
    sanitize_drafter,
    update_problems,
)
from tests.test_convert import greedy_mlx_vlm

# loadDrafter registers both (ios_bridge/templates/MLXKitBundle.swift)
BOTH = [*TEXT_REGISTRATION, *VLM_REGISTRATION]


def swift_sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """qwenMTPSanitizeWeights on the values: the `mtp.` tensors, norms + 1."""
    s = sanitize_drafter({k: tuple(v.shape) for k, v in weights.items()}, False)
    one = {k: mx.array(1, dtype=weights[k].dtype) for k in s.shifted}
    return {k: weights[k] + one[k] if k in one else weights[k] for k in s.shapes}


def swift_drafter_problems(directory: Path) -> list[str]:
    """What mlx-swift-lm would refuse loading `directory` as a drafter (both registrations)."""
    config, weights, _ = read_drafter(directory)
    try:
        r = drafter_built(BOTH, config)
    except SwiftRefuses as e:
        return [str(e)]
    loaded = sanitize_drafter({k: tuple(v.shape) for k, v in weights.items()}, r.preconverted_norms)
    return update_problems("mtp/", loaded, drafter_keys(config), config)


def read_drafter(directory: Path) -> tuple[dict, dict, dict]:
    """(config, weights, metadata by weight name) as mlx-swift-lm's loader gets them."""
    config = json.loads((directory / "config.json").read_text())
    weights, metadata = {}, {}
    for f in weight_files(directory):
        arrays, meta = mx.load(str(f), return_metadata=True)
        weights.update(arrays)
        metadata.update({k: meta for k in arrays})
    return config, weights, metadata


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drafters(tmp_path_factory) -> dict[str, Path]:
    """Conversions of tiny_untied with the quality recipe (per-layer 6-bit MTP projections)
    in both drafter layouts, a float32 one for reference logits, and a real bundle."""
    root = tmp_path_factory.mktemp("drafters")
    out = {}
    for layout in ("checkpoint", "mlx-vlm"):
        convert(
            FIXTURES / "tiny_untied",
            root / layout,
            recipe="quality",
            dtype="float32",
            drafter_layout=layout,
            quiet=True,
        )
        out[layout] = root / layout
    convert(
        FIXTURES / "tiny_untied",
        root / "f32",
        quantize=False,
        dtype="float32",
        drafter_layout="checkpoint",
        quiet=True,
    )
    out["f32"] = root / "f32"
    build_bundle(FIXTURES / "tiny_untied", root / "bundle", "iphone15", dtype="float32")
    out["bundle"] = root / "bundle"
    return out


# --- mlx-swift-lm ------------------------------------------------------------------------------


def test_bundle_drafter_passes_mlx_swift_lm_rules(drafters):
    bundle = drafters["bundle"]
    config = json.loads((bundle / "mtp" / "config.json").read_text())
    model = json.loads((bundle / "model" / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and config["vision_config"] == model["vision_config"]
    assert json.loads((bundle / "manifest.json").read_text())["quantization"]["recipe"] == "quality"
    assert config["quantization"]["mtp.layers.0.mlp.down_proj"]["bits"] == 6
    glue = (bundle / "xcode" / "MLXKitBundle.swift").read_text()
    assert load_bundle(bundle, glue).drafter == "MLXVLM.Qwen35VLMNextNDraftModel"
    # a plain conversion's checkpoint-layout drafter (no vision_config): the text drafter
    assert swift_drafter_problems(drafters["checkpoint"] / "mtp") == []
    assert drafter_built(BOTH, read_drafter(drafters["checkpoint"] / "mtp")[0]).drafter == (
        "MLXLLM.Qwen35MTPDraftModel"
    )


def test_the_mlx_vlm_layout_fails_mlx_swift_lm_rules(drafters):
    """OUT/mtp/ (the layout bundles had before issue 12): mlx-swift-lm registers qwen3_5_mtp
    with preconverted norms, but its sanitize keeps only `mtp.`-prefixed names, so nothing
    loads; with the prefix added, the drafter-relative quantization keys would miss (6-bit
    weights read as 4-bit) and the converted norms would be shifted a second time."""
    old = drafters["mlx-vlm"] / "mtp"
    config, weights, _ = read_drafter(old)
    problems = swift_drafter_problems(old)
    assert "mtp/: missing mtp.fc.weight" in problems and len(problems) == len(drafter_keys(config))
    assert swift_sanitize(weights) == {}  # the prefix filter keeps nothing

    prefixed = {f"mtp.{k}": v for k, v in weights.items()}
    shapes = sanitize_drafter({k: tuple(v.shape) for k, v in prefixed.items()}, False)
    wrong = update_problems("mtp/", shapes, drafter_keys(config), config)
    assert any("mtp.layers.0.mlp.down_proj quantized as 4 bits" in p for p in wrong), wrong
    norm = swift_sanitize(prefixed)["mtp.norm.weight"]
    converted = weights["norm.weight"]  # already 1 + w
    assert mx.array_equal(norm, converted + 1).item()  # shifted twice


def test_shifted_norms_are_the_ones_mlxkit_and_the_reference_use(drafters):
    """mlx-swift-lm's + 1 applied to the bundle layout's norms gives exactly the norms mlxkit
    loads from the Hugging Face checkpoint."""
    _, weights, _ = read_drafter(drafters["f32"] / "mtp")
    model = load_model(FIXTURES / "tiny_untied", dtype=mx.float32)
    ours = dict(tree_flatten(model.parameters()))
    loaded = swift_sanitize(weights)
    assert (
        len(sanitize_drafter({k: tuple(v.shape) for k, v in weights.items()}, False).shifted) == 7
    )
    for k in loaded:
        assert mx.array_equal(loaded[k], ours[k]).item(), k


# --- mlx-vlm -----------------------------------------------------------------------------------


def test_mlx_vlm_reads_the_bundle_drafter_and_reproduces_the_reference(drafters):
    mlx_vlm = pytest.importorskip("mlx_vlm")
    from mlx_vlm.speculative.drafters import load_drafter

    ref = reference("tiny_untied")
    target, _ = mlx_vlm.load(str(drafters["f32"]))
    drafter, kind = load_drafter(str(drafters["f32"] / "mtp"), kind="mtp")
    assert kind == "mtp" and drafter.config.model_type == "qwen3_5_mtp"
    logits = mlx_vlm_mtp_logits(target, drafter, "tiny_untied")
    assert np.abs(logits - ref["mtp_logits_f64"]).max() <= 1e-4


@pytest.mark.parametrize("which", ["bundle", "mlx-vlm"])
def test_mlx_vlm_generates_with_the_drafter(drafters, which):
    """mlx-vlm's speculative decoding with the bundle's mtp/ (quality recipe: its 6-bit
    projections must be found under the `mtp.` keys) and with OUT/mtp/ gives the tokens of
    plain greedy decoding, drafting as it goes."""
    mlx_vlm = pytest.importorskip("mlx_vlm")
    from mlx_vlm.speculative.drafters import load_drafter

    model_dir = drafters[which] / "model" if which == "bundle" else drafters[which]
    mtp_dir = drafters[which] / "mtp"
    target, _ = mlx_vlm.load(str(model_dir))
    drafter, kind = load_drafter(str(mtp_dir), kind="mtp")
    assert drafter.layers[0].mlp.down_proj.bits == 6
    prompt = [int(t) for t in reference("tiny_untied")["tokens"][:12]]
    plain = greedy_mlx_vlm(target, prompt, 24)
    assert greedy_mlx_vlm(target, prompt, 24, draft_model=drafter, draft_kind=kind) == plain
    assert len(drafter.accept_lens) >= 5


# --- mlxkit.load ---------------------------------------------------------------------------------


def greedy(path: Path, mtp: bool) -> list[int]:
    model, tokenizer = load(path)
    tokenizer._eos_token_ids = []
    prompt = [int(t) for t in reference("tiny_untied")["tokens"][:12]]
    return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=24, mtp=mtp)]


def test_mlxkit_loads_both_layouts_and_old_bundles_identically(drafters, tmp_path):
    ref = reference("tiny_untied")
    model = load_model(drafters["f32"])
    hidden = mx.array(ref["hidden_f64"][:-1], dtype=mx.float32)[None]
    mtp = model.mtp_forward(hidden, mx.array(ref["tokens"][1:])[None])[0][0]
    assert np.abs(np.array(mtp) - ref["mtp_logits_f64"]).max() <= 1e-4

    a, b = load_model(drafters["checkpoint"]), load_model(drafters["mlx-vlm"])
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert pa.keys() == pb.keys() and any(k.startswith("mtp.") for k in pa)
    assert all(mx.array_equal(pa[k], pb[k]).item() for k in pa)

    # a bundle made before the layout changed: mtp/ in the split layout
    old = Path(shutil.copytree(drafters["bundle"], tmp_path / "old"))
    shutil.rmtree(old / "mtp")
    shutil.copytree(drafters["mlx-vlm"] / "mtp", old / "mtp")
    manifest = json.loads((old / "manifest.json").read_text())  # as that bundle listed them
    manifest["files"] = file_entries(old)
    (old / "manifest.json").write_text(json.dumps(manifest))
    plain = greedy(drafters["bundle"], mtp=False)
    assert greedy(drafters["bundle"], mtp=True) == plain == greedy(old, mtp=True)
