"""The planner with the vision tower: its bytes are the bytes written, the published shapes are
the published parameter counts, encoding one image costs what mlxkit's tower allocates, the
context holds the image, and refusals name a smaller image cap (or a lighter tower) that fits."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlxkit.convert.converter import convert
from mlxkit.ios_bridge import PlanRefused, choose_plan, evaluate, plan, refusal_message
from mlxkit.ios_bridge import memory as mem

from mlxkit.cli import main
from mlxkit.errors import ConfigError
from mlxkit.layout import ModelConfig, bytes_by_part_on_disk, model_parameters
from mlxkit.models.qwen3_5_vision import PREFIX, VisionConfig, VisionModel
from mlxkit.presets import model_config, sizes
from tests.helpers import FIXTURES
from tests.vision_helpers import VISION

# vision parameters of the published checkpoints (the model.visual.* tensors of the safetensors
# headers in mlxkit.presets.HUB_REPOS), in millions
PUBLISHED_VISION_PARAMETERS = {"0.8b": 100.6, "2b": 331.4, "4b": 333.5, "9b": 456.0}


def shapes(size: str) -> ModelConfig:
    return ModelConfig.from_dict(model_config(size))


@pytest.mark.parametrize("name", [*VISION, "tiny_tied"])
@pytest.mark.parametrize("options", [{}, {"vision_bits": 8, "group_size": 32}, {"vision": False}])
def test_planned_vision_bytes_equal_written_bytes(tmp_path, name, options):
    p = plan(FIXTURES / name, "iphone15pro", **options)
    result = convert(FIXTURES / name, tmp_path / "out", quiet=True, **options)
    written = bytes_by_part_on_disk(tmp_path / "out", tmp_path / "out" / "mtp")
    assert p.weights == written == result.bytes_by_part
    assert (p.weights["vision"] > 0) == options.get("vision", True)


@pytest.mark.parametrize("size", sizes())
def test_published_vision_shapes_give_the_published_parameter_counts(size):
    """The presets' towers (which benchmarks/make_checkpoint.py writes, name for name)."""
    from benchmarks.make_checkpoint import vision_tensors

    s = shapes(size)
    tower = {p: sh for p, sh in model_parameters(s.text, True, s.vision) if p.startswith(PREFIX)}
    assert (
        round(sum(math.prod(sh) for sh in tower.values()) / 1e6, 1)
        == (PUBLISHED_VISION_PARAMETERS[size])
    )
    written = vision_tensors(model_config(size)["vision_config"])
    renamed = {PREFIX + n.removeprefix("model.visual."): sh for n, sh in written}
    patch = PREFIX + "patch_embed.proj.weight"
    d, c, t, p, _ = renamed[patch]
    renamed[patch] = (d, t, p, p, c)  # PyTorch's Conv3d layout in the checkpoint
    assert renamed == tower
    assert s.vision.head_dim == (72 if size == "9b" else 64)


