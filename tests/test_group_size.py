"""Group sizes that fit the widths: where the recipe's group size does not divide a weight's
input width, the largest of 64 and 32 that does is used and recorded for that layer in
config.json (as mlx-lm does); a width neither divides is refused. On a checkpoint of hidden
size 96 (which 64 does not divide), the bytes on disk, the plan, the printed bits per weight
and config.json's `quantization` block say the same, and the model loads and generates. (A
default conversion of it once wrote every weight unquantized, printed "16.00 bits per weight"
and declared 4-bit in config.json.)"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlx.core as mx
import pytest
from mlxkit.convert import convert
from mlxkit.convert.converter import format_summary
from mlxkit.convert.quantize import load_recipe

import mlxkit
from benchmarks.make_checkpoint import dtype_of, text_tensors
from mlxkit.checkpoint import read_headers, weight_files
from mlxkit.errors import ConfigError
from mlxkit.layout import (
    bytes_by_part,
    bytes_by_part_on_disk,
    model_parameters,
    planned_tensors,
    vision_rule,
)
from mlxkit.load import load_model_config
from tests.helpers import copy_fixture


def set_width(d: Path, hidden: int) -> None:
    """Rewrites a copy of tiny_tied at `d` in place: its tokenizer and text config (no vision
    tower) with hidden size `hidden`, and random weights of those shapes in the Hugging Face
    layout."""
    config = json.loads((d / "config.json").read_text())
    del config["vision_config"]
    config["text_config"]["hidden_size"] = hidden
    (d / "config.json").write_text(json.dumps(config))
    for f in [*d.glob("*.safetensors"), d / "reference.npz"]:
        f.unlink(missing_ok=True)
    mx.random.seed(0)
    weights = {}
    for name, shape in text_tensors(config["text_config"]):
        if name.endswith("norm.weight") and "linear_attn" not in name:
            value = mx.zeros(shape)  # x·(1 + w)
        elif name.endswith("A_log"):
            value = mx.full(shape, -1.0)
        elif name.endswith(("linear_attn.norm.weight", "dt_bias")):
            value = mx.ones(shape)
        else:
            value = mx.random.normal(shape) * 0.5 / math.sqrt(shape[-1])
        weights[name] = value.astype(mx.float32 if dtype_of(name) == "F32" else mx.bfloat16)
    mx.save_safetensors(str(d / "model.safetensors"), weights, metadata={"format": "pt"})


def checkpoint_of_width(tmp_path: Path, hidden: int) -> Path:
    d = copy_fixture(tmp_path, "tiny_tied", f"hidden{hidden}")
    set_width(d, hidden)
    return d


@pytest.fixture(scope="module")
def hidden96(tmp_path_factory) -> Path:
    return checkpoint_of_width(tmp_path_factory.mktemp("width"), 96)


def test_the_recipe_takes_the_largest_group_size_that_divides_the_width():
    uniform, g128, g32 = (load_recipe("uniform", group_size=g) for g in (64, 128, 32))
    path = "language_model.model.layers.0.mlp.gate_proj.weight"
    assert uniform.rule_for(path, (8, 192)) == (4, 64)
    assert uniform.rule_for(path, (8, 96)) == (4, 32)
    assert g128.rule_for(path, (8, 384)) == (4, 128)
    assert g128.rule_for(path, (8, 192)) == (4, 64)
    assert g128.rule_for("mtp.fc.weight", (64, 96)) == (4, 32)
    assert g32.rule_for(path, (8, 128)) == (4, 32)  # a group size that fits is kept
    assert load_recipe("quality").rule_for("language_model.lm_head.weight", (512, 96)) == (8, 32)
    with pytest.raises(ConfigError) as e:
        uniform.rule_for(path, (8, 80))
    assert str(e.value) == (
        "language_model.model.layers.0.mlp.gate_proj cannot be quantized: its input width 80 "
        "is not a multiple of 64 or 32; convert with --no-quantize"
    )


def test_a_vision_linear_takes_a_fitting_group_size_or_stays_whole():
    """The 9B tower's MLP takes 4,304 features, which no group size divides: that layer stays
    in the output dtype (no refusal, so --vision-bits still quantizes the rest of it)."""
    path = "vision_tower.blocks.0.mlp.linear_fc2.weight"
    assert vision_rule(path, (1152, 4304), 8, 64) is None
    assert vision_rule(path, (48, 96), 8, 64) == (8, 32)
    assert vision_rule(path, (1152, 4608), 4, 64) == (4, 64)


def test_disk_plan_printed_bits_and_config_agree_on_a_hidden_96_model(hidden96, tmp_path):
    out = tmp_path / "out"
    result = convert(hidden96, out, quiet=True)
    cfg = load_model_config(hidden96).text
    recipe = load_recipe("uniform")

    plan = bytes_by_part(planned_tensors(cfg, recipe, include_mtp=True))
    assert bytes_by_part_on_disk(out, out / "mtp") == plan == result.bytes_by_part

    weights = sum(math.prod(s) for _, s in model_parameters(cfg, include_mtp=False))
    bpw = (plan["embeddings"] + plan["layers"]) * 8 / weights
    printed = re.search(r"([\d.]+) bits per weight", format_summary(result)).group(1)
    # 4 bits and a bf16 scale and bias per group of 32 or 64: 4.5 to 5, a little more with the
    # norms and conv1d kept in bf16
    assert printed == f"{bpw:.2f}" and 4.5 < bpw < 5.2

    # config.json: every 2-D weight is quantized, by the bits and group size it records: the
    # default group 64 where it divides the input width (128), else 32 (96), written per layer
    headers = {}
    for directory, prefix in ((out, ""), (out / "mtp", "mtp.")):
        headers.update({prefix + n: i for n, i in read_headers(weight_files(directory)).items()})
    blocks = {
        "": json.loads((out / "config.json").read_text())["quantization"],
        "mtp.": {
            ("mtp." + k if isinstance(v, dict) else k): v
            for k, v in json.loads((out / "mtp" / "config.json").read_text())[
                "quantization"
            ].items()
        },
    }
    checked = fallbacks = 0
    for path, shape in model_parameters(cfg, include_mtp=True):
        if len(shape) != 2:
            continue
        module = path.removesuffix(".weight")
        block = blocks["mtp." if module.startswith("mtp.") else ""]
        assert (block["bits"], block["group_size"]) == (4, 64)
        rows, width = shape
        group = block[module]["group_size"] if module in block else block["group_size"]
        assert group == (64 if width % 64 == 0 else 32), module
        assert block.get(module, {}).get("bits", 4) == 4
        assert headers[path].shape == (rows, width * 4 // 32) and headers[path].dtype == "U32"
        assert headers[f"{module}.scales"].shape == (rows, width // group), module
        checked += 1
        fallbacks += group == 32
    assert checked == 1 + 3 * 8 + 7 + 8  # embedding, 3 linear-attention layers, 1 full, MTP
    # group 64: out_proj (3), o_proj (1 + MTP's), down_proj (4 + MTP's), all of input 128, and
    # MTP's fc (input 192); the other 29 take 96 features
    assert fallbacks == checked - 11 == 29

    model, tokenizer = mlxkit.load(out)
    assert model.language_model.model.embed_tokens.group_size == 32
    tokenizer._eos_token_ids = []
    responses = list(
        mlxkit.stream_generate(model, tokenizer, "def add(a, b):", max_tokens=8, num_draft=2)
    )
    assert len(responses) == 8 and responses[-1].drafted > 0  # the 32-group drafter ran too


def test_a_width_no_group_size_divides_is_refused_in_one_line(tmp_path):
    src = checkpoint_of_width(tmp_path, 80)
    with pytest.raises(ConfigError, match="input width 80 is not a multiple of 64 or 32"):
        convert(src, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
    convert(src, tmp_path / "float", quantize=False, quiet=True)  # what the message says works
    model, tokenizer = mlxkit.load(tmp_path / "float")
    assert len(list(mlxkit.stream_generate(model, tokenizer, "def", max_tokens=2))) >= 1
