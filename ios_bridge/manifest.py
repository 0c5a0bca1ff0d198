"""manifest.json: what a bundle holds, what it needs, and how to check it.

The manifest is the hand-off between this Python side and the app: the Swift loader reads
`min_ios`, `target.device_model_ids`, `memory.check_available_bytes`, `mlx.cache_limit_bytes`
and `max_context` from it before loading anything, and `bundle verify` re-checks every file
against `files`. `SCHEMA` below is the one description of its required shape; the Swift
`Decodable` structs mirror the subset they read (a test compares the two).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mlxkit.errors import MlxkitError
from mlxkit.load import BUNDLE_MANIFEST as MANIFEST

SCHEMA_VERSION = 1
FORMAT = "mlxkit-ios-bundle"

# Required keys → type, nested dicts for sub-objects. `list` / `dict` are not looked into.
SCHEMA: dict = {
    "schema_version": int,
    "format": str,
    "created_by": str,
    "model": {"name": str, "size": (str, type(None)), "path": str, "mtp_path": (str, type(None))},
    "source": {"path": str, "repo": (str, type(None)), "revision": (str, type(None))},
    "runtime": {"name": str, "min_version": str},
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
        "dtype": str,
        "bits_per_part": dict,
    },
    "mtp": {"included": bool, "path": (str, type(None)), "num_draft": int},
    "max_context": int,
    "prefill_chunk": int,
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
    "performance": dict,
    "files": list,
}


class ManifestError(MlxkitError):
    """manifest.json is missing or not JSON: the input is bad, not the bundle's contents."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(root: Path) -> list[dict]:
    """Every regular file under `root` except the manifest, sorted, with size and sha256."""
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        entries.append({"path": rel, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return entries


def read_manifest(bundle: Path) -> dict:
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise ManifestError(f"{bundle}: not a directory; pass a bundle folder")
    if not path.is_file():
        raise ManifestError(f"{bundle}: no {MANIFEST}; is this a bundle made by mlxkit?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e}); rebuild the bundle") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: not a JSON object; rebuild the bundle")
    return data


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
            errors.append(f"{name}: expected {getattr(kind, '__name__', kind)}")
    if not where:
        if data.get("schema_version") not in (None, SCHEMA_VERSION):
            errors.append(f"schema_version: {data['schema_version']} is not {SCHEMA_VERSION}")
        if "format" in data and data["format"] != FORMAT:
            errors.append(f"format: expected {FORMAT!r}")
        for i, entry in enumerate(data.get("files") or []):
            if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)
                    and isinstance(entry.get("bytes"), int)
                    and isinstance(entry.get("sha256"), str)):  # fmt: skip
                errors.append(f"files[{i}]: needs path (str), bytes (int), sha256 (str)")
    return errors
