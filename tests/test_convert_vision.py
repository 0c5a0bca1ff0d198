"""The vision tower through the converter: kept in the layout mlx-vlm and MLX Swift read, its
config, token ids and preprocessor configs carried over, quantized only when asked, dropped with
--no-vision; mlx-vlm loads the output; bad vision inputs are one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten
from mlxkit.convert import convert
from mlxkit.convert import converter as converter_module
from mlxkit.convert.converter import preprocessor_configs

from mlxkit.checkpoint import weight_files
from mlxkit.layout import VISION_TOKEN_KEYS, ModelConfig
from mlxkit.load import load_model
from mlxkit.models.qwen3_5_vision import PREFIX, VisionConfig, sanitize_vision_tensor
from mlxkit.vision import PREPROCESSOR_FILES, Preprocessor
from tests.helpers import FIXTURES, conversions, reference
from tests.test_convert_errors import (
    assert_nothing_left,
    assert_one_line_error,
    copy_fixture,
    edit_config,
    edit_weights,
    run_cli,
)
from tests.vision_helpers import VISION, config, tower_inputs


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return conversions(tmp_path_factory)


def tensors(directory: Path) -> dict[str, mx.array]:
    return {k: v for f in weight_files(directory) for k, v in mx.load(str(f)).items()}


def sanitized_source(name: str, dtype) -> dict[str, mx.array]:
    out = {}
    for key, value in tensors(FIXTURES / name).items():
        item = sanitize_vision_tensor(key, value, dtype)
        if item is not None:
            out[item[0]] = item[1]
    return out


@pytest.mark.parametrize("name", [*VISION, "tiny_tied"])
def test_config_carries_the_vision_config_token_ids_and_preprocessor(converted, name):
    """The fixtures' token ids are the tiny tokenizer's (452/453/449/450), not Qwen's."""
    out = converted(name)
    source, written = config(name), json.loads((out / "config.json").read_text())
    assert written["vision_config"] == source["vision_config"]
    for key in VISION_TOKEN_KEYS:
        assert written[key] == source[key]
    assert (written["image_token_id"], written["vision_start_token_id"]) == (452, 449)
    for f in ("chat_template.jinja", "tokenizer.json"):
        assert (out / f).read_bytes() == (FIXTURES / name / f).read_bytes()
    vision = VisionConfig.from_dict(source)
    if (FIXTURES / name / PREPROCESSOR_FILES[0]).is_file():  # copied byte for byte
        for f in PREPROCESSOR_FILES:
            assert (out / f).read_bytes() == (FIXTURES / name / f).read_bytes()
    else:  # tiny_tied ships none: Qwen 3.5's defaults, which is what the source meant
        for f, data in preprocessor_configs(vision).items():
            assert json.loads((out / f).read_text()) == data
            assert data["processor_class"] == "Qwen3VLProcessor"
    assert Preprocessor.from_dir(out, vision) == Preprocessor.from_dir(FIXTURES / name, vision)


@pytest.mark.parametrize("name", VISION)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_vision_weights_equal_the_sanitized_source(converted, name, dtype):
    """Unquantized by default, the patch weight channels-last, every value as the source's
    (cast to the output dtype); in 1 KB chunks too, which split the Conv3d weight by output
    channel."""
    out = converted(name, dtype=dtype, quantize=dtype != "float32")
    expected = sanitized_source(name, getattr(mx, dtype))
    got = {k: v for k, v in tensors(out).items() if k.startswith(PREFIX)}
    assert got.keys() == expected.keys() and len(got) > 20
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert mx.array_equal(got[key], value).item(), key
    assert got[PREFIX + "patch_embed.proj.weight"].shape[-1] == 3  # [D, T, P, P, C]


def test_chunked_vision_conversion_gives_the_same_bytes(converted, tmp_path, monkeypatch):
    monkeypatch.setattr(converter_module, "CHUNK_BYTES", 1024)
    out = tmp_path / "chunked"
    convert(FIXTURES / VISION[1], out, quiet=True, vision_bits=8, group_size=32)
    whole = converted(VISION[1], vision_bits=8, group_size=32)
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_vision_bits_quantize_the_linear_layers_only(converted):
    """8 bits at the recipe's group size: every linear of the tower, exactly mx.quantize of the
    source; the Conv3d patch embedding, the position table and the norms stay in bf16. The
    quantization block names the vision modules (their bits differ from the default 4)."""
    name = VISION[0]  # hidden 32, MLP 64, merged 128: all multiples of 32
    out = converted(name, vision_bits=8, group_size=32)
    got, src = tensors(out), sanitized_source(name, mx.bfloat16)
    quant = json.loads((out / "config.json").read_text())["quantization"]
    linears = [
        k for k in src if k.endswith(".weight") and src[k].ndim == 2 and "pos_embed" not in k
    ]
    assert len(linears) == 2 * 4 + 2
    for key in linears:
        module = key.removesuffix(".weight")
        w, s, b = mx.quantize(src[key], group_size=32, bits=8)
        assert (
            mx.array_equal(got[key], w).item() and mx.array_equal(got[f"{module}.scales"], s).item()
        )
        assert mx.array_equal(got[f"{module}.biases"], b).item(), key
        assert quant[module] == {"group_size": 32, "bits": 8, "mode": "affine"}
    for key in src.keys() - set(linears):
        assert mx.array_equal(got[key], src[key]).item() and got[key].dtype == mx.bfloat16, key
    model = load_model(out, dtype=mx.float32)
    assert isinstance(model.vision_tower.blocks[0].attn.qkv, nn.QuantizedLinear)
    assert isinstance(model.vision_tower.pos_embed, nn.Embedding)


