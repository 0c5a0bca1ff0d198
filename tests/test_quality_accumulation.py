"""`mlxkit eval` sums a quantized model's matmuls in float32, as MLX's Metal kernels do with
bfloat16 inputs; MLX's CPU backend sums them in bfloat16, an error that is no part of what
quantization costs on a Mac or an iPhone (mlxkit/quality.py's docstring)."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

from mlxkit import quality
from mlxkit.errors import ConfigError
from mlxkit.quality import measure_quality, sum_in_float32
from tests.helpers import FIXTURES, conversions

WIDTH, OUT, ROWS = 384, 64, 8


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return conversions(tmp_path_factory)


def layers() -> tuple[nn.Module, mx.array]:
    """A 4-bit linear and embedding of one random matrix, and bfloat16 inputs."""
    mx.random.seed(0)
    linear = nn.Linear(WIDTH, OUT, bias=False)
    embedding = nn.Embedding(OUT, WIDTH)
    embedding.weight = linear.weight
    model = nn.Module()
    model.linear, model.embedding = linear, embedding
    nn.quantize(model, group_size=64, bits=4)
    return model, mx.random.normal((ROWS, WIDTH)).astype(mx.bfloat16)


def exact(q: nn.Module, x: mx.array) -> np.ndarray:
    """x @ Wᵀ of the dequantized weight in float64, rounded to bfloat16 once."""
    w = mx.dequantize(q.weight, q.scales, q.biases, group_size=q.group_size, bits=q.bits)
    y = np.array(x.astype(mx.float32), np.float64) @ np.array(w.astype(mx.float32), np.float64).T
    return np.array(mx.array(y.astype(np.float32)).astype(mx.bfloat16).astype(mx.float32))


def error(y: mx.array, truth: np.ndarray) -> float:
    return float(np.abs(np.array(y.astype(mx.float32)) - truth).mean() / np.abs(truth).mean())


def test_float32_sums_are_the_exact_products_rounded_once():
    with mx.stream(mx.cpu):
        model, x = layers()
        native = (model.linear(x), model.embedding.as_linear(x))
        truth = exact(model.linear, x)
        sum_in_float32(model)
        ids = mx.array([[0, 5, 63]])
        assert mx.array_equal(model.embedding(ids), model.embedding.quantized(ids))
        for y in (model.linear(x), model.embedding.as_linear(x)):
            assert y.dtype == mx.bfloat16
            assert error(y, truth) < 1e-3  # bfloat16's rounding, once (2^-9 at most)
        # the CPU backend's own bfloat16 sums: an error several times larger at this width
        assert all(error(y, truth) > 3 * error(model.linear(x), truth) for y in native)


def test_eval_sums_in_float32_unless_told_and_says_which(converted):
    model = converted("tiny_tied")
    text = (FIXTURES.parent / "helpers.py").read_text()[:600]
    f32 = measure_quality(model, FIXTURES / "tiny_tied", text=text, quiet=True)
    native = measure_quality(
        model, FIXTURES / "tiny_tied", text=text, quiet=True, accumulation="native"
    )
    assert (f32.accumulation, native.accumulation) == ("float32", "native")
    assert f32.kl_mean != native.kl_mean and f32.tokens == native.tokens
    assert json.loads(json.dumps(f32.to_dict()))["accumulation"] == "float32"
    with pytest.raises(ConfigError, match="accumulation must be one of float32, native"):
        measure_quality(model, FIXTURES / "tiny_tied", text=text, accumulation="bf16")


def test_kept_results_are_float32_sums_only(tmp_path, monkeypatch):
    """The planner's kept figures describe the device: a result kept before `accumulation`
    existed (summed as the machine did) is not one of them."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = quality.cache_dir()
    folder.mkdir(parents=True)
    old = {"kl_mean": 0.03, "top1": 0.83}
    (folder / "abc-key-old-512.json").write_text(json.dumps(old))
    assert quality.cached_quality("abc", "key") is None
    (folder / "abc-key-new-512.json").write_text(json.dumps({**old, "accumulation": "float32"}))
    assert quality.cached_quality("abc", "key")["accumulation"] == "float32"
