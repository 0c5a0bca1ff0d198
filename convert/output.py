"""Where `convert` and `bundle build` write, and how an existing output is replaced.

The rules, for both:
- OUT is never the current, home or root directory (or a folder holding one of them), and
  never the source checkpoint, a folder holding it, or a folder inside it.
- An existing OUT is replaced only with --force, and only when mlxkit wrote it — told by
  its own files (`is_ours`: a model directory carrying the converter's mark and nothing
  else, a bundle whose manifest lists every file in it) or empty. Anything else may hold a
  user's files and is left alone.
- The new OUT is assembled in a hidden sibling (`.OUT.partial-PID`, `.OUT.building-PID`)
  and swapped with the old one in a single atomic rename (Linux `renameat2`
  RENAME_EXCHANGE, macOS `renamex_np` RENAME_SWAP); the old one, now in the sibling, is
  then deleted. A kill at any moment therefore leaves OUT old or new and complete, plus at
  most a hidden sibling, which the next run for the same OUT removes (`remove_leftovers`).
  Where the file system cannot swap, OUT is moved aside (`.OUT.old-PID`) and the new one
  renamed in; a kill between the two renames leaves the old OUT aside, and the next run
  puts it back.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mlxkit.errors import MlxkitError

TEMP_KINDS = ("partial", "building", "old")


class OutputError(MlxkitError):
    """OUT cannot be written or replaced; nothing was touched."""


def _exists(path: Path) -> bool:
    try:
        os.lstat(path)
        return True
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return False
    except (OSError, ValueError) as e:
        raise OutputError(f"{path}: not a usable output path ({_reason(e)})") from None


def _reason(e: BaseException) -> str:
    return (getattr(e, "strerror", None) or str(e) or type(e).__name__).splitlines()[0]


def _protected(out: Path) -> str | None:
    """Why `out` must never be replaced, or None: it is (or holds) the current, home or
    root directory."""
    real = _real(out)
    for name, place in (
        ("the current directory", Path.cwd()),
        ("your home directory", Path.home()),
    ):
        place = _real(place)
        if real == place:
            return name
        if place.is_relative_to(real):
            return f"a folder holding {name}"
    return "the root directory" if real == Path(real.anchor) else None


def _real(path: Path) -> Path:
    """`path` with its symlinks followed as far as they go (a loop stays as it is)."""
    return Path(os.path.realpath(path))


def check_destination(out: Path, force: bool, is_ours: Callable[[Path], bool], what: str) -> None:
    """May `what` be written to `out`? Checked before anything is read or downloaded."""
    why = _protected(out)
    if why:
        raise OutputError(f"{out} is {why}; choose a new folder for the {what}")
    if _exists(out):
        if not force:
            raise OutputError(f"{out} already exists; pass --force to replace it")
        if out.is_symlink() or not out.is_dir():
            raise OutputError(f"{out} exists and is not a directory; not replacing it")
        try:
            empty = not any(out.iterdir())
        except OSError as e:
            raise OutputError(
                f"{out}: cannot look inside ({_reason(e)}); not replacing it"
            ) from None
        if not empty and not is_ours(out):
            raise OutputError(
                f"{out} was not written by mlxkit (it holds files a {what} does not have); "
                "not replacing it — choose a new folder or remove it yourself"
            )
    parent = next(p for p in [out.parent, *out.parent.parents] if _exists(p))
    if not parent.is_dir():
        raise OutputError(f"{parent} is not a directory; cannot write {out}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: no permission to write here; choose another output folder")


def check_apart_from_source(out: Path, source: Path) -> None:
    """OUT is neither the source checkpoint, nor holds it, nor lies inside it."""
    out, src = _real(out), _real(source)
    if out == src or src.is_relative_to(out):
        raise OutputError(f"{out}: the output would replace the source checkpoint {src}")
    if out.is_relative_to(src):
        raise OutputError(
            f"{out} lies inside the source checkpoint {src}; write the output elsewhere"
        )


def temp_dir(out: Path, kind: str) -> Path:
    """The hidden sibling a new `out` is assembled in (removed by `remove_leftovers` if the
    process dies)."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an earlier run of this process, not one in progress
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped by its parent is a zombie: dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_leftovers(out: Path) -> list[Path]:
    """Removes the temporary siblings of `out` left by dead processes (a kill, a power
    cut); an old OUT moved aside is put back if no new one took its place. Returns what
    was removed."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.({'|'.join(TEMP_KINDS)})-(\d+)")
    removed = []
    try:
        siblings = sorted(out.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        m = pattern.fullmatch(path.name)
        if not m or _alive(int(m.group(2))) or path.is_symlink() or not path.is_dir():
            continue
        if m.group(1) == "old" and not _exists(out):
            os.rename(path, out)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _swap(a: Path, b: Path) -> bool:
    """Atomically exchanges two paths; False where the OS or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform == "darwin":
            rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), 0x2)  # RENAME_SWAP
        elif sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
            at_fdcwd, rename_exchange = -100, 0x2
            rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
        else:
            return False
    except (OSError, AttributeError):
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, out: Path) -> None:
    """Puts the finished `tmp` at `out`: a plain rename when `out` does not exist, else an
    atomic swap followed by deleting the old one (see the module docstring)."""
    if not _exists(out):
        os.rename(tmp, out)
        return
    if _swap(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old OUT
        return
    old = temp_dir(out, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def assembling(out: Path, kind: str) -> Iterator[Path]:
    """The hidden sibling (`temp_dir`) a new `out` is built in, created with any missing
    parents of `out`, after the leftovers of dead runs are removed. The caller moves its result
    into place (`replace_dir`) inside the block. On any error or interrupt the sibling goes,
    with the parents made for it, and an OSError becomes one line (`write_error`); on success
    whatever is left in the sibling goes."""
    remove_leftovers(out)
    tmp = temp_dir(out, kind)
    created = next((p for p in reversed(out.parents) if not p.exists()), None)
    try:
        tmp.mkdir(parents=True)
        yield tmp
    except BaseException as e:
        shutil.rmtree(created or tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(e, out.parent) from None
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def write_error(e: OSError, where: Path) -> MlxkitError:
    """An OSError while writing, as one line that says what to do."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(
            f"{where}: disk full while writing; nothing was left behind — free some space "
            "and run again"
        )
    return OutputError(f"{where}: cannot write the output ({_reason(e)}); nothing was left behind")
