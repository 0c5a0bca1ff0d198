"""Shared pieces of the vision tests: the tiny vision fixtures, their tower and its inputs."""

from __future__ import annotations

import json
import struct
import zlib
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxkit.models.qwen3_5_vision import (
    PREFIX,
    VisionConfig,
    VisionModel,
    sanitize_vision_tensor,
)
from tests.helpers import FIXTURES, reference

VISION = ("tiny_vision_p4", "tiny_vision_p6")
PARTS = ("image0", "image1", "video")


def config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


@cache
def tower_weights(name: str) -> dict[str, mx.array]:
    """The checkpoint's vision tensors as `sanitize_vision_tensor` gives them (float32)."""
    out = {}
    for key, value in mx.load(str(FIXTURES / name / "model.safetensors")).items():
        item = sanitize_vision_tensor(key, value, mx.float32)
        if item is not None:
            out[item[0]] = item[1]
    return out


def load_tower(name: str) -> VisionModel:
    model = VisionModel(VisionConfig.from_dict(config(name)))
    weights = [(k[len(PREFIX) :], v) for k, v in tower_weights(name).items()]
    model.load_weights(weights, strict=True)
    return model


def tower_inputs(name: str, parts=PARTS) -> tuple[mx.array, list[tuple[int, int, int]]]:
    ref = reference(name)
    patches = np.concatenate([ref[f"{p}_patches"] for p in parts])
    return mx.array(patches), [tuple(int(v) for v in ref[f"{p}_grid"]) for p in parts]


def header_only_png(path: Path, width: int, height: int) -> None:
    """A PNG that declares width×height and holds no pixels (what a decompression bomb looks
    like to a decoder that checks the header first)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
