"""The converter: its output is what it planned, what mlx-lm writes (text) and mlx-vlm reads
(vision tower included), and what mlx-lm, mlxkit and mlx-vlm (with the MTP drafter) load and
decode identically."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx_vlm  # a dev dependency: the interoperability tests must run, not skip
import numpy as np
import pytest
from mlxkit.convert import convert, load_recipe, planned_tensors
from mlxkit.convert import converter as converter_module

from mlxkit.checkpoint import read_headers, weight_files
from mlxkit.generate import stream_generate
from mlxkit.layout import ModelConfig, drafter_key
from mlxkit.load import load, load_model
from mlxkit.models.qwen3_5 import TextConfig, sanitize_tensor
from tests.helpers import (
    FIXTURES,
    TINY,
    conversions,
    copying_mtp_checkpoint,
    mlx_vlm_mtp_logits,
    reference,
)
from tests.vision_helpers import VISION

DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "U32": "uint32"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Converts each fixture once per setting; returns a function (name, **options) -> OUT."""
    return conversions(tmp_path_factory)


def written(directory: Path) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """name -> (shape, dtype, bytes) from the safetensors headers in a directory."""
    return {
        name: (info.shape, DTYPE_NAMES[info.dtype], info.nbytes)
        for name, info in read_headers(weight_files(directory)).items()
    }


def config_of(name: str) -> TextConfig:
    return TextConfig.from_dict(json.loads((FIXTURES / name / "config.json").read_text()))


def shapes_of(name: str) -> ModelConfig:
    return ModelConfig.from_dict(json.loads((FIXTURES / name / "config.json").read_text()))


def source_weights(name: str, dtype=None) -> dict[str, mx.array]:
    """The fixture's tensors under our parameter paths, sanitized as the loader does."""
    cfg = config_of(name)
    out = {}
    for f in weight_files(FIXTURES / name):
        for key, value in mx.load(str(f)).items():
            item = sanitize_tensor(key, value, cfg.tie_word_embeddings, dtype)
            if item is not None:
                out[item[0]] = item[1]
    return out


# --- the plan is the output ---------------------------------------------------------------------


@pytest.mark.parametrize("name", [*TINY, VISION[1]])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"recipe": "quality"},
        {"bits": 8, "group_size": 32},
        {"quantize": False, "dtype": "float32"},
        {"mtp": False},
        {"vision": False},
        {"vision_bits": 4, "group_size": 32},
    ],
    ids=["uniform", "quality", "8bit-g32", "float32", "no-mtp", "no-vision", "vision-4bit-g32"],
)
def test_conversion_writes_exactly_the_planned_tensors(converted, name, options):
    """Every fixture ships a vision tower, kept unless vision=False (in the output dtype
    unless vision_bits)."""
    out = converted(name, **options)
    recipe = None
    if options.get("quantize", True):
        recipe = load_recipe(
            options.get("recipe", "uniform"), options.get("bits"), options.get("group_size")
        )
    shapes = shapes_of(name)
    vision = shapes.vision if options.get("vision", True) else None
    plan = planned_tensors(
        shapes.text,
        recipe,
        include_mtp=options.get("mtp", True),
        dtype=options.get("dtype", "bfloat16"),
        vision=vision,
        vision_bits=options.get("vision_bits"),
    )
    assert any(t.part == "vision" for t in plan) == (vision is not None)
    if options.get("vision_bits"):
        assert any(t.part == "vision" and t.dtype == "uint32" for t in plan)
    main = {t.path: (t.shape, t.dtype, t.nbytes) for t in plan if t.part != "mtp"}
    drafter = {drafter_key(t.path): (t.shape, t.dtype, t.nbytes) for t in plan if t.part == "mtp"}
    assert written(out) == main
    assert not any(k.startswith("mtp.") for k in written(out))
    if options.get("mtp", True):
        assert written(out / "mtp") == drafter
    else:
        assert not (out / "mtp").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(b for *_, b in main.values())


@pytest.mark.parametrize("name", TINY)
def test_output_is_what_mlx_lm_convert_writes(converted, name, tmp_path):
    """Without the vision tower (mlx-lm drops it): same tensor names, dtypes and bytes as
    `mlx_lm.convert -q`, same config but for the spelling mlx-lm leaves behind in
    rope_parameters (it renames rope_type to type in place)."""
    from mlx_lm.convert import convert as mlx_lm_convert

    ours = converted(name, vision=False)
    theirs = tmp_path / "mlx_lm"
    mlx_lm_convert(str(FIXTURES / name), str(theirs), quantize=True)
    a = {k: v for f in weight_files(ours) for k, v in mx.load(str(f)).items()}
    b = {k: v for f in weight_files(theirs) for k, v in mx.load(str(f)).items()}
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert value.dtype == b[k].dtype and value.shape == b[k].shape, k
        assert mx.array_equal(value, b[k]).item(), k
    ca = json.loads((ours / "config.json").read_text())
    cb = json.loads((theirs / "config.json").read_text())
    cb["text_config"]["rope_parameters"]["rope_type"] = cb["text_config"]["rope_parameters"].pop(
        "type"
    )
    assert ca == cb
    for f in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (ours / f).read_bytes() == (FIXTURES / name / f).read_bytes()