def test_no_vision_writes_a_text_only_model(converted):
    """No tower tensors, no vision_config, no preprocessor files; the text model is the same
    tensor for tensor, and decodes the same tokens."""
    name = VISION[0]
    text_only, full = converted(name, vision=False), converted(name)
    a, b = tensors(text_only), tensors(full)
    assert a.keys() == {k for k in b if not k.startswith(PREFIX)}
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    assert "vision_config" not in json.loads((text_only / "config.json").read_text())
    assert not any((text_only / f).exists() for f in PREPROCESSOR_FILES)
    assert not load_model(text_only).has_vision and load_model(full).has_vision


def test_mlx_vlm_loads_the_float32_and_4bit_conversions(converted):
    """mlx_vlm.load on OUT: its vision tower holds exactly our tensors (no transpose, no
    renaming), its config the source's token ids, and on float32 weights its tower's output on
    two images and a video equals transformers' float64 within 2× transformers' float32 error."""
    import mlx_vlm

    name = VISION[1]
    ref = reference(name)
    for options in ({"quantize": False, "dtype": "float32"}, {}):
        out = converted(name, **options)
        model, _ = mlx_vlm.load(str(out))
        ours = dict(tree_flatten(load_model(out).vision_tower.parameters()))
        theirs = dict(tree_flatten(model.vision_tower.parameters()))
        assert theirs.keys() >= ours.keys()
        for key, value in ours.items():
            assert theirs[key].dtype == value.dtype and mx.array_equal(theirs[key], value).item()
        for key in VISION_TOKEN_KEYS:
            assert getattr(model.config, key) == config(name)[key], key
        if options:  # float32
            patches, grids = tower_inputs(name)
            features, _ = model.vision_tower(patches, mx.array(grids))
            tol = 2 * ref["err_tower_f32"]
            np.testing.assert_allclose(np.array(features), ref["tower_f64"], rtol=0, atol=tol)


# --- bad input ---------------------------------------------------------------------------------


def _vision(edit):
    return lambda s: edit_config(s, lambda c: edit(c["vision_config"]))


BAD = {
    "--vision-bits 7": (None, ["--vision-bits", "7"], "--vision-bits: bits must be one of"),
    "--vision-bits with --no-vision": (
        None,
        ["--vision-bits", "8", "--no-vision"],
        "drop it or --no-vision",
    ),
    "--vision-bits with --no-quantize": (
        None,
        ["--vision-bits", "8", "--no-quantize"],
        "--vision-bits has no effect",
    ),
    "--image-tokens without a plan": (None, ["--image-tokens", "64"], "only with --target"),
    "out_hidden_size": (
        _vision(lambda v: v.update(out_hidden_size=48)),
        [],
        "out_hidden_size 48 differs from the text model's hidden_size 64",
    ),
    "deepstack": (_vision(lambda v: v.update(deepstack_visual_indexes=[0])), [], "DeepStack"),
    "missing token id": (
        lambda s: edit_config(s, lambda c: c.pop("vision_start_token_id")),
        [],
        "lacks vision_start_token_id",
    ),
    "token id beyond the vocabulary": (
        lambda s: edit_config(s, lambda c: c.update(image_token_id=248056)),
        [],
        "image_token_id must be a token id below the vocabulary size 512",
    ),
    "preprocessor patch size": (
        lambda s: (s / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16})),
        [],
        "patch_size 16 differs from the vision tower's 4",
    ),
    "missing vision tensor": (
        lambda s: edit_weights(s, lambda w: w.pop("model.visual.blocks.1.attn.qkv.weight")),
        [],
        "missing tensor for vision_tower.blocks.1.attn.qkv.weight",
    ),
    "vision tensor shape": (
        lambda s: edit_weights(
            s,
            lambda w: w.update({"model.visual.pos_embed.weight": mx.zeros((25, 32), mx.bfloat16)}),
        ),
        [],
        "model.visual.pos_embed.weight has shape (25, 32), expected (16, 32)",
    ),
    "patch weight rank": (
        lambda s: edit_weights(
            s,
            lambda w: w.update(
                {"model.visual.patch_embed.proj.weight": mx.zeros((32, 96), mx.bfloat16)}
            ),
        ),
        [],
        "expected a 5-D Conv3d weight",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_vision_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, case):
    break_source, args, message = BAD[case]
    src = copy_fixture(tmp_path, VISION[0])
    if break_source is not None:
        break_source(src)
    result = run_cli(["--hf-path", str(src), "-o", str(tmp_path / "out"), *args])
    assert_one_line_error(result, message)
    assert_nothing_left(tmp_path, {"src"})


def test_a_broken_vision_config_does_not_stop_a_text_only_conversion(tmp_path):
    src = copy_fixture(tmp_path, VISION[0])
    _vision(lambda v: v.update(out_hidden_size=48))(src)
    result = run_cli(["--hf-path", str(src), "-o", str(tmp_path / "out"), "--no-vision", "--quiet"])
    assert result.exit_code == 0, result.output
    assert not ModelConfig.from_dict(
        json.loads((tmp_path / "out" / "config.json").read_text())
    ).vision
