"""Sharded safetensors written incrementally, in row chunks, from a plan.

Because every output tensor's shape and dtype are known before conversion starts
(`mlxkit.layout.planned_tensors`), each shard's header — and so every tensor's byte offset — is
fixed up front. The header is written first and each chunk of rows is then written with
`pwrite` straight to its place: no tensor is ever held whole, and the three outputs of a
quantized weight (packed weight, scales, biases) fill in side by side.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxkit.layout import PlannedTensor

# Per shard, header included: the README promises ≤ 2 GB shards (mlx-lm writes up to 5 GiB).
MAX_SHARD_BYTES = 2_000_000_000
_HEADER_ROOM = 16 << 20  # kept free per shard for the JSON header

SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "uint32": "U32"}
MX_DTYPES = {
    "bfloat16": mx.bfloat16,
    "float16": mx.float16,
    "float32": mx.float32,
    "uint32": mx.uint32,
}
# numpy cannot hold bfloat16: its bytes travel as uint16
_AS_NUMPY = {"bfloat16": mx.uint16}


@dataclass
class _Slot:
    """Where one tensor's bytes go."""

    tensor: PlannedTensor
    key: str  # the name in the file
    fd_index: int
    offset: int  # absolute byte offset in the shard file
    row_bytes: int
    written: int = 0


def shard_names(count: int) -> list[str]:
    """mlx-lm's naming: one file is `model.safetensors`, more are numbered."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def plan_shards(
    tensors: list[PlannedTensor], max_bytes: int = MAX_SHARD_BYTES
) -> list[list[PlannedTensor]]:
    """Consecutive groups of at most `max_bytes` (a tensor larger than that gets a shard of
    its own, as in mlx-lm). An empty plan still gets one (empty) shard."""
    limit = max(1, max_bytes - _HEADER_ROOM)
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(entries: list[tuple[str, PlannedTensor]], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, t in entries:
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


class ShardedWriter:
    """Writes the planned tensors of one model directory; `close` checks that every byte of
    every tensor arrived and writes `model.safetensors.index.json`."""

    def __init__(
        self,
        directory: Path,
        tensors: list[PlannedTensor],
        key: Callable[[str], str] = lambda path: path,
        metadata: dict[str, str] | None = None,
        max_shard_bytes: int = MAX_SHARD_BYTES,
        index_metadata: dict | None = None,
    ):
        self.directory = directory
        self.index_metadata = index_metadata or {}
        self.slots: dict[str, _Slot] = {}
        self.files: list[Path] = []
        self.fds: list[int] = []
        metadata = {"format": "mlx", **(metadata or {})}
        shards = plan_shards(tensors, max_shard_bytes)
        for i, (name, shard) in enumerate(zip(shard_names(len(shards)), shards)):
            entries = [(key(t.path), t) for t in shard]
            header = _header(entries, metadata)
            path = directory / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self.files.append(path)
            self.fds.append(fd)
            _pwrite_all(fd, header, 0)
            offset = len(header)
            for k, t in entries:
                rows = t.shape[0] if t.shape else 1
                self.slots[t.path] = _Slot(t, k, i, offset, t.nbytes // max(rows, 1))
                offset += t.nbytes

    def write(self, path: str, row_start: int, array: mx.array) -> int:
        """Writes `array` as rows [row_start, row_start + len) of tensor `path`; returns the
        bytes written. `array` must already have the planned dtype."""
        slot = self.slots[path]
        t = slot.tensor
        if array.dtype != MX_DTYPES[t.dtype] or tuple(array.shape[1:]) != t.shape[1:]:
            raise AssertionError(
                f"{path}: got {array.dtype} {array.shape}, planned {t.dtype} {t.shape}"
            )
        if t.dtype in _AS_NUMPY:
            array = array.view(_AS_NUMPY[t.dtype])
        data = np.ascontiguousarray(np.asarray(array))
        _pwrite_all(
            self.fds[slot.fd_index],
            memoryview(data).cast("B"),
            slot.offset + row_start * slot.row_bytes,
        )
        slot.written += data.nbytes
        return data.nbytes

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        incomplete = [s.key for s in self.slots.values() if s.written != s.tensor.nbytes]
        if incomplete:
            raise AssertionError(f"tensors not fully written: {incomplete[:5]}")
        weight_map = {
            s.key: self.files[s.fd_index].name
            for s in sorted(self.slots.values(), key=lambda s: s.key)
        }
        total = sum(s.tensor.nbytes for s in self.slots.values())
        index = {"metadata": {"total_size": total, **self.index_metadata}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))

    def abort(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
