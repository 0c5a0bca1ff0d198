"""Typed reads of untrusted values: a config.json, a recipe, a manifest or a command-line
option. JSON gives strings where numbers belong, booleans that Python counts as integers,
NaN and 400-digit numbers; each reader here accepts exactly one kind of value, within
bounds, so nothing downstream is sized from a number that was never checked."""

from __future__ import annotations

import math
import os
from pathlib import Path

from mlxkit.errors import ConfigError, MlxkitError


def _fail(error: type[MlxkitError], where: str, expected: str, value: object) -> MlxkitError:
    return error(f"{where}: expected {expected}, got {shown(value)}")


def shown(value: object) -> str:
    """A short, one-line repr of any JSON value (a 5,000-digit int has no repr at all)."""
    if isinstance(value, (list, dict)):
        return f"a {'list' if isinstance(value, list) else 'JSON object'} of {len(value)}"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return "an integer of more than 19 digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def integer(
    value: object,
    where: str,
    lo: int | None = None,
    hi: int | None = None,
    error: type[MlxkitError] = ConfigError,
) -> int:
    """An int (not a bool, not 4.0) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(error, where, "an integer", value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = (
            f"between {lo} and {hi}"
            if lo is not None and hi is not None
            else f"at least {lo}"
            if lo is not None
            else f"at most {hi}"
        )
        raise _fail(error, where, f"an integer {bounds}", value)
    return value


def number(
    value: object,
    where: str,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    error: type[MlxkitError] = ConfigError,
) -> float:
    """A finite int or float within [lo, hi] (or (lo, hi] with `lo_open`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(error, where, "a number", value)
    try:
        x = float(value)
    except OverflowError:
        raise _fail(error, where, "a finite number", value) from None
    if not math.isfinite(x):
        raise _fail(error, where, "a finite number", value)
    below = lo is not None and (x <= lo if lo_open else x < lo)
    if below or (hi is not None and x > hi):
        low = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        high = "" if hi is None else f"<= {hi}"
        raise _fail(error, where, f"a number {' and '.join(b for b in (low, high) if b)}", value)
    return x


def boolean(value: object, where: str, error: type[MlxkitError] = ConfigError) -> bool:
    if not isinstance(value, bool):
        raise _fail(error, where, "true or false", value)
    return value


def string(
    value: object,
    where: str,
    choices: tuple[str, ...] | None = None,
    error: type[MlxkitError] = ConfigError,
) -> str:
    if not isinstance(value, str):
        raise _fail(error, where, "a string", value)
    if choices is not None and value not in choices:
        raise _fail(error, where, f"one of {', '.join(choices)}", value)
    return value


def mapping(value: object, where: str, error: type[MlxkitError] = ConfigError) -> dict:
    if not isinstance(value, dict):
        raise _fail(error, where, "a JSON object", value)
    return value


def sequence(value: object, where: str, error: type[MlxkitError] = ConfigError) -> list:
    if not isinstance(value, list):
        raise _fail(error, where, "a list", value)
    return value


def local_path(value: object, what: str = "path", error: type[MlxkitError] = ConfigError) -> Path:
    """`value` as a Path the OS can look up. Beyond these limits (a NUL byte, a name of
    more than 255 bytes, more than 4,096 bytes in all) `os.stat` raises instead of
    answering, so `Path.exists()` and friends would too."""
    try:
        text = os.fsdecode(os.fspath(value))
    except TypeError:
        raise _fail(error, what, "a path", value) from None
    encoded = os.fsencode(text)
    if b"\0" in encoded or len(encoded) > 4096 or any(len(p) > 255 for p in encoded.split(b"/")):
        raise error(f"{what} {shown(text)}: not a usable path (NUL byte or name too long)")
    return Path(text).expanduser()
