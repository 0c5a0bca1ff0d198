"""Loading real checkpoint layouts, and the one-line errors for broken ones."""

import json
import shutil
import struct

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlxkit.cli import main
from mlxkit.errors import CheckpointError
from mlxkit.load import load, load_model
from tests.helpers import FIXTURES


def copy_fixture(tmp_path, name="tiny_tied"):
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def rewrite_weights(model_dir, edit):
    """Applies edit(dict of arrays) to model.safetensors, keeping the HF layout."""
    path = model_dir / "model.safetensors"
    weights = mx.load(str(path))
    edit(weights)
    mx.save_safetensors(str(path), weights)


def test_load_returns_model_and_tokenizer():
    model, tokenizer = load(FIXTURES / "tiny_tied")
    assert model.has_mtp
    assert model.layers[0].linear_attn.A_log.dtype == mx.float32
    assert model.language_model.model.embed_tokens.weight.dtype == mx.bfloat16
    ids = tokenizer.encode("def f(x):\n    return x")
    assert tokenizer.decode(ids) == "def f(x):\n    return x"


def test_sharded_checkpoint_loads_every_shard():
    model = load_model(FIXTURES / "tiny_untied")
    assert len(model.layers) == 8 and "lm_head" in model.language_model


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda w: w.pop("model.language_model.layers.1.mlp.up_proj.weight"), "missing tensor"),
        (
            lambda w: w.update(
                {"model.language_model.layers.0.mlp.up_proj.weight": mx.zeros((3, 3))}
            ),
            "has shape (3, 3)",
        ),
        (lambda w: w.update({"model.language_model.extra.weight": mx.zeros((2,))}), "extra.weight"),
    ],
)
def test_bad_tensors_name_the_tensor(tmp_path, breakage, message):
    d = copy_fixture(tmp_path)
    rewrite_weights(d, breakage)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_model(d)


def test_wrong_model_type(tmp_path):
    d = copy_fixture(tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'llama' is not a Qwen 3.5"):
        load_model(d)


def test_truncated_shard_names_file_and_tensor(tmp_path):
    d = copy_fixture(tmp_path, "tiny_untied")
    shard = d / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(
        CheckpointError, match=r"model-00002-of-00002.safetensors: tensor .*truncated"
    ):
        load_model(d)


def test_header_longer_than_file(tmp_path):
    d = copy_fixture(tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 2)
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header length"):
        load_model(d)


def test_cli_info_counts_parameters_by_part():
    result = CliRunner().invoke(main, ["info", str(FIXTURES / "tiny_tied")])
    assert result.exit_code == 0, result.output
    weights = mx.load(str(FIXTURES / "tiny_tied" / "model.safetensors"))
    expected = {"text": 0, "mtp": 0, "vision": 0}
    nbytes = dict(expected)
    for name, w in weights.items():
        part = (
            "mtp"
            if name.startswith("mtp.")
            else "vision"
            if name.startswith("model.visual.")
            else "text"
        )
        expected[part] += w.size
        nbytes[part] += w.nbytes
    for part, count in expected.items():
        line = next(line for line in result.output.splitlines() if line.strip().startswith(part))
        assert f"{count:,}" in line and f"{nbytes[part]:,} bytes" in line
    assert "3 Gated-DeltaNet, 1 full attention" in result.output


def test_cli_info_on_a_non_checkpoint_exits_2(tmp_path):
    result = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert result.exit_code == 2
    assert "no config.json" in result.output
    assert "Traceback" not in result.output
