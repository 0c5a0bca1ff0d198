"""`mlxkit info` on quantized checkpoints: every setting a mixed recipe gives, the bits per
weight, and the rounding, read from the files alone."""

import json

import pytest
from click.testing import CliRunner
from mlxkit.convert import convert

from mlxkit.checkpoint import read_headers, weight_files
from mlxkit.cli import main
from tests.helpers import FIXTURES


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """tiny_tied under the fixed mixed `quality` recipe (several settings, no measurement)."""
    out = tmp_path_factory.mktemp("info") / "tiny-quality"
    convert(FIXTURES / "tiny_tied", out, recipe="quality", quiet=True)
    return out


def quantization_line(path) -> str:
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0, result.output
    return next(line for line in result.output.splitlines() if "quantization:" in line)


def test_a_mixed_recipe_lists_every_setting_and_the_bits_per_weight(mixed):
    config = json.loads((mixed / "config.json").read_text())
    q = config["quantization"]
    headers = read_headers(weight_files(mixed))
    counts: dict[tuple, int] = {}
    text_bytes = 0
    for name, t in headers.items():
        if name.startswith("vision_tower."):  # counted apart, as "vision"
            continue
        text_bytes += t.nbytes
        if name.endswith(".scales"):
            module = name.rsplit(".", 1)[0]
            o = q.get(module) if isinstance(q.get(module), dict) else {}
            key = (o.get("bits", q["bits"]), o.get("group_size", q["group_size"]))
            counts[key] = counts.get(key, 0) + 1
    assert len(counts) > 1  # the recipe is mixed
    line = quantization_line(mixed)
    assert line.split(": ", 1)[1].startswith("mixed: ")
    for (bits, group), n in counts.items():
        assert f"{bits}-bit, group size {group} ({n} module{'s' * (n != 1)})" in line
    text = CliRunner().invoke(main, ["info", str(mixed)]).output
    params = int(
        next(x for x in text.splitlines() if x.strip().startswith("text"))
        .split()[1]
        .replace(",", "")
    )
    assert f"{text_bytes * 8 / params:.2f} bits per weight (text)" in line


def test_the_rounding_the_index_records_is_shown(mixed, tmp_path):
    assert "rounding" not in quantization_line(mixed)
    copy = tmp_path / "gptq"
    copy.mkdir()
    for f in mixed.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    index = copy / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data.setdefault("metadata", {})["rounding"] = "gptq"
    index.write_text(json.dumps(data))
    assert quantization_line(copy).endswith("; rounding gptq")
