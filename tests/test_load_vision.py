"""mlxkit.load with the vision tower: every layout (Hugging Face, converted, quantized, bundle)
loads it, lazily, under the loader's strict checks; a text-only checkpoint loads as before;
`mlxkit info` shows the tower; broken vision inputs are one clear line."""

from __future__ import annotations

import json
import math
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlxkit.checkpoint import read_headers, weight_files
from mlxkit.cli import main
from mlxkit.errors import CheckpointError, MlxkitError
from mlxkit.generate import stream_generate
from mlxkit.load import load, load_model
from mlxkit.models.qwen3_5_vision import PREFIX, VisionModel
from mlxkit.vision import Preprocessor, VisionTokens
from tests.helpers import FIXTURES, conversions, reference
from tests.vision_helpers import VISION, config, load_tower, tower_inputs, tower_weights


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return conversions(tmp_path_factory)


@pytest.mark.parametrize("name", VISION)
def test_every_layout_loads_the_tower(converted, name):
    """Hugging Face layout, converted float32, converted 4-bit with an 8-bit tower: the tower is
    `model.vision_tower` with the checkpoint's weights, the token ids and preprocessor are
    config.json's and preprocessor_config.json's; its output equals the reference tower's."""
    src = FIXTURES / name
    ref = reference(name)
    for path, dtype in (
        (src, mx.float32),
        (converted(name, quantize=False, dtype="float32"), None),
    ):
        model = load_model(path, dtype=dtype)
        assert model.has_vision and isinstance(model.vision_tower, VisionModel)
        params = dict(tree_flatten(model.vision_tower.parameters()))
        assert {PREFIX + k for k in params} == set(tower_weights(name))
        for key, value in params.items():
            assert mx.array_equal(value, tower_weights(name)[PREFIX + key]).item(), key
        assert model.vision_tokens == VisionTokens.from_config(config(name))
        assert model.preprocessor == Preprocessor.from_dir(src, model.vision_tower.config)
        out = np.array(model.vision_tower(*tower_inputs(name)))
        assert np.abs(out - ref["tower_f64"]).max() <= 2 * ref["err_tower_f32"]
    quantized = load_model(converted(name, vision_bits=8, group_size=32))
    assert quantized.has_vision and quantized.preprocessor is not None


def test_a_text_only_checkpoint_loads_as_before(converted):
    """No tower, no token ids, no preprocessor; its greedy tokens equal those of the same
    model loaded with its tower (the text weights are the same)."""
    name = VISION[0]
    text_only, with_tower = converted(name, vision=False), converted(name)
    m, tok = load(text_only)
    assert not m.has_vision and m.vision_tokens is None and m.preprocessor is None
    assert "vision_tower" not in m
    prompt = [int(t) for t in reference("tiny_tied")["tokens"][:12]]

    def greedy(model, tokenizer):
        tokenizer._eos_token_ids = []
        return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=16)]

    assert greedy(m, tok) == greedy(*load(with_tower))


def test_the_tower_stays_lazy_through_a_text_generation():
    """Loading maps the weights without reading them, and a text prompt never reads the
    tower's: evaluating them afterwards allocates at least their bytes (and the HF layout's
    transposed patch weight once more)."""
    model, tokenizer = load(FIXTURES / VISION[1])
    tokenizer._eos_token_ids = []
    for _ in stream_generate(model, tokenizer, [3, 5, 7, 9], max_tokens=4):
        pass
    tower = [p for _, p in tree_flatten(model.vision_tower.parameters())]
    before = mx.get_active_memory()
    mx.eval(tower)
    nbytes = sum(p.nbytes for p in tower)
    patch = model.vision_tower.patch_embed.proj.weight.nbytes
    assert nbytes <= mx.get_active_memory() - before <= nbytes + 2 * patch and nbytes > 500_000


def _copy(tmp_path, name=VISION[0]):
    return shutil.copytree(FIXTURES / name, tmp_path / name)


def _edit_config(d, edit):
    c = json.loads((d / "config.json").read_text())
    edit(c)
    (d / "config.json").write_text(json.dumps(c))


def _edit_weights(d, edit):
    path = d / "model.safetensors"
    w = mx.load(str(path))
    edit(w)
    mx.save_safetensors(str(path), w)


