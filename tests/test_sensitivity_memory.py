"""The sensitivity measurement (convert/sensitivity.py) runs in bounded memory: a decoder layer
sees at most ACTIVATION_BYTES of activations at once whatever the calibration tokens and the
number of streams (a linear-attention layer PIECE tokens at a time), and cutting the work into
steps changes no result. (Its peak at 4B and 9B
widths is measured by the slow tests in test_convert_memory.py.)"""

from __future__ import annotations

import gc
import weakref

import mlx.core as mx
import mlxkit.convert.sensitivity as sens
import numpy as np
import pytest
from mlxkit.convert.reader import SourceCheckpoint

from mlxkit.models.qwen3_5 import DecoderLayer
from tests.helpers import FIXTURES

WINDOWS, T = 3, 2 * sens.PIECE  # calibration windows of T tokens: several per step, or one


# groups of each kind: their streams start at the input, a linear-attention layer or an
# attention layer, or are the head's (a few, for speed: each group is one more stream)
GROUPS = [
    "embeddings",
    "layers.0.linear_attn.in_proj",
    "layers.2.mlp.down_proj",
    "layers.3.self_attn.o_proj",
    "layers.6.linear_attn.out_proj",
    "head",
]


@pytest.fixture(scope="module")
def tiny():
    """tiny_untied (8 layers, both attention kinds, an untied head), the groups measured, and
    token ids drawn from its vocabulary."""
    ckpt = SourceCheckpoint.open(FIXTURES / "tiny_untied", include_mtp=True, include_vision=False)
    ids = np.random.default_rng(0).integers(0, ckpt.cfg.vocab_size, (WINDOWS, T), np.int32)
    return ckpt, GROUPS, ids


def test_steps_change_no_result(tiny, monkeypatch, tmp_path):
    """Every window at once and whole against one window at a time in pieces: the same KLs,
    bit for bit (each step's arithmetic is the same); the head over one token at a time too,
    to float32 rounding (numpy's BLAS, which runs the head's matmuls, sums a single row in
    another order than a block of rows)."""
    ckpt, names, ids = tiny
    with monkeypatch.context() as whole_windows:
        whole_windows.setattr(sens, "PIECE", T)
        assert sens._windows_per_step(ckpt.cfg, T) >= WINDOWS * len(names)  # all at once
        whole = sens._probe_kls(ckpt, ids, names, tmp_path)
    assert len(whole) == len(names) and all(v > 0 for v in whole.values())
    monkeypatch.setattr(sens, "_windows_per_step", lambda cfg, T: 1)
    assert sens._probe_kls(ckpt, ids, names, tmp_path) == whole
    monkeypatch.setattr(sens, "ACTIVATION_BYTES", 1)  # the head's blocks: one token
    assert sens._probe_kls(ckpt, ids, names, tmp_path) == pytest.approx(whole, rel=2e-6)


def test_a_layer_runs_one_window_at_a_time_on_the_least_budget(tiny, monkeypatch, tmp_path):
    """With no room for more, no layer call gets more than one window (a linear-attention
    layer: a PIECE of one), however many streams (one per group of the layers before) and
    windows there are."""
    ckpt, names, ids = tiny
    monkeypatch.setattr(sens, "ACTIVATION_BYTES", 1, raising=False)
    seen = []
    call = DecoderLayer.__call__

    def spy(self, x: mx.array, *args, **kwargs):
        seen.append(x.shape)
        return call(self, x, *args, **kwargs)

    monkeypatch.setattr(DecoderLayer, "__call__", spy)
    sens._probe_kls(ckpt, ids, names, tmp_path)
    streams = 1 + sum(1 for n in names if n != "head")  # the source and every input group
    H = ckpt.cfg.hidden_size
    assert {s for s in seen} == {(1, T, H), (1, sens.PIECE, H)}
    assert len(seen) > streams * WINDOWS  # the last layer alone runs them all


def test_a_decoder_layer_is_freed_before_the_next_is_loaded(tiny, monkeypatch, tmp_path):
    """A DecoderLayer refers to itself (its compiled blocks are its bound methods), so
    dropping the measurement's last reference does not free it: only the cyclic collector
    does, and it runs rarely once the process holds many objects (at 4B/9B widths every layer
    measured stayed resident: 215 MiB / 417 MiB more per layer). With the collector off, no
    layer the measurement loaded is alive when it loads the next, nor when the head runs."""
    ckpt, _, ids = tiny
    loaded = []
    load = sens._load_layer

    def spy(ckpt, i):
        layer = load(ckpt, i)
        loaded.append(weakref.ref(layer))
        assert [r() is not None for r in loaded] == [False] * i + [True]
        return layer

    head = sens._head_kls

    def head_spy(*args):
        assert all(r() is None for r in loaded)
        return head(*args)

    monkeypatch.setattr(sens, "_load_layer", spy)
    monkeypatch.setattr(sens, "_head_kls", head_spy)
    gc.collect()
    gc.disable()
    try:
        sens._probe_kls(ckpt, ids[:1], ["head"], tmp_path)  # the source's stream alone
    finally:
        gc.enable()
    assert len(loaded) == ckpt.cfg.num_hidden_layers
