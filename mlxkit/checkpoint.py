"""Reading a model directory's files without trusting them: config.json, the list of
safetensors shards, and each shard's header checked against the file's real size, so a bad
download fails with a message naming the file and tensor instead of deep inside MLX."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from mlxkit.errors import CheckpointError

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors spelling: BF16, F32, U32, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int
    file: Path

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json here; is this a model directory?")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def weight_files(model_dir: Path) -> list[Path]:
    """Shards named by model.safetensors.index.json if present, else every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            raise CheckpointError(f"{index}: not a safetensors index (no weight_map)") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} names {f.name}, which is missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors weight files")
    return files


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parses and validates one safetensors header; every tensor must lie inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: header length {n} exceeds the file; truncated?")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: safetensors header is not valid JSON") from None
    base = 8 + n
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name}") from None
        count = 1
        for d in shape:
            count *= d
        if dtype not in _DTYPE_BYTES or end - start != count * _DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{path}: tensor {name} has inconsistent dtype/shape/offsets")
        if base + end > size:
            raise CheckpointError(
                f"{path}: tensor {name} ends at byte {base + end} but the file has {size} bytes "
                "(truncated download?)"
            )
        tensors[name] = TensorInfo(name, dtype, shape, base + start, base + end, path)
    return tensors


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint; a name in two shards is an error."""
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name} appears in both {tensors[name].file} and {f}")
            tensors[name] = info
    return tensors
