"""`verify_bundle`: is this folder still exactly what was built, safe to ship, and does it fit?

Each check is independent and reported on its own line, so one broken file does not hide
the others. Input that is not a bundle at all (no folder, no manifest, manifest not JSON)
raises ManifestError instead: the CLI exits 2 for bad input and 1 for a bundle that fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from mlxkit.errors import MlxkitError

from .manifest import MANIFEST, read_manifest, schema_errors, sha256_file


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    bundle: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, problems: list[str], passed: str) -> None:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5
                                           else "")  # fmt: skip
        self.checks.append(Check(name, not problems, shown if problems else passed))


def _bad_path(root: Path, rel: str) -> str | None:
    """Why `rel` may not be used as a bundle path, or None. Rejects absolute paths, `..`
    components, and paths that resolve (through symlinks) outside the bundle."""
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or rel.startswith(("/", "\\")) or ":" in pure.parts[0]:
        return f"{rel!r} is absolute"
    if ".." in pure.parts or "\\" in rel:
        return f"{rel!r} leaves the bundle"
    if not (root / rel).resolve().is_relative_to(root.resolve()):
        return f"{rel!r} resolves outside the bundle (symlink)"
    return None


def _check_paths(root: Path, entries: list) -> tuple[list[str], list[dict]]:
    problems, usable = [], []
    for entry in entries:
        why = _bad_path(root, entry["path"])
        if why:
            problems.append(why)
        else:
            usable.append(entry)
    for path in root.rglob("*"):
        if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
            problems.append(f"{path.relative_to(root).as_posix()} links outside the bundle")
    return problems, usable


def _check_files(root: Path, entries: list[dict]) -> list[str]:
    problems = []
    listed = {e["path"] for e in entries}
    for e in entries:
        path = root / e["path"]
        if not path.is_file():
            problems.append(f"{e['path']} is missing")
        elif path.stat().st_size != e["bytes"]:
            problems.append(
                f"{e['path']} has {path.stat().st_size} bytes, manifest says {e['bytes']}"
            )
        elif sha256_file(path) != e["sha256"]:
            problems.append(f"{e['path']}: sha256 differs (corrupted or modified)")
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST and rel not in listed:
            problems.append(f"{rel} is not listed in the manifest")
    return problems


def _check_load(root: Path, manifest: dict) -> tuple[list[str], str]:
    """model/ alone, then model/ with the bundle's drafter."""
    from mlxkit.load import MTP_DIR, load_model

    model_dir = root / manifest["model"]["path"]
    try:
        model = load_model(model_dir, drafter=model_dir / MTP_DIR)  # as a bare copy of model/
        detail = (f"model/ loads ({'with' if model.has_mtp else 'without'} MTP; names, shapes "
                  "and dtypes checked, weights memory-mapped)")  # fmt: skip
        mtp_path = manifest["model"].get("mtp_path")
        if mtp_path:
            if not load_model(model_dir, drafter=root / mtp_path).has_mtp:
                return [f"{mtp_path}/ did not provide the MTP head"], ""
            detail += f"; with {mtp_path}/ it loads with the MTP head"
        return [], detail
    except MlxkitError as e:
        return [str(e)], ""
    except Exception as e:  # noqa: BLE001 - MLX raises plain exceptions on bad files
        return [f"{type(e).__name__}: {e}"], ""


def _check_plan(root: Path, manifest: dict, target: str | None) -> tuple[list[str], str]:
    """Re-plans from model/config.json with the manifest's settings at its max context, on
    `target` (default: the manifest's), within the memory limit the manifest asks for (the
    increased one only if it declares the entitlement required), and compares the weight bytes with what is on disk."""
    from .devices import resolve_target
    from .plan import evaluate

    q, t = manifest["quantization"], manifest["target"]
    if target is None and t.get("kind") == "budget":
        tgt = resolve_target(None, t["usable_bytes"])
    else:
        tgt = resolve_target(target or t["name"])
    p = evaluate(
        root / manifest["model"]["path"], tgt, manifest["max_context"],
        recipe=q["recipe"], bits=q["bits"], group_size=q["group_size"], dtype=q["dtype"],
        mtp=manifest["mtp"]["included"], num_draft=manifest["mtp"]["num_draft"],
        prefill_chunk=manifest["prefill_chunk"], entitlement=manifest["entitlement_required"],
    )  # fmt: skip
    problems = []
    on_disk = weight_bytes_on_disk(root, manifest)
    if on_disk != p.weights:
        problems.append(f"weights on disk {on_disk} differ from the plan's {p.weights}")
    if not p.fits:
        problems.append(
            f"does not fit {tgt.label}: peak {p.total / 1e9:.2f} GB at "
            f"{p.max_context:,} tokens, {p.usable / 1e9:.2f} GB usable"
        )
    ent = "with" if manifest["entitlement_required"] else "without"
    detail = (f"fits {tgt.label}: peak {p.total / 1e9:.2f} GB of {p.usable / 1e9:.2f} GB "
              f"usable {ent} the entitlement at {p.max_context:,} tokens")  # fmt: skip
    return problems, detail


def weight_bytes_on_disk(root: Path, manifest: dict) -> dict[str, int]:
    """Tensor bytes per part, read from the safetensors headers of model/ and mtp/."""
    from mlxkit.layout import bytes_by_part_on_disk

    mtp_path = manifest["model"].get("mtp_path")
    return bytes_by_part_on_disk(
        root / manifest["model"]["path"], root / mtp_path if mtp_path else None
    )


def verify_bundle(path: str | Path, target: str | None = None, load: bool = True) -> Report:
    root = Path(path).expanduser()
    manifest = read_manifest(root)  # raises ManifestError on bad input
    report = Report(root)
    errors = schema_errors(manifest)
    report.add("manifest schema", errors, f"schema {manifest.get('schema_version')} complete")
    if errors:
        return report  # the other checks read the fields the schema check found missing
    path_problems, entries = _check_paths(root, manifest["files"])
    report.add("paths stay inside the bundle", path_problems, f"{len(entries)} paths")
    file_problems = _check_files(root, entries)
    total = sum(e["bytes"] for e in entries)
    report.add("file sizes and sha256", file_problems,
               f"{len(entries)} files, {total / 1e9:.3f} GB")  # fmt: skip
    if load:
        problems, detail = _check_load(root, manifest)
        report.add("model loads", problems, detail)
    try:
        problems, detail = _check_plan(root, manifest, target)
    except MlxkitError as e:
        if target is not None:
            raise  # an unknown --target is bad input: exit 2
        problems, detail = [str(e)], ""
    report.add("plan fits the target", problems, detail)
    return report
