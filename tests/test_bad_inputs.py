"""Bad inputs through every command and the API: each ends as one line and exit 2 (1 for a
bundle that fails verification), leaves nothing behind and touches none of its inputs. The
harness is tests/badinput.py; a new case is one more row in a table here."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlxkit.errors import MlxkitError
from mlxkit.models.qwen3_5 import TextConfig
from tests.badinput import (
    Inputs,
    api,
    cli,
    edit_header,
    edit_json,
    fifo,
    read_safetensors,
    run_row,
    safetensors_bytes,
    steps,
    symlink_loop,
    write_bytes,
)
from tests.helpers import FIXTURES

DEL = object()
A = "model.language_model.layers.0.linear_attn.A_log"  # F32 [4] at bytes [0, 16)
N = "model.language_model.layers.0.linear_attn.norm.weight"  # F32 [32] at [16, 144)
EMBED = "model.language_model.embed_tokens.weight"


def config(i: Inputs) -> Path:
    return i.src / "config.json"


def shard(i: Inputs) -> Path:
    return i.src / "model.safetensors"


def index(i: Inputs) -> Path:
    return i.src / "model.safetensors.index.json"


def manifest(i: Inputs) -> Path:
    return i.bundle / "manifest.json"


def text(**values) -> object:
    """Sets (or with DEL removes) text_config fields of src/config.json."""

    def edit(c: dict) -> None:
        for k, v in values.items():
            if v is DEL:
                c["text_config"].pop(k, None)
            else:
                c["text_config"][k] = v

    return edit_json(config, edit)


def vision_config(**values) -> object:
    """Sets vision_config fields of src/config.json."""
    return edit_json(config, lambda c: c["vision_config"].update(values))


def raw_config(make) -> object:
    """config.json rewritten as text by make(the parsed config)."""

    def setup(i: Inputs) -> None:
        c = json.loads(config(i).read_text())
        config(i).write_text(make(c))

    return setup


def header(edit) -> object:
    return edit_header(shard, edit)


def shift_all(h: dict, by: int) -> None:
    for k, v in h.items():
        if k != "__metadata__":
            v["data_offsets"] = [o + by for o in v["data_offsets"]]


def weight_index(weight_map: object = None, raw: str | None = None) -> object:
    """Writes src/model.safetensors.index.json."""

    def setup(i: Inputs) -> None:
        if raw is not None:
            index(i).write_text(raw)
            return
        wm = weight_map
        if callable(wm):
            names = [k for k in read_safetensors(shard(i))[0] if k != "__metadata__"]
            wm = {n: wm(i) for n in names}
        index(i).write_text(json.dumps({"metadata": {}, "weight_map": wm}))

    return setup


def weights(edit) -> object:
    def setup(i: Inputs) -> None:
        w = mx.load(str(shard(i)))
        edit(w)
        mx.save_safetensors(str(shard(i)), w, metadata={"format": "pt"})

    return setup


def outside_shard(i: Inputs) -> None:
    (i.root / "elsewhere").mkdir()
    shutil.copy(shard(i), i.root / "elsewhere" / "model.safetensors")


def int16_norm(i: Inputs) -> None:
    """An input norm of the converted model stored as int16."""
    path = i.converted / "model.safetensors"
    w = mx.load(str(path))
    name = next(k for k in w if k.endswith("input_layernorm.weight"))
    w[name] = w[name].astype(mx.int16)
    mx.save_safetensors(str(path), w, metadata={"format": "mlx"})


def overlap_second(h: dict, data: bytes) -> None:
    """The second tensor of a header starts inside the first."""
    second = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])[1]
    start, end = h[second]["data_offsets"]
    h[second]["data_offsets"] = [start - 2, end - 2]


def converted_config(edit) -> object:
    return edit_json(lambda i: i.converted / "config.json", edit)


def edit_manifest(edit) -> object:
    return edit_json(manifest, edit)


def listed(entry: dict) -> object:
    return edit_manifest(lambda m: m["files"].append(entry))


def entry(path: str) -> dict:
    return {"path": path, "bytes": 1, "sha256": "0" * 64}


def rehash(i: Inputs, rel: str) -> None:
    """Updates the manifest entry of `rel` to the file's new size and sha256, so that only
    the check under test can see the change."""
    from mlxkit.bundle_files import sha256_file

    m = json.loads(manifest(i).read_text())
    for e in m["files"]:
        if e["path"] == rel:
            e["bytes"] = (i.bundle / rel).stat().st_size
            e["sha256"] = sha256_file(i.bundle / rel)
    manifest(i).write_text(json.dumps(m))


def bundle_tensor_dtype(i: Inputs) -> None:
    """A norm of model/ stored as F16 where the plan says BF16 (same byte count)."""
    path = i.bundle / "model" / "model.safetensors"
    h, data = read_safetensors(path)
    name = next(k for k, v in h.items() if k.endswith("input_layernorm.weight"))
    h[name]["dtype"] = "F16"
    path.write_bytes(safetensors_bytes(h, data))
    rehash(i, "model/model.safetensors")


def edit_plist(rel: str, edit) -> object:
    """A setup that edits a plist of the bundle in place."""
    import plistlib

    def setup(i: Inputs) -> None:
        path = i.bundle / rel
        data = plistlib.loads(path.read_bytes())
        edit(data)
        path.write_bytes(plistlib.dumps(data))

    return setup


def bundle_file(rel: str, make) -> object:
    def setup(i: Inputs) -> None:
        make(i.bundle / rel)

    return setup


def truncate_bundle_weights(i: Inputs) -> None:
    path = i.bundle / "model" / "model.safetensors"
    os.truncate(path, path.stat().st_size - 8)


def flip_bundle_byte(i: Inputs) -> None:
    path = i.bundle / "model" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def user_folder(i: Inputs) -> None:
    i.out.mkdir()
    (i.out / "notes.txt").write_text("mine")


def home(i: Inputs) -> None:
    (i.root / "home").mkdir()
    (i.root / "home" / "notes.txt").write_text("mine")


def converted_plus_user_file(i: Inputs) -> None:
    shutil.copytree(i.converted, i.out)
    (i.out / "notes.txt").write_text("mine")


def bundle_plus_user_file(i: Inputs) -> None:
    shutil.copytree(i.bundle, i.out)
    (i.out / "xcode" / "notes.txt").write_text("mine")


def a_file(name: str) -> object:
    return lambda i: (i.root / name).write_text("a file")


def info(id: str, setup, message: str, **kw):
    return cli(id, "info", "{src}", setup=setup, message=message, **kw)


def convert(id: str, *args: str, **kw):
    return cli(id, "convert", "--hf-path", "{src}", "-o", "{out}", *args, **kw)


def to_bundle(id: str, *args: str, **kw):
    return cli(id, "convert", "--hf-path", "{src}", "--target", "iphone12", *args, **kw)


def build(id: str, *args: str, **kw):
    return cli(id, "bundle", "build", "{src}", "{out}", "--target", "iphone12", *args, **kw)


def plan(id: str, *args: str, **kw):
    return cli(id, "plan", *args, **kw)


def verify(id: str, setup, message: str, *args: str, code: int = 1, **kw):
    return cli(
        id,
        "bundle",
        "verify",
        "{bundle}",
        "--no-load",
        *args,
        setup=setup,
        message=message,
        code=code,
        needs=("bundle",),
        **kw,
    )


NINES = "9" * 400
WORK = "{root}/work"  # a current directory apart from the inputs
REPLAN = "manifest matches a re-plan"

# fmt: off
CONFIG_ROWS = [
    info("config: a list", write_bytes(config, "[1, 2]"), "not a JSON object"),
    info("config: a number", write_bytes(config, "7"), "not a JSON object"),
    info("config: a string", write_bytes(config, '"qwen"'), "not a JSON object"),
    info("config: empty", write_bytes(config, ""), "not valid JSON"),
    info("config: not UTF-8", write_bytes(config, b'{"a": "\xff\xfe"}'), "not UTF-8"),
    info("config: nested 100,000 deep", write_bytes(config, "[" * 100_000 + "]" * 100_000),
         "nested too deeply"),
    info("config: a 5,000-digit integer", raw_config(lambda c: json.dumps(c).replace(
        '"hidden_size": 64', '"hidden_size": ' + "7" * 5000)), "not valid JSON"),
    info("config: NaN", raw_config(lambda c: json.dumps(c).replace("1e-06", "NaN")),
         "not valid JSON"),
    info("config: a directory", lambda i: (config(i).unlink(), config(i).mkdir()), "a directory"),
    info("config: a symlink loop", symlink_loop(config), "symlink loop"),
    info("config: a character device", lambda i: (config(i).unlink(),
         config(i).symlink_to("/dev/zero")), "outside the model directory"),
    info("config: 70 MB", lambda i: os.truncate(config(i), 70 << 20), "too large"),
    info("config: missing", lambda i: config(i).unlink(), "no config.json"),
    info("config: text_config a string", edit_json(config, lambda c: c.update(text_config="x")),
         "text_config: expected a JSON object"),
    info("config: text_config a list", edit_json(config, lambda c: c.update(text_config=[1])),
         "text_config: expected a JSON object"),
    info("config: text_config null", edit_json(config, lambda c: c.update(text_config=None)),
         "text_config"),
    info("config: model_type missing", edit_json(config, lambda c: c.pop("model_type")),
         "not a Qwen 3.5 dense model"),
    info("config: model_type a number", edit_json(config, lambda c: c.update(model_type=3)),
         "model_type 3"),
    info("config: hidden_size 0", text(hidden_size=0), "hidden_size"),
    info("config: hidden_size -64", text(hidden_size=-64), "hidden_size"),
    info("config: hidden_size a string", text(hidden_size="64"),
         "hidden_size: expected an integer"),
    info("config: hidden_size a float", text(hidden_size=64.0), "hidden_size: expected an integer"),
    info("config: hidden_size true", text(hidden_size=True), "hidden_size: expected an integer"),
    info("config: hidden_size null", text(hidden_size=None), "lacks the text-model field"),
    info("config: hidden_size 100,000", text(hidden_size=100_000), "hidden_size"),
    info("config: num_attention_heads 0", text(num_attention_heads=0), "num_attention_heads"),
    info("config: 5,000 attention heads", text(num_attention_heads=5000), "num_attention_heads"),
    info("config: num_key_value_heads 0", text(num_key_value_heads=0), "num_key_value_heads"),
    info("config: heads not a multiple of kv heads", text(num_key_value_heads=3),
         "multiple of num_key_value_heads"),
    info("config: head_dim 0", text(head_dim=0), "head_dim"),
    info("config: odd rotary dims", text(head_dim=6), "rotary"),
    info("config: 10^9 layers", text(num_hidden_layers=10**9), "num_hidden_layers"),
    info("config: 10^9 layers, no layer_types", text(num_hidden_layers=10**9, layer_types=DEL),
         "num_hidden_layers"),
    info("config: 0 layers", text(num_hidden_layers=0), "num_hidden_layers"),
    info("config: layer_types too long", text(layer_types=["linear_attention"] * 5),
         "layer_types has 5 entries"),
    info("config: unknown layer type", text(layer_types=["moe"] * 4), "layer_types[0]"),
    info("config: layer_types a string", text(layer_types="full_attention"), "layer_types"),
    info("config: layer_types numbers", text(layer_types=[1, 2, 3, 4]), "layer_types[0]"),
    info("config: full_attention_interval 0", text(layer_types=DEL, full_attention_interval=0),
         "full_attention_interval"),
    info("config: vocab 10^12", text(vocab_size=10**12), "vocab_size"),
    info("config: vocab 0", text(vocab_size=0), "vocab_size"),
    info("config: vocab missing", text(vocab_size=DEL), "'vocab_size'"),
    info("config: intermediate -1", text(intermediate_size=-1), "intermediate_size"),
    info("config: mtp layers -1", text(mtp_num_hidden_layers=-1), "mtp_num_hidden_layers"),
    info("config: mtp layers a string", text(mtp_num_hidden_layers="1"), "mtp_num_hidden_layers"),
    info("config: mtp layers 10^6", text(mtp_num_hidden_layers=10**6), "mtp_num_hidden_layers"),
    info("config: rms_norm_eps negative", text(rms_norm_eps=-1e-6), "rms_norm_eps"),
    info("config: rms_norm_eps a string", text(rms_norm_eps="1e-6"), "rms_norm_eps"),
    info("config: rope_parameters a list", text(rope_parameters=[1]), "rope_parameters"),
    info("config: rope_theta 0", text(rope_parameters={"rope_theta": 0}), "rope_theta"),
    info("config: rope_theta a string", text(rope_parameters={"rope_theta": "big"}), "rope_theta"),
    info("config: rope_theta 1e999", raw_config(lambda c: json.dumps(c).replace(
        '"rope_theta": 10000.0', '"rope_theta": 1e999')), "rope_theta"),
    info("config: rotary factor 2", text(rope_parameters={"partial_rotary_factor": 2}),
         "partial_rotary_factor"),
    info("config: rotary factor 0", text(rope_parameters={"partial_rotary_factor": 0}),
         "partial_rotary_factor"),
    info("config: max positions 0", text(max_position_embeddings=0), "max_position_embeddings"),
    info("config: max positions 10^30", text(max_position_embeddings=10**30),
         "max_position_embeddings"),
    info("config: tie_word_embeddings 'yes'", text(tie_word_embeddings="yes"),
         "tie_word_embeddings"),
    info("config: eos a string", text(eos_token_id="x"), "eos_token_id"),
    info("config: eos a float", text(eos_token_id=[1.5]), "eos_token_id"),
    info("config: eos -1", text(eos_token_id=-1), "eos_token_id"),
    info("config: eos beyond the vocabulary", text(eos_token_id=10**6), "eos_token_id"),
    info("config: linear value heads not a multiple", text(linear_num_value_heads=3),
         "linear_num_value_heads"),
    info("config: conv kernel 0", text(linear_conv_kernel_dim=0), "linear_conv_kernel_dim"),
    info("config: linear key head dim 0", text(linear_key_head_dim=0), "linear_key_head_dim"),
    info("config: mixture of experts", text(num_experts=8), "mixture-of-experts"),
    convert("config through convert: hidden 0", setup=text(hidden_size=0), message="hidden_size"),
    plan("config through plan: 10^9 layers", "--model", "{src}", "--target", "iphone12",
         setup=text(num_hidden_layers=10**9), message="num_hidden_layers"),
    plan("config through plan: a list", "--model", "{src}", "--target", "iphone12",
         setup=write_bytes(config, "[]"), message="not a JSON object"),
    cli("config through generate: heads 0", "generate", "--model", "{src}", "--prompt", "hi",
        setup=text(num_attention_heads=0), message="num_attention_heads"),
    build("config through bundle build: mtp -1", setup=text(mtp_num_hidden_layers=-1),
          message="mtp_num_hidden_layers"),
    info("config: FIFO", fifo(config), "not a regular file", subprocess=True),
    info("vision_config: depth 10^9", vision_config(depth=10**9), "depth must be a positive"),
    api("vision_config through load: depth 10^9", lambda i: _api_load(i),
        setup=vision_config(depth=10**9),
        message="depth must be a positive"),
    plan("vision_config through plan: depth 10^9", "--model", "{src}", "--target", "iphone12",
         setup=vision_config(depth=10**9), message="depth must be a positive"),
    info("vision_config: 10^12 position embeddings", vision_config(
        num_position_embeddings=10**12), "num_position_embeddings"),
    plan("vision_config through plan: 10^12 position embeddings", "--model", "{src}",
         "--target", "iphone12", setup=vision_config(num_position_embeddings=10**12),
         message="num_position_embeddings"),
    info("vision_config: hidden_size 10^7", vision_config(hidden_size=10**7), "hidden_size"),
    info("vision_config: rope_theta a string", vision_config(rope_parameters={
        "rope_theta": "x"}), "rope_theta"),
    convert("vision_config through convert: rope_theta 0", setup=vision_config(
        rope_parameters={"rope_theta": 0}), message="rope_theta"),
    info("vision tokens: image and video the same", edit_json(config, lambda c: c.update(
        video_token_id=c["image_token_id"])), "four different tokens"),
]

HEADER_ROWS = [
    info("header: a list", header(lambda h, d: b"[1, 2]"), "not a JSON object"),
    info("header: nested 100,000 deep", header(
        lambda h, d: b'{"a":' * 100_000 + b"1" + b"}" * 100_000), "nested too deeply"),
    info("header: not JSON", header(lambda h, d: b"{garbage"), "not valid JSON"),
    info("header: not UTF-8", header(lambda h, d: b'{"\xff": 1}'), "not valid JSON"),
    info("header: NaN in a shape", header(
        lambda h, d: json.dumps(h).replace('"shape": [4]', '"shape": [NaN]', 1).encode()),
        "not valid JSON"),
    info("header: string offsets", header(lambda h, d: h[A].update(data_offsets=["0", "16"])),
         "data_offsets"),
    info("header: list dtype", header(lambda h, d: h[A].update(dtype=["F32"])), "unknown dtype"),
    info("header: unknown dtype", header(lambda h, d: h[A].update(dtype="F128")), "F128"),
    info("header: negative shape", header(lambda h, d: h[A].update(shape=[-4])), "shape"),
    info("header: float shape", header(lambda h, d: h[A].update(shape=[4.0])), "shape"),
    info("header: bool in shape", header(lambda h, d: h[A].update(shape=[4, True])), "shape"),
    info("header: dimension 2^40", header(lambda h, d: h.update(
        {"model.language_model.x": {"dtype": "F32", "shape": [0, 2**40],
                                    "data_offsets": [len(d), len(d)]}})), "shape"),
    info("header: negative offsets", header(lambda h, d: h[A].update(data_offsets=[-16, 0])),
         "data_offsets"),
    info("header: offsets 1e999", header(lambda h, d: json.dumps(h).replace(
        '"data_offsets": [0, 16]', '"data_offsets": [0, 1e999]', 1).encode()), "data_offsets"),
    info("header: three offsets", header(lambda h, d: h[A].update(data_offsets=[0, 16, 32])),
         "data_offsets"),
    info("header: start after end", header(lambda h, d: h[A].update(data_offsets=[16, 0])),
         "outside"),
    info("header: overlapping tensors", header(overlap_second), "overlaps"),
    info("header: a gap before the first tensor", header(
        lambda h, d: (shift_all(h, 16), (h, b"\0" * 16 + d))[1]), "leaves a gap"),
    info("header: trailing bytes", header(lambda h, d: (h, d + b"x" * 8)), "trailing bytes"),
    info("header: bytes not shape × itemsize", header(lambda h, d: h[A].update(shape=[5])),
         "bytes for a F32 tensor"),
    info("header: entry a number", header(lambda h, d: h.update({A: 7})), "not an object"),
    info("header: entry without dtype", header(lambda h, d: h[A].pop("dtype")), "dtype"),
    info("header: __metadata__ a list", header(lambda h, d: h.update(__metadata__=["x"])),
         "__metadata__"),
    info("header: __metadata__ with a number", header(
        lambda h, d: h.update(__metadata__={"format": 1})), "__metadata__"),
    info("header: a name twice", header(lambda h, d: json.dumps(h)[:-1].encode() + b', "'
         + A.encode() + b'": ' + json.dumps(h[A]).encode() + b"}"), "appears twice"),
    info("header: length 0", write_bytes(shard, b"\0" * 8 + b"{}"), "not a JSON object"),
    info("header: length past the end", write_bytes(
        shard, (10**6).to_bytes(8, "little") + b"{}"), "exceeds the file"),
    info("header: length 2^63", write_bytes(shard, (2**63).to_bytes(8, "little")),
         "exceeds the file"),
    info("header: file of 3 bytes", write_bytes(shard, b"abc"), "truncated"),
    info("header: tensor past the end", header(lambda h, d: (h, d[:-4])), "outside"),
    info("header: a tensor in two shards",
         lambda i: shutil.copy(shard(i), i.src / "b.safetensors"), "appears in both"),
    convert("header through convert: overlap", setup=header(overlap_second), message="overlaps"),
    cli("header through generate: a list", "generate", "--model", "{src}", "--prompt", "hi",
        setup=header(lambda h, d: b"[]"), message="not a JSON object"),
    build("header through bundle build: unknown dtype",
          setup=header(lambda h, d: h[A].update(dtype="F128")), message="F128"),
]

INDEX_ROWS = [
    info("index: a list", weight_index(raw="[1]"), "no weight_map"),
    info("index: weight_map a list", weight_index(["model.safetensors"]), "no weight_map"),
    info("index: weight_map to ints", weight_index(lambda i: 1), "not a file name"),
    info("index: not JSON", weight_index(raw="{"), "not valid JSON"),
    info("index: nested 100,000 deep", weight_index(raw="[" * 100_000), "nested too deeply"),
    info("index: empty weight_map", weight_index({}), "empty"),
    info("index: ../elsewhere", steps(outside_shard, weight_index(
        lambda i: "../elsewhere/model.safetensors")), "not a plain *.safetensors file name"),
    info("index: /etc/passwd", weight_index(lambda i: "/etc/passwd"), "not a plain"),
    info("index: an absolute shard path", weight_index(lambda i: str(shard(i))), "not a plain"),
    info("index: a subfolder", weight_index(lambda i: "sub/model.safetensors"), "not a plain"),
    info("index: NUL in a name", weight_index(lambda i: "a\0.safetensors"), "not a plain"),
    info("index: a missing shard", weight_index(lambda i: "gone.safetensors"), "missing"),
    info("index: a symlink out of the model", steps(
        outside_shard, weight_index(lambda i: "link.safetensors"),
        lambda i: (i.src / "link.safetensors").symlink_to(
            i.root / "elsewhere" / "model.safetensors")), "outside the model directory"),
    info("index: a symlink loop", steps(weight_index(lambda i: "loop.safetensors"),
                                        symlink_loop(lambda i: i.src / "loop.safetensors")),
         "symlink loop"),
    info("index: a directory as shard", steps(weight_index(lambda i: "d.safetensors"),
                                              lambda i: (i.src / "d.safetensors").mkdir()),
         "a directory"),
    info("index: a directory", lambda i: index(i).mkdir(), "a directory"),
    info("index: a FIFO shard", steps(weight_index(lambda i: "f.safetensors"),
                                      fifo(lambda i: i.src / "f.safetensors")),
         "not a regular file", subprocess=True),
    info("shards: none", lambda i: shard(i).unlink(), "no *.safetensors"),
    info("shards: a directory named x.safetensors",
         lambda i: (i.src / "x.safetensors").mkdir(), "a directory"),
    info("shards: a symlink loop", symlink_loop(lambda i: i.src / "x.safetensors"),
         "symlink loop"),
    info("shards: a broken symlink",
         lambda i: (i.src / "x.safetensors").symlink_to("nowhere"), "broken symlink"),
    info("shards: a symlink out of the model", steps(outside_shard, lambda i: (
        i.src / "x.safetensors").symlink_to(i.root / "elsewhere" / "model.safetensors")),
        "outside the model directory"),
    info("shards: a FIFO", fifo(lambda i: i.src / "x.safetensors"), "not a regular file",
         subprocess=True),
    convert("index through convert: ../", setup=steps(outside_shard, weight_index(
        lambda i: "../elsewhere/model.safetensors")), message="not a plain"),
    cli("index through generate: a FIFO", "generate", "--model", "{src}", "--prompt", "hi",
        setup=steps(weight_index(lambda i: "f.safetensors"),
                    fifo(lambda i: i.src / "f.safetensors")),
        message="not a regular file", subprocess=True),
]

WEIGHT_ROWS = [
    convert("weights: all NaN", setup=weights(lambda w: w.update(
        {EMBED: mx.full(w[EMBED].shape, float("nan"), w[EMBED].dtype)})), message="NaN"),
    convert("weights: one infinity", setup=weights(lambda w: w.update(
        {N: mx.concatenate([mx.array([float("inf")]), w[N][1:]])})), message="NaN or infinite"),
    convert("weights: beyond float16", "--dtype", "float16", setup=weights(lambda w: w.update(
        {EMBED: mx.full(w[EMBED].shape, 1e30, w[EMBED].dtype)})), message="beyond the range"),
    cli("weights: int32 through generate", "generate", "--model", "{src}", "--prompt", "hi",
        setup=weights(lambda w: w.update({A: w[A].astype(mx.int32)})),
        message="floating-point dtype"),
    convert("weights: int32 through convert", setup=weights(lambda w: w.update(
        {EMBED: w[EMBED].astype(mx.int32)})), message="expected bf16, f16 or f32"),
    cli("weights: int16 in a converted model", "generate", "--model", "{converted}", "--prompt",
        "hi", needs=("converted",), message="floating-point dtype", setup=int16_norm),
    cli("quantization: bits a string", "info", "{converted}", needs=("converted",),
        setup=converted_config(lambda c: c["quantization"].update(bits="4")),
        message="quantization.bits"),
    cli("quantization: a list", "generate", "--model", "{converted}", "--prompt", "hi",
        needs=("converted",), setup=converted_config(lambda c: c.update(quantization=[4])),
        message="quantization"),
    cli("quantization: group 0", "generate", "--model", "{converted}", "--prompt", "hi",
        needs=("converted",), setup=converted_config(
            lambda c: c["quantization"].update(group_size=0)), message="group_size"),
    cli("drafter: config a list", "info", "{converted}", needs=("converted",),
        setup=write_bytes(lambda i: i.converted / "mtp" / "config.json", "[]"),
        message="not a JSON object"),
    cli("drafter: header overlaps", "generate", "--model", "{converted}", "--prompt", "hi",
        needs=("converted",), message="overlaps",
        setup=edit_header(lambda i: i.converted / "mtp" / "model.safetensors", overlap_second)),
    cli("an MLX model as source", "convert", "--hf-path", "{converted}", "-o", "{out}",
        needs=("converted",), message="already converted"),
    convert("side files: generation_config.json a FIFO",
            setup=fifo(lambda i: i.src / "generation_config.json"), message="not a regular file",
            subprocess=True),
    convert("side files: generation_config.json not JSON",
            setup=write_bytes(lambda i: i.src / "generation_config.json", "{"),
            message="not valid JSON"),
    convert("side files: eos_token_id a string", setup=edit_json(
        lambda i: i.src / "generation_config.json", lambda g: g.update(eos_token_id="x")),
        message="eos_token_id"),
    convert("side files: tokenizer_config.json a list",
            setup=write_bytes(lambda i: i.src / "tokenizer_config.json", "[]"),
            message="not a JSON object"),
    convert("side files: tokenizer.json a symlink out of the model", setup=lambda i: (
        shutil.copy(i.src / "tokenizer.json", i.root / "t.json"),
        (i.src / "tokenizer.json").unlink(), (i.src / "tokenizer.json").symlink_to(
            i.root / "t.json")), message="outside the model directory"),
    info("config: a symlink out of the model", lambda i: (
        shutil.copy(config(i), i.root / "c.json"), config(i).unlink(),
        config(i).symlink_to(i.root / "c.json")), "outside the model directory"),
]

OUTPUT_ROWS = [
    cli("convert -o . --force", "convert", "--hf-path", "{src}", "-o", ".", "--force",
        cwd=WORK, message="the current directory"),
    cli("convert -o '' --force", "convert", "--hf-path", "{src}", "-o", "", "--force",
        cwd=WORK, message="the current directory"),
    cli("convert -o ~ --force", "convert", "--hf-path", "{src}", "-o", "~", "--force",
        setup=home, env={"HOME": "{root}/home"}, message="your home directory"),
    cli("convert -o / --force", "convert", "--hf-path", "{src}", "-o", "/", "--force",
        message="/"),
    cli("convert -o SRC --force", "convert", "--hf-path", "{src}", "-o", "{src}", "--force",
        message="would replace the source"),
    cli("convert -o parent-of-SRC --force", "convert", "--hf-path", "{src}", "-o", "{root}",
        "--force", message="would replace the source"),
    cli("convert -o SRC/inside", "convert", "--hf-path", "{src}", "-o", "{src}/mlx",
        message="lies inside the source"),
    convert("convert --force over a user's folder", "--force", setup=user_folder,
            message="was not written by mlxkit"),
    convert("convert --force over a model plus a user's file", "--force",
            setup=converted_plus_user_file, needs=("src", "converted"),
            message="was not written by mlxkit"),
    convert("convert --force over a file", "--force", setup=lambda i: i.out.write_text("x"),
            message="not a directory"),
    convert("convert --force over a symlink", "--force", needs=("src", "converted"),
            setup=lambda i: i.out.symlink_to(i.converted), message="not a directory"),
    convert("convert over an existing folder", setup=user_folder, message="already exists"),
    cli("convert -o under a file", "convert", "--hf-path", "{src}", "-o", "{root}/f/out",
        setup=a_file("f"), message="not a directory"),
    cli("convert -o a 300-byte name", "convert", "--hf-path", "{src}", "-o", "x" * 300,
        message="not a usable path"),
    cli("convert -o inside a symlink loop", "convert", "--hf-path", "{src}", "-o", "{root}/l/x",
        setup=symlink_loop(lambda i: i.root / "l"), message="not a usable output path"),
    cli("bundle build OUT a symlink loop --force", "bundle", "build", "{src}", "{root}/l",
        "--target", "iphone12", "--force", setup=symlink_loop(lambda i: i.root / "l"),
        message="not a directory"),
    cli("convert: --size 3b", "convert", "--size", "3b", message="unknown size '3b'"),
    cli("convert: --size and --hf-path", "convert", "--size", "2b", "--hf-path", "{src}",
        message="exactly one of"),
    cli("convert: no source", "convert", message="exactly one of"),
    cli("convert: --hf-path missing", "convert", "--hf-path", "{root}/nope",
        message="not a directory"),
    cli("convert: --hf-path a file", "convert", "--hf-path", "{root}/f", setup=a_file("f"),
        message="not a directory"),
    cli("convert: --hf-path 5,000 characters", "convert", "--hf-path", "a" * 5000,
        message="not a usable path"),
    convert("convert --bits 7", "--bits", "7", message="bits must be one of"),
    convert("convert --bits x", "--bits", "x", message="'x' is not a valid integer"),
    convert("convert --bits 10^30", "--bits", "1" + "0" * 30, message="bits must be one of"),
    convert("convert --group-size 48", "--group-size", "48", message="group size must be"),
    convert("convert --group-size 0", "--group-size", "0", message="group size must be"),
    convert("convert --recipe fast", "--recipe", "fast", message="unknown recipe 'fast'"),
    convert("convert --recipe ../uniform", "--recipe", "../uniform", message="unknown recipe"),
    convert("convert --dtype int8", "--dtype", "int8", message="dtype must be one of"),
    convert("convert --no-quantize --bits 8", "--no-quantize", "--bits", "8", message="no effect"),
    convert("convert --frobnicate", "--frobnicate", message="No such option"),
    to_bundle("convert --target nokia", "-o", "{out}", "--target", "nokia",
              message="unknown target 'nokia'"),
    to_bundle("convert --target --context 0", "-o", "{out}", "--context", "0",
              message="context must be a positive"),
    to_bundle("convert --target --context -5", "-o", "{out}", "--context", "-5",
              message="context must be a positive"),
    to_bundle("convert --target --context 10^9", "-o", "{out}", "--context", "1000000000",
              message="exceeds the model's"),
    to_bundle("convert --target --memory-budget 1MB", "-o", "{out}", "--memory-budget", "1MB",
              message="does not fit"),
    to_bundle("convert --target --memory-budget 400 digits", "-o", "{out}", "--memory-budget",
              NINES, message="at most 10 TB"),
    to_bundle("convert --target --memory-budget 1e400", "-o", "{out}", "--memory-budget",
              "1e400", message="not a memory size"),
    to_bundle("convert --target --memory-budget nan", "-o", "{out}", "--memory-budget", "nan",
              message="not a memory size"),
    to_bundle("convert --target --memory-budget -1GB", "-o", "{out}", "--memory-budget", "-1GB",
              message="not a memory size"),
    to_bundle("convert --target --no-quantize", "-o", "{out}", "--no-quantize",
              message="drop --no-quantize"),
    to_bundle("convert --target -o parent-of-SRC --force", "-o", "{root}", "--force",
              message="would replace the source"),
    to_bundle("convert --target -o SRC --force", "-o", "{src}", "--force",
              message="would replace the source"),
    to_bundle("convert --target -o . --force", "-o", ".", "--force", cwd=WORK,
              message="the current directory"),
    to_bundle("convert --target --force over a user's folder", "-o", "{out}", "--force",
              setup=user_folder, message="was not written by mlxkit"),
    to_bundle("convert --target --force over a converted model", "-o", "{out}", "--force",
              needs=("src", "converted"), setup=lambda i: shutil.copytree(i.converted, i.out),
              message="was not written by mlxkit"),
    build("bundle build: SRC missing", setup=lambda i: shutil.rmtree(i.src),
          message="no such directory"),
    build("bundle build --target nokia", "--target", "nokia", message="unknown target"),
    build("bundle build --num-draft 0", "--num-draft", "0", message="num_draft"),
    build("bundle build --num-draft 99", "--num-draft", "99", message="num_draft"),
    build("bundle build --prefill-chunk 0", "--prefill-chunk", "0", message="prefill chunk"),
    build("bundle build --acceptance nan", "--acceptance", "nan", message="acceptance"),
    build("bundle build --acceptance 2", "--acceptance", "2", message="acceptance"),
    build("bundle build --bits 7", "--bits", "7", message="bits must be one of"),
    build("bundle build --group-size 48", "--group-size", "48", message="group size"),
    build("bundle build --recipe nope", "--recipe", "nope", message="unknown recipe"),
    build("bundle build --dtype int8", "--dtype", "int8", message="dtype must be one of"),
    build("bundle build --context 0", "--context", "0", message="context must be a positive"),
    build("bundle build --memory-budget 1MB", "--memory-budget", "1MB", message="does not fit"),
    cli("bundle build OUT=SRC --force", "bundle", "build", "{src}", "{src}", "--target",
        "iphone12", "--force", message="would replace the source"),
    cli("bundle build OUT=parent-of-SRC --force", "bundle", "build", "{src}", "{root}",
        "--target", "iphone12", "--force", message="would replace the source"),
    cli("bundle build OUT=. --force", "bundle", "build", "{src}", ".", "--target", "iphone12",
        "--force", cwd=WORK, message="the current directory"),
    build("bundle build --force over a user's folder", "--force", setup=user_folder,
          message="was not written by mlxkit"),
    build("bundle build --force over a bundle plus a user's file", "--force",
          needs=("src", "bundle"), setup=bundle_plus_user_file,
          message="was not written by mlxkit"),
]

PLAN_INFO_GENERATE_ROWS = [
    plan("plan --target iphone99", "--size", "2b", "--target", "iphone99",
         message="unknown target"),
    plan("plan --context 0", "--size", "2b", "--target", "iphone15", "--context", "0",
         message="context must be"),
    plan("plan --context -5", "--size", "2b", "--target", "iphone15", "--context", "-5",
         message="context must be"),
    plan("plan --context 10^30", "--size", "2b", "--target", "iphone15", "--context",
         "1" + "0" * 30, message="exceeds the model's"),
    plan("plan --context abc", "--size", "2b", "--target", "iphone15", "--context", "abc",
         message="not a valid integer"),
    plan("plan --memory-budget 0.5GB", "--size", "2b", "--memory-budget", "0.5GB",
         message="does not fit"),
    plan("plan --memory-budget many", "--size", "2b", "--memory-budget", "many",
         message="not a memory size"),
    plan("plan --memory-budget 400 digits", "--size", "2b", "--memory-budget", NINES,
         message="at most 10 TB"),
    plan("plan --memory-budget 400 digits GB", "--size", "2b", "--memory-budget", NINES + "GB",
         message="at most 10 TB"),
    plan("plan --memory-budget 0", "--size", "2b", "--memory-budget", "0",
         message="must be positive"),
    plan("plan --size 3b", "--size", "3b", "--target", "iphone15", message="neither a size"),
    plan("plan without a target", "--size", "2b", message="give a --target"),
    plan("plan --model missing", "--model", "{root}/nope", "--target", "iphone15",
         message="neither a size"),
    plan("plan --size and --model", "--size", "2b", "--model", "{src}", "--target", "iphone15",
         message="exactly one of"),
    plan("plan --num-draft 0", "--size", "2b", "--target", "iphone15", "--num-draft", "0",
         message="num_draft"),
    plan("plan --prefill-chunk -1", "--size", "2b", "--target", "iphone15", "--prefill-chunk",
         "-1", message="prefill chunk"),
    plan("plan --prefill-chunk 10^30", "--size", "2b", "--target", "iphone15",
         "--prefill-chunk", "1" + "0" * 30, message="prefill chunk must be between"),
    build("bundle build --prefill-chunk 2^63", "--prefill-chunk", str(2**63),
          message="prefill chunk must be between"),
    plan("plan --acceptance 1.5", "--size", "2b", "--target", "iphone15", "--acceptance", "1.5",
         message="acceptance"),
    plan("plan --acceptance nan", "--size", "2b", "--target", "iphone15", "--acceptance", "nan",
         message="acceptance"),
    plan("plan --bits 9", "--size", "2b", "--target", "iphone15", "--bits", "9",
         message="bits must be one of"),
    plan("plan --recipe x", "--size", "2b", "--target", "iphone15", "--recipe", "x",
         message="unknown recipe"),
    plan("plan --group-size 7", "--size", "2b", "--target", "iphone15", "--group-size", "7",
         message="group size"),
    plan("plan 9b on an iPhone 15", "--size", "9b", "--target", "iphone15",
         message="does not fit"),
    plan("plan --image-tokens 10^30", "--size", "2b", "--target", "iphone15", "--image-tokens",
         "1" + "0" * 30, message="exceed the model's"),
    to_bundle("convert --target --image-tokens 10^9", "-o", "{out}", "--image-tokens",
              "1000000000", message="exceed the model's"),
    plan("plan --vision on a text-only checkpoint", "--model", "{src}", "--target", "iphone12",
         "--vision", setup=edit_json(config, lambda c: c.pop("vision_config")),
         message="no vision tower"),
    plan("plan --recipe ''", "--size", "2b", "--target", "iphone15", "--recipe", "",
         message="unknown recipe ''"),
    convert("convert --recipe ''", "--recipe", "", message="unknown recipe ''"),
    convert("convert -o with a NUL byte", "-o", "{out}\0", message="not a usable path"),
    cli("info: missing", "info", "{root}/nope", message="not a directory"),
    cli("info: a file", "info", "{root}/f", setup=a_file("f"), message="not a directory"),
    cli("info: no argument", "info", message="Missing argument"),
    cli("info: a bundle whose model config is a list", "info", "{bundle}", needs=("bundle",),
        setup=write_bytes(lambda i: i.bundle / "model" / "config.json", "[]"),
        message="not a JSON object"),
    cli("generate: no model", "generate", "--prompt", "hi", message="--model PATH or --size"),
    cli("generate: missing model", "generate", "--model", "{root}/nope", "--prompt", "hi",
        message="not a directory"),
    cli("generate: a bundle with a truncated file", "generate", "--model", "{bundle}",
        "--prompt", "hi", needs=("bundle",), setup=truncate_bundle_weights,
        message="does not match its manifest.json"),
    cli("generate: a bundle with a model file gone", "generate", "--model", "{bundle}",
        "--prompt", "hi", needs=("bundle",),
        setup=lambda i: (i.bundle / "mtp" / "model.safetensors").unlink(), message="missing"),
    cli("generate: a bundle with files: 7", "generate", "--model", "{bundle}", "--prompt", "hi",
        needs=("bundle",), setup=edit_manifest(lambda m: m.update(files=7)),
        message="files: expected a list"),
]

VERIFY_ROWS = [
    verify("verify: min_ios edited", edit_manifest(lambda m: m.update(min_ios="12.0")),
           "min_ios: manifest says '12.0'"),
    verify("verify: device ids edited", edit_manifest(
        lambda m: m["target"].update(device_model_ids=["iPhone1,1"])), "device_model_ids"),
    verify("verify: check_available_bytes edited", edit_manifest(
        lambda m: m["memory"].update(check_available_bytes=1)), "check_available_bytes"),
    verify("verify: cache limit edited", edit_manifest(
        lambda m: m["mlx"].update(cache_limit_bytes=10**12)), "cache_limit_bytes"),
    verify("verify: a 1 PB budget", edit_manifest(lambda m: m["target"].update(
        kind="budget", usable_bytes=10**15, usable_bytes_entitled=10**15)), "budget"),
    verify("verify: another device", edit_manifest(
        lambda m: m["target"].update(name="iphone16promax")), "target.label"),
    verify("verify: an unknown device", edit_manifest(
        lambda m: m["target"].update(name="nokia")), "unknown target 'nokia'"),
    verify("verify: model.path ../other", edit_manifest(
        lambda m: m["model"].update(path="../other")), "model.path '../other'"),
    verify("verify: model.path absolute", edit_manifest(
        lambda m: m["model"].update(path="/etc")), "model.path '/etc'"),
    verify("verify: mtp.path outside", edit_manifest(
        lambda m: m["mtp"].update(path="../../mtp")), "mtp.path"),
    verify("verify: entitlement flipped", edit_manifest(
        lambda m: m.update(entitlement_required=not m["entitlement_required"])),
        "entitlement_required"),
    verify("verify: entitlements edited", edit_manifest(lambda m: m.update(
        entitlements=["com.apple.developer.kernel.extended-virtual-addressing"])),
        "entitlements"),
    verify("verify: max_context edited", edit_manifest(lambda m: m.update(max_context=100)),
           REPLAN),
    verify("verify: max_context beyond the model", edit_manifest(
        lambda m: m.update(max_context=10**6)), "exceeds the model's"),
    verify("verify: prefill_chunk edited", edit_manifest(lambda m: m.update(prefill_chunk=4096)),
           REPLAN),
    verify("verify: num_draft edited", edit_manifest(lambda m: m["mtp"].update(num_draft=7)),
           REPLAN),
    verify("verify: largest context edited", edit_manifest(
        lambda m: m.update(largest_context_that_fits=10**6)), "largest_context_that_fits"),
    verify("verify: usable bytes edited", edit_manifest(
        lambda m: m["memory"].update(usable_bytes=10**12)), "usable_bytes"),
    verify("verify: headroom edited", edit_manifest(
        lambda m: m["memory"].update(headroom_bytes=10**12)), "headroom_bytes"),
    verify("verify: bits edited", edit_manifest(lambda m: m["quantization"].update(bits=8)),
           "tensors as planned"),
    verify("verify: dtype edited", edit_manifest(
        lambda m: m["quantization"].update(dtype="float16")), "tensors as planned"),
    verify("verify: acceptance a string", edit_manifest(
        lambda m: m["performance"].update(mtp_acceptance="high")), "acceptance"),
    verify("verify: a speed edited", edit_manifest(
        lambda m: m["performance"].update(roofline_efficiency=1.0)), "roofline_efficiency"),
    verify("verify: warnings edited", edit_manifest(lambda m: m.update(warnings=["ok"])),
           "warnings"),
    verify("verify: model.name edited", edit_manifest(lambda m: m["model"].update(
        name="Qwen3.5-9B")), "model.name: manifest says 'Qwen3.5-9B'"),
    verify("verify: an extra field", edit_manifest(lambda m: m.update(trusted=True)),
           "not a field mlxkit writes"),
    verify("verify: schema_version 2", edit_manifest(lambda m: m.update(schema_version=2)),
           "schema_version"),
    verify("verify: a field missing", edit_manifest(lambda m: m.pop("min_ios")), "min_ios"),
    verify("verify: files '.'", listed(entry(".")), "not a plain relative path"),
    verify("verify: files with NUL", listed(entry("a\0b")), "control characters"),
    verify("verify: files of 5,000 characters", listed(entry("a" * 5000)), "longer than"),
    verify("verify: files ../x", listed(entry("../x")), "leaves the bundle"),
    verify("verify: files /etc/passwd", listed(entry("/etc/passwd")), "absolute"),
    verify("verify: files a symlink loop", steps(listed(entry("xcode/loop")), symlink_loop(
        lambda i: i.bundle / "xcode" / "loop")), "resolves outside"),
    verify("verify: files: 7", edit_manifest(lambda m: m.update(files=7)), "files"),
    verify("verify: files entry a string", edit_manifest(lambda m: m["files"].append("x")),
           "files["),
    verify("verify: negative bytes", listed({"path": "x", "bytes": -1, "sha256": "0" * 64}),
           "files["),
    verify("verify: sha256 not hex", listed({"path": "x", "bytes": 1, "sha256": "z" * 64}),
           "files["),
    verify("verify: a file listed twice", edit_manifest(
        lambda m: m["files"].append(dict(m["files"][0]))), "listed twice"),
    verify("verify: a flipped byte", flip_bundle_byte, "sha256 differs"),
    verify("verify: a truncated file", truncate_bundle_weights, "bytes, manifest says"),
    verify("verify: an unlisted file", bundle_file("model/extra.bin",
                                                   lambda p: p.write_text("x")), "not listed"),
    verify("verify: a symlink out", bundle_file("xcode/out", lambda p: p.symlink_to("/etc")),
           "links outside"),
    verify("verify: model/ a symlink out", lambda i: (
        shutil.move(i.bundle / "model", i.root / "model"),
        (i.bundle / "model").symlink_to(i.root / "model")), "links outside"),
    verify("verify: a tensor in another dtype", bundle_tensor_dtype, "planned BF16"),
    verify("verify: mtp left out but present", edit_manifest(lambda m: (
        m["mtp"].update(included=False, path=None), m["model"].update(mtp_path=None))), "mtp"),
    verify("verify: a FIFO in the bundle", fifo(lambda i: i.bundle / "xcode" / "pipe"),
           "not a regular file", subprocess=True),
    verify("verify: preprocessor_config.json a FIFO", fifo(
        lambda i: i.bundle / "model" / "preprocessor_config.json"), "not a regular file",
        subprocess=True),
    verify("verify: preprocessor_config.json nested 100,000 deep", write_bytes(
        lambda i: i.bundle / "model" / "preprocessor_config.json", "[" * 100_000), "nested"),
    cli("verify: not a directory", "bundle", "verify", "{root}/f", setup=a_file("f"),
        message="not a directory"),
    cli("verify: no manifest", "bundle", "verify", "{src}", message="no manifest.json"),
    verify("verify: manifest not JSON", write_bytes(manifest, "{"), "not valid JSON", code=2),
    verify("verify: manifest a list", write_bytes(manifest, "[]"), "not a JSON object", code=2),
    verify("verify: manifest nested", write_bytes(manifest, "[" * 100_000), "nested", code=2),
    verify("verify: manifest not UTF-8", write_bytes(manifest, b"\xff"), "not UTF-8", code=2),
    verify("verify: manifest a directory", lambda i: (manifest(i).unlink(), manifest(i).mkdir()),
           "a directory", code=2),
    verify("verify: --target nokia", None, "unknown target", "--target", "nokia", code=2),
    verify("verify: --target a Mac", None, "is a Mac", "--target", "m4pro-24gb", code=2),
    verify("verify: an entitlement added to Entitlements.plist, rehashed", steps(
        edit_plist("xcode/Entitlements.plist", lambda d: d.update(
            {"com.apple.security.get-task-allow": True})),
        lambda i: rehash(i, "xcode/Entitlements.plist")), "get-task-allow"),
    verify("verify: Entitlements.plist not a plist, rehashed", steps(
        write_bytes(lambda i: i.bundle / "xcode" / "Entitlements.plist", "<plist"),
        lambda i: rehash(i, "xcode/Entitlements.plist")), "not a readable plist"),
    verify("verify: model/config.json says 8 bits, rehashed", steps(
        edit_json(lambda i: i.bundle / "model" / "config.json",
                  lambda c: c["quantization"].update(bits=8)),
        lambda i: rehash(i, "model/config.json")), "model/config.json: quantization is not"),
    verify("verify: mtp/config.json unquantized, rehashed", steps(
        edit_json(lambda i: i.bundle / "mtp" / "config.json",
                  lambda c: (c.pop("quantization"), c.pop("quantization_config"))),
        lambda i: rehash(i, "mtp/config.json")), "mtp/config.json: quantization is not"),
    verify("verify: bytes 10^400", listed({"path": "x", "bytes": 10**400, "sha256": "0" * 64}),
           "files["),
    cli("verify: a rehashed tokenizer_config.json that is a list", "bundle", "verify",
        "{bundle}", needs=("bundle",), code=1, message="not a JSON object", setup=steps(
            write_bytes(lambda i: i.bundle / "model" / "tokenizer_config.json", "[1]"),
            lambda i: rehash(i, "model/tokenizer_config.json"))),
]
# fmt: on


def _api_load(i: Inputs, **kw):
    return _load(i.src, **kw)


def _load(path, **kw):
    from mlxkit import load

    return load(path, **kw)


def _verify(path):
    from mlxkit.ios_bridge import verify_bundle

    return verify_bundle(path)


def _info(path):
    from mlxkit.info import checkpoint_info

    return checkpoint_info(path)


def _plan(*args, **kw):
    from mlxkit.ios_bridge import plan

    return plan(*args, **kw)


def _api_convert(i: Inputs, src=None, out=None, **kw):
    from mlxkit.convert import convert

    return convert(src or i.src, out or i.out, quiet=True, **kw)


def _api_build(i: Inputs, **kw):
    from mlxkit.ios_bridge import build_bundle

    return build_bundle(i.src, i.out, "iphone12", **kw)


def widen_to_f64(name: str):
    """A header edit: tensor `name` stored as F64 (the data re-laid out to match)."""

    def edit(h: dict, d: bytes):
        data, at = b"", 0
        for key in sorted(
            (k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"]
        ):
            start, end = h[key]["data_offsets"]
            chunk = d[start:end]
            if key == name:
                chunk = np.frombuffer(chunk, np.float32).astype(np.float64).tobytes()
                h[key]["dtype"] = "F64"
            h[key]["data_offsets"] = [at, at + len(chunk)]
            data, at = data + chunk, at + len(chunk)
        return h, data

    return edit


def extra_tensor(name: str):
    """A header edit: one more F32 tensor of one element, named `name`."""

    def edit(h: dict, d: bytes):
        h[name] = {"dtype": "F32", "shape": [1], "data_offsets": [len(d), len(d) + 4]}
        return h, d + b"\0" * 4

    return edit


def _load_model(path, **kw):
    from mlxkit import load_model

    return load_model(path, **kw)


def _api_load_converted(i: Inputs):
    return _load(i.converted)


def _choose(*args, **kw):
    from mlxkit.ios_bridge import choose_plan

    return choose_plan(*args, **kw)


# fmt: off
API_ROWS = [
    api("load: config a list", _api_load, setup=write_bytes(config, "[]"),
        message="not a JSON object"),
    api("load: int32 weights", _api_load, setup=weights(
        lambda w: w.update({A: w[A].astype(mx.int32)})), message="floating-point dtype"),
    api("load: NUL in the path", lambda i: _load("a\0b"), message="not a usable path"),
    api("load: 5,000-character path", lambda i: _load("a" * 5000), message="not a usable path"),
    api("load: a bundle with a flipped byte, verify=True", lambda i: _load(i.bundle, verify=True),
        needs=("bundle",), setup=flip_bundle_byte, message="sha256 differs"),
    api("load: a bundle with a truncated file", lambda i: _load(i.bundle), needs=("bundle",),
        setup=truncate_bundle_weights, message="bytes, manifest says"),
    api("load: a bundle whose weights are not listed", lambda i: _load(i.bundle),
        needs=("bundle",), setup=edit_manifest(lambda m: m.update(files=[
            e for e in m["files"] if e["path"] != "model/model.safetensors"])),
        message="'model/model.safetensors' is not listed"),
    api("load: a bundle listing ../x", lambda i: _load(i.bundle), needs=("bundle",),
        setup=listed(entry("model/../../x")), message="leaves the bundle"),
    api("convert: bits '4'", lambda i: _api_convert(i, bits="4"), message="bits must be"),
    api("convert: recipe None", lambda i: _api_convert(i, recipe=None), message="recipe"),
    api("convert: dtype int8", lambda i: _api_convert(i, dtype="int8"), message="dtype"),
    api("convert: NUL in the output", lambda i: _api_convert(i, out="a\0b"),
        message="not a usable path"),
    api("convert: NUL in the source", lambda i: _api_convert(i, src="a\0b"),
        message="not a usable path"),
    api("convert: a read-only output folder", lambda i: _read_only(i, _api_convert),
        message="Permission denied"),
    api("bundle: num_draft 0", lambda i: _api_build(i, num_draft=0), message="num_draft"),
    *(api(f"recipe: {what}", lambda i, text=text: _recipe(i, text), message=message)
      for what, text, message in [
          ("rules not a list", "rules = 3", "rules: expected a list"),
          ("a rule not a table", "rules = [1]", "rule 1: expected a JSON object"),
          ("match a number", "[[rules]]\nmatch = 5", "match: expected a string"),
          ("a bad regular expression", "[[rules]]\nmatch = '('", "bad regular expression"),
          ("quantize a string", "[[rules]]\nmatch = 'x'\nquantize = 'no'", "quantize"),
          ("bits a string", "bits = '4'", "bits must be one of"),
          ("a rule's group size 7", "[[rules]]\nmatch = 'x'\ngroup_size = 7", "group size"),
          ("description a number", "description = 5", "description: expected a string"),
          ("an unknown key", "bitz = 4", "unknown keys ['bitz']"),
          ("not TOML", "bits = = 4", "not a readable TOML recipe"),
          ("not UTF-8", b"bits = 4 # \xff", "not a readable TOML recipe"),
      ]),
    api("bundle: a read-only output folder", lambda i: _read_only(i, _api_build),
        message="Permission denied"),
    api("verify: missing", lambda i: _verify(i.root / "nope"), message="not a directory"),
    api("info: a header bomb", lambda i: _info(i.src), message="nested too deeply",
        setup=header(lambda h, d: b'{"a":' + b"[" * 100_000)),
    api("TextConfig: a list", lambda i: TextConfig.from_dict([]),
        message="expected a JSON object"),
    api("plan: hidden size 0", lambda i: _plan({"model_type": "qwen3_5_text", **json.loads(
        config(i).read_text())["text_config"], "hidden_size": 0}, "iphone12"),
        message="hidden_size"),
    api("load: dtype a string", lambda i: _load(i.src, dtype="float32"), message="dtype must be"),
    api("load: dtype int8", lambda i: _load(i.src, dtype=mx.int8), message="dtype must be"),
    api("load: F64 weights", _api_load, setup=header(widen_to_f64(N)), message="dtype F64"),
    api("load: F8_E5M2 weights", _api_load, setup=header(
        lambda h, d: h[A].update(dtype="F8_E5M2", shape=[16])), message="dtype F8_E5M2"),
    api("load: a tensor name with a newline", _api_load,
        setup=header(extra_tensor("model.language_model.a\nb")), message="not a Qwen 3.5"),
    api("load_model: a drafter that is not there", lambda i: _load_model(
        i.converted, drafter=i.root / "nope"), needs=("converted",), message="drafter"),
    api("load_model: drafter 123", lambda i: _load_model(i.converted, drafter=123),
        needs=("converted",), message="drafter: expected a path"),
    api("load: mtp/ a symlink out of the model", _api_load_converted, needs=("converted",),
        setup=lambda i: (shutil.move(i.converted / "mtp", i.root / "m"),
                         (i.converted / "mtp").symlink_to(i.root / "m")),
        message="outside the model directory"),
    cli("info: mtp/ a symlink out of the model", "info", "{converted}", needs=("converted",),
        setup=lambda i: (shutil.move(i.converted / "mtp", i.root / "m"),
                         (i.converted / "mtp").symlink_to(i.root / "m")),
        message="outside the model directory"),
    api("load: a quantization override that is a list", _api_load_converted,
        needs=("converted",), setup=converted_config(lambda c: c["quantization"].update(
            {"language_model.model.embed_tokens": [8]})), message="true/false"),
    api("plan: reserve 10^400", lambda i: _plan("2b", "iphone15", reserve=10**400),
        message="reserve"),
    api("plan: cache_limit 1.5", lambda i: _plan("2b", "iphone15", cache_limit=1.5),
        message="cache_limit"),
    api("choose_plan: mtp 'no'", lambda i: _choose("2b", "iphone15", mtp="no"),
        message="mtp: expected true or false"),
    api("choose_plan: context '4096'", lambda i: _choose("2b", "iphone15", "4096"),
        message="context: expected an integer"),
    api("bundle: mtp 'no'", lambda i: _api_build(i, mtp="no"), message="mtp"),
    api("bundle: context '4096'", lambda i: _api_build(i, context="4096"), message="context"),
    api("convert: bits without quantizing", lambda i: _api_convert(i, bits=8, quantize=False),
        message="no effect"),
    api("convert: quantize None", lambda i: _api_convert(i, quantize=None), message="quantize"),
    api("convert: vision 'no'", lambda i: _api_convert(i, vision="no"), message="vision"),
]
# fmt: on


def _recipe(i: Inputs, text: str | bytes):
    """A recipe file with `text` in a recipe folder of the inputs, loaded by name."""
    from mlxkit.convert import quantize

    folder, real = i.root / "recipes", quantize.RECIPES_DIR
    folder.mkdir()
    quantize.RECIPES_DIR = folder
    try:
        (folder / "mine.toml").write_bytes(text.encode() if isinstance(text, str) else text)
        return quantize.load_recipe("mine")
    finally:
        quantize.RECIPES_DIR = real
        shutil.rmtree(folder)


def _read_only(i: Inputs, call):
    """A folder the process may not write in (simulated: the tests may run as root, for
    whom permission bits do not hold)."""
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if i.root in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    Path.mkdir = mkdir
    try:
        return call(i)
    finally:
        Path.mkdir = real_mkdir


def side(name: str):
    """A tokenizer or generation file of src/."""
    return lambda i: i.src / name


def _chat(i: Inputs):
    """Renders src/'s chat template for one user message (the tokenizer alone: these rows
    run in a forked child, see badinput.py)."""
    from mlxkit.tokenizer import load_tokenizer

    return load_tokenizer(i.src).apply_chat_template([{"role": "user", "content": "hi"}])


def template(text: str) -> object:
    return write_bytes(side("chat_template.jinja"), text)


def inline_template(value: object) -> object:
    """tokenizer_config.json's chat_template (the older layout: no chat_template.jinja)."""
    return steps(
        lambda i: (i.src / "chat_template.jinja").unlink(),
        edit_json(side("tokenizer_config.json"), lambda c: c.update(chat_template=value)),
    )


