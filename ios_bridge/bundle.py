"""`build_bundle`: plan for a phone, convert, and package — one folder an app can ship.

    OUT/
      model/          the MLX model directory (loads by itself in mlx-lm, MLX Swift, mlxkit),
                      with the vision tower and its preprocessor configs when planned
      mtp/            the MTP drafter (the head in the checkpoint's layout), when included
      manifest.json   what is inside, what it needs, sha256 of every file
      xcode/          Entitlements.plist, Info-BackgroundAssets.plist, MLXKitBundle.swift, README

The plan comes first, so a model that cannot fit is refused before a byte is converted.
Without explicit choices the recipe, MTP inclusion and memory limit are picked by
`choose_plan` (choose.py), as `mlxkit plan` picks them. The converter writes the drafter inside
its output (`model/mtp/`, where mlxkit.load looks for it), in the "checkpoint" layout that
mlx-swift-lm's Qwen 3.5 text drafter reads (convert.converter.DRAFTER_LAYOUTS); the bundle
moves it beside `model/` so that each directory is a plain, self-contained model directory.
The vision tower stays inside model/ (`vision_tower.*`, config.json's `vision_config` and token
ids, preprocessor_config.json and video_preprocessor_config.json), where MLX Swift's VLM loader
(`VLMModelFactory`, model type qwen3_5) reads it; its text loader ignores it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from mlxkit.convert import output

from mlxkit import __version__
from mlxkit.bundle_files import bundle_files, read_manifest
from mlxkit.bundle_files import file_entries as listed_files
from mlxkit.errors import ConfigError, MlxkitError
from mlxkit.fields import local_path
from mlxkit.load import BUNDLE_MODEL_DIR as MODEL_DIR
from mlxkit.load import MTP_DIR
from mlxkit.vision import PREPROCESSOR_FILES

if TYPE_CHECKING:
    from mlxkit.convert.source import Source

from .choose import choose_plan
from .devices import ENTITLEMENT, Target, resolve_target
from .manifest import FORMAT, MANIFEST, SCHEMA_VERSION, file_entries
from .plan import Plan, PlanRefused
from .serialize import memory_to_dict, plan_to_dict, target_to_dict, vision_to_dict
from .xcode import RUNTIME, write_xcode

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


def make_manifest(plan: Plan, source: dict, has_mtp_dir: bool) -> dict:
    """The manifest without `files` (they are hashed once everything is written)."""
    d = plan_to_dict(plan)
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
        "runtime": dict(RUNTIME),
        "target": target_to_dict(plan),
        "min_ios": plan.target.min_ios,
        "entitlement_required": plan.entitlement_required,
        "entitlements": [ENTITLEMENT] if plan.entitlement_required else [],
        "quantization": d["quantization"],
        "mtp": {  # num_draft: what the phone's runtime drafts per round (runtimes.py)
            "included": has_mtp_dir,
            "path": MTP_DIR if has_mtp_dir else None,
            "num_draft": plan.num_draft,
        },
        "vision": {  # in model/: VLMModelFactory reads it, LLMModelFactory ignores it
            **vision_to_dict(plan),
            "preprocessor": list(PREPROCESSOR_FILES) if plan.vision is not None else [],
        },
        "max_context": plan.max_context,
        "largest_context_that_fits": plan.largest_context_that_fits,
        "prefill_chunk": plan.settings.prefill_chunk,
        "memory": memory,
        "mlx": {"cache_limit_bytes": plan.settings.cache_limit},
        "performance": d["performance"],
        "warnings": plan.warnings,
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
    from mlxkit.convert.source import resolve_source

    tgt = target if isinstance(target, Target) else resolve_target(target, memory_budget)
    if tgt.kind == "mac":
        raise ConfigError(
            f"{tgt.name} is a Mac: bundles are for iPhones. `mlxkit plan --target {tgt.name}` "
            "plans for it, and `mlxkit convert` without --target writes the model it loads"
        )
    source = resolve_source(src)
    ckpt = SourceCheckpoint.open(source.directory, include_mtp=settings.get("mtp") is not False,
                                 include_vision=settings.get("vision") is not False)  # fmt: skip
    name, has_mtp = source.name, ckpt.has_mtp
    return source, choose_plan(ckpt.shapes, tgt, context, name=name, has_mtp=has_mtp, **settings)


def build_bundle(
    src: str | Path,
    out: str | Path,
    target: str | Target | None = None,
    *,
    memory_budget: int | str | None = None,
    context: int | None = None,
    force: bool = False,
    quiet: bool = True,
    **settings,
) -> dict:
    """Plans, converts `src` (a Hugging Face layout checkpoint directory, or a size name)
    into `out`, and writes manifest.json and xcode/. Returns the manifest. `settings` are
    the fields of `Settings`; `recipe` and `mtp` left out (or None) are chosen."""
    import json

    from mlxkit.convert.converter import convert
    from mlxkit.convert.source import local_source

    out = local_path(out, "output", output.OutputError).absolute()
    local = local_source(src)
    if local is not None:
        output.check_apart_from_source(out, local.directory)
    output.check_destination(out, force, written_by_bundle, "bundle")
    source, p = plan_for_source(src, target, memory_budget, context, settings)
    output.check_apart_from_source(out, source.directory)

    with output.assembling(out, "building") as tmp:
        s, vision = p.settings, p.vision is not None
        result = convert(source, tmp / MODEL_DIR, bits=s.bits, group_size=s.group_size,
                         recipe=s.recipe, dtype=s.dtype, quantize=True, mtp=s.mtp,
                         vision=vision, vision_bits=s.vision_bits if vision else None,
                         drafter_layout="checkpoint", force=False, quiet=True)  # fmt: skip
        if (tmp / MODEL_DIR / MTP_DIR).is_dir():
            os.rename(tmp / MODEL_DIR / MTP_DIR, tmp / MTP_DIR)
        if result.bytes_by_part != p.weights:  # one source of truth: this is a bug if it fires
            raise MlxkitError(
                f"internal error: the converter wrote {result.bytes_by_part} but the plan "
                f"expected {p.weights}; please report it"
            )
        manifest = make_manifest(p, _source_info(source.directory), (tmp / MTP_DIR).is_dir())
        # What an app downloads: model/ and mtp/ plus manifest.json (not yet written: room
        # for it is reserved); xcode/ goes into the app project, not the download.
        download = MANIFEST_ALLOWANCE + sum(
            f.stat().st_size for d in (MODEL_DIR, MTP_DIR) for f in (tmp / d).rglob("*")
            if f.is_file()
        )  # fmt: skip
        write_xcode(tmp / "xcode", out.name, manifest, download)
        manifest["files"] = file_entries(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        output.replace_dir(tmp, out)
    return manifest


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
