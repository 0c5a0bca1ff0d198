"""`build_bundle`: plan for a phone, convert, and package — one folder an app can ship.

    OUT/
      model/          the MLX model directory (loads by itself in mlx-lm, MLX Swift, mlxkit),
                      with the vision tower and its preprocessor configs when planned
      mtp/            the MTP drafter (the head in the checkpoint's layout), when included,
                      with draft_vocab.json when the plan has a draft vocabulary (mlxkit's
                      loader drafts over it; MLX Swift's reads config.json and *.safetensors)
      vision/         VisionEncoder.mlpackage, with --vision-encoder coreml (model/ then holds
                      no tower)
      manifest.json   what is inside, what it needs, sha256 of every file
      xcode/          Entitlements.plist, Info-BackgroundAssets.plist, MLXKitBundle.swift,
                      MLXKitVisionEncoder.swift (Core ML bundles), README

The plan comes first, so a model that cannot fit is refused before a byte is converted.
Without explicit choices the recipe, MTP inclusion and memory limit are picked by
`choose_plan` (choose.py), as `mlxkit plan` picks them; the rounding is the caller's
(`rounding="gptq"`: the converter rounds the decoder layers' linears by GPTQ, the same tensors,
and the manifest's quality block says which rounding its figures are of). The converter writes
the drafter inside its output (`model/mtp/`, where mlxkit.load looks for it), in the "checkpoint" layout that
mlx-swift-lm's Qwen 3.5 drafters read (convert.converter.DRAFTER_LAYOUTS); the bundle
moves it beside `model/` so that each directory is a plain, self-contained model directory, and
gives mtp/config.json model/'s `vision_config` when model/ holds the tower, so that MLX Swift
pairs the model its VLM loader builds with the drafter that accepts it (`_pair_drafter`).
The vision tower stays inside model/ (`vision_tower.*`, config.json's `vision_config` and token
ids, preprocessor_config.json and video_preprocessor_config.json), where MLX Swift's VLM loader
(`VLMModelFactory`, model type qwen3_5) reads it; its text loader ignores it. With
`vision_encoder="coreml"` the app encodes images with a Core ML package instead, so model/ is
converted text-only (it loads in every loader, the text one included) and the tower is
exported from the checkpoint to vision/VisionEncoder.mlpackage (convert/coreml.py), whose
weight file the plan counts to the byte; the manifest describes its functions, preprocessing
and token ids, and the package's size and digest.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from mlxkit.convert import output
from mlxkit.convert.coreml import import_coreml

from mlxkit import __version__
from mlxkit.bundle_files import bundle_files, read_manifest
from mlxkit.bundle_files import file_entries as listed_files
from mlxkit.errors import ConfigError, MlxkitError
from mlxkit.fields import local_path
from mlxkit.layout import VISION_TOKEN_KEYS
from mlxkit.load import BUNDLE_MODEL_DIR as MODEL_DIR
from mlxkit.load import MTP_DIR
from mlxkit.vision import PREPROCESSOR_FILES

if TYPE_CHECKING:
    from mlxkit.source import Source

from .choose import choose_plan
from .devices import ENTITLEMENT, Target, resolve_target
from .guided import JSON_SCHEMA_FILE, check_guided_runtime, read_json_schema
from .manifest import (
    COREML_PATH,
    COREML_RECORDED,
    FORMAT,
    MANIFEST,
    SCHEMA_VERSION,
    VISION_DIR,
    file_entries,
)
from .plan import COREML_PRECISION, Plan, PlanRefused
from .roofline import mtp_recommended
from .runtimes import runtime_record
from .serialize import memory_to_dict, plan_to_dict, target_to_dict, vision_to_dict
from .xcode import write_xcode

APP_BASELINE = 40 * 2**20  # the part of the runtime reserve already in use at the app's check
MANIFEST_ALLOWANCE = 1 << 20  # bytes counted for manifest.json in the download sizes


def _source_info(directory: Path) -> dict:
    """Repo and revision when the checkpoint is a Hugging Face cache snapshot
    (…/models--Org--Name/snapshots/<revision>/)."""
    parts = directory.resolve().parts
    repo = revision = None
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        repo = parts[-3][len("models--") :].replace("--", "/")
        revision = parts[-1]
    return {"path": str(directory.resolve()), "repo": repo, "revision": revision}


def coreml_facts(root: Path, recorded: dict) -> dict:
    """What the manifest says of the Core ML package beyond the plan: where it is, its size and
    digest (from the files), and what its spec records (`recorded`: the preprocessing, tower
    config and token ids an app needs to make its input)."""
    from mlxkit.convert.coreml import package_digest, package_files

    package = root / COREML_PATH
    files = package_files(package)
    return {
        "path": COREML_PATH,
        "bytes": sum((package / rel).stat().st_size for rel in files),
        "sha256": package_digest(files),
        **{key: recorded[key] for key in COREML_RECORDED},
    }


def recorded_by_export(package: Path) -> dict:
    """The preprocessing, tower config and token ids the export wrote into the spec."""
    from mlxkit.convert.coreml import read_package_spec

    meta = read_package_spec(package).metadata
    return {key: json.loads(meta[f"mlxkit.{key}"]) for key in COREML_RECORDED}


def make_manifest(
    plan: Plan,
    source: dict,
    has_mtp_dir: bool,
    coreml: dict | None = None,
    json_schema: bool = False,
) -> dict:
    """The manifest without `files` (they are hashed once everything is written); `coreml`:
    `coreml_facts` of the package, with the Core ML encoder; `json_schema`: the bundle carries
    JSON_SCHEMA_FILE. The drafter is recommended where the phone's predicted MTP gain is at
    least MIN_MTP_GAIN (below it the Swift glue does not load it)."""
    d = plan_to_dict(plan)
    gain = plan.speed.mtp_speedup if has_mtp_dir and plan.speed is not None else None
    gain = None if gain is None else round(gain, 3)
    # the MLX tower is in model/, where VLMModelFactory reads it (LLMModelFactory ignores it)
    vision = {
        **vision_to_dict(plan),
        "preprocessor": list(PREPROCESSOR_FILES) if plan.mlx_vision is not None else [],
    }
    if vision["coreml"] is not None:
        vision["coreml"].update(coreml or {})
    memory = memory_to_dict(plan)
    memory["check_available_bytes"] = max(0, plan.total - APP_BASELINE)
    return {
        "schema_version": SCHEMA_VERSION,
        "format": FORMAT,
        "created_by": f"mlxkit {__version__}",
        "model": {
            "name": plan.model,
            "size": plan.size,
            "model_type": "qwen3_5",
            "path": MODEL_DIR,
            "mtp_path": MTP_DIR if has_mtp_dir else None,
        },
        "source": source,
        "runtime": runtime_record(plan.settings.swift_runtime),
        "target": target_to_dict(plan),
        "min_ios": plan.target.min_ios,
        "entitlement_required": plan.entitlement_required,
        "entitlements": [ENTITLEMENT] if plan.entitlement_required else [],
        "quantization": d["quantization"],
        "mtp": {  # num_draft: what the phone's runtime drafts per round (runtimes.py)
            "included": has_mtp_dir,
            "path": MTP_DIR if has_mtp_dir else None,
            "num_draft": plan.num_draft,
            "recommended": has_mtp_dir and mtp_recommended(gain),
            "predicted_gain": gain,
            # N: mtp/draft_vocab.json, the shortlist mlxkit's loop drafts over (MLX Swift
            # ignores it and drafts over the whole head); None: no shortlist
            "draft_vocab": plan.settings.draft_vocab if has_mtp_dir else None,
        },
        "vision": vision,
        "max_context": plan.max_context,
        "largest_context_that_fits": plan.largest_context_that_fits,
        "prefill_chunk": plan.settings.prefill_chunk,
        "kv_cache": d["kv_cache"],
        "memory": memory,
        "mlx": {"cache_limit_bytes": plan.settings.cache_limit},
        "json_schema_path": JSON_SCHEMA_FILE if json_schema else None,
        "performance": d["performance"],
        "warnings": plan.warnings,
        # the recipe's quality vs the source, measured or predicted (mlxkit.quality_block)
        "quality": plan.quality,
        "files": [],
    }


def plan_for_source(
    src: str | Path,
    target: str | Target | None,
    memory_budget: int | str | None,
    context: int | None,
    settings: dict,
) -> tuple[Source, Plan]:
    """The checkpoint and the plan `choose_plan` makes for it on an iPhone target (from the
    checkpoint's headers and config alone: no weight is read)."""
    from mlxkit.convert.reader import SourceCheckpoint

    from mlxkit.source import resolve_source

    tgt = target if isinstance(target, Target) else resolve_target(target, memory_budget)
    if tgt.kind == "mac":
        raise ConfigError(
            f"{tgt.name} is a Mac: bundles are for iPhones. `mlxkit plan --target {tgt.name}` "
            "plans for it, and `mlxkit convert` without --target writes the model it loads"
        )
    source = resolve_source(src)
    # the tower is read for the Core ML encoder even with --no-vision, which the plan refuses
    vision = settings.get("vision") is not False or settings.get("vision_encoder") == "coreml"
    ckpt = SourceCheckpoint.open(
        source.directory, include_mtp=settings.get("mtp") is not False, include_vision=vision
    )
    name, has_mtp = source.name, ckpt.has_mtp
    return source, choose_plan(
        ckpt.shapes,
        tgt,
        context,
        name=name,
        has_mtp=has_mtp,
        checkpoint=source.directory,
        **settings,
    )


def build_bundle(
    src: str | Path,
    out: str | Path,
    target: str | Target | None = None,
    *,
    memory_budget: int | str | None = None,
    context: int | None = None,
    force: bool = False,
    quiet: bool = True,
    json_schema: str | Path | None = None,
    **settings,
) -> dict:
    """Plans, converts `src` (a Hugging Face layout checkpoint directory, or a size name)
    into `out`, and writes manifest.json and xcode/. Returns the manifest. `settings` are
    the fields of `Settings`; `recipe` and `mtp` left out (or None) are chosen. `json_schema`:
    a JSON Schema file the app's prompts use, carried beside the manifest (guided.py)."""
    from mlxkit.source import local_source

    schema = None if json_schema is None else read_json_schema(json_schema)
    out = local_path(out, "output", output.OutputError).absolute()
    local = local_source(src)
    if local is not None:
        output.check_apart_from_source(out, local.directory)
    output.check_destination(out, force, written_by_bundle, "bundle")
    source, p = plan_for_source(src, target, memory_budget, context, settings)
    output.check_apart_from_source(out, source.directory)
    if schema is not None:
        check_guided_runtime(p.settings.swift_runtime)

    if p.vision_encoder == "coreml":
        import_coreml()  # before minutes of conversion, not after
    with output.assembling(out, "building") as tmp:
        written = _convert_model(source, tmp, p)
        coreml = None
        if p.vision_encoder == "coreml":
            written["vision"] = _export_encoder(source.directory, tmp, out, p, quiet)
            coreml = coreml_facts(tmp, recorded_by_export(tmp / COREML_PATH))
        if written != p.weights:  # one source of truth: this is a bug if it fires
            raise MlxkitError(
                f"internal error: the converter wrote {written} but the plan expected "
                f"{p.weights}; please report it"
            )
        if schema is not None:
            (tmp / JSON_SCHEMA_FILE).write_text(json.dumps(schema, indent=2) + "\n")
        manifest = make_manifest(
            p, _source_info(source.directory), (tmp / MTP_DIR).is_dir(), coreml, schema is not None
        )
        write_xcode(tmp / "xcode", out.name, manifest, _download_bytes(tmp))
        manifest["files"] = file_entries(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        output.replace_dir(tmp, out)
    return manifest


def _convert_model(source, tmp: Path, p: Plan) -> dict[str, int]:
    """model/ (and mtp/ beside it, in the checkpoint layout mlx-swift-lm's drafter reads) as
    the plan says; the bytes written per part."""
    from mlxkit.convert.converter import convert

    s, tower = p.settings, p.mlx_vision is not None
    auto = p.bits_per_weight is not None  # recipe auto: the converter allocates the same budget
    result = convert(
        source,
        tmp / MODEL_DIR,
        bits=None if auto else s.bits,
        group_size=None if auto else s.group_size,
        recipe=s.recipe,
        bits_per_weight=p.bits_per_weight,
        dtype=s.dtype,
        rounding=s.rounding,
        quantize=True,
        mtp=s.mtp,
        vision=tower,
        vision_bits=s.vision_bits if tower else None,
        draft_vocab=s.draft_vocab,
        drafter_layout="checkpoint",
        force=False,
        quiet=True,
    )
    if (tmp / MODEL_DIR / MTP_DIR).is_dir():
        os.rename(tmp / MODEL_DIR / MTP_DIR, tmp / MTP_DIR)
        if tower:
            _pair_drafter(tmp / MODEL_DIR, tmp / MTP_DIR)
    return dict(result.bytes_by_part)


def _pair_drafter(model: Path, mtp: Path) -> None:
    """mtp/config.json takes model/'s `vision_config` and vision token ids. mlx-swift-lm picks
    the drafter by that config's shape (ml-explore/mlx-swift-lm 1441444,
    Libraries/MLXLLM/Qwen35TextMTPRegistration.swift:50-55 and
    Libraries/MLXVLM/Qwen35VLMMTPRegistration.swift:44-49): without a `vision_config` it builds
    Qwen35MTPDraftModel, which accepts only MLXLLM's models and calls fatalError on the Qwen35
    that the VLM loader builds for model/ with the tower (Libraries/MLXLLM/Models/Qwen35MTP.swift
    :248-257); with one it builds Qwen35VLMNextNDraftModel, which accepts exactly that model and
    decodes the whole config as MLXVLM's Qwen35Configuration (vision_config included). The
    tensors are the same `mtp.*` for both (QwenMTP.swift's qwenMTPSanitizeWeights)."""
    main = json.loads((model / "config.json").read_text())
    config = json.loads((mtp / "config.json").read_text())
    config["vision_config"] = main["vision_config"]
    config.update({k: main[k] for k in VISION_TOKEN_KEYS if k in main})
    (mtp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4) + "\n")


def _download_bytes(tmp: Path) -> int:
    """What an app downloads: model/, mtp/ and vision/, the JSON Schema file when there is one,
    plus manifest.json (not yet written: room for it is reserved); xcode/ goes into the app
    project."""
    files = [p for d in (MODEL_DIR, MTP_DIR, VISION_DIR) for p in (tmp / d).rglob("*")]
    files.append(tmp / JSON_SCHEMA_FILE)
    return MANIFEST_ALLOWANCE + sum(f.stat().st_size for f in files if f.is_file())


def _export_encoder(checkpoint: Path, tmp: Path, out: Path, p: Plan, quiet: bool) -> int:
    """Exports the tower to vision/ and returns its weight file's size, which the plan
    counted (`weight_file_bytes`); a checkpoint whose tower repeats a tensor exactly (an
    untrained one) comes out smaller, and is refused rather than shipped unplanned."""
    from mlxkit.convert.coreml import export_vision_encoder

    grids = p.coreml_grids
    result = export_vision_encoder(
        checkpoint,
        tmp / COREML_PATH,
        grids,
        precision=COREML_PRECISION,
        quiet=quiet,
        shown_as=out / COREML_PATH,
    )
    if result.weight_bytes != p.weights["vision"]:
        raise MlxkitError(
            f"{checkpoint}: the Core ML weight file holds {result.weight_bytes:,} bytes, not the "
            f"{p.weights['vision']:,} planned: coremltools stored identical tensors of this "
            "vision tower once (an untrained tower, e.g. LayerNorm weights all ones); a "
            "trained checkpoint has none. Use --vision-encoder mlx for this one"
        )
    return result.weight_bytes


def written_by_bundle(directory: Path) -> bool:
    """A bundle `build_bundle` wrote: its manifest lists every file in it (so replacing it
    loses no file of the user's)."""
    try:
        manifest = read_manifest(directory)
    except MlxkitError:
        return False
    entries, problems = listed_files(manifest)
    if manifest.get("format") != FORMAT or problems:
        return False
    listed = {e.path for e in entries} | {MANIFEST}
    return all(rel in listed and stat.S_ISREG(st.st_mode) for rel, st in bundle_files(directory))


__all__ = ["PlanRefused", "build_bundle", "make_manifest"]
