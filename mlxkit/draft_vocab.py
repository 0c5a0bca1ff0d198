"""The draft vocabulary: the shortlist of token ids the MTP drafter's logits are computed over.

Why: in the small Qwen 3.5 models the 248,320-row output head is most of a draft step (0.8B:
254 M of its ~0.8 B parameters sit in the tied embedding/head), while the tokens a drafter
proposes come mostly from a few thousand frequent ones. Drafting over N of them reads N/V of
the head. Verification still runs the whole vocabulary, so the output stays exactly the
target's: a token outside the shortlist is never drafted, only produced by verification. With
sampling the proposal q is the draft's softmax over the shortlist (zero elsewhere), which the
speculative-sampling rule takes as it takes any q.

The file, `draft_vocab.json` beside the drafter (mtp/), written by `mlxkit convert
--draft-vocab N`. MLX Swift's and mlx-vlm's drafter loaders read config.json and *.safetensors
only, so they never see it. Its layout is fixed, so that its size follows from the vocabulary
size and N alone (the planner counts it from a config, without the file):

    {"format": "mlxkit.draft_vocab", "version": 1, "vocab_size": V, "size": N,
     "calibration": "<16 hex digits: the token stream it was counted on>",
     "ids": "<base64 of N little-endian uint32, ascending>"}
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlxkit.checkpoint import read_json
from mlxkit.errors import CheckpointError, ConfigError
from mlxkit.fields import shown

FILE = "draft_vocab.json"
FORMAT = "mlxkit.draft_vocab"
VERSION = 1
DIGEST_CHARS = 16  # the calibration digest's hex digits


def check_size(n: object, vocab_size: int) -> None:
    """N must be a whole number of tokens below the vocabulary size (N = V is the full head)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < vocab_size:
        raise ConfigError(
            f"draft vocabulary must be between 1 and {vocab_size - 1:,} tokens (the model has "
            f"{vocab_size:,}; leave --draft-vocab out for the full head), got {shown(n)}"
        )


def check(n: object, vocab_size: int, drafter: bool) -> None:
    """--draft-vocab N (`check_size`) for a model that gets a drafter to draft over it: the
    converter and the planner refuse it alike."""
    check_size(n, vocab_size)
    if not drafter:
        raise ConfigError(
            "--draft-vocab is the MTP drafter's, and no drafter is written (--no-mtp, or the "
            "checkpoint has no MTP head): drop --draft-vocab"
        )


def encode(ids: Sequence[int], vocab_size: int, calibration: str) -> bytes:
    """The file's bytes for `ids` (distinct, in [0, vocab_size)); stored ascending."""
    array = np.unique(np.asarray(ids, dtype=np.int64))
    if len(array) != len(ids) or array[0] < 0 or array[-1] >= vocab_size:
        raise ConfigError("draft vocabulary ids must be distinct and within the vocabulary")
    return _render(vocab_size, array.astype("<u4").tobytes(), calibration)


def file_bytes(vocab_size: int, n: int) -> int:
    """The size of the file for N ids of a V-token vocabulary, whatever the ids."""
    return len(_render(vocab_size, bytes(4 * n), "0" * DIGEST_CHARS))


def _render(vocab_size: int, packed: bytes, calibration: str) -> bytes:
    if len(calibration) != DIGEST_CHARS:
        raise ConfigError(f"calibration digest must be {DIGEST_CHARS} hex digits")
    data = {
        "format": FORMAT,
        "version": VERSION,
        "vocab_size": vocab_size,
        "size": len(packed) // 4,
        "calibration": calibration,
        "ids": base64.b64encode(packed).decode("ascii"),
    }
    return (json.dumps(data) + "\n").encode("ascii")


def read(path: Path, vocab_size: int) -> np.ndarray:
    """The ids [N] (int32, ascending) of the file at `path`, checked against the model."""
    redo = "convert the model again with --draft-vocab N, or delete the file"
    data = read_json(path, "draft vocabulary")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an mlxkit draft vocabulary; {redo}")
    if data.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: draft vocabulary version {shown(data.get('version'))}, this mlxkit reads "
            f"{VERSION}; {redo}"
        )
    if data.get("vocab_size") != vocab_size:
        raise CheckpointError(
            f"{path}: made for a {shown(data.get('vocab_size'))}-token vocabulary, the model has "
            f"{vocab_size:,}; {redo}"
        )
    try:
        packed = base64.b64decode(str(data.get("ids")), validate=True)
    except ValueError:
        raise CheckpointError(f"{path}: ids are not base64; {redo}") from None
    ids = np.frombuffer(packed, dtype="<u4") if len(packed) % 4 == 0 else None
    if ids is None or len(ids) != data.get("size") or not 1 <= len(ids) < vocab_size:
        raise CheckpointError(
            f"{path}: ids do not match its size {shown(data.get('size'))}; {redo}"
        )
    if np.any(np.diff(ids.astype(np.int64)) <= 0) or ids[-1] >= vocab_size:
        raise CheckpointError(
            f"{path}: ids must be ascending, distinct and below {vocab_size:,}; {redo}"
        )
    return ids.astype(np.int32)
