"""Small shared pieces for tests: fixture paths and a float32 model loader."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxkit.load import load_model
from mlxkit.models.qwen3_5 import Model

FIXTURES = Path(__file__).parent / "fixtures"
TINY = ("tiny_tied", "tiny_untied")


@cache
def reference(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name / "reference.npz") as f:
        return dict(f)


def load_f32(name: str) -> Model:
    return load_model(FIXTURES / name, dtype=mx.float32)
