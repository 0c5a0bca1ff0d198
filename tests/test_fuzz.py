"""Hypothesis fuzzing of the four parsers that read untrusted files: safetensors headers,
config.json, shard indexes and bundle manifests. Each must end in a result or in mlxkit's
own error, never another exception, and what it accepts must be sound: a header it accepts
is one the safetensors reference implementation accepts too, and tiles the file exactly.

The default run tries a few hundred examples per parser; `pytest -m slow` 5,000 each."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from mlxkit.checkpoint import DTYPE_BYTES, read_config, read_header, weight_files
from mlxkit.errors import MlxkitError
from mlxkit.models.qwen3_5 import TextConfig
from tests.helpers import FIXTURES

DEFAULT, SLOW = 300, 5000
SCRATCH = Path(tempfile.mkdtemp(prefix="mlxkit-fuzz-"))  # one folder for every example


def fuzz(strategy, examples: int = DEFAULT):
    """The test body as two tests: a default one and a `slow` one with 5,000 examples."""

    def wrap(body):
        def make(n):
            return settings(
                max_examples=n,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )(given(strategy)(body))

        fast = make(examples)
        slow = pytest.mark.slow(make(SLOW))
        return fast, slow

    return wrap


def teardown_module():
    shutil.rmtree(SCRATCH, ignore_errors=True)


# --- JSON values of every kind, the ones that break parsers included --------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 2**31, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "..", "/etc/passwd", "a\0b", "x" * 300, "BF16", "F32"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

# --- safetensors headers --------------------------------------------------------------------


@st.composite
def safetensors_files(draw) -> bytes:
    """A valid safetensors file, then (usually) one near-miss mutation of it."""
    n = draw(st.integers(0, 4))
    header: dict = {}
    offset = 0
    for i in range(n):
        dtype = draw(st.sampled_from(sorted(DTYPE_BYTES)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    data = bytes(offset)
    names = [k for k in header if k != "__metadata__"]
    kind = draw(
        st.sampled_from(
            ["none", "field", "offsets", "data", "prefix", "raw", "metadata", "duplicate", "extra"]
        )
    )
    prefix = None
    if kind == "field" and names:
        name, key = (
            draw(st.sampled_from(names)),
            draw(st.sampled_from(["dtype", "shape", "data_offsets"])),
        )
        if draw(st.booleans()):
            header[name][key] = draw(json_values)
        else:
            del header[name][key]
    elif kind == "offsets" and names:
        name = draw(st.sampled_from(names))
        header[name]["data_offsets"] = [
            o + draw(st.integers(-3, 3)) for o in header[name]["data_offsets"]
        ]
    elif kind == "data":
        data = data[: draw(st.integers(0, len(data)))] + bytes(draw(st.integers(0, 3)))
    elif kind == "metadata":
        header["__metadata__"] = draw(json_values)
    elif kind == "extra":
        header[draw(st.text(max_size=5))] = draw(json_values)
    if kind == "raw":
        raw = draw(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
    else:
        raw = json.dumps(header).encode()
        if kind == "duplicate" and names:
            raw = (
                raw[:-1]
                + b', "'
                + names[0].encode()
                + b'": '
                + json.dumps(header[names[0]]).encode()
                + b"}"
            )
    raw += b" " * draw(st.integers(0, 8))
    if kind == "prefix":
        prefix = draw(st.integers(0, 2**64 - 1))
    length = len(raw) if prefix is None else prefix
    return length.to_bytes(8, "little") + raw + data


def _reference_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), "numpy") as f:
            list(f.keys())
        return True
    except Exception:  # noqa: BLE001 - the reference raises several types for a bad file
        return False


@fuzz(safetensors_files())
def _header(blob: bytes) -> None:
    path = SCRATCH / "fuzz.safetensors"
    path.write_bytes(blob)
    try:
        tensors = read_header(path)
    except MlxkitError:
        return
    assert _reference_accepts(path), "accepted a header the safetensors reference rejects"
    spans = sorted((t.start, t.end) for t in tensors.values())
    n = int.from_bytes(blob[:8], "little")
    end = 8 + n
    for start, stop in spans:
        assert start == end and stop >= start
        end = stop
    assert end == len(blob)


test_header_fuzz, test_header_fuzz_5000 = _header


# --- config.json ----------------------------------------------------------------------------

BASE_CONFIG = json.loads((FIXTURES / "tiny_tied" / "config.json").read_text())
TEXT_KEYS = sorted(BASE_CONFIG["text_config"])


@st.composite
def configs(draw) -> object:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    config = json.loads(json.dumps(BASE_CONFIG))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(TEXT_KEYS + ["rope_parameters.rope_theta", "text_config"]))
        value = draw(json_values | st.integers(-5, 10**10))
        if key == "text_config":
            config["text_config"] = value
        elif not isinstance(config.get("text_config"), dict):
            break
        elif key.startswith("rope_parameters."):
            rope = config["text_config"].get("rope_parameters")
            if isinstance(rope, dict):
                rope["rope_theta"] = value
        elif draw(st.booleans()):
            config["text_config"][key] = value
        else:
            config["text_config"].pop(key, None)
    return config


@fuzz(configs())
def _config(config: object) -> None:
    try:
        cfg = TextConfig.from_dict(config)
    except MlxkitError:
        return
    assert 0 < cfg.rotary_dim <= cfg.head_dim and cfg.num_hidden_layers == len(cfg.layer_types)
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0


test_config_fuzz, test_config_fuzz_5000 = _config


@fuzz(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def _config_file(blob: bytes) -> None:
    folder = SCRATCH / "config"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes(blob)
    try:
        assert isinstance(read_config(folder), dict)
    except MlxkitError:
        pass


test_config_file_fuzz, test_config_file_fuzz_5000 = _config_file


# --- shard indexes ---------------------------------------------------------------------------

SHARD_NAMES = [
    "model.safetensors",
    "loop.safetensors",
    "dir.safetensors",
    "fifo.safetensors",
    "out.safetensors",
    "gone.safetensors",
    "../model.safetensors",
    "/etc/passwd",
    "sub/model.safetensors",
    "a\0.safetensors",
]


def _model_dir() -> Path:
    """A model folder with one good shard and every kind of bad one beside it."""
    folder = SCRATCH / "index"
    if not folder.exists():
        folder.mkdir()
        shutil.copy(FIXTURES / "tiny_tied" / "model.safetensors", folder / "model.safetensors")
        (folder / "loop.safetensors").symlink_to("loop.safetensors")
        (folder / "dir.safetensors").mkdir()
        os.mkfifo(folder / "fifo.safetensors")
        (folder / "out.safetensors").symlink_to(FIXTURES / "tiny_tied" / "model.safetensors")
    return folder


indexes = st.one_of(
    json_values,
    st.dictionaries(
        st.text(max_size=6), st.sampled_from(SHARD_NAMES) | json_values, max_size=4
    ).map(lambda wm: {"weight_map": wm}),
)


@fuzz(indexes)
def _index(data: object) -> None:
    folder = _model_dir()
    (folder / "model.safetensors.index.json").write_text(json.dumps(data))
    try:
        files = weight_files(folder)
    except MlxkitError:
        return
    assert files and all(f.parent == folder and f.is_file() for f in files)
    assert all(f.name == "model.safetensors" for f in files)


test_index_fuzz, test_index_fuzz_5000 = _index


# --- bundle manifests ------------------------------------------------------------------------


def _bundle() -> Path:
    folder = SCRATCH / "bundle"
    if not folder.exists():
        from mlxkit.ios_bridge import build_bundle

        build_bundle(FIXTURES / "tiny_tied", folder, "iphone12")
    return folder


def _paths(value: object, where: tuple = ()) -> list[tuple]:
    """Every path to a leaf or branch of a JSON value."""
    out = [where]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*where, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*where, i))
    return out


@st.composite
def manifests(draw) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
    manifest = json.loads((_bundle() / "manifest.json").read_text())
    for _ in range(draw(st.integers(1, 2))):
        where = draw(st.sampled_from(_paths(manifest)[1:]))
        node = manifest
        for key in where[:-1]:
            node = node[key]
        if draw(st.booleans()) and isinstance(node, dict):
            del node[where[-1]]
        else:
            node[where[-1]] = draw(json_values)
    return json.dumps(manifest).encode()


@fuzz(manifests(), examples=200)
def _manifest(blob: bytes) -> None:
    from mlxkit.ios_bridge import verify_bundle

    bundle = _bundle()
    original = (bundle / "manifest.json").read_bytes()
    (bundle / "manifest.json").write_bytes(blob)
    try:
        report = verify_bundle(bundle, load=False)
    except MlxkitError:
        return
    finally:
        (bundle / "manifest.json").write_bytes(original)
    if report.ok:  # then nothing changed but the fields no app reads
        informational = ("source", "created_by", "quality")  # quality: re-measured on request
        strip = lambda m: {k: v for k, v in m.items() if k not in informational}
        assert strip(json.loads(blob)) == strip(json.loads(original))


test_manifest_fuzz, test_manifest_fuzz_5000 = _manifest
