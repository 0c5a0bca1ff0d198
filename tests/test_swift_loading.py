"""Every kind of bundle mlxkit builds, loaded by the model of MLX Swift's loading
(tests/swift_loading.py): text only, MLX vision and Core ML vision, each with and without the
MTP drafter, with each recipe, for each Swift runtime. A pairing mlx-swift-lm would refuse or
crash on fails here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlxkit.ios_bridge import build_bundle
from mlxkit.ios_bridge.plan import COREML_SWIFT_GAP
from mlxkit.ios_bridge.report import bundle_line
from mlxkit.ios_bridge.runtimes import runtime_record

from tests.helpers import FIXTURES
from tests.swift_loading import (
    DRAFTER_TARGETS,
    SwiftCrashes,
    SwiftRefuses,
    drafter_built,
    drafter_files_read,
    generation,
    load_bundle,
    registered,
)

KINDS = {  # bundle kind → build_bundle options (the tiny vision fixture: seconds each)
    "text": {"vision": False},
    "mlx-vision": {},
    "coreml-vision": {"vision_encoder": "coreml", "coreml_grids": "6x9"},
}
EXPECTED = {  # kind → (factory, model, drafter)
    "text": ("LLMModelFactory", "MLXLLM.Qwen35Model", "MLXLLM.Qwen35MTPDraftModel"),
    "mlx-vision": ("VLMModelFactory", "MLXVLM.Qwen35", "MLXVLM.Qwen35VLMNextNDraftModel"),
    "coreml-vision": ("LLMModelFactory", "MLXLLM.Qwen35Model", "MLXLLM.Qwen35MTPDraftModel"),
}
CASES = [(k, m, r, "1441444") for k in KINDS for m in (True, False) for r in ("uniform", "quality")]
CASES += [(k, False, "uniform", "3.31.4") for k in KINDS]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(kind, mtp, recipe, runtime) → bundle folder, each built once."""
    root = tmp_path_factory.mktemp("swift-loading")
    made: dict[tuple, Path] = {}

    def get(kind: str, mtp: bool, recipe: str, runtime: str) -> Path:
        key = (kind, mtp, recipe, runtime)
        if key not in made:
            out = root / "-".join(map(str, key))
            options = {**KINDS[kind], "mtp": mtp, "recipe": recipe, "swift_runtime": runtime}
            build_bundle(FIXTURES / "tiny_vision_p6", out, "iphone15", **options)
            made[key] = out
        return made[key]

    return get


def glue_of(bundle: Path) -> str:
    return (bundle / "xcode" / "MLXKitBundle.swift").read_text()


@pytest.mark.parametrize("kind, mtp, recipe, runtime", CASES)
def test_mlx_swift_loads_every_bundle_kind(built, kind, mtp, recipe, runtime):
    bundle = built(kind, mtp, recipe, runtime)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["recipe"] == recipe
    assert manifest["runtime"] == runtime_record(runtime)
    loaded = load_bundle(bundle, glue_of(bundle))
    factory, model, drafter = EXPECTED[kind]
    assert (loaded.factory, loaded.model) == (factory, model)
    assert loaded.drafter == (drafter if mtp else None)
    # mlxkit writes model/ as MLX loads it: nothing renamed, transposed or shifted
    assert not (loaded.main.renamed or loaded.main.transposed or loaded.main.shifted)
    if mtp:  # the head is the checkpoint's: its seven norms get the + 1
        assert len(loaded.mtp.shifted) == 7 and not loaded.mtp.renamed


def test_the_text_drafter_on_the_vlm_model_crashes(built, tmp_path):
    """The default bundle as it was before the fix: mtp/config.json without a vision_config
    beside a model/ the VLM loader builds. mlx-swift-lm makes the text drafter, whose first
    round calls fatalError on MLXVLM's Qwen35, with either registration order."""
    old = Path(shutil.copytree(built("mlx-vision", True, "quality", "1441444"), tmp_path / "b"))
    config = json.loads((old / "mtp" / "config.json").read_text())
    del config["vision_config"]
    (old / "mtp" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SwiftCrashes, match="Qwen35MTPDraftModel requires a Qwen35 target"):
        load_bundle(old, glue_of(old))
    only_text = "await Qwen35TextMTPRegistration.register()\n"  # what the old glue registered
    with pytest.raises(SwiftCrashes, match="got MLXVLM.Qwen35"):
        load_bundle(old, only_text + "loadDrafter")


def test_only_the_vlm_registration_leaves_a_text_drafter_unregistered(built):
    text = json.loads(
        (built("text", True, "uniform", "1441444") / "mtp" / "config.json").read_text()
    )
    with pytest.raises(SwiftRefuses, match="unsupportedModelType"):
        drafter_built(registered("await Qwen35VLMMTPRegistration.register()"), text)


