"""Bad inputs for quantization, by class: a checkpoint whose widths no group size divides (64
and 32 both fail) is refused in one line by every path that would quantize it — convert (any
recipe or group size), convert --target, bundle build, plan — before anything is written.
Rows run through the shared harness (tests/badinput.py) with tests/test_bad_inputs.py's API
helpers; the checkpoint maker is tests/test_group_size.py's."""

from __future__ import annotations

import pytest

from tests.badinput import Inputs, api, cli, run_row
from tests.test_bad_inputs import _api_build, _api_convert, _plan
from tests.test_group_size import set_width

WIDTH = "input width 80 is not a multiple of 64 or 32"


def width_80(i: Inputs) -> None:
    set_width(i.src, 80)


# fmt: off
ROWS = [
    cli("width 80: convert", "convert", "--hf-path", "{src}", "-o", "{out}", setup=width_80,
        message=WIDTH),
    cli("width 80: convert --group-size 128", "convert", "--hf-path", "{src}", "-o", "{out}",
        "--group-size", "128", setup=width_80, message=WIDTH),
    cli("width 80: convert --recipe quality --bits 8", "convert", "--hf-path", "{src}", "-o",
        "{out}", "--recipe", "quality", "--bits", "8", setup=width_80, message=WIDTH),
    cli("width 80: convert --target", "convert", "--hf-path", "{src}", "--target", "iphone12",
        setup=width_80, message=WIDTH),
    cli("width 80: bundle build", "bundle", "build", "{src}", "{out}", "--target", "iphone12",
        setup=width_80, message=WIDTH),
    cli("width 80: plan", "plan", "--model", "{src}", "--target", "iphone12", setup=width_80,
        message=WIDTH),
    api("width 80: convert()", _api_convert, setup=width_80, message=WIDTH),
    api("width 80: convert(group_size=32)", lambda i: _api_convert(i, group_size=32),
        setup=width_80, message=WIDTH),
    api("width 80: build_bundle()", _api_build, setup=width_80, message=WIDTH),
    api("width 80: plan()", lambda i: _plan(i.src, "iphone12"), setup=width_80, message=WIDTH),
]
# fmt: on


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_quantization_input(row, tmp_path, monkeypatch):
    run_row(row, tmp_path, monkeypatch, built={})