# --- quantization -------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["uniform", "quality"])
def test_quantized_weights_equal_mx_quantize_of_the_same_weights(converted, recipe):
    name = "tiny_untied"
    out = converted(name, recipe=recipe)
    rules = load_recipe(recipe)
    src = source_weights(name, mx.bfloat16)
    got = {k: v for f in weight_files(out) for k, v in mx.load(str(f)).items()}
    got.update({"mtp." + k: v for k, v in mx.load(str(out / "mtp" / "model.safetensors")).items()})
    config = json.loads((out / "config.json").read_text())
    n_quantized = 0
    for path, weight in src.items():
        rule = rules.rule_for(path, tuple(weight.shape))
        module = path.removesuffix(".weight")
        if rule is None:
            assert f"{module}.scales" not in got
            assert mx.array_equal(got[path], weight).item() and got[path].dtype == weight.dtype
            continue
        bits, group = rule
        w, s, b = mx.quantize(weight, group_size=group, bits=bits)
        assert mx.array_equal(got[path], w).item(), path
        assert mx.array_equal(got[f"{module}.scales"], s).item(), path
        assert mx.array_equal(got[f"{module}.biases"], b).item(), path
        # what a loader reconstructs is within one quantization step of the source (MLX
        # keeps zero exact, which costs up to a step), plus the bf16 rounding of the
        # stored values and biases
        scales, biases = (got[f"{module}.{k}"].astype(mx.float32) for k in ("scales", "biases"))
        restored = mx.dequantize(
            got[path], got[f"{module}.scales"], got[f"{module}.biases"], group, bits
        ).astype(mx.float32)
        w32 = weight.astype(mx.float32)
        step, offset = (mx.repeat(mx.abs(a), group, axis=-1) for a in (scales, biases))
        bound = step + (offset + mx.abs(w32)) * 2**-7
        assert (mx.abs(restored - w32) <= bound).all().item(), path
        if not path.startswith("mtp.") and rule != (rules.bits, rules.group_size):
            assert config["quantization"][module] == {
                "group_size": group,
                "bits": bits,
                "mode": "affine",
            }
        n_quantized += 1
    assert n_quantized > 30


def test_row_chunks_give_the_bytes_of_whole_tensors(converted, tmp_path, monkeypatch):
    """With 1 KB chunks every matrix is read, quantized and written in many pieces."""
    monkeypatch.setattr(converter_module, "CHUNK_BYTES", 1024)
    for options in ({}, {"quantize": False, "dtype": "float32"}):
        out = tmp_path / f"chunked{len(options)}"
        convert(FIXTURES / "tiny_untied", out, quiet=True, **options)
        whole = converted("tiny_untied", **options)
        for sub in ("", "mtp"):
            for f in weight_files(whole / sub):
                assert (out / sub / f.name).read_bytes() == f.read_bytes()


def test_quality_recipe_puts_more_bits_where_it_says():
    recipe = load_recipe("quality")
    assert recipe.rule_for("language_model.model.embed_tokens.weight", (248320, 1024)) == (8, 64)
    assert recipe.rule_for("language_model.lm_head.weight", (248320, 4096)) == (8, 64)
    assert recipe.rule_for("language_model.model.layers.0.linear_attn.in_proj_a", (16, 1024)) == (
        8,
        64,
    )
    assert recipe.rule_for("language_model.model.layers.3.mlp.down_proj.weight", (1024, 3584)) == (
        6,
        64,
    )
    assert recipe.rule_for(
        "language_model.model.layers.3.self_attn.v_proj.weight", (512, 1024)
    ) == (6, 64)
    assert recipe.rule_for(
        "language_model.model.layers.3.self_attn.q_proj.weight", (4096, 1024)
    ) == (4, 64)
    assert (
        recipe.rule_for("language_model.model.layers.0.linear_attn.conv1d.weight", (6144, 4, 1))
        is None
    )
    assert recipe.rule_for("language_model.model.norm.weight", (1024,)) is None
    assert load_recipe("quality", bits=3).rule_for("mtp.fc.weight", (1024, 2048)) == (3, 64)


