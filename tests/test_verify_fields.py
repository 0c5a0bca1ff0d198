"""`bundle verify` on the files an app reads beside the weights: a bundle whose config.json token
ids, preprocessor values, generation config or recorded Core ML preprocessing were changed, with
every sha256 (and the package digest) recomputed so that only this check can see it, fails;
the same bundle without its recorded source still fails what the bundle itself fixes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlxkit.convert.coreml import SPEC_FILE, package_digest, package_files
from mlxkit.ios_bridge import build_bundle, verify_bundle
from mlxkit.ios_bridge.manifest import COREML_PATH

from mlxkit.bundle_files import sha256_file
from tests.helpers import FIXTURES
from tests.vision_helpers import VISION

NAME = VISION[1]  # tiny_vision_p6: patch 6, merge 3; image 452, video 453, start 449, end 450
CHECK = "files the app reads, re-derived"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verify-fields")
    src = Path(shutil.copytree(FIXTURES / NAME, root / "src"))
    mlx, coreml = root / "mlx", root / "coreml"
    build_bundle(src, mlx, "iphone15")
    build_bundle(src, coreml, "iphone15", vision_encoder="coreml", coreml_grids="6x9")
    return {"src": src, "mlx": mlx, "coreml": coreml}


def tampered(built: dict, kind: str, tmp_path: Path, edit) -> Path:
    """A copy of a built bundle with `edit(bundle)` applied and every listed file's size and
    sha256 (and the Core ML package's digest) recomputed."""
    bundle = Path(shutil.copytree(built[kind], tmp_path / kind))
    edit(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["files"]:
        path = bundle / entry["path"]
        entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    if manifest["vision"]["coreml"] is not None:
        files = package_files(bundle / COREML_PATH)
        manifest["vision"]["coreml"]["sha256"] = package_digest(files)
        manifest["vision"]["coreml"]["bytes"] = sum(
            (bundle / COREML_PATH / rel).stat().st_size for rel in files
        )
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


def failed(bundle: Path) -> dict[str, str]:
    return {c.name: c.detail for c in verify_bundle(bundle, load=False).checks if not c.ok}


def edit_json(rel: str, **values):
    def edit(bundle: Path) -> None:
        path = bundle / rel
        data = json.loads(path.read_text())
        data.update(values)
        path.write_text(json.dumps(data, indent=2))

    return edit


def test_the_built_bundles_pass_and_say_what_was_re_derived(built):
    for kind in ("mlx", "coreml"):
        checks = {c.name: c for c in verify_bundle(built[kind], load=False).checks}
        assert all(c.ok for c in checks.values()), [c for c in checks.values() if not c.ok]
        assert "re-derived from the recorded source" in checks[CHECK].detail
    assert "Core ML export's records" in checks[CHECK].detail


CASES = {  # bundle, edit, what the check says
    "image_token_id": (
        "mlx",
        edit_json("model/config.json", image_token_id=451),
        "image_token_id 451 is not <|image_pad|>'s id 452 in tokenizer.json",
    ),
    "vision_start_token_id the eos id": (
        "mlx",
        edit_json("model/config.json", vision_start_token_id=442),
        "vision_start_token_id 442 is the id of <|im_end|>",
    ),
    "image_mean": (  # in both files, as the loader wants them alike
        "mlx",
        lambda b: [
            edit_json(f"model/{name}", image_mean=[0.48, 0.46, 0.41])(b)
            for name in ("preprocessor_config.json", "video_preprocessor_config.json")
        ],
        "model/preprocessor_config.json is not the recorded source's",
    ),
    "video fps": (
        "mlx",
        edit_json("model/video_preprocessor_config.json", fps=4),
        "model/video_preprocessor_config.json is not the recorded source's",
    ),
    "image_std out of range": (
        "mlx",
        edit_json("model/preprocessor_config.json", image_std=[1e-300, 0.5, 0.5]),
        "model/preprocessor_config.json is not the recorded source's",
    ),
    "generation eos": (
        "mlx",
        edit_json("model/generation_config.json", eos_token_id=[440]),
        "model/generation_config.json is not the recorded source's",
    ),
    "config eos": (
        "mlx",
        edit_json("model/config.json", eos_token_id=[440]),
        "model/config.json: eos_token_id is not the recorded source's",
    ),
    "vision_config rope_theta": (
        "mlx",
        lambda b: _edit_vision_config(b, rope_theta=1e4),
        "model/config.json: vision_config is not the recorded source's",
    ),
    "drafter tokenizer": (
        "mlx",
        edit_json("mtp/tokenizer_config.json", eos_token="<|endoftext|>"),
        "mtp/tokenizer_config.json is not the recorded source's",
    ),
    "core ml token ids": (
        "coreml",
        lambda b: _edit_recorded(b, "token_ids", image_token_id=451),
        "token_ids are not model/config.json's",
    ),
    "core ml image_mean": (
        "coreml",
        lambda b: _edit_recorded(b, "preprocessing", image_mean=[0.48, 0.46, 0.41]),
        "vision.coreml.preprocessing is not what the recorded source exports",
    ),
    "core ml rescale 1e300": (
        "coreml",
        lambda b: _edit_recorded(b, "preprocessing", rescale_factor=1e300),
        "vision.coreml.preprocessing: rescale_factor",
    ),
}


def _edit_vision_config(bundle: Path, **values) -> None:
    path = bundle / "model" / "config.json"
    data = json.loads(path.read_text())
    data["vision_config"].setdefault("rope_parameters", {}).update(values)
    path.write_text(json.dumps(data))


def _edit_recorded(bundle: Path, key: str, **values) -> None:
    """The Core ML export's record `key` changed alike in the package's spec and the manifest,
    so that the spec check (spec against manifest) agrees and only a re-derivation can tell."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(bundle / COREML_PATH))
    meta = spec.description.metadata.userDefined
    recorded = {**json.loads(meta[f"mlxkit.{key}"]), **values}
    meta[f"mlxkit.{key}"] = json.dumps(recorded)
    (bundle / COREML_PATH / SPEC_FILE).write_bytes(spec.SerializeToString())
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["vision"]["coreml"][key] = recorded
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_changed_field_with_hashes_recomputed_fails(built, tmp_path, case):
    kind, edit, message = CASES[case]
    got = failed(tampered(built, kind, tmp_path, edit))
    assert message in got.get(CHECK, ""), got
    if case not in ALSO_FAILED_ELSEWHERE:
        assert list(got) == [CHECK], got


# config.json's ids are parsed by the re-plan too; the image preprocessor by the vision check
ALSO_FAILED_ELSEWHERE = ("vision_start_token_id the eos id", "image_std out of range")


def test_without_the_source_the_bundle_is_still_held_to_itself(built, tmp_path):
    """The recorded source gone (a bundle verified on another machine): the token ids against
    the tokenizer and the preprocessing bounds still fail a changed bundle, and a sound one
    passes saying that the files were not re-derived."""
    gone = {**built, "src": tmp_path / "elsewhere" / "src"}  # the same name: the model's
    for kind in ("mlx", "coreml"):

        def unsourced(bundle: Path) -> None:
            path = bundle / "manifest.json"
            manifest = json.loads(path.read_text())
            manifest["source"]["path"] = str(gone["src"])
            path.write_text(json.dumps(manifest))

        sound = tampered(built, kind, tmp_path / "sound", unsourced)
        checks = {c.name: c for c in verify_bundle(sound, load=False).checks}
        assert all(c.ok for c in checks.values()), [c for c in checks.values() if not c.ok]
        assert "is not here, so the files were not re-derived" in checks[CHECK].detail
    bad = tampered(
        built,
        "mlx",
        tmp_path / "bad",
        lambda b: (unsourced(b), edit_json("model/config.json", image_token_id=451)(b)),
    )
    assert "image_token_id 451 is not <|image_pad|>'s id 452" in failed(bad)[CHECK]