BROKEN = {
    "out_hidden_size": (
        lambda d: _edit_config(d, lambda c: c["vision_config"].update(out_hidden_size=32)),
        "config.json: vision_config.out_hidden_size 32 differs from the text model's hidden_size",
    ),
    "missing token id": (
        lambda d: _edit_config(d, lambda c: c.pop("video_token_id")),
        "lacks video_token_id",
    ),
    "token id is a string": (
        lambda d: _edit_config(d, lambda c: c.update(image_token_id="452")),
        "image_token_id must be a token id below the vocabulary size 512 (got '452')",
    ),
    "missing tower tensor": (
        lambda d: _edit_weights(d, lambda w: w.pop("model.visual.merger.norm.bias")),
        "missing tensor vision_tower.merger.norm.bias",
    ),
    "tower tensor shape": (
        lambda d: _edit_weights(
            d, lambda w: w.update({"model.visual.merger.norm.bias": mx.zeros((7,), mx.bfloat16)})
        ),
        "tensor model.visual.merger.norm.bias has shape (7,), expected (32,)",
    ),
    "preprocessor disagrees": (
        lambda d: (d / "preprocessor_config.json").write_text('{"merge_size": 3}'),
        "merge_size 3 differs from the vision tower's 2",
    ),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_broken_vision_inputs_are_one_line(tmp_path, case):
    edit, message = BROKEN[case]
    d = _copy(tmp_path)
    edit(d)
    with pytest.raises(MlxkitError) as e:
        load_model(d)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_tower_tensors_without_a_vision_config_are_an_error(converted, tmp_path):
    d = shutil.copytree(converted(VISION[0], vision=False), tmp_path / "text")
    first = next(iter(weight_files(d)))
    w = dict(mx.load(str(first)))
    w["vision_tower.pos_embed.weight"] = mx.zeros((16, 32))
    mx.save_safetensors(str(first), w, metadata={"format": "mlx"})
    with pytest.raises(CheckpointError, match="belongs to a vision tower, but .*no vision_config"):
        load_model(d)


def test_info_shows_the_tower_parameters_and_bytes(converted):
    """The tower's line and its part: the source's parameter count, unquantized or 8-bit, with
    the bytes the safetensors headers say."""
    name = VISION[0]
    params = sum(math.prod(v.shape) for v in tower_weights(name).values())
    assert params == sum(math.prod(p.shape) for _, p in tree_flatten(load_tower(name).parameters()))
    for path in (FIXTURES / name, converted(name, vision_bits=8, group_size=32)):
        result = CliRunner().invoke(main, ["info", str(path)])
        assert result.exit_code == 0, result.output
        assert (
            "image encoder (vision tower): depth 2, hidden 32, 2 heads (head dim 16), patch 4, merge 2"
            in (result.output)
        )
        assert "token ids 452/453/449/450" in result.output
        nbytes = sum(
            i.nbytes
            for n, i in read_headers(weight_files(path)).items()
            if n.startswith(("model.visual.", "vision_tower."))
        )
        line = next(
            ln
            for ln in result.output.splitlines()
            if ln.strip().startswith("vision ") and "bytes" in ln
        )
        assert f"{params:,}" in line and f"{nbytes:,} bytes" in line


def test_info_on_a_broken_vision_config_exits_2(tmp_path):
    d = _copy(tmp_path)
    _edit_config(d, lambda c: c["vision_config"].update(num_heads=5))
    result = CliRunner().invoke(main, ["info", str(d)])
    assert result.exit_code == 2 and "vision_config.hidden_size / num_heads" in result.stderr


def _edit_preprocessor(d, name, **values):
    path = d / name
    c = json.loads(path.read_text())
    c.update(values)
    path.write_text(json.dumps(c))


IMAGE_PRE, VIDEO_PRE = "preprocessor_config.json", "video_preprocessor_config.json"
INSANE_PREPROCESSOR = {  # file, values, the one line naming the field
    "rescale_factor 1e300": (IMAGE_PRE, {"rescale_factor": 1e300}, "rescale_factor"),
    "rescale_factor 2": (IMAGE_PRE, {"rescale_factor": 2}, "rescale_factor"),
    "image_std 1e-300": (IMAGE_PRE, {"image_std": [1e-300, 0.5, 0.5]}, "image_std"),
    "image_std 1e300": (IMAGE_PRE, {"image_std": [0.5, 1e300, 0.5]}, "image_std"),
    "image_std negative": (IMAGE_PRE, {"image_std": [0.5, 0.5, -0.5]}, "image_std"),
    "image_mean 255": (IMAGE_PRE, {"image_mean": [255, 255, 255]}, "image_mean"),
    "image_mean two values": (IMAGE_PRE, {"image_mean": [0.5, 0.5]}, "image_mean needs 3"),
    "do_normalize false": (IMAGE_PRE, {"do_normalize": False}, "do_normalize"),
    "do_rescale a string": (IMAGE_PRE, {"do_rescale": "yes"}, "do_rescale"),
    "resample bilinear": (IMAGE_PRE, {"resample": 2}, "resample 2"),
    "patch_size a float": (IMAGE_PRE, {"patch_size": 4.5}, "patch_size 4.5"),
    "video std 1e-300": (VIDEO_PRE, {"image_std": [1e-300, 0.5, 0.5]}, "image_std"),
    "video mean unlike the image's": (
        VIDEO_PRE,
        {"image_mean": [0.4, 0.5, 0.5]},
        "must be those of preprocessor_config.json",
    ),
    "video fps 1e9": (VIDEO_PRE, {"fps": 1e9}, "fps"),
}


@pytest.mark.parametrize("case", INSANE_PREPROCESSOR, ids=list(INSANE_PREPROCESSOR))
def test_a_preprocessor_value_out_of_range_is_refused_at_load(tmp_path, case):
    """A preprocessor file whose values parse but make no sense (a rescale of 1e300, a std of
    1e-300) loaded before, and the tower then saw infinities: generation blamed the weights."""
    name, values, message = INSANE_PREPROCESSOR[case]
    d = _copy(tmp_path)
    _edit_preprocessor(d, name, **values)
    with pytest.raises(MlxkitError) as e:
        load_model(d)
    assert message in str(e.value) and name in str(e.value) and "\n" not in str(e.value)


def test_preprocessor_values_in_range_still_load(tmp_path):
    """CLIP's normalization and a 16-bit rescale are within the bounds."""
    d = _copy(tmp_path)
    clip = {"image_mean": [0.481, 0.458, 0.408], "image_std": [0.269, 0.261, 0.276]}
    for name in (IMAGE_PRE, VIDEO_PRE):
        _edit_preprocessor(d, name, rescale_factor=1 / 65535, **clip)
    pre = load_model(d).preprocessor
    assert pre.image_mean == (0.481, 0.458, 0.408) and pre.rescale_factor == 1 / 65535


CLASHING_TOKEN_IDS = {  # config.json edit, the one line (tiny tokenizer: 440 endoftext,
    # 441 im_start, 442 im_end and the text eos, 449/450 vision start/end, 452/453 pads)
    "vision_start is the eos id": (
        {"vision_start_token_id": 442},
        "vision_start_token_id 442 is also the eos_token_id",
    ),
    "image pad is the config's pad id": (
        {"pad_token_id": 452},
        "image_token_id 452 is also the pad_token_id",
    ),
    "vision_start is im_start": (
        {"vision_start_token_id": 441},
        "vision_start_token_id 441 is the id of <|im_start|>",
    ),
    "vision_end is endoftext": (
        {"vision_end_token_id": 440},
        "vision_end_token_id 440 is the id of <|endoftext|>",
    ),
    "image pad is another token's id": (
        {"image_token_id": 451},
        "image_token_id 451 is not <|image_pad|>'s id 452 in tokenizer.json",
    ),
    "start and end swapped": (
        {"vision_start_token_id": 450, "vision_end_token_id": 449},
        "vision_start_token_id 450 is not <|vision_start|>'s id 449",
    ),
}


@pytest.mark.parametrize("case", CLASHING_TOKEN_IDS, ids=list(CLASHING_TOKEN_IDS))
def test_vision_token_ids_clashing_with_the_tokenizer_are_refused(tmp_path, case):
    """Distinct and inside the vocabulary is not enough: a vision id that is also the eos, the
    pad or a chat token, or is not the id of its own token in tokenizer.json, loaded before
    and broke every prompt with an image. Load and convert refuse it in one line."""
    from mlxkit.convert import convert

    values, message = CLASHING_TOKEN_IDS[case]
    d = _copy(tmp_path)
    _edit_config(d, lambda c: c.update(values))
    for run in (lambda: load_model(d), lambda: convert(d, tmp_path / "out", quiet=True)):
        with pytest.raises(MlxkitError) as e:
            run()
        assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