def test_recipe_quantization_block_is_declared_in_both_configs(converted):
    out = converted("tiny_untied", recipe="quality")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"]
    assert config["quantization"]["language_model.lm_head"]["bits"] == 8
    assert config["quantization"]["language_model.model.layers.7.mlp.down_proj"]["bits"] == 6
    assert not any(k.startswith("vision_tower") for k in config["quantization"])  # not quantized
    drafter = json.loads((out / "mtp" / "config.json").read_text())
    assert drafter["quantization"] == drafter["quantization_config"]
    assert drafter["quantization"]["layers.0.mlp.down_proj"]["bits"] == 6  # drafter-relative paths
    assert not any(k.startswith("mtp.") for k in drafter["quantization"])
    assert drafter["model_type"] == "qwen3_5_mtp" and drafter["block_size"] == 3
    assert drafter["text_config"]["hidden_size"] == 64


# --- loading and decoding -----------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_float32_conversion_reproduces_reference_logits(converted, name):
    out = converted(name, quantize=False, dtype="float32")
    ref = reference(name)
    model = load_model(out)
    assert model.layers[0].linear_attn.A_log.dtype == mx.float32
    logits = model(mx.array(ref["tokens"])[None])[0]
    assert np.abs(np.array(logits) - ref["logits_f64"]).max() <= 1e-4
    mtp = model.mtp_forward(
        mx.array(ref["hidden_f64"][:-1], dtype=mx.float32)[None], mx.array(ref["tokens"][1:])[None]
    )[0][0]
    assert np.abs(np.array(mtp) - ref["mtp_logits_f64"]).max() <= 1e-4


def greedy_mlx_lm(out: Path, prompt: list[int], n: int) -> list[int]:
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.generate import generate_step

    model, _ = mlx_lm_load(str(out))
    steps = generate_step(mx.array(prompt), model, max_tokens=n)
    return [int(t) for t, _ in steps]


def greedy_mlxkit(out: Path, prompt: list[int], n: int, mtp: bool, dtype=None) -> list[int]:
    model, tokenizer = load(out, dtype=dtype)
    tokenizer._eos_token_ids = []  # decode n tokens whatever they are
    return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=n, mtp=mtp)]


@pytest.mark.parametrize("name", TINY)
def test_mlx_lm_and_mlxkit_decode_the_converted_model_identically(converted, name):
    """float32 for everything not quantized, so that both runtimes compute in float32: in
    bf16 their (equally valid) orders of operations already differ on these random models."""
    out = converted(name, dtype="float32")
    prompt = [int(t) for t in reference(name)["tokens"][:12]]
    plain = greedy_mlxkit(out, prompt, 24, mtp=False)
    assert greedy_mlx_lm(out, prompt, 24) == plain
    assert greedy_mlxkit(out, prompt, 24, mtp=True) == plain
    assert load_model(out).has_mtp  # found OUT/mtp/ on its own


def test_mtp_decode_on_converted_equals_unconverted(converted):
    name = "tiny_untied"
    out = converted(name, quantize=False, dtype="float32")
    prompt = [int(t) for t in reference(name)["tokens"][:12]]
    assert greedy_mlxkit(out, prompt, 24, mtp=True) == greedy_mlxkit(
        FIXTURES / name, prompt, 24, mtp=True, dtype=mx.float32
    )


@pytest.mark.parametrize("name", TINY)
def test_mlx_vlm_mtp_drafter_reads_the_drafter_directory(converted, name):
    """mlx-vlm's `qwen3_5_mtp` drafter on OUT/mtp reproduces the fixture's MTP reference
    (so no norm is converted twice), and its speculative decoding (what `--draft-model
    OUT/mtp --draft-kind mtp` runs) gives the greedy tokens of plain decoding."""
    from mlx_vlm.speculative.drafters import load_drafter

    ref = reference(name)
    out = converted(name, quantize=False, dtype="float32")
    target, _ = mlx_vlm.load(str(out))
    drafter, kind = load_drafter(str(out / "mtp"), kind="mtp")
    assert kind == "mtp"
    logits = mlx_vlm_mtp_logits(target, drafter, name)
    assert np.abs(logits - ref["mtp_logits_f64"]).max() <= 1e-4

    # 4-bit, float32 activations: in bf16, mlx-vlm's own multi-token verify pass rounds
    # differently from its one-token decode step and flips near-ties on these random models
    out = converted(name, dtype="float32")
    target, _ = mlx_vlm.load(str(out))
    drafter, kind = load_drafter(str(out / "mtp"), kind="mtp")
    prompt = [int(t) for t in ref["tokens"][:12]]
    plain = greedy_mlx_vlm(target, prompt, 24)
    assert greedy_mlx_vlm(target, prompt, 24, draft_model=drafter, draft_kind=kind) == plain
    assert len(drafter.accept_lens) >= 5  # drafting rounds ran


