"""Bad inputs of --rounding, refused in one line before anything is rounded or written: an
unknown rounding, and learned rounding of weights that are not quantized (--target with it:
tests/test_bad_inputs_gptq_target.py). Rows run through the shared harness
(tests/badinput.py)."""

from __future__ import annotations

import pytest

from tests.badinput import api, cli, run_row
from tests.test_bad_inputs import _api_convert

# fmt: off
ROWS = [
    cli("unknown --rounding", "convert", "--hf-path", "{src}", "-o", "{out}", "--rounding",
        "awq", message="--rounding must be one of nearest, gptq, got 'awq'"),
    cli("--rounding gptq with --no-quantize", "convert", "--hf-path", "{src}", "-o", "{out}",
        "--rounding", "gptq", "--no-quantize",
        message="--rounding gptq rounds quantized weights; drop --no-quantize"),
    api("convert(rounding=None)", lambda i: _api_convert(i, rounding=None),
        message="--rounding must be one of nearest, gptq, got None"),
]
# fmt: on


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_rounding_input(row, tmp_path, monkeypatch):
    run_row(row, tmp_path, monkeypatch, built={})
