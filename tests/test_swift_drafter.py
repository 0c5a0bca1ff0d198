"""The MTP drafter an iPhone bundle ships in mtp/, checked against the three loaders that
read it: mlx-swift-lm (its loading rules reproduced below from its source, file and commit
named at each rule), mlx-vlm (its loader run), and mlxkit.load. mlx-swift-lm itself cannot
run here; what it would do with the files is what these rules compute.

Layouts (convert.converter.DRAFTER_LAYOUTS): bundles use "checkpoint" (the head as the
Hugging Face checkpoint stores it: `mtp.*` names, norms w, model_type qwen3_5); OUT/mtp/ of a
plain conversion keeps "mlx-vlm" (mlx-vlm's split drafter: no prefix, norms 1 + w), the
layout every bundle had before. The rules below are those of the stored versions named:
the Qwen35TextMTPRegistration and qwenMTPSanitizeWeights of the 3.x line, under which the
old layout loads nothing, and the norm decision of the main branch (0182a49), which also
registers qwen3_5_mtp as a pre-converted standalone drafter; the checkpoint layout passes
both, because its model type (qwen3_5) takes the same path in each."""

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
from mlxkit.models.qwen3_5 import Model, TextConfig
from tests.helpers import FIXTURES, mlx_vlm_mtp_logits, reference
from tests.test_convert import greedy_mlx_vlm

# --- mlx-swift-lm's rules, reproduced from its source -------------------------------------------

# Libraries/MLXLLM/Qwen35TextMTPRegistration.swift @ 4e440c20e317acc080d3ec7bdd85d0182e0cf004:
# the drafter types `Qwen35TextMTPRegistration.register()` adds to MTPDrafterTypeRegistry;
# "qwen3_5" and "qwen3_5_moe" only when `vision_config` is absent (qwen35TextMTPConfiguration),
# all three creating `Qwen35MTPDraftModel(config)` (default preconvertedNorms: false).
REGISTERED_TEXT_DRAFTERS = {"qwen3_5_text": False, "qwen3_5": True, "qwen3_5_moe": True}

# Libraries/MLXLMCommon/QwenMTP.swift @ fadb88487ec15b3f775f0a55109f8c04e65ab17e,
# qwenMTPSanitizeWeights (what Qwen35MTPDraftModel.sanitize calls): keep the keys that start
# with "mtp.", then add 1 to every 1-D tensor whose name ends with one of these.
SWIFT_NORM_SUFFIXES = (
    "mtp.norm.weight",
    "mtp.pre_fc_norm_embedding.weight",
    "mtp.pre_fc_norm_hidden.weight",
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
)


def swift_drafter_type(config: dict) -> str:
    """MTPDrafterModelFactory._load (Libraries/MLXLMCommon/MTPDrafterModelFactory.swift @
    0fd8ce8c6dd6ea3c3715256f06abd75967a27076) creates the drafter registered for config.json's
    top-level `model_type`; raises when 3.x registers none for it."""
    model_type = config.get("model_type")
    if model_type not in REGISTERED_TEXT_DRAFTERS:
        raise LookupError(f"no text MTP drafter registered for model_type {model_type!r}")
    if REGISTERED_TEXT_DRAFTERS[model_type] and "vision_config" in config:
        raise LookupError(f"{model_type} with vision_config is not a text drafter")
    return model_type


def swift_sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """qwenMTPSanitizeWeights for a dense head (QwenMTP.swift @ fadb884, above)."""
    kept = {k: v for k, v in weights.items() if k.startswith("mtp.")}
    return {
        k: v + mx.array(1, dtype=v.dtype) if k.endswith(SWIFT_NORM_SUFFIXES) and v.ndim == 1 else v
        for k, v in kept.items()
    }


