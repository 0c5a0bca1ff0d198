"""A vision tower quantized with --vision-bits runs, not only loads: its features are what its
dequantized weights compute and stay near the unquantized tower's, and generation with an
image works through the API, the CLI and an iPhone bundle. (The merger once reshaped by a
quantized weight's packed width and crashed on the first image.)"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx import nn
from mlx.utils import tree_flatten
from mlxkit.ios_bridge import build_bundle, verify_bundle

import mlxkit
from mlxkit.cli import main
from mlxkit.load import load_model
from mlxkit.models.qwen3_5_vision import VisionModel
from tests.helpers import FIXTURES, conversions, reference
from tests.vision_helpers import VISION, tower_inputs

QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
# Relative L2 distance from the float64 reference tower allowed for each bit width: about twice
# what these random towers measure (8-bit: 0.14% to 1.4%, 4-bit: 1.9% to 13%; the bf16
# conversion's own rounding included).
TOLERANCE = {8: 0.03, 4: 0.25}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return conversions(tmp_path_factory)


def dequantized(tower: VisionModel) -> tuple[VisionModel, set[str]]:
    """A float tower with the quantized tower's weights dequantized, and which layers were
    quantized."""
    params = dict(tree_flatten(tower.parameters()))
    quantized = set()
    for path, module in tower.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            quantized.add(path)
            params[f"{path}.weight"] = mx.dequantize(
                module.weight, module.scales, module.biases, module.group_size, module.bits
            )
            del params[f"{path}.scales"], params[f"{path}.biases"]
    dense = VisionModel(tower.config)
    dense.load_weights(list(params.items()), strict=True)
    return dense, quantized


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", VISION)
def test_the_quantized_tower_computes_what_its_weights_say(converted, name, bits):
    """Every linear whose input width 64 or 32 divides is quantized (the recipe's group 64, else
    32): all ten of the patch-4 tower, the two MLP output layers (input 96) of the patch-6 one.
    Its features equal those of the same tower with the weights dequantized (float32, 1e-4) and
    are within TOLERANCE of the float64 reference of the unquantized tower."""
    tower = load_model(converted(name, vision_bits=bits), dtype=mx.float32).vision_tower
    dense, quantized = dequantized(tower)
    weights = dict(tree_flatten(dense.parameters()))
    linears = [p for p, m in dense.named_modules() if isinstance(m, nn.Linear)]
    fits = {p for p in linears if weights[f"{p}.weight"].shape[1] % 32 == 0}
    assert quantized == fits and len(quantized) == {VISION[0]: 10, VISION[1]: 2}[name]
    patches, grids = tower_inputs(name)
    got = np.array(tower(patches, grids))
    assert np.abs(got - np.array(dense(patches, grids))).max() <= 1e-4
    ref = reference(name)["tower_f64"]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= TOLERANCE[bits]


def cli_generate(model: Path, image: Path, max_tokens: int):
    """`mlxkit generate --image` on `model`; fails the test unless it exits 0."""
    args = ["generate", "--model", str(model), "--image", str(image), "--prompt", "What?"]
    result = CliRunner().invoke(main, [*args, "--max-tokens", str(max_tokens)])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("bits", [8, 4])
def test_generation_with_an_image_through_the_api_and_the_cli(converted, bits):
    out = converted(VISION[0], vision_bits=bits)
    image = FIXTURES / VISION[0] / "image0.png"
    model, tokenizer = mlxkit.load(out)
    assert isinstance(model.vision_tower.merger.linear_fc1, nn.QuantizedLinear)
    tokenizer._eos_token_ids = []
    responses = list(
        mlxkit.stream_generate(model, tokenizer, QUESTION, images=[image], max_tokens=6)
    )
    assert len(responses) == 6 and responses[-1].finish_reason == "length"
    result = cli_generate(out, image, 4)
    assert "4 tokens" in result.output


def test_a_bundle_with_an_8_bit_tower_verifies_and_generates_with_an_image(tmp_path):
    out = tmp_path / "bundle"
    build_bundle(FIXTURES / VISION[0], out, "iphone15", vision_bits=8)
    report = verify_bundle(out)
    assert report.ok, [(c.name, c.detail) for c in report.checks]
    model, tokenizer = mlxkit.load(out)
    assert isinstance(model.vision_tower.blocks[0].attn.qkv, nn.QuantizedLinear)
    tokenizer._eos_token_ids = []
    image = FIXTURES / VISION[0] / "image1.png"
    responses = list(
        mlxkit.stream_generate(model, tokenizer, QUESTION, images=[image], max_tokens=4)
    )
    assert len(responses) == 4
    cli_generate(out, image, 3)
