"""--recipe auto (convert/sensitivity.py): the allocation fits its budget, spends bits where the
measured sensitivity is, refuses a budget below 4 bits naming the smallest that fits; the
measurement on a real (tiny) checkpoint, its cache, and a conversion that writes what was
allocated."""

from __future__ import annotations

import json

import mlxkit.convert.sensitivity as sens
import pytest
from mlxkit.convert import convert
from mlxkit.convert.sensitivity import (
    SETTINGS,
    BudgetError,
    Group,
    Sensitivity,
    allocate,
    auto_recipe,
    measure_sensitivity,
    smallest_bits_per_weight,
)

from tests.helpers import FIXTURES

ROWS, COLS = 256, 512  # each synthetic group: one weight of this shape


def _group(name: str, probe_kl: float) -> Group:
    """A group whose bytes are what mlx-lm writes (bf16 scales and biases) and whose squared
    error halves with each extra bit and doubles with the group size, as affine rounding does."""
    nbytes, error = {}, {}
    for k in SETTINGS:
        bits, size = map(int, k.split("/"))
        nbytes[k] = ROWS * COLS * bits // 8 + 2 * ROWS * (COLS // size) * 2
        error[k] = 4.0 ** (-bits) * size
    return Group(name, [f"language_model.model.{name}"], probe_kl, nbytes, error)


def _sensitivity(kls: list[float]) -> Sensitivity:
    groups = [_group(f"layers.{i}.mlp.down_proj", kl) for i, kl in enumerate(kls)]
    return Sensitivity(
        source_digest="test",
        calibration_digest="test",
        tokens=0,
        seconds=0.0,
        text_parameters=len(kls) * ROWS * COLS,
        fixed_bytes=0,
        groups=groups,
        mtp=None,
        mtp_parameters=0,
        mtp_fixed_bytes=0,
    )


def _bits_per_weight(s: Sensitivity, chosen: dict[str, str]) -> float:
    spent = s.fixed_bytes + sum(g.nbytes[chosen[g.name]] for g in s.groups)
    return spent * 8 / s.text_parameters


@pytest.mark.parametrize("budget", [4.25, 4.5, 5.0, 6.0, 8.5])
def test_allocation_fits_the_budget_and_spends_it(budget):
    s = _sensitivity([0.01, 0.02, 0.005, 0.04])
    chosen = allocate(s, budget)
    used = _bits_per_weight(s, chosen)
    assert used <= budget + 1e-9
    assert used > budget - 1.0  # the budget is spent, not left idle
    assert all(int(k.split("/")[0]) >= 4 for k in chosen.values())


def test_raised_sensitivity_gets_more_bits():
    even = allocate(_sensitivity([0.01] * 4), 5.0)
    raised = allocate(_sensitivity([0.01, 0.01, 0.5, 0.01]), 5.0)
    bpw = {k: int(k.split("/")[0]) + 32 / int(k.split("/")[1]) for k in SETTINGS}
    group = "layers.2.mlp.down_proj"
    assert bpw[raised[group]] > bpw[even[group]]
    assert bpw[raised[group]] > max(bpw[raised[g]] for g in raised if g != group)


def test_budget_too_small_is_refused_naming_the_smallest():
    s = _sensitivity([0.01, 0.02])
    smallest = smallest_bits_per_weight(s)
    assert smallest == 4.25  # 4 bits at group 128, as mlx-lm counts scales and biases
    with pytest.raises(BudgetError, match=r"below 4\.25, the smallest budget .* at least that"):
        allocate(s, 4.0)
    assert set(allocate(s, smallest).values()) == {"4/128"}


def test_recipe_writes_one_rule_per_module():
    s = _sensitivity([0.01, 0.5])
    recipe = auto_recipe(s, 5.0)
    chosen = allocate(s, 5.0)
    for g in s.groups:
        bits, size = map(int, chosen[g.name].split("/"))
        assert recipe.rule_for(g.modules[0], (ROWS, COLS)) == (bits, size)
    assert s.predicted_kl(recipe) == pytest.approx(sum(g.kl(chosen[g.name]) for g in s.groups))


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """tiny_untied measured once on one calibration window (the slow part: ~20 s here), with
    the cache in a temporary folder; the tests after it read the cache."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        yield measure_sensitivity(FIXTURES / "tiny_untied", max_tokens=256), cache


def test_measurement_on_a_checkpoint_and_its_cache(measured, monkeypatch):
    s, cache = measured
    names = {g.name for g in s.groups}
    assert {"embeddings", "head", "layers.0.linear_attn.in_proj", "layers.3.self_attn.o_proj"} <= (
        names
    )
    assert s.mtp is not None and s.tokens == 256
    assert all(g.probe_kl > 0 for g in s.groups)
    # every setting's predicted KL falls with more bits at the same group size
    g = s.groups[0]
    assert g.kl("4/64") > g.kl("5/64") > g.kl("6/64") > g.kl("8/64")
    files = list((cache / "mlxkit" / "sensitivity").iterdir())
    assert len(files) == 1 and json.loads(files[0].read_text())["source_digest"] == s.source_digest
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(sens, "_probe_kls", None)  # a cache hit measures nothing
    again = measure_sensitivity(FIXTURES / "tiny_untied", max_tokens=256)
    assert again.to_dict() == s.to_dict()


def test_convert_auto_writes_the_allocation(tmp_path, measured, monkeypatch):
    s, cache = measured
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    real = sens.measure_sensitivity
    monkeypatch.setattr(sens, "measure_sensitivity", lambda d, **kw: real(d, max_tokens=256, **kw))
    result = convert(
        FIXTURES / "tiny_untied", tmp_path / "out", recipe="auto", bits_per_weight=5.0, quiet=True
    )
    assert result.bits_per_weight <= 5.0
    assert "recipe auto for 5 bits per weight" in result.sensitivity
    assert "(cached)" in result.sensitivity
    chosen = allocate(s, 5.0)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    for g in s.groups:
        bits, size = map(int, chosen[g.name].split("/"))
        for module in g.modules:
            entry = config.get(module, config)
            assert (entry["bits"], entry["group_size"]) == (bits, size)


@pytest.mark.parametrize("group", ["layers.0.mlp.down_proj", "layers.3.self_attn.q_proj", "head"])
def test_streamed_kl_equals_the_whole_model_perturbed(measured, group):
    """A group's KL from the layer-by-layer streams equals the KL of the whole model, loaded at
    once, with that group's weights quantized at the probe (float64 softmax on both sides)."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from mlxkit.layout import fitting_group_size
    from mlxkit.load import load_model
    from mlxkit.tokenizer import load_tokenizer

    s, _ = measured
    ids = mx.array(sens.calibration_windows(load_tokenizer(FIXTURES / "tiny_untied"), 256))
    model = load_model(FIXTURES / "tiny_untied", dtype=mx.float32)
    reference = np.array(model(ids), dtype=np.float64)
    members = next(g.modules for g in s.groups if g.name == group)
    params = dict(tree_flatten(model.parameters()))
    probed = [
        (
            f"{m}.weight",
            sens._fake_quantized(
                w := params[f"{m}.weight"], 4, fitting_group_size(w.shape[1], 128)
            ),
        )
        for m in members
    ]
    model.load_weights(probed, strict=False)
    perturbed = np.array(model(ids), dtype=np.float64)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    r, m = log_softmax(reference), log_softmax(perturbed)
    kl = float((np.exp(r) * (r - m)).sum(-1).mean())
    measured_kl = next(g.probe_kl for g in s.groups if g.name == group)
    assert measured_kl == pytest.approx(kl, rel=1e-3)
