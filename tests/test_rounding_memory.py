"""GPTQ's streaming pass holds one decoder layer at a time: each is freed before the next is
loaded (a DecoderLayer refers to itself, so dropping the last reference is not enough)."""

import gc
import weakref

import mlx.core as mx
from mlxkit.convert import rounding
from mlxkit.convert.quantize import load_recipe
from mlxkit.convert.reader import SourceCheckpoint

from tests.helpers import FIXTURES


def test_a_decoder_layer_is_freed_before_the_next_is_loaded(monkeypatch, tmp_path):
    ckpt = SourceCheckpoint.open(FIXTURES / "tiny_tied", include_mtp=False, include_vision=False)
    loaded = []
    load = rounding._load_layer

    def spy(ckpt, i):
        assert all(r() is None for r in loaded), f"layer {i - 1} is still alive"
        layer = load(ckpt, i)
        loaded.append(weakref.ref(layer))
        return layer

    monkeypatch.setattr(rounding, "_load_layer", spy)
    gc.collect()
    gc.disable()  # the collector would free them at a time of its own choosing
    try:
        rounding.round_layers(ckpt, load_recipe("uniform"), mx.bfloat16, tmp_path, max_tokens=256)
    finally:
        gc.enable()
    assert len(loaded) == ckpt.cfg.num_hidden_layers
