"""Small shared pieces for tests: fixture paths, a float32 model loader, and mlx-vlm's MTP
drafter run on a fixture's reference."""

from __future__ import annotations

from collections.abc import Callable
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


def conversions(tmp_path_factory) -> Callable[..., Path]:
    """(fixture name, **convert options) -> OUT, converting each fixture once per setting: the
    body of a module-scoped `converted` fixture."""
    from mlxkit.convert import convert

    made: dict = {}

    def get(name: str, **options) -> Path:
        key = (name, tuple(sorted(options.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("converted") / f"{name}-out"
            convert(FIXTURES / name, out, quiet=True, **options)
            made[key] = out
        return made[key]

    return get


def load_f32(name: str) -> Model:
    return load_model(FIXTURES / name, dtype=mx.float32)


def mlx_vlm_mtp_logits(target, drafter, name: str) -> np.ndarray:
    """Logits of mlx-vlm's MTP drafter, bound to its `target`, on fixture `name`'s tokens
    and float64 main-model hidden states: to compare with the reference's mtp_logits_f64."""
    ref = reference(name)
    drafter.bind(target)
    tokens = mx.array(ref["tokens"])[None]
    hidden = mx.array(ref["hidden_f64"][:-1], dtype=mx.float32)[None]
    h = drafter._forward_hidden(drafter._input_embed(tokens[:, 1:]), hidden, None,
                                mx.arange(tokens.shape[1] - 1)[None])  # fmt: skip
    return np.array(drafter._lm_head_fn(h)[0].astype(mx.float32))
