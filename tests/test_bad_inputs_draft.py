"""Bad inputs for drafting (issue 24): num_draft other than "auto" or 1..8, and `mlxkit tune`
on what it cannot tune, each refused in one line with nothing written (the tune cache
directory is the row's `out`, which must never appear). Rows run through the shared harness
(tests/badinput.py) with tests/test_generate_errors.py's row makers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlxkit.convert import convert

from tests.badinput import Inputs, cli, run_row
from tests.helpers import FIXTURES
from tests.test_generate_errors import api_generate, generate_cli

AUTO_OR_N = 'num_draft must be "auto" or an integer'
CACHE = {"XDG_CACHE_HOME": "{out}"}


def without_mtp(i: Inputs) -> None:
    shutil.rmtree(i.converted / "mtp")


# fmt: off
ROWS = [
    api_generate({"num_draft": "fast"}, AUTO_OR_N),
    api_generate({"num_draft": "AUTO"}, AUTO_OR_N),
    api_generate({"num_draft": ""}, AUTO_OR_N),
    generate_cli("--num-draft", "fast", message="'fast' is not \"auto\" or an integer"),
    generate_cli("--num-draft", "2.5", message="'2.5' is not \"auto\" or an integer"),
    cli("tune: a model without MTP", "tune", "{converted}", setup=without_mtp,
        needs=("converted",), env=CACHE, message="this model has no MTP weights"),
    cli("tune --max-tokens 0", "tune", "{src}", "--max-tokens", "0", env=CACHE,
        message="--max-tokens"),
    cli("tune --repeats 0", "tune", "{src}", "--repeats", "0", env=CACHE, message="--repeats"),
    cli("tune: no such directory", "tune", "{root}/missing", env=CACHE, message="missing"),
]
# fmt: on


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """tiny_tied converted (4-bit, with mtp/), made once and copied into each row."""
    out = tmp_path_factory.mktemp("built") / "converted"
    convert(FIXTURES / "tiny_tied", out, quiet=True)
    return {"converted": out}


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_draft_input(row, tmp_path, monkeypatch, converted):
    run_row(row, tmp_path, monkeypatch, built=converted)