def swift_main_norm_convention(name: str, metadata: dict, model_type: str) -> str:
    """The decision on mlx-swift-lm's main branch (Libraries/MLXLMCommon/Qwen35Checkpoint.swift
    @ 0182a4914ea62e591695074a3623d57cce54a6b7, Qwen35CheckpointPolicy.normConvention), for a
    weight named `name`: a declared `mlx_swift_lm.qwen_mtp.norm_convention` wins; "scale"
    (no shift) when the drafter was made with preconvertedNorms (the qwen3_5_mtp / qwen3_8_mtp
    registrations), when the weights are not under the `mtp` namespace (a standalone,
    unprefixed checkpoint), or when the file says `format: mlx`; otherwise "offset" (+1)."""
    declared = metadata.get("mlx_swift_lm.qwen_mtp.norm_convention")
    if declared:
        return declared
    preconverted = model_type in ("qwen3_5_mtp", "qwen3_8_mtp")
    embedded_mtp = name.startswith("mtp.")
    if preconverted or not embedded_mtp or metadata.get("format", "").lower() == "mlx":
        return "scale"
    return "offset"


def swift_quantization(config: dict, module: str) -> tuple[int, int] | None:
    """BaseConfiguration.PerLayerQuantization.quantization(layer:) (Libraries/MLXLMCommon/
    BaseConfiguration.swift @ 00cb98954804a4a97432c7afcae6780abeafb875): the `quantization`
    block's entry for the module path, `false` → not quantized, absent → the defaults. The
    loader asks only for modules whose `<path>.scales` exists (loadWeights in Libraries/
    MLXLMCommon/Load.swift @ 047989bbc149a006038702c39499a7007605064e)."""
    block = config.get("quantization") or {}
    entry = block.get(module, block)
    if entry is False:
        return None
    return entry["bits"], entry["group_size"]


