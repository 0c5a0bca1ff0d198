"""The planner's decode speed reads the KV cache it plans: at long context the cache is most of
what a step reads, so a 4-bit cache predicts a faster step than a 16-bit one, by exactly the
bytes it saves."""

from __future__ import annotations

import pytest
from mlxkit.ios_bridge import evaluate
from mlxkit.ios_bridge import memory as mem
from mlxkit.ios_bridge.roofline import speed_model, step_bytes

from mlxkit.cache import KVQuantization

CONTEXT = 131_072
OPTIONS = {"recipe": "uniform", "vision": False, "prefill_chunk": 32}


def test_the_step_reads_the_planned_cache_bits():
    plans = {b: evaluate("0.8b", "iphone15pro", CONTEXT, kv_bits=b, **OPTIONS) for b in (16, 4)}
    p16, p4 = plans[16], plans[4]
    cfg, reads = p16.cfg, p16.weight_reads
    kv4 = KVQuantization(4, 64)
    saved = (
        mem.n_full_layers(cfg)
        * CONTEXT
        * (mem.kv_bytes_per_token_per_layer(cfg, 2) - mem.kv_bytes_per_token_per_layer(cfg, 2, kv4))
    )
    assert step_bytes(cfg, reads, CONTEXT, 2) - step_bytes(cfg, reads, CONTEXT, 2, kv4) == saved
    model, bandwidth = speed_model(), p4.target.bandwidth
    expected = 1 / model.seconds(step_bytes(cfg, reads, CONTEXT, 2, kv4), bandwidth)
    assert p4.speed.decode_tps_at_context == pytest.approx(expected, rel=1e-12)
    assert p4.speed.decode_tps_at_context > p16.speed.decode_tps_at_context
    assert p4.speed.mtp_speedup != p16.speed.mtp_speedup  # the drafter's cache is read too
