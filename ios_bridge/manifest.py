"""manifest.json: what a bundle holds, what it needs, and how to check it.

The manifest is the hand-off between this Python side and the app: the Swift loader reads
`min_ios`, `target.device_model_ids`, `memory.check_available_bytes`, `mlx.cache_limit_bytes`
and `max_context` from it before loading anything, and `bundle verify` re-checks every file
against `files`. `SCHEMA` below is the one description of its required shape; the Swift
`Decodable` structs mirror the subset they read (a test compares the two).
"""

from __future__ import annotations

from pathlib import Path

from mlxkit.bundle_files import MANIFEST, read_manifest, sha256_file
from mlxkit.bundle_files import file_entries as listed_files
from mlxkit.errors import ManifestError
from mlxkit.fields import shown

SCHEMA_VERSION = 1
FORMAT = "mlxkit-ios-bundle"
VISION_DIR = "vision"  # the Core ML vision encoder, with --vision-encoder coreml
COREML_PATH = f"{VISION_DIR}/VisionEncoder.mlpackage"
# What the manifest copies from the package's spec metadata (mlxkit.<key>, JSON): what an app
# needs to make a function's input, and the tower the plan is remade with.
COREML_RECORDED = ("preprocessing", "vision_config", "token_ids")

# Required keys → type, nested dicts for sub-objects. `list` / `dict` are not looked into.
SCHEMA: dict = {
    "schema_version": int,
    "format": str,
    "created_by": str,
    "model": {"name": str, "size": (str, type(None)), "path": str, "mtp_path": (str, type(None))},
    "source": {"path": str, "repo": (str, type(None)), "revision": (str, type(None))},
    # the mlx-swift-lm commit the Swift in xcode/ is written against (runtimes.SwiftRuntime)
    "runtime": {"name": str, "version": str, "commit": str, "mtp_drafter": bool},
    "target": {
        "name": str,
        "label": str,
        "tier": (str, type(None)),
        "devices": list,
        "device_model_ids": list,
        "usable_bytes": int,
        "usable_bytes_entitled": int,
    },
    "min_ios": str,
    "entitlement_required": bool,
    "entitlements": list,
    "quantization": {
        "recipe": str,
        "bits": int,
        "group_size": int,
        "rounding": str,
        "dtype": str,
        "bits_per_part": dict,
    },
    # recommended: whether the Swift glue runs the drafter (the phone's predicted gain, in
    # predicted_gain, is at least roofline.MIN_MTP_GAIN; None where it cannot be predicted);
    # draft_vocab: N when mtp/draft_vocab.json holds the drafter's shortlist of N tokens (what
    # mlxkit's loader drafts over; MLX Swift's drafter ignores the file), else None
    "mtp": {
        "included": bool,
        "path": (str, type(None)),
        "num_draft": int,
        "recommended": bool,
        "predicted_gain": (float, type(None)),
        "draft_vocab": (int, type(None)),
    },
    "vision": {
        "included": bool,
        "encoder": (str, type(None)),
        "image_tokens": (int, type(None)),
        "patch_size": (int, type(None)),
        "spatial_merge_size": (int, type(None)),
        "preprocessor": list,
        "coreml": (dict, type(None)),
    },
    "max_context": int,
    "prefill_chunk": int,
    # the KV cache the plan holds its context with: bits 16 (the activation dtype), or 8 / 4
    # (mlx-swift-lm's GenerateParameters kvBits, kvGroupSize, quantizedKVStart)
    "kv_cache": {"bits": int, "group_size": int, "quantized_kv_start": int},
    "memory": {
        "peak_bytes": int,
        "check_available_bytes": int,
        "usable_bytes": int,
        "headroom_bytes": int,
        "breakdown": dict,
        "weights_by_part": dict,
        "kv_bytes_per_token": int,
    },
    "mlx": {"cache_limit_bytes": int},
    # the JSON Schema the app's prompts use (guided.JSON_SCHEMA_FILE beside the manifest), or None
    "json_schema_path": (str, type(None)),
    # what the recipe costs against the source (mlxkit.quality.quality_block), or None when the
    # plan knew nothing of it; no app reads it, and verify re-measures it only on request
    "quality": (dict, type(None)),
    "performance": dict,
    "files": list,
}


def file_entries(root: Path) -> list[dict]:
    """Every regular file under `root` except the manifest, sorted, with size and sha256."""
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        entries.append({"path": rel, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return entries


def schema_errors(data: dict, schema: dict = SCHEMA, where: str = "") -> list[str]:
    """Missing keys and wrong types, as readable paths ("memory.peak_bytes: missing")."""
    errors = []
    for key, kind in schema.items():
        name = f"{where}{key}"
        if key not in data:
            errors.append(f"{name}: missing")
        elif isinstance(kind, dict):
            if not isinstance(data[key], dict):
                errors.append(f"{name}: expected an object")
            else:
                errors += schema_errors(data[key], kind, name + ".")
        elif not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            errors.append(f"{name}: expected {names}")
    if not where:
        if data.get("schema_version") not in (None, SCHEMA_VERSION):
            errors.append(
                f"schema_version: {shown(data['schema_version'])} is not {SCHEMA_VERSION}"
            )
        if "format" in data and data["format"] != FORMAT:
            errors.append(f"format: expected {FORMAT!r}")
        if isinstance(data.get("files"), list):
            errors += listed_files(data)[1]
    return errors


__all__ = [
    "FORMAT",
    "MANIFEST",
    "SCHEMA",
    "SCHEMA_VERSION",
    "ManifestError",
    "file_entries",
    "read_manifest",
    "schema_errors",
    "sha256_file",
]