def test_a_vlm_drafter_config_must_decode_as_mlxvlm_qwen35_configuration(built):
    mtp = built("mlx-vision", True, "uniform", "1441444") / "mtp"
    config = json.loads((mtp / "config.json").read_text())
    del config["vision_config"]["num_position_embeddings"]
    with pytest.raises(SwiftRefuses, match="vision_config.num_position_embeddings"):
        drafter_built(registered(glue_of(mtp.parent)), config)


def test_a_tensor_the_swift_model_does_not_declare_fails(built, tmp_path):
    """update(verify: .all): a stray tensor in model/ (here a leftover MTP tensor renamed so
    that sanitize keeps it) is refused."""
    bundle = Path(shutil.copytree(built("text", False, "uniform", "1441444"), tmp_path / "b"))
    st = bundle / "model" / "model.safetensors"
    import mlx.core as mx

    arrays, meta = mx.load(str(st), return_metadata=True)
    arrays["language_model.model.extra.weight"] = mx.zeros((2,))
    mx.save_safetensors(str(st), arrays, metadata=meta)
    with pytest.raises(SwiftRefuses, match="unexpected language_model.model.extra.weight"):
        load_bundle(bundle, glue_of(bundle))


def test_the_drafter_loader_never_reads_a_draft_vocabulary(built, tmp_path):
    """mlxkit's shortlist (mtp/draft_vocab.json, `mlxkit convert --draft-vocab N`) beside the
    drafter: mlx-swift-lm opens config.json and the safetensors only, and loads the same
    drafter with the same tensors as without it."""
    from mlxkit import draft_vocab

    original = built("text", True, "uniform", "1441444")
    bundle = Path(shutil.copytree(original, tmp_path / "b"))
    vocab = json.loads((bundle / "mtp" / "config.json").read_text())["text_config"]["vocab_size"]
    data = draft_vocab.encode([1, 5, 9], vocab, "0" * draft_vocab.DIGEST_CHARS)
    (bundle / "mtp" / draft_vocab.FILE).write_bytes(data)
    assert drafter_files_read(bundle / "mtp") == ["config.json", "model.safetensors"]
    with_file, without = (
        load_bundle(bundle, glue_of(bundle)),
        load_bundle(original, glue_of(original)),
    )
    assert with_file.drafter == without.drafter == "MLXLLM.Qwen35MTPDraftModel"
    assert with_file.mtp.shapes == without.mtp.shapes


def test_each_drafter_accepts_only_its_loaders_model():
    assert DRAFTER_TARGETS["MLXVLM.Qwen35VLMNextNDraftModel"] == {"MLXVLM.Qwen35"}
    assert "MLXVLM.Qwen35" not in DRAFTER_TARGETS["MLXLLM.Qwen35MTPDraftModel"]


def test_generation_parameters_per_runtime(built):
    main, release = runtime_record("1441444"), runtime_record("3.31.4")
    assert generation(main, 512, 0.0, drafter=False) == {
        "prefill_step": 512,
        "block_size": 1,
        "speculative": False,
    }
    # with the drafter the whole prompt is prefilled at once: the glue keeps it to prompts the
    # memory plan's prefill chunk covers
    assert generation(main, 512, 0.0, drafter=True)["prefill_step"] is None
    assert generation(main, 512, 0.7, drafter=True)["speculative"] is False
    with pytest.raises(SwiftRefuses, match="3.31.4 has no Qwen 3.5 MTP drafter"):
        generation(release, 512, 0.0, drafter=True)
    glue = glue_of(built("mlx-vision", True, "uniform", "1441444"))
    assert "temperature == 0 && promptTokens <= manifest.prefillChunk" in glue
    assert "parameters.prefill.stepSize = manifest.prefillChunk" in glue
    old = glue_of(built("mlx-vision", False, "uniform", "3.31.4"))
    assert "parameters.prefillStepSize = manifest.prefillChunk" in old
    assert "loadDrafter" not in old and "mtpDrafter" not in old


def test_a_core_ml_bundle_warns_at_build_time_and_says_so_in_its_swift(built):
    """MLX Swift answers text only with a Core ML bundle: the build says so, with the smallest
    upstream change that would let it use the encoder's output."""
    bundle = built("coreml-vision", True, "uniform", "1441444")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert COREML_SWIFT_GAP in manifest["warnings"]
    assert f"\n  warning: {COREML_SWIFT_GAP}" in bundle_line("out", manifest)
    assert "precomputed image features" in COREML_SWIFT_GAP
    swift = (bundle / "xcode" / "MLXKitVisionEncoder.swift").read_text()
    assert "public entry in MLXVLM's Qwen35 that takes\n// precomputed image features" in swift
    mlx = json.loads(
        (built("mlx-vision", True, "uniform", "1441444") / "manifest.json").read_text()
    )
    assert COREML_SWIFT_GAP not in mlx["warnings"]