TEMPLATE = "chat template failed"

# fmt: off
TOKENIZER_ROWS = [
    api("tokenizer.json: a symlink out of the model", _api_load, setup=lambda i: (
        shutil.copy(i.src / "tokenizer.json", i.root / "t.json"),
        (i.src / "tokenizer.json").unlink(), (i.src / "tokenizer.json").symlink_to(
            i.root / "t.json")), message="outside the model directory"),
    api("tokenizer_config.json: a list", _api_load,
        setup=write_bytes(side("tokenizer_config.json"), "[1]"), message="not a JSON object"),
    api("tokenizer_config.json: nested 100,000 deep", _api_load,
        setup=write_bytes(side("tokenizer_config.json"), "[" * 100_000), message="nested"),
    api("tokenizer_config.json: NaN", _api_load,
        setup=write_bytes(side("tokenizer_config.json"), '{"x": NaN}'), message="not valid JSON"),
    api("tokenizer_config.json: a directory", _api_load, setup=lambda i: (
        (i.src / "tokenizer_config.json").unlink(), (i.src / "tokenizer_config.json").mkdir()),
        message="a directory"),
    api("tokenizer_config.json: eos_token a number", _api_load, setup=edit_json(
        side("tokenizer_config.json"), lambda c: c.update(eos_token={"content": 5})),
        message="eos_token"),
    api("tokenizer_config.json: chat_template a list of numbers", _api_load,
        setup=inline_template([1, 2]), message="chat_template must be"),
    api("tokenizer_config.json: named template without its text", _api_load,
        setup=inline_template([{"name": "default"}]), message="chat_template must be"),
    api("tokenizer_config.json: chat_template a number", _api_load,
        setup=inline_template(5), message="chat_template must be"),
    api("generation_config.json: a list", _api_load,
        setup=write_bytes(side("generation_config.json"), "[1]"), message="not a JSON object"),
    api("generation_config.json: nested 100,000 deep", _api_load,
        setup=write_bytes(side("generation_config.json"), "[" * 100_000), message="nested"),
    *(api(f"generation_config.json: eos_token_id {what}", _api_load, setup=edit_json(
        side("generation_config.json"), lambda g, v=value: g.update(eos_token_id=v)),
        message="eos_token_id") for what, value in [
            ("a string", "x"), ("a float", [1.5]), ("-1", -1), ("an object", {"a": 1}),
            ("10^30", 10**30), ("true", True)]),
    api("generation_config.json: a FIFO", _api_load, setup=fifo(side("generation_config.json")),
        message="not a regular file"),
    api("chat_template.jinja: not UTF-8", _api_load, setup=template(b"{{ '\xff' }}"),
        message="not UTF-8"),
    api("chat_template.jinja: a directory", _api_load, setup=lambda i: (
        (i.src / "chat_template.jinja").unlink(), (i.src / "chat_template.jinja").mkdir()),
        message="a directory"),
    api("chat_template.jinja: 2 MB", _api_load, setup=lambda i: os.truncate(
        i.src / "chat_template.jinja", 2 << 20), message="too large"),
    api("chat template: a syntax error", _chat, setup=template("{% for %}"),
        message=TEMPLATE + " (line 1)"),
    api("chat template: raise_exception", _chat, setup=template(
        "{{ raise_exception('System message must come first') }}"),
        message="System message must come first"),
    api("chat template: an undefined call", _chat, setup=template("{{ nope() }}"),
        message="'nope' is undefined"),
    api("chat template: a sandbox escape", _chat, setup=template(
        "{{ cycler.__init__.__globals__.os.system('true') }}"), message=TEMPLATE),
    api("chat template: division by zero", _chat, setup=template("{{ 1 / 0 }}"),
        message="division by zero"),
    api("chat template: endless recursion", _chat, setup=template(
        "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"), message="recursion"),
    api("chat template: 10^10 steps of nested loops", _chat, setup=template(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"),
        message="steps", subprocess=True),
    api("chat template: a number of 10^10 digits", _chat, setup=template(
        "{{ 7 ** (10 ** 10) }}"), message="digits", subprocess=True),
    api("chat template: a string of 10^11 characters", _chat, setup=template(
        "{{ 'x' * 10 ** 11 }}"), message="items"),
    api("chat template: a string doubled 60 times", _chat, setup=template(
        "{% set ns = namespace(s='ab') %}{% for i in range(60) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"), message="characters", subprocess=True),
    convert("tokenizer_config.json through convert: chat_template a number",
            setup=inline_template(5), message="chat_template must be"),
    convert("chat_template.jinja through convert: not UTF-8", setup=template(b"\xff"),
            message="not UTF-8"),
    api("tokenizer.json: a word-level tokenizer", _api_load, setup=write_bytes(
        side("tokenizer.json"), json.dumps({"version": "1.0", "model": {
            "type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}})), message="byte-level"),
    convert("chat template through convert: a syntax error", setup=template("{% for %}"),
            message=TEMPLATE + " (line 1)"),
    to_bundle("chat template through a bundle: a syntax error", "-o", "{out}",
              setup=template("{% if %}"), message=TEMPLATE),
]
# fmt: on


VISION = FIXTURES / "tiny_vision_p4"
PRE, VIDEO_PRE = "preprocessor_config.json", "video_preprocessor_config.json"


def vision(*edits) -> object:
    """A setup: the vision fixture's config and preprocessor files in vis/, then `edits`."""

    def setup(i: Inputs) -> None:
        (i.root / "vis").mkdir()
        for name in ("config.json", PRE, VIDEO_PRE):
            shutil.copy(VISION / name, i.root / "vis" / name)
        for edit in edits:
            edit(i)

    return setup


def vis(name: str):
    return lambda i: i.root / "vis" / name


def _preprocessor(i: Inputs):
    from mlxkit.models.qwen3_5_vision import VisionConfig
    from mlxkit.vision import Preprocessor

    config = json.loads((i.root / "vis" / "config.json").read_text())
    return Preprocessor.from_dir(i.root / "vis", VisionConfig.from_dict(config))


def _image(image, **kw):
    """preprocess_image of `image` (a callable of the inputs gives a path under them)."""
    from mlxkit.vision import preprocess_image

    return lambda i: preprocess_image(
        image(i) if callable(image) else image, _preprocessor(i), **kw
    )


def _raw_image(image, pre):
    from mlxkit.vision import preprocess_image

    return preprocess_image(image, pre)


def _raw_video(frames, pre):
    from mlxkit.vision import preprocess_video

    return preprocess_video(frames, pre)


def _video(frames, **kw):
    from mlxkit.vision import preprocess_video

    return lambda i: preprocess_video(frames, _preprocessor(i), **kw)


FRAMES = np.zeros((4, 32, 32, 3), np.uint8)

# fmt: off
VISION_ROWS = [
    api("preprocessor: image_mean strings", _preprocessor, needs=(), setup=vision(edit_json(
        vis(PRE), lambda c: c.update(image_mean=["a", "b", "c"]))), message="image_mean"),
    api("preprocessor: image_mean a number", _preprocessor, needs=(), setup=vision(edit_json(
        vis(PRE), lambda c: c.update(image_mean=0.5))), message="image_mean: expected a list"),
    api("preprocessor: image_std NaN", _preprocessor, needs=(), setup=vision(write_bytes(
        vis(PRE), '{"image_std": [NaN, 0.5, 0.5]}')), message="not valid JSON"),
    api("preprocessor: rescale_factor a string", _preprocessor, needs=(), setup=vision(
        edit_json(vis(PRE), lambda c: c.update(rescale_factor="x"))), message="rescale_factor"),
    api("preprocessor: rescale_factor 0", _preprocessor, needs=(), setup=vision(
        edit_json(vis(PRE), lambda c: c.update(rescale_factor=0))), message="rescale_factor"),
    api("preprocessor: size a list", _preprocessor, needs=(), setup=vision(edit_json(
        vis(PRE), lambda c: c.update(size=[1, 2]))), message="size: expected a JSON object"),
    api("preprocessor: max_pixels 10^30", _preprocessor, needs=(), setup=vision(edit_json(
        vis(PRE), lambda c: c.update(max_pixels=10**30))), message="up to"),
    api("preprocessor: min_pixels above max_pixels", _preprocessor, needs=(), setup=vision(
        edit_json(vis(PRE), lambda c: c.update(min_pixels=10**6, max_pixels=10))),
        message="increasing range"),
    api("preprocessor: fps a string", _preprocessor, needs=(), setup=vision(edit_json(
        vis(VIDEO_PRE), lambda c: c.update(fps="x"))), message="fps: expected a number"),
    api("preprocessor: fps 0", _preprocessor, needs=(), setup=vision(edit_json(
        vis(VIDEO_PRE), lambda c: c.update(fps=0))), message="fps"),
    api("preprocessor: min_frames above max_frames", _preprocessor, needs=(), setup=vision(
        edit_json(vis(VIDEO_PRE), lambda c: c.update(min_frames=9, max_frames=3))),
        message="increasing range"),
    api("preprocessor: nested 100,000 deep", _preprocessor, needs=(), setup=vision(
        write_bytes(vis(PRE), "[" * 100_000)), message="nested too deeply"),
    api("preprocessor: a directory", _preprocessor, needs=(), setup=vision(
        lambda i: (vis(PRE)(i).unlink(), vis(PRE)(i).mkdir())), message="a directory"),
    api("preprocessor: a FIFO", _preprocessor, needs=(), setup=vision(fifo(vis(VIDEO_PRE))),
        message="not a regular file"),
    api("image: a 5,000-character path", _image("a" * 5000), needs=(), setup=vision(),
        message="not a usable path"),
    api("image: min_pixels 10^12", _image(FRAMES[0], min_pixels=10**12, max_pixels=10**13),
        needs=(), setup=vision(), message="is more than the"),
    api("image: an opened file that is truncated", lambda i: _image(
        Image.open(i.root / "vis" / "cut.png"))(i), needs=(), setup=vision(
        lambda i: (i.root / "vis" / "cut.png").write_bytes(
            (VISION / "image0.png").read_bytes()[:200])), message="not readable"),
    api("image: pre a string", lambda i: _raw_image(FRAMES[0], "pre"), needs=(),
        message="pre must be a Preprocessor"),
    api("video: pre None", lambda i: _raw_video(FRAMES, None), needs=(),
        message="pre must be a Preprocessor"),
    api("video: a generator", _video(f for f in FRAMES), needs=(), setup=vision(),
        message="not generator"),
    api("video: None", _video(None), needs=(), setup=vision(), message="not NoneType"),
    api("video: a string", _video("abcd"), needs=(), setup=vision(), message="not str"),
    api("video: fps 1e-320", _video(FRAMES, fps=1e-320), needs=(), setup=vision(),
        message="too small"),
    api("video: max_pixels 10^13", _video(FRAMES, max_pixels=10**13), needs=(),
        setup=vision(), message="is more than the"),
]
# fmt: on


ROWS = (
    CONFIG_ROWS
    + HEADER_ROWS
    + INDEX_ROWS
    + WEIGHT_ROWS
    + OUTPUT_ROWS
    + PLAN_INFO_GENERATE_ROWS
    + VERIFY_ROWS
    + API_ROWS
    + TOKENIZER_ROWS
    + VISION_ROWS
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A converted model and a bundle of tiny_tied, made once and copied into each row."""
    from mlxkit.convert import convert
    from mlxkit.ios_bridge import build_bundle

    from tests.helpers import FIXTURES

    root = tmp_path_factory.mktemp("built")
    convert(FIXTURES / "tiny_tied", root / "converted", quiet=True)
    build_bundle(FIXTURES / "tiny_tied", root / "bundle", "iphone12")
    return {"converted": root / "converted", "bundle": root / "bundle"}


def test_the_table_has_over_100_distinct_cases():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)) and len(ids) >= 100, len(ids)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row, tmp_path, monkeypatch, built):
    run_row(row, tmp_path, monkeypatch, built)


def test_the_harness_sees_a_leftover(tmp_path, monkeypatch, built):
    """The harness itself can fail: a row whose command writes a file is caught."""
    row = api("writes", lambda i: (i.root / "x").write_text("x") and _api_convert(i, bits=7))
    with pytest.raises(AssertionError, match="left"):
        run_row(row, tmp_path, monkeypatch, built)


def test_float_weights_are_not_flagged(tmp_path):
    """The non-finite check fires on non-finite values only: large finite ones pass."""
    from mlxkit.convert import convert

    src = tmp_path / "src"
    shutil.copytree(Path(__file__).parent / "fixtures" / "tiny_tied", src)
    w = mx.load(str(src / "model.safetensors"))
    w[EMBED] = (w[EMBED].astype(mx.float32) * 1e4).astype(w[EMBED].dtype)
    mx.save_safetensors(str(src / "model.safetensors"), w, metadata={"format": "pt"})
    out = convert(src, tmp_path / "out", quiet=True, quantize=False).output
    got = np.array(
        mx.load(str(out / "model.safetensors"))[
            EMBED.replace("model.language_model.", "language_model.model.")
        ].astype(mx.float32)
    )
    assert np.isfinite(got).all() and np.abs(got).max() > 100


def test_hub_cache_snapshot_symlinks_are_allowed(tmp_path):
    """A Hugging Face cache snapshot is all symlinks into the repo's blob store: they leave
    the model directory, and that one place outside it is allowed (and no other)."""
    from mlxkit.info import checkpoint_info
    from tests.helpers import FIXTURES

    repo = tmp_path / "models--Qwen--Qwen3.5-Tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in (FIXTURES / "tiny_tied").iterdir():
        shutil.copy(f, blobs / f"blob-{f.name}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"blob-{f.name}")
    assert checkpoint_info(snapshot).params["text"] > 0
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(FIXTURES / "tiny_tied" / "model.safetensors")
    with pytest.raises(MlxkitError, match="outside the model directory"):
        checkpoint_info(snapshot)


def test_the_harness_kills_a_hang(tmp_path, monkeypatch, built):
    """A row that could hang runs in a child the harness kills after its timeout."""
    import time

    from tests import badinput

    monkeypatch.setattr(badinput, "TIMEOUT_S", 0.2)
    row = api("hangs", lambda i: time.sleep(60), subprocess=True)
    with pytest.raises(pytest.fail.Exception, match="hung"):
        run_row(row, tmp_path, monkeypatch, built)


def test_hub_cache_snapshot_of_a_converted_model_loads_with_its_drafter(tmp_path, built):
    """In a cache snapshot of a converted model, mtp/ is a real folder whose files link into
    the blob store two levels up: allowed like the files beside it."""
    from mlxkit import load_model

    snapshot = tmp_path / "models--me--Tiny-4bit" / "snapshots" / "0123abc"
    blobs = tmp_path / "models--me--Tiny-4bit" / "blobs"
    blobs.mkdir(parents=True)
    for f in sorted(built["converted"].rglob("*")):
        if f.is_file():
            rel = f.relative_to(built["converted"])
            blob = blobs / rel.as_posix().replace("/", "-")
            shutil.copy(f, blob)
            (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / rel).symlink_to(os.path.relpath(blob, (snapshot / rel).parent))
    assert load_model(snapshot).has_mtp
