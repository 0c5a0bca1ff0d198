"""Bad inputs of --recipe auto, refused in one line before anything is measured or written:
--bits / --group-size beside it (auto chooses them), --bits-per-weight without it, and
--bits-per-weight with --target (the phone sets the budget). Rows run through the shared
harness (tests/badinput.py)."""

from __future__ import annotations

import pytest

from tests.badinput import api, cli, run_row
from tests.test_bad_inputs import _api_convert

# fmt: off
ROWS = [
    cli("auto with --bits", "convert", "--hf-path", "{src}", "-o", "{out}", "--recipe", "auto",
        "--bits", "8", message="--recipe auto chooses the bits and group size of each group"),
    cli("auto with --group-size", "convert", "--hf-path", "{src}", "-o", "{out}", "--recipe",
        "auto", "--group-size", "32", message="pass --bits-per-weight B instead"),
    cli("--bits-per-weight without auto", "convert", "--hf-path", "{src}", "-o", "{out}",
        "--bits-per-weight", "4.5", message="--bits-per-weight is the budget of --recipe auto"),
    cli("--bits-per-weight with --target", "convert", "--hf-path", "{src}", "--target",
        "iphone15pro", "--bits-per-weight", "4.5", message="drop --bits-per-weight"),
    api("convert(recipe='auto', bits_per_weight='4.5')",
        lambda i: _api_convert(i, recipe="auto", bits_per_weight="4.5"),
        message="--bits-per-weight must be a number"),
    api("convert(recipe='auto', quantize=False)",
        lambda i: _api_convert(i, recipe="auto", quantize=False),
        message="--recipe auto quantizes; drop --no-quantize"),
]
# fmt: on


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_auto_input(row, tmp_path, monkeypatch):
    run_row(row, tmp_path, monkeypatch, built={})
