"""The planner's quantized KV cache (issue 26): bytes per token equal to what the runtime's
cache holds, the precision and prefill chunk `plan` chooses, and why a 12 GB phone plans no
more context than an 8 GB one."""

from __future__ import annotations

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlxkit.ios_bridge import choose_plan, evaluate, plan
from mlxkit.ios_bridge import memory as mem

from mlxkit.cache import KVCache, KVQuantization
from mlxkit.cli import main
from mlxkit.errors import ConfigError
from mlxkit.load import load_model
from tests.helpers import FIXTURES


@pytest.mark.parametrize("n_tokens", [256, 300])
@pytest.mark.parametrize("kv", [KVQuantization(8, 32), KVQuantization(4, 32)], ids=str)
def test_quantized_kv_bytes_equal_runtime_caches(kv, n_tokens):
    """The bf16 fixture over N tokens (prefill in chunks, the MTP head fed): the caches'
    real nbytes are the planner's bytes per token times the allocated positions, exactly
    (packed values, scales and biases per group)."""
    model = load_model(FIXTURES / "tiny_tied")
    cfg = model.config
    cache, mtp_cache = model.make_cache(kv), model.make_mtp_cache(kv)
    tokens = mx.array([[(7 * i) % 400 + 3 for i in range(n_tokens)]])
    hidden = [model.hidden(tokens[:, s : s + 128], cache) for s in range(0, n_tokens, 128)]
    model.mtp_hidden(mx.concatenate(hidden, axis=1)[:, :-1], tokens[:, 1:], mtp_cache)
    mx.eval(*[c.state for c in cache + mtp_cache])
    kv_layers = [c for c in cache if isinstance(c, KVCache)]
    assert all(c.quantized for c in kv_layers + mtp_cache)
    per_layer = mem.kv_bytes_per_token_per_layer(cfg, 2, kv)
    # 2 (keys, values) · 2 KV heads · (32 values at `bits` + a bf16 scale and bias per group)
    assert per_layer == 2 * 2 * (32 * kv.bits // 8 + 2 * 2)
    assert sum(c.nbytes for c in kv_layers) == mem.kv_cache_bytes(cfg, n_tokens, 2, False, kv)
    assert sum(c.nbytes for c in kv_layers) == len(kv_layers) * per_layer * (
        mem.kv_allocated_tokens(n_tokens)
    )
    assert mtp_cache[0].nbytes == mem.kv_allocated_tokens(n_tokens - 1) * per_layer
    assert kv_layers[0].nbytes == 2 * mem.kv_layer_buffer_bytes(cfg, n_tokens, 2, kv)


def test_0_8b_at_4_bits_plans_3x_the_16_bit_context():
    """Issue 26's acceptance, text only, uniform recipe: the 4-bit plan with the prefill chunk
    it chooses against the 16-bit plan at the 512-token chunk every plan had before; the
    0.8B then reaches the model's 262,144 positions on an iPhone 15."""
    options = {"recipe": "uniform", "vision": False}
    four = choose_plan("0.8b", "iphone15", kv_bits=4, **options)
    sixteen = choose_plan("0.8b", "iphone15", kv_bits=16, prefill_chunk=512, **options)
    assert four.settings.kv_bits == 4 and sixteen.settings.kv_bits == 16
    assert four.max_context == 262_144 >= 3 * sixteen.max_context
    assert four.settings.prefill_chunk < 512  # the scores of a 512 chunk would not fit
    assert choose_plan("0.8b", "iphone15", kv_bits=4, prefill_chunk=512, **options).max_context < (
        262_144
    )


def test_plan_prefers_16_then_8_then_4_bits():
    """--context N: the first precision (then the largest chunk) that reaches N; no context:
    the most the target holds, up to the model's positions."""
    options = {"recipe": "uniform", "vision": False}
    by_bits = {
        b: evaluate("4b", "iphone15pro", kv_bits=b, prefill_chunk=32, **options) for b in (16, 8, 4)
    }
    c16, c8 = by_bits[16].largest_context_that_fits, by_bits[8].largest_context_that_fits
    assert c16 < c8 < by_bits[4].largest_context_that_fits
    assert choose_plan("4b", "iphone15pro", 4096, **options).settings.kv_bits == 16
    assert choose_plan("4b", "iphone15pro", c16 + 1, **options).settings.kv_bits == 8
    assert choose_plan("4b", "iphone15pro", c8 + 1, **options).settings.kv_bits == 4
    # the most the target holds within the limit the plan needs (4,096 tokens fit without the
    # entitlement, so it is planned without it)
    most = choose_plan("4b", "iphone15pro", **options)
    lean = evaluate("4b", "iphone15pro", kv_bits=4, prefill_chunk=32, entitlement=False, **options)
    assert most.settings.kv_bits == 4 and not most.settings.entitlement
    assert most.max_context == lean.largest_context_that_fits


def test_the_score_matrix_of_a_quantized_cache_is_counted_at_any_chunk():
    """Attention over a quantized cache has no fused kernel: its [nh, C, T] scores count even
    for a verify pass of k+1 <= 8 tokens (over an unquantized one MLX's vector kernel has none)."""
    cfg = plan("0.8b", "iphone15pro", vision=False).cfg
    T = 131_072
    plain = mem.verify_activations(cfg, 2, 2, T)
    quantized = mem.verify_activations(cfg, 2, 2, T, KVQuantization(4))
    assert quantized.layer_peak >= 2 * cfg.num_attention_heads * 3 * T * 2 > plain.layer_peak


def test_bad_kv_settings_are_refused():
    with pytest.raises(ConfigError, match="kv bits must be 16"):
        plan("0.8b", "iphone15pro", kv_bits=6, vision=False)
    with pytest.raises(ConfigError, match="kv group size must be 32, 64 or 128"):
        plan("0.8b", "iphone15pro", kv_bits=4, kv_group_size=48, vision=False)


def test_12_gb_phone_says_why_it_plans_no_more_than_8_gb():
    p8 = plan("9b", "iphone16pro", vision=False)
    p12 = plan("9b", "iphone17pro", vision=False)
    assert p8.largest_context_that_fits == p12.largest_context_that_fits
    assert any("usable memory of 8 GB phones" in w for w in p12.warnings)
    assert not any("usable memory of" in w for w in p8.warnings)


def test_cli_plan_kv_bits_and_tiers():
    runner = CliRunner()
    args = ["plan", "--size", "0.8b", "--target", "iphone15", "--no-vision", "--recipe", "uniform"]
    out = runner.invoke(main, [*args, "--kv-bits", "4"])
    assert out.exit_code == 0, out.output
    assert "KV cache at 4 bits" in out.output and "262,144 tokens planned" in out.output
    bad = runner.invoke(main, [*args, "--kv-bits", "3"])
    assert bad.exit_code == 2 and "kv bits must be 16" in bad.output


@pytest.mark.parametrize("runtime", ["1441444", "3.31.4"])
def test_bundle_records_the_kv_cache_and_the_glue_sets_it(tmp_path, runtime):
    """A bundle planned with a 4-bit cache: the manifest records it, the Swift glue sets
    GenerateParameters' kvBits / kvGroupSize / quantizedKVStart from it (the loading model
    says mlx-swift-lm then runs the quantized cache), its README says so, and bundle verify
    re-plans it with that cache."""
    from mlxkit.ios_bridge.bundle import build_bundle
    from mlxkit.ios_bridge.runtimes import runtime_record
    from mlxkit.ios_bridge.verify import verify_bundle

    from tests.swift_loading import SwiftRefuses, kv_cache

    out = tmp_path / "b"
    options = {"vision": False, "mtp": False, "swift_runtime": runtime}
    manifest = build_bundle(
        FIXTURES / "tiny_vision_p6", out, "iphone15", kv_bits=4, kv_group_size=32, **options
    )
    assert manifest["kv_cache"] == {"bits": 4, "group_size": 32, "quantized_kv_start": 0}
    glue = (out / "xcode" / "MLXKitBundle.swift").read_text()
    record = runtime_record(runtime)
    assert kv_cache(record, manifest["kv_cache"], glue) == {
        "kv_bits": 4,
        "kv_group_size": 32,
        "quantized_kv_start": 0,
    }
    unset = glue.replace("parameters.kvBits = manifest.kvCache.bits", "")
    with pytest.raises(SwiftRefuses, match="keeps the KV cache unquantized"):
        kv_cache(record, manifest["kv_cache"], unset)
    assert "quantized\nto 4 bits in groups of 32" in (out / "xcode" / "README.md").read_text()
    assert verify_bundle(out, load=False).ok
