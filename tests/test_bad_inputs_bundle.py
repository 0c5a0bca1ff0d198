"""Bad checkpoints and bundles through the shared harness (tests/badinput.py), one class of
issue 21's item 8 per table: vision weights the Core ML export cannot hold, numbers of
thousands of digits in options that parse their own strings, vision token ids that clash with
the tokenizer's, preprocessor values out of range, and bundles whose app-read fields were
changed with every hash recomputed. The prepared inputs are test_bad_inputs.py's."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from tests.badinput import Inputs, api, cli, edit_json, run_row, steps
from tests.test_bad_inputs import (
    PRE,
    VIDEO_PRE,
    _preprocessor,
    built,  # noqa: F401 - the module fixture the rows copy their converted inputs from
    edit_manifest,
    rehash,
    verify,
    vis,
    vision,
)

DIGITS = "4" * 5000
QKV = "model.visual.blocks.0.attn.qkv.weight"
BIAS = "model.visual.merger.norm.bias"
NOT_SOURCE = "is not the recorded source's"


def vision_weight(name: str, value: float, first_only: bool = False):
    """A setup: the vision fixture's tensor `name` holding `value` (everywhere, or only in
    its first element)."""

    def setup(i: Inputs) -> None:
        path = i.vision / "model.safetensors"
        w = mx.load(str(path))
        flat = w[name].astype(mx.float32).flatten()
        if first_only:
            flat[0] = value
        else:
            flat = mx.full(flat.shape, value)
        w[name] = flat.reshape(w[name].shape).astype(w[name].dtype)
        mx.save_safetensors(str(path), w, metadata={"format": "pt"})

    return setup


def vision_cfg(**values):
    """A setup: config.json of the vision fixture with `values` set."""
    return edit_json(lambda i: i.vision / "config.json", lambda c: c.update(values))


def vision_pre(name: str, **values):
    """A setup: a preprocessor file of the vision fixture with `values` set."""
    return edit_json(lambda i: i.vision / name, lambda c: c.update(values))


def export(id: str, *args: str, **kw):
    return cli(
        id, "export-coreml", "{vision}", "-o", "{out}.mlpackage", *args, needs=("vision",), **kw
    )


def coreml_bundle(id: str, *args: str, **kw):
    return cli(
        id,
        "bundle",
        "build",
        "{vision}",
        "{out}",
        "--target",
        "iphone15",
        "--vision-encoder",
        "coreml",
        *args,
        needs=("vision",),
        **kw,
    )


def bundle_json(rel: str, **values):
    """A setup: a JSON file of the bundle changed, and its manifest entry rehashed."""

    def setup(i: Inputs) -> None:
        path = i.bundle / rel
        data = json.loads(path.read_text())
        data.update(values)
        path.write_text(json.dumps(data))
        rehash(i, rel)

    return setup


# fmt: off
EXPORT_VALUE_ROWS = [
    export("export-coreml: NaN in a vision weight", "--grids", "4x4",
           setup=vision_weight(QKV, float("nan"), first_only=True),
           message=f"{QKV} holds NaN or infinite values"),
    export("export-coreml: infinity in a vision bias", "--grids", "4x4",
           setup=vision_weight(BIAS, float("inf")), message=f"{BIAS} holds NaN or infinite"),
    export("export-coreml: a value beyond float16", "--grids", "4x4",
           setup=vision_weight(BIAS, 1e5), message="beyond float16's range"),
    coreml_bundle("bundle build --vision-encoder coreml: NaN in a vision weight",
                  "--coreml-grids", "4x4", setup=vision_weight(QKV, float("nan"), first_only=True),
                  message=f"{QKV} holds NaN or infinite values"),
]

DIGIT_ROWS = [
    export("export-coreml: --grids rows of 5,000 digits", "--grids", f"{DIGITS}x4",
           message="rows and cols have at most 6 digits"),
    export("export-coreml: --grids cols of 5,000 digits", "--grids", f"4x4,4x{DIGITS}",
           message="rows and cols have at most 6 digits"),
    export("export-coreml: --grids of 7 digits", "--grids", "4x4000000",
           message="rows and cols have at most 6 digits"),
    cli("plan: --coreml-grids of 5,000 digits", "plan", "--model", "{vision}", "--target",
        "iphone15", "--vision-encoder", "coreml", "--coreml-grids", f"{DIGITS}x4",
        needs=("vision",), message="rows and cols have at most 6 digits"),
    coreml_bundle("bundle build: --coreml-grids of 5,000 digits", "--coreml-grids",
                  f"{DIGITS}x4", message="rows and cols have at most 6 digits"),
    cli("convert --target: --coreml-grids of 5,000 digits", "convert", "--hf-path", "{vision}",
        "--target", "iphone15", "-o", "{out}", "--vision-encoder", "coreml", "--coreml-grids",
        f"4x{DIGITS}", needs=("vision",), message="rows and cols have at most 6 digits"),
    cli("plan: --memory-budget of 5,000 digits", "plan", "--size", "micro", "--memory-budget",
        f"{DIGITS}GB", needs=(), message="at most 10 TB"),
    cli("plan: --memory-budget 1e400GB", "plan", "--size", "micro", "--memory-budget",
        "1e400GB", needs=(), message="not a memory size"),
    cli("plan: --context of 5,000 digits", "plan", "--size", "micro", "--target", "iphone15",
        "--context", DIGITS, needs=(), message="--context"),
    cli("serve: --prompt-cache-size of 5,000 digits", "serve", "--size", "micro",
        "--prompt-cache-size", f"{DIGITS}MB", needs=(), message="at most 10 TB"),
]

TOKEN_ID_ROWS = [
    cli("vision tokens: vision_start the eos id (info)", "info", "{vision}", needs=("vision",),
        setup=vision_cfg(vision_start_token_id=442), message="is also the eos_token_id"),
    cli("vision tokens: image the pad id (plan)", "plan", "--model", "{vision}", "--target",
        "iphone15", needs=("vision",), setup=vision_cfg(pad_token_id=452),
        message="image_token_id 452 is also the pad_token_id"),
    cli("vision tokens: vision_end im_start (convert)", "convert", "--hf-path", "{vision}",
        "-o", "{out}", needs=("vision",), setup=vision_cfg(vision_end_token_id=441),
        message="vision_end_token_id 441 is the id of <|im_start|>"),
    api("vision tokens: video endoftext (load)", lambda i: _load_vision(i), needs=("vision",),
        setup=vision_cfg(video_token_id=440), message="is the id of <|endoftext|>"),
    cli("vision tokens: image not its token's id (generate)", "generate", "--model", "{vision}",
        "--prompt", "hi", needs=("vision",), setup=vision_cfg(image_token_id=451),
        message="is not <|image_pad|>'s id 452"),
    cli("vision tokens: generation_config's eos (bundle build)", "bundle", "build", "{vision}",
        "{out}", "--target", "iphone15", needs=("vision",), setup=edit_json(
            lambda i: i.vision / "generation_config.json",
            lambda g: g.update(eos_token_id=[449])),
        message="vision_start_token_id 449 is the id of generation_config.json's eos_token_id"),
]

PREPROCESSOR_ROWS = [
    *(api(f"preprocessor: {what}", _preprocessor, needs=(), setup=vision(edit_json(
        vis(name), lambda c, v=values: c.update(v))), message=message)
      for what, name, values, message in [
          ("rescale_factor 1e300", PRE, {"rescale_factor": 1e300}, "rescale_factor"),
          ("rescale_factor 1.5", PRE, {"rescale_factor": 1.5}, "rescale_factor"),
          ("image_std 1e-300", PRE, {"image_std": [1e-300, 0.5, 0.5]}, "image_std"),
          ("image_std 0", PRE, {"image_std": [0, 0.5, 0.5]}, "image_std"),
          ("image_std 1e300", PRE, {"image_std": [0.5, 0.5, 1e300]}, "image_std"),
          ("image_mean -3", PRE, {"image_mean": [-3, 0.5, 0.5]}, "image_mean"),
          ("image_mean 4 values", PRE, {"image_mean": [0.5] * 4}, "image_mean needs 3"),
          ("do_rescale false", PRE, {"do_rescale": False}, "do_rescale"),
          ("do_resize null", PRE, {"do_resize": None}, "do_resize"),
          ("resample nearest", PRE, {"resample": 0}, "resample 0"),
          ("resample a string", PRE, {"resample": "bicubic"}, "resample 'bicubic'"),
          ("patch_size a string", PRE, {"patch_size": "4"}, "patch_size '4' differs"),
          ("temporal_patch_size 10^30", PRE, {"temporal_patch_size": 10**30},
           "temporal_patch_size an integer of more than 19 digits differs"),
          ("video rescale_factor 1e300", VIDEO_PRE, {"rescale_factor": 1e300}, "rescale_factor"),
          ("video std unlike the image's", VIDEO_PRE, {"image_std": [0.25, 0.25, 0.25]},
           "must be those of preprocessor_config.json"),
          ("video do_normalize false", VIDEO_PRE, {"do_normalize": False}, "do_normalize"),
          ("video fps 10^6", VIDEO_PRE, {"fps": 10**6}, "fps"),
      ]),
    cli("preprocessor through generate: rescale_factor 1e300", "generate", "--model",
        "{vision}", "--prompt", "hi", "--image", "{vision}/image0.png", needs=("vision",),
        setup=vision_pre(PRE, rescale_factor=1e300), message="rescale_factor"),
    cli("preprocessor through convert: image_std 1e-300", "convert", "--hf-path", "{vision}",
        "-o", "{out}", needs=("vision",), setup=vision_pre(PRE, image_std=[1e-300, 1, 1]),
        message="image_std"),
    export("preprocessor through export-coreml: image_mean 255", "--grids", "4x4",
           setup=vision_pre(PRE, image_mean=[255, 255, 255]), message="image_mean"),
]

VERIFY_FIELD_ROWS = [
    verify("verify: image_token_id changed, rehashed",
           bundle_json("model/config.json", image_token_id=451), "is not <|image_pad|>'s id"),
    verify("verify: vision_start the eos id, rehashed",
           bundle_json("model/config.json", vision_start_token_id=442),
           "vision_start_token_id 442 is the id of <|im_end|>"),
    verify("verify: config.json eos changed, rehashed",
           bundle_json("model/config.json", eos_token_id=[441]),
           f"model/config.json: eos_token_id {NOT_SOURCE}"),
    verify("verify: text_config changed, rehashed", bundle_json(
        "model/config.json", text_config={"vocab_size": 512}),
        f"model/config.json: text_config {NOT_SOURCE}"),
    verify("verify: generation_config eos changed, rehashed",
           bundle_json("model/generation_config.json", eos_token_id=[440]),
           f"model/generation_config.json {NOT_SOURCE}"),
    verify("verify: tokenizer_config changed, rehashed",
           bundle_json("model/tokenizer_config.json", eos_token="<|endoftext|>"),
           f"model/tokenizer_config.json {NOT_SOURCE}"),
    verify("verify: the drafter's tokenizer_config changed, rehashed",
           bundle_json("mtp/tokenizer_config.json", eos_token="<|endoftext|>"),
           f"mtp/tokenizer_config.json {NOT_SOURCE}"),
    verify("verify: chat template changed, rehashed", steps(
        lambda i: (i.bundle / "model" / "chat_template.jinja").write_text("{{ messages }}"),
        lambda i: rehash(i, "model/chat_template.jinja")),
        f"model/chat_template.jinja {NOT_SOURCE}"),
    verify("verify: the source is another checkpoint", edit_manifest(
        lambda m: m["source"].update(path=m["source"]["path"].replace("tiny_tied",
                                                                      "tiny_vision_p4"))),
        NOT_SOURCE),
]
# fmt: on


def _load_vision(i: Inputs):
    from mlxkit.load import load_model

    return load_model(i.vision)


ROWS = EXPORT_VALUE_ROWS + DIGIT_ROWS + TOKEN_ID_ROWS + PREPROCESSOR_ROWS + VERIFY_FIELD_ROWS


def test_every_class_has_rows():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)) and len(ids) >= 45, len(ids)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row, tmp_path, monkeypatch, built):  # noqa: F811 - the imported fixture
    run_row(row, tmp_path, monkeypatch, built)
