"""The iPhone planner against the real thing: the bytes `convert` writes, the caches the
runtime allocates, and refusals that name what fits instead."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest
from mlxkit.convert.converter import convert
from mlxkit.ios_bridge import PlanRefused, evaluate, plan, refusal_message, resolve_target
from mlxkit.ios_bridge import memory as mem
from mlxkit.ios_bridge.devices import load_catalog, parse_bytes
from mlxkit.ios_bridge.roofline import expected_tokens_per_round

from mlxkit.cache import KVCache, LinearAttentionCache
from mlxkit.errors import ConfigError
from mlxkit.layout import bytes_by_part_on_disk
from mlxkit.load import load_model
from mlxkit.models.qwen3_5 import TextConfig
from mlxkit.presets import text_config
from tests.helpers import FIXTURES

SIX_GB_AND_LESS = [
    "iphone12",
    "iphone13",
    "iphone12pro",
    "iphone13pro",
    "iphone14",
    "iphone14pro",
    "iphone15",
    "iphone15plus",
    "tier-4gb",
    "tier-6gb-lpddr5",
]


@pytest.mark.parametrize("fixture", ["tiny_tied", "tiny_untied"])
@pytest.mark.parametrize(("recipe", "bits"), [("uniform", 4), ("quality", 4), ("uniform", 3)])
def test_planned_weight_bytes_equal_written_bytes(tmp_path, fixture, recipe, bits):
    p = plan(FIXTURES / fixture, "iphone15pro", recipe=recipe, bits=bits)
    result = convert(FIXTURES / fixture, tmp_path / "out", recipe=recipe, bits=bits, quiet=True)
    written = bytes_by_part_on_disk(tmp_path / "out", tmp_path / "out" / "mtp")
    assert p.weights == written == result.bytes_by_part
    assert p.weights["mtp"] > 0 and p.weights["embeddings"] > 0


def test_planned_weights_without_mtp(tmp_path):
    p = plan(FIXTURES / "tiny_tied", "iphone12", mtp=False)
    convert(FIXTURES / "tiny_tied", tmp_path / "out", mtp=False, quiet=True)
    assert p.weights == bytes_by_part_on_disk(tmp_path / "out")
    assert p.weights["mtp"] == 0 and not (tmp_path / "out" / "mtp").exists()


@pytest.mark.parametrize("n_tokens", [5, 256, 300])
def test_kv_and_state_bytes_equal_runtime_caches(n_tokens):
    """Run the fixture model over N tokens (prefill in chunks, MTP head fed as in generation)
    and compare the runtime caches' .nbytes with the planner's formulas."""
    model = load_model(FIXTURES / "tiny_tied")  # bf16, as converted models run
    cfg = model.config
    cache, mtp_cache = model.make_cache(), model.make_mtp_cache()
    tokens = mx.array([[(7 * i) % 400 + 3 for i in range(n_tokens)]])
    hidden = [model.hidden(tokens[:, s : s + 128], cache) for s in range(0, n_tokens, 128)]
    hidden = mx.concatenate(hidden, axis=1)
    model.mtp_hidden(hidden[:, :-1], tokens[:, 1:], mtp_cache)  # positions with a known next
    mx.eval(*[c.state for c in cache + mtp_cache])

    b = 2
    kv = sum(c.nbytes for c in cache if isinstance(c, KVCache))
    state = sum(c.nbytes for c in cache if isinstance(c, LinearAttentionCache))
    mtp_kv = sum(c.nbytes for c in mtp_cache)
    per_layer = mem.kv_bytes_per_token_per_layer(cfg, b)
    assert kv == mem.kv_cache_bytes(cfg, n_tokens, b, mtp=False)
    assert mtp_kv == mem.kv_allocated_tokens(n_tokens - 1) * per_layer
    assert state == mem.linear_state_bytes(cfg, b)
    # the plan's KV line (all KV layers at the same length) bounds main + MTP from above
    assert kv + mtp_kv <= mem.kv_cache_bytes(cfg, n_tokens, b, mtp=True)
    assert mem.kv_cache_bytes(cfg, n_tokens, b, mtp=True) == (
        mem.n_kv_layers(cfg, True) * math.ceil(n_tokens / 256) * 256 * per_layer
    )


def test_kv_bytes_after_generation_within_plan():
    """Decoding with MTP (verify appends k drafts before trimming): what the caches hold
    after a generation stays within the plan made at that context."""
    from mlxkit.generate import PromptCache, stream_generate
    from mlxkit.load import load

    model, tokenizer = load(FIXTURES / "tiny_tied")
    pc = PromptCache.new(model)
    prompt = [(5 * i) % 400 + 3 for i in range(250)]
    last = None
    for last in stream_generate(
        model, tokenizer, prompt, max_tokens=20, mtp=True, num_draft=2, prompt_cache=pc
    ):
        pass
    context = len(prompt) + last.generation_tokens
    held = sum(c.nbytes for c in pc.main + pc.mtp if isinstance(c, KVCache))
    p = evaluate(FIXTURES / "tiny_tied", "m4-16gb", context, num_draft=2, vision=False)  # mlxkit
    assert p.num_draft == 2 and held <= p.kv_cache_bytes
    assert held >= mem.kv_cache_bytes(model.config, context - 1, 2, mtp=False)


@pytest.mark.parametrize("target", SIX_GB_AND_LESS)
def test_9b_refused_on_4_and_6_gb_phones_naming_what_fits(target):
    """Text only (with the vision tower even the 4B and 2B do not fit the 4 GB phones)."""
    with pytest.raises(PlanRefused) as e:
        plan("9b", target, vision=False)
    msg = refusal_message(e.value)
    assert "Qwen3.5-9B" in msg and "does not fit" in msg and "What fits instead" in msg
    assert "--size 4b" in msg or "--size 2b" in msg
    assert "--target iphone15pro" in msg  # the 8 GB tier runs it
    assert e.value.plan is not None and not e.value.plan.fits


def test_9b_fits_8_gb_phones_with_the_entitlement_only():
    """Text only: with its vision tower the 9B fits no phone (see test_plan_vision.py)."""
    p = plan("9b", "iphone15pro", vision=False)
    assert p.fits and p.entitlement_required and p.largest_context_that_fits >= 512
    with pytest.raises(PlanRefused) as e:
        plan("9b", "iphone15pro", entitlement=False, vision=False)
    assert "--entitlement" in refusal_message(e.value)


def test_refusal_names_a_shorter_context():
    p = plan("4b", "iphone15")
    with pytest.raises(PlanRefused) as e:
        plan("4b", "iphone15", context=p.largest_context_that_fits + 1)
    assert f"--context {p.largest_context_that_fits}" in refusal_message(e.value)


@pytest.mark.parametrize(("size", "vision"), [("2b", False), ("0.8b", True)])
def test_max_context_is_the_exact_boundary(size, vision):
    p = plan(size, "iphone12", vision=vision)
    assert evaluate(size, "iphone12", p.largest_context_that_fits, vision=vision).fits
    assert not evaluate(size, "iphone12", p.largest_context_that_fits + 1, vision=vision).fits


def test_plan_kv_cache_and_state_match_the_formulas():
    p = plan("0.8b", "iphone12", context=4096)
    cfg = TextConfig.from_dict(text_config("0.8b"))
    assert p.num_draft == 1  # mlx-swift-lm drafts one token per round on the phone
    assert p.kv_cache_bytes == mem.kv_cache_bytes(cfg, 4096 + 1, 2, mtp=True)
    assert p.kv_bytes_per_token == (6 + 1) * 2 * 2 * 256 * 2  # 6 full layers + MTP, 2 KV heads
    assert p.state_bytes == 18 * (3 * 6144 * 2 + 16 * 128 * 128 * 4)
    assert p.speed.decode_tps > 0 and 1.0 < p.speed.mtp_speedup < 3.0


def test_budget_smaller_than_weights_is_refused():
    with pytest.raises(PlanRefused, match="does not fit"):
        plan("2b", None, memory_budget="1GB", vision=False)
    assert plan("0.8b", None, memory_budget="3.5GB").fits


def test_targets_and_aliases():
    catalog = load_catalog()
    assert len(catalog.devices) == 25
    assert set(catalog.tiers) == {"4gb", "6gb-lpddr4x", "6gb-lpddr5", "8gb", "12gb"}
    for name, device in [
        ("iphone15", "iphone15"),
        ("iPhone 15 Pro", "iphone15pro"),
        ("iphone16promax", "iphone16promax"),
        ("iphone-air", "iphoneair"),
        ("iphone-16e", "iphone16e"),
    ]:
        assert resolve_target(name).devices[0].id == device
    assert resolve_target("tier-8gb").kind == "tier"
    for d in catalog.devices.values():
        assert {"soc", "gpu_cores", "ram", "bandwidth"} <= set(d.source)
        assert all(s in catalog.sources for s in d.source.values())
    with pytest.raises(ConfigError, match="unknown target"):
        resolve_target("iphone11")


@pytest.mark.parametrize("bad", ["0GB", "-1GB", "lots", ""])
def test_bad_budgets(bad):
    with pytest.raises(ConfigError):
        parse_bytes(bad)
    assert parse_bytes("3.5GB") == 3_500_000_000 and parse_bytes("1GiB") == 2**30


def test_mtp_expected_tokens():
    assert expected_tokens_per_round(0.0, 2) == 1.0
    assert expected_tokens_per_round(1.0, 2) == 3.0
    assert expected_tokens_per_round(0.5, 1) == pytest.approx(1.5)