def test_mlx_vlm_accepts_the_drafts_of_a_copying_mtp_head(tmp_path):
    from mlx_vlm.speculative.drafters import load_drafter

    out = tmp_path / "out"
    convert(copying_mtp_checkpoint(tmp_path), out, dtype="float32", quiet=True)
    target, _ = mlx_vlm.load(str(out))
    drafter, kind = load_drafter(str(out / "mtp"), kind="mtp")
    prompt = [int(t) for t in reference("tiny_untied")["tokens"][:12]]
    plain = greedy_mlx_vlm(target, prompt, 24)
    assert greedy_mlx_vlm(target, prompt, 24, draft_model=drafter, draft_kind=kind) == plain
    assert sum(drafter.accept_lens) >= 0.9 * sum(drafter.draft_lens)
    assert greedy_mlxkit(out, prompt, 24, mtp=True) == plain


def greedy_mlx_vlm(model, prompt: list[int], n: int, **draft) -> list[int]:
    """Token ids from mlx-vlm's decode loop (`generate_step`, which `mlx_vlm.generate` and its
    CLI drive; called directly because mlx-vlm's detokenizer cannot print the padding ids
    past the tiny tokenizer that these random models emit)."""
    from mlx_vlm.generate.ar import generate_step

    tokens: list[int] = []
    for token, _ in generate_step(
        mx.array([prompt]), model, None, None, max_tokens=n, temperature=0.0, **draft
    ):
        tokens.extend(np.array(token).reshape(-1).tolist())
        if len(tokens) >= n:
            break
    return tokens[:n]


def test_default_output_name_and_force(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = convert(FIXTURES / "tiny_tied", quiet=True)
    assert result.output == tmp_path / "tiny_tied-4bit"
    before = (result.output / "model.safetensors").read_bytes()
    again = convert(FIXTURES / "tiny_tied", result.output, force=True, quiet=True, bits=8)
    assert json.loads((again.output / "config.json").read_text())["quantization"]["bits"] == 8
    assert len((again.output / "model.safetensors").read_bytes()) > len(before)  # 8-bit weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_tied-4bit"]  # nothing left over
    assert convert(FIXTURES / "tiny_tied", None, quantize=False, quiet=True).output.name == (
        "tiny_tied-bfloat16"
    )


def test_result_reports_bytes_bits_time_and_memory(converted, tmp_path):
    result = convert(FIXTURES / "tiny_tied", tmp_path / "o", quiet=True)
    # the reported bytes are the bytes in the written files, read back from their headers
    mtp = sum(i.nbytes for i in read_headers(weight_files(tmp_path / "o" / "mtp")).values())
    main = sum(i.nbytes for i in read_headers(weight_files(tmp_path / "o")).values())
    assert result.bytes_by_part["mtp"] == mtp > 0 and result.bytes_by_part["vision"] > 0
    text_and_vision = ("embeddings", "layers", "vision")
    assert sum(result.bytes_by_part[k] for k in text_and_vision) == main
    assert result.total_bytes == main + mtp
    assert 4.0 < result.bits_per_weight < 5.5
    assert result.seconds > 0 and result.peak_memory > 10e6
    assert result.mtp_dir == tmp_path / "o" / "mtp"


def test_size_resolves_through_the_hub_cache_and_names_the_output(tmp_path, monkeypatch):
    """--size goes through huggingface_hub's snapshot_download (here a stand-in returning a
    local snapshot), and the default output is named after the repo."""
    import huggingface_hub
    from click.testing import CliRunner

    from mlxkit.cli import main

    asked = []

    def snapshot_download(repo_id, **kwargs):
        asked.append((repo_id, kwargs))
        return str(FIXTURES / "tiny_tied")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["convert", "--size", "2b", "--quiet"])
    assert result.exit_code == 0, result.output
    assert asked[0][0] == "Qwen/Qwen3.5-2B" and "*.safetensors" in asked[0][1]["allow_patterns"]
    assert (tmp_path / "Qwen3.5-2B-4bit" / "mtp" / "config.json").is_file()


def test_size_micro_resolves_through_mlxkit_load(tmp_path, monkeypatch):
    import importlib

    load_module = importlib.import_module("mlxkit.load")  # `mlxkit.load` is also a function
    monkeypatch.setattr(load_module, "resolve_model_dir", lambda name: FIXTURES / "tiny_untied")
    monkeypatch.chdir(tmp_path)
    from mlxkit.source import Size

    result = convert(Size("micro"), quiet=True, recipe="quality")
    assert result.output == tmp_path / "micro-quality-4bit"
