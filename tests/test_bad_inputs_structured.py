"""Bad inputs for log-probabilities, logit_bias and constrained decoding (issue 28): each
refused in one line by the Python API and the CLI, through the shared harness
(tests/badinput.py) with tests/test_generate_errors.py's row makers."""

from __future__ import annotations

import pytest

from tests.badinput import run_row
from tests.test_generate_errors import api_generate

# fmt: off
ROWS = [
    api_generate({"logprobs": 21}, "logprobs must be between 0 and 20"),
    api_generate({"logprobs": -1}, "logprobs must be between 0 and 20"),
    api_generate({"logprobs": True}, "logprobs must be an integer"),
    api_generate({"logprobs": "5"}, "logprobs must be an integer"),
    api_generate({"logit_bias": [(1, 2.0)]}, "logit_bias must be a mapping"),
    api_generate({"logit_bias": {"1": 2.0}}, "a logit_bias token id must be an integer"),
    api_generate({"logit_bias": {10**9: 2.0}}, "a logit_bias token id must be between 0 and"),
    api_generate({"logit_bias": {-1: 2.0}}, "a logit_bias token id must be between 0 and"),
    api_generate({"logit_bias": {1: 101}}, "logit_bias values must be in [-100, 100]"),
    api_generate({"logit_bias": {1: float("nan")}}, "logit_bias values must be"),
    api_generate({"logit_bias": {1: "a"}}, "logit_bias values must be numbers"),
]
# fmt: on


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_structured_input(row, tmp_path, monkeypatch):
    run_row(row, tmp_path, monkeypatch, {})
