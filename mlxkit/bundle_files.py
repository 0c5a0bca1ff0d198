"""A bundle's manifest.json as untrusted input: reading it, its `files` list, and checking
the files on disk against that list. Shared by `bundle verify` (which reports every
problem) and `mlxkit.load` of a bundle (which refuses on the first), so both read the list
by the same rules.

A manifest path is a plain relative POSIX path (no `..`, no `.`, no empty or over-long
parts, no NUL or control characters, no backslashes) that, followed through symlinks, stays
inside the bundle. Files are regular files: a FIFO or device is reported, never opened.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mlxkit.checkpoint import read_json, short
from mlxkit.errors import ManifestError

MANIFEST = "manifest.json"  # an iPhone bundle: manifest.json beside model/ and mtp/

MAX_MANIFEST_BYTES = 16 << 20
MAX_PATH_CHARS = 1024
MAX_FILE_BYTES = 2**63 - 1  # what a file system can report
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileEntry:
    path: str
    bytes: int
    sha256: str


def read_manifest(bundle: Path) -> dict:
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise ManifestError(f"{bundle}: not a directory; pass a bundle folder")
    if not (path.exists() or path.is_symlink()):
        raise ManifestError(f"{bundle}: no {MANIFEST}; is this a bundle made by mlxkit?")
    data = read_json(path, MANIFEST, ManifestError, MAX_MANIFEST_BYTES)
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: not a JSON object; rebuild the bundle")
    return data


def bad_path(rel: object) -> str | None:
    """Why `rel` cannot name a file of the bundle (lexically), or None."""
    if not isinstance(rel, str):
        return f"{short(str(rel), 40)} is not a string"
    if not rel or len(rel) > MAX_PATH_CHARS:
        return f"{short(rel, 40)} is empty or longer than {MAX_PATH_CHARS} characters"
    if any(ord(c) < 32 or c == "\x7f" for c in rel) or "\\" in rel:
        return f"{short(rel, 40)} contains control characters or backslashes"
    if rel.startswith("/") or ":" in rel.split("/")[0]:
        return f"{short(rel, 40)} is absolute"
    parts = rel.split("/")
    if ".." in parts:
        return f"{short(rel, 40)} leaves the bundle"
    if any(p in ("", ".") or len(p) > 255 for p in parts):
        return f"{short(rel, 40)} is not a plain relative path"
    return None


def resolves_inside(root: Path, rel: str) -> bool:
    """`root / rel`, with every symlink followed, is inside `root` (a loop is not)."""
    try:
        real = os.path.realpath(root / rel, strict=True)
    except FileNotFoundError:
        real = os.path.realpath(root / rel)  # missing files are reported by the size check
    except (OSError, RuntimeError, ValueError):
        return False
    top = os.path.realpath(root)
    return PurePosixPath(real).is_relative_to(top)


def file_entries(manifest: dict) -> tuple[list[FileEntry], list[str]]:
    """The manifest's `files` as entries, and what is wrong with those that are not
    entries at all. Paths are not judged here: `bad_path` and `check_files` do that."""
    files = manifest.get("files")
    if not isinstance(files, list):
        return [], ["files: expected a list"]
    entries, problems, seen = [], [], set()
    for i, e in enumerate(files):
        if not (
            isinstance(e, dict)
            and isinstance(e.get("path"), str)
            and isinstance(e.get("bytes"), int)
            and not isinstance(e.get("bytes"), bool)
            and 0 <= e["bytes"] <= MAX_FILE_BYTES
            and isinstance(e.get("sha256"), str)
            and _SHA256.fullmatch(e["sha256"])
        ):
            problems.append(
                f"files[{i}]: needs path, bytes (0 to 2^63 - 1) and sha256 (64 hex digits)"
            )
        elif e["path"] in seen:
            problems.append(f"files[{i}]: {short(e['path'], 40)} is listed twice")
        else:
            seen.add(e["path"])
            entries.append(FileEntry(e["path"], e["bytes"], e["sha256"]))
    return entries, problems


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_files(root: Path, entries: list[FileEntry], hashes: bool = True) -> list[str]:
    """Each listed file exists inside the bundle as a regular file of the listed size (and
    sha256, with `hashes`)."""
    problems = []
    for e in entries:
        path = root / e.path
        why = bad_path(e.path) or (
            None if resolves_inside(root, e.path) else f"{e.path} resolves outside the bundle"
        )
        if why:
            problems.append(why)
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:
            problems.append(f"{e.path} is missing")
            continue
        except OSError as err:
            problems.append(f"{e.path} cannot be read ({err.strerror})")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{e.path} is not a regular file")
        elif st.st_size != e.bytes:
            problems.append(f"{e.path} has {st.st_size} bytes, manifest says {e.bytes}")
        elif hashes and sha256_file(path) != e.sha256:
            problems.append(f"{e.path}: sha256 differs (corrupted or modified)")
    return problems


def bundle_files(root: Path) -> list[tuple[str, os.stat_result]]:
    """Every entry under `root` except directories (symlinks not followed), with its lstat."""
    out = []
    for folder, dirs, files in os.walk(root):
        base = Path(folder)
        for name in sorted(dirs):
            if (base / name).is_symlink():
                files.append(name)  # a linked directory is an entry, not walked into
        for name in sorted(files):
            path = base / name
            out.append((path.relative_to(root).as_posix(), os.lstat(path)))
    return out
