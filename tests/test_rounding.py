"""`--rounding gptq` (convert/rounding.py): GPTQ lowers a layer's output error against plain
rounding at the same bits, its codes pack as mx.quantize packs them, and a conversion with it
rounds only the decoder layers' linears: the embedding (the tied output head) and the MTP
head are the plain conversion's, byte for byte (no clipping or learned rounding of the head)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlxkit.convert import convert, rounding
from mlxkit.convert.rounding import gptq, pack

from mlxkit.checkpoint import read_config
from mlxkit.quality import model_quantization_key, quantization_key
from tests.helpers import FIXTURES


def _layer(rows: int = 32, cols: int = 256, tokens: int = 1024):
    """A fixed layer (bf16 values) and correlated inputs with a few loud channels, as
    activations are."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    w = np.array(mx.array(w).astype(mx.bfloat16).astype(mx.float32))
    mix = rng.standard_normal((cols, cols)).astype(np.float32) * 0.3 + np.eye(cols)
    x = (rng.standard_normal((tokens, cols)) @ mix).astype(np.float32)
    x[:, :8] *= 10
    return w, x


def _dequantized(w, scales, biases, bits, group_size) -> np.ndarray:
    out = mx.dequantize(
        mx.array(w),
        mx.array(scales).astype(mx.bfloat16),
        mx.array(biases).astype(mx.bfloat16),
        group_size=group_size,
        bits=bits,
    )
    return np.array(out.astype(mx.float32))


@pytest.mark.parametrize("bits,group_size", [(4, 128), (5, 64), (6, 32)])
def test_gptq_lowers_the_layer_output_error(bits, group_size):
    w, x = _layer()
    codes, scales, biases = gptq(w, x.T @ x, bits, group_size, mx.bfloat16)
    learned = _dequantized(pack(codes, bits), scales, biases, bits, group_size)
    q = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=group_size, bits=bits)
    nearest = np.array(mx.dequantize(*q, group_size=group_size, bits=bits).astype(mx.float32))

    def error(v):
        return float(((x @ (v - w).T) ** 2).sum())

    # measured: about 0.2 of plain rounding's error on this layer
    assert error(learned) < 0.5 * error(nearest)
    assert codes.max() <= 2**bits - 1


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_pack_is_mx_quantize_layout(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(4, 128)).astype(np.uint8)
    packed = pack(codes, bits)
    assert packed.shape == mx.quantize(mx.zeros((4, 128)), group_size=64, bits=bits)[0].shape
    ones, zeros = mx.ones((4, 2)), mx.zeros((4, 2))
    back = mx.dequantize(mx.array(packed), ones, zeros, group_size=64, bits=bits)
    np.testing.assert_array_equal(np.array(back), codes)


def test_convert_rounds_only_the_decoder_layers(tmp_path, monkeypatch):
    monkeypatch.setattr(rounding, "MAX_TOKENS", 512)  # 2 windows: fast
    nearest = convert(FIXTURES / "tiny_tied", tmp_path / "nearest", quiet=True)
    learned = convert(FIXTURES / "tiny_tied", tmp_path / "gptq", rounding="gptq", quiet=True)
    assert nearest.rounding is None and learned.rounding.startswith("rounding gptq: ")
    assert learned.total_bytes == nearest.total_bytes
    for sub in ("", "mtp/"):
        a = _tensors(tmp_path / "nearest" / sub)
        b = _tensors(tmp_path / "gptq" / sub)
        assert a.keys() == b.keys()
        changed = {k for k in a if not mx.array_equal(a[k], b[k])}
        if sub:
            assert not changed  # the MTP head: plain rounding
            continue
        assert not any("embed_tokens" in k for k in changed)  # the tied output head too
        assert changed and all(".layers." in k for k in changed)
        assert any(k.endswith("mlp.down_proj.weight") for k in changed)
    # the same quantization block, so only the index's rounding keeps their kept figures apart
    nearest_key = model_quantization_key(tmp_path / "nearest")
    assert nearest_key == quantization_key(
        read_config(tmp_path / "nearest")["quantization"], "bfloat16"
    )
    assert model_quantization_key(tmp_path / "gptq") != nearest_key


def _tensors(folder) -> dict[str, mx.array]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out