@pytest.mark.parametrize(
    ("hidden", "heads", "grid"),
    [pytest.param(256, 4, (1, 32, 64), marks=pytest.mark.slow), (96, 2, (1, 32, 64))],
)
def test_encoding_estimate_against_the_measured_peak(monkeypatch, hidden, heads, grid):
    """mlxkit's tower encoding one image on this machine's CPU build (which has no fused
    attention, so the scores are counted): the estimate is not below the measured peak and
    within 1.7× of it (observed 1.22× and 1.61×)."""
    monkeypatch.setattr(mem, "FUSED_ATTENTION_HEAD_DIMS", ())
    cfg = VisionConfig(
        depth=1,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_heads=heads,
        out_hidden_size=64,
        num_position_embeddings=64,
    )
    tower = VisionModel(cfg)
    tower.set_dtype(mx.bfloat16)
    mx.eval(tower.parameters())
    n = grid[1] * grid[2]
    pixels = np.random.default_rng(0).normal(size=(n, cfg.patch_dim)).astype(np.float32)
    mx.clear_cache()  # no reused (larger) buffers from earlier tests in the measurement
    limit = mx.set_cache_limit(0)
    try:
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(tower(mx.array(pixels), [grid]))
        measured = mx.get_peak_memory() - base
    finally:
        mx.set_cache_limit(limit)
    estimate = mem.vision_activations(cfg, n // 4, 2, mask=False).total
    assert measured <= estimate <= 1.7 * measured, (measured, estimate)


def test_fused_attention_decides_whether_the_scores_count():
    """Head dim 64 (0.8B-4B) has MLX's fused kernel, 72 (9B) not: its [16, N, N] bf16 scores at
    the 1,280-token cap (N = 5,120 patches) are the plan's largest array and counted twice."""
    for size in ("0.8b", "2b", "4b"):
        assert mem.vision_score_bytes(shapes(size).vision, 1280, 2) == 0
    v = shapes("9b").vision
    scores = mem.vision_score_bytes(v, 1280, 2)
    assert scores == 16 * 5120**2 * 2
    p = evaluate("9b", "m4pro-48gb", 8192)
    assert p.largest_array == ("vision attention scores (one image)", scores)
    mac, phone = (mem.vision_activations(v, 1280, 2, mask) for mask in (False, True))
    assert mac.layer_kind == "vision attention" and mac.layer_peak >= 2 * scores
    assert phone.layer_peak - mac.layer_peak == mem.vision_mask_bytes(v, 1280, 2) == 5120**2 * 2


def test_a_plan_counts_the_tower_its_encoding_and_the_image_tokens():
    with_tower, text = (evaluate("2b", "iphone15", 4096, vision=v) for v in (True, False))
    assert with_tower.weights["vision"] > 0 == text.weights["vision"]
    assert with_tower.weight_bytes - text.weight_bytes == with_tower.weights["vision"]
    enc = with_tower.vision_encoding
    assert enc.phase == "image encoding" and enc == mem.vision_activations(
        shapes("2b").vision,
        1280,
        2,
        mask=True,  # the phone runs mlx-swift-lm
    )
    assert with_tower.activations.total == max(enc.total, with_tower.activations.total)
    assert text.vision_encoding is None and with_tower.image_tokens == 1280
    # the image's features and embeddings wait in prefill: 2 · 1280 · H · 2 bytes more
    cfg = shapes("2b").text
    image, none = (mem.prefill_activations(cfg, 512, 4096, 4352, 2, True, n) for n in (1280, 0))
    assert image.retained - none.retained == 2 * 1280 * 2048 * 2
    # the smallest useful context holds one image and 512 tokens of text
    big = plan("0.8b", "iphone17pro", image_tokens=4000)
    assert big.max_context >= big.largest_context_that_fits >= 4000 + 512


def test_a_context_smaller_than_the_image_does_not_fit():
    p = evaluate("0.8b", "iphone17pro", 1000)
    assert p.fits_in_memory and not p.holds_an_image and not p.fits
    with pytest.raises(PlanRefused) as e:
        plan("0.8b", "iphone17pro", 1000)
    msg = refusal_message(e.value)
    assert "1,000 tokens of context, which cannot hold one image of 1,280" in msg
    assert "(--image-tokens 1000)" in msg and "--no-vision" in msg
    assert plan("0.8b", "iphone17pro", 1000, image_tokens=1000).fits


def test_refusal_names_the_largest_image_cap_that_fits():
    with pytest.raises(PlanRefused) as e:
        plan("2b", "iphone12")  # the tower and one 1,280-token image do not fit 2.4 GB
    msg = refusal_message(e.value)
    cap = int(msg.split("(--image-tokens ")[1].split(")")[0])
    assert 256 < cap < 1280
    assert plan("2b", "iphone12", image_tokens=cap).fits
    assert not evaluate("2b", "iphone12", image_tokens=cap + 1).fits
    assert "--vision-bits 8" in msg and "--no-vision" in msg


def test_choose_plan_keeps_the_tower_when_it_fits_and_drops_it_when_not():
    assert choose_plan("2b", "iphone15").vision is not None
    dropped = choose_plan("2b", "iphone12")
    assert dropped.vision is None and dropped.checkpoint.vision is not None
    assert "with the vision tower, then without" in dropped.choice
    with pytest.raises(PlanRefused):
        choose_plan("2b", "iphone12", vision=True)
    assert choose_plan("2b", "iphone12", vision=True, image_tokens=512).vision is not None
    assert choose_plan(FIXTURES / "tiny_tied", "iphone12", vision=False).vision is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image-tokens", "0"], "image tokens must be a positive number of tokens, got 0"),
        (["--image-tokens", "-5"], "image tokens must be a positive number of tokens, got -5"),
        (["--vision-bits", "7"], "--vision-bits: bits must be one of 2, 3, 4, 5, 6, 8, got 7"),
    ],
)
def test_bad_vision_knobs_are_one_line_exit_2(args, message):
    result = CliRunner().invoke(main, ["plan", "--size", "2b", "--target", "iphone15", *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: {message}"
    knob = args[0].removeprefix("--").replace("-", "_")
    with pytest.raises(ConfigError, match=message.split(", got")[0].split(": ")[-1]):
        evaluate("2b", "iphone15", **{knob: int(args[1])})


def test_plan_command_shows_the_vision_tower():
    result = CliRunner().invoke(main, ["plan", "--size", "4b", "--target", "iphone15pro"])
    assert result.exit_code == 0, result.output
    assert "vision: on (bfloat16), images up to 1,280 vision tokens (5,120 patches" in result.output
    assert "vision       " in result.output  # its weights line
    result = CliRunner().invoke(main, ["plan", "--size", "9b", "--target", "m4pro-48gb"])
    assert "head dim 72 has no fused MLX kernel: scores materialised" in result.output
    result = CliRunner().invoke(main, ["plan", "--size", "2b", "--target", "iphone12", "--json"])
    import json

    data = json.loads(result.output)
    assert data["vision"]["available"] and not data["vision"]["included"]