def swift_expected_parameters(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """What Qwen35MTPDraftModel declares: `@ModuleInfo(key: "mtp") var mtp:
    Qwen35MTPPredictor` with keys fc, layers, norm, pre_fc_norm_embedding, pre_fc_norm_hidden
    (Libraries/MLXLLM/Models/Qwen35MTP.swift @ 9ef240bf24e94bddfec2083adc271b740271819a), the
    layer being Qwen35DecoderLayer with the checkpoint's own names: the same paths as
    mlxkit's `mtp.*` parameters (which are the Hugging Face names)."""
    params = tree_flatten(Model(cfg, has_mtp=True).parameters())
    return {p: tuple(v.shape) for p, v in params if p.startswith("mtp.")}


def read_drafter(directory: Path) -> tuple[dict, dict, dict]:
    """(config, weights, metadata by weight name) as mlx-swift-lm's loader gets them."""
    config = json.loads((directory / "config.json").read_text())
    weights, metadata = {}, {}
    for f in weight_files(directory):
        arrays, meta = mx.load(str(f), return_metadata=True)
        weights.update(arrays)
        metadata.update({k: meta for k in arrays})
    return config, weights, metadata


def swift_load_problems(directory: Path, cfg: TextConfig) -> list[str]:
    """Everything mlx-swift-lm 3.x would refuse or get wrong loading `directory` as the text
    drafter: an unregistered model type, parameters missing or unexpected after sanitize
    (`update(verify: .all)`), quantization settings that do not fit the packed tensors."""
    config, weights, _ = read_drafter(directory)
    try:
        swift_drafter_type(config)
    except LookupError as e:
        return [str(e)]
    loaded = swift_sanitize(weights)
    expected = swift_expected_parameters(cfg)
    problems = []
    quantized = {k.removesuffix(".scales") for k in loaded if k.endswith(".scales")}
    for module in sorted(quantized):
        bits, group = swift_quantization(config, module) or (None, None)
        rows, columns = expected[f"{module}.weight"]
        packed, scales = loaded[f"{module}.weight"].shape, loaded[f"{module}.scales"].shape
        if bits is None or packed != (rows, columns * bits // 32) or scales[-1] * group != columns:
            problems.append(
                f"{module}: quantized as {bits} bits, group {group}, does not fit "
                f"weight {packed} and scales {scales}"
            )
    names = {k for k in loaded if not k.endswith((".scales", ".biases"))}
    problems += [f"missing {k}" for k in sorted(set(expected) - names)]
    problems += [f"unexpected {k}" for k in sorted(names - set(expected))]
    return problems


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


def tiny_cfg() -> TextConfig:
    return TextConfig.from_dict(json.loads((FIXTURES / "tiny_untied" / "config.json").read_text()))


# --- mlx-swift-lm ------------------------------------------------------------------------------


def test_bundle_drafter_passes_mlx_swift_lm_rules(drafters):
    bundle_mtp = drafters["bundle"] / "mtp"
    config = json.loads((bundle_mtp / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and "vision_config" not in config
    assert (
        json.loads((drafters["bundle"] / "manifest.json").read_text())["quantization"]["recipe"]
        == "quality"
    )
    assert config["quantization"]["mtp.layers.0.mlp.down_proj"]["bits"] == 6
    for directory in (bundle_mtp, drafters["checkpoint"] / "mtp"):
        assert swift_load_problems(directory, tiny_cfg()) == []


def test_todays_layout_fails_mlx_swift_lm_rules(drafters):
    """OUT/mtp/ (the layout bundles had): the 3.x registration (4e440c2) has no drafter for
    qwen3_5_mtp, and its sanitize would drop every tensor (none is `mtp.`-prefixed); with the
    prefix added, the drafter-relative quantization keys would miss (6-bit weights loaded as
    4-bit) and the converted norms would be shifted a second time."""
    old = drafters["mlx-vlm"] / "mtp"
    config, weights, _ = read_drafter(old)
    assert swift_load_problems(old, tiny_cfg()) == [
        "no text MTP drafter registered for model_type 'qwen3_5_mtp'"
    ]
    assert swift_sanitize(weights) == {}  # the prefix filter keeps nothing

    prefixed = {f"mtp.{k}": v for k, v in weights.items()}
    quant = {k.removesuffix(".scales") for k in prefixed if k.endswith(".scales")}
    wrong = {m for m in quant if swift_quantization(config, m) != (6, 64)} & {
        "mtp.layers.0.self_attn.v_proj",
        "mtp.layers.0.mlp.down_proj",
    }
    assert wrong == {"mtp.layers.0.self_attn.v_proj", "mtp.layers.0.mlp.down_proj"}
    norm = swift_sanitize(prefixed)["mtp.norm.weight"]
    converted = weights["norm.weight"]  # already 1 + w
    assert mx.array_equal(norm, converted + 1).item()  # shifted twice


def test_shifted_norms_are_the_ones_mlxkit_and_the_reference_use(drafters):
    """mlx-swift-lm's +1 (3.x sanitize, and main's convention rule) applied to the bundle's
    norms gives exactly the norms mlxkit loads from the Hugging Face checkpoint."""
    config, weights, metadata = read_drafter(drafters["f32"] / "mtp")
    model = load_model(FIXTURES / "tiny_untied", dtype=mx.float32)
    ours = dict(tree_flatten(model.parameters()))
    loaded = swift_sanitize(weights)
    norms = [k for k in loaded if k.endswith(SWIFT_NORM_SUFFIXES)]
    assert len(norms) == 7  # 3 head norms + 2 layer norms + q_norm, k_norm
    for k in loaded:
        assert mx.array_equal(loaded[k], ours[k]).item(), k
    for k in norms:  # main branch: declared nothing, `mtp.` names, format pt → shift
        assert swift_main_norm_convention(k, metadata[k], config["model_type"]) == "offset"
    # had the bundle said qwen3_5_mtp, main would not shift these norms
    assert (
        swift_main_norm_convention("mtp.norm.weight", metadata["mtp.norm.weight"], "qwen3_5_mtp")
        == "scale"
    )


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
