"""Bad inputs for log-probabilities, logit_bias and constrained decoding (issue 28): each
refused in one line by the Python API and the CLI, through the shared harness
(tests/badinput.py) with tests/test_generate_errors.py's row makers."""

from __future__ import annotations

import pytest

from mlxkit.structured import Grammar
from tests.badinput import Inputs, run_row, write_bytes
from tests.test_generate_errors import api_generate, generate_cli


def schema_file(i: Inputs):
    return i.root / "schema.json"


def schema_cli(data: str, message: str):
    """`mlxkit generate --json-schema schema.json`, the file holding `data`."""
    return generate_cli(
        "--json-schema",
        "{root}/schema.json",
        message=message,
        name=f" holding {data[:30]!r}",
        setup=write_bytes(schema_file, data),
    )


def schema(value) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"schema": value}}}


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
    api_generate({"response_format": {"type": "xml"}}, "response_format type must be"),
    api_generate({"response_format": ["json"]}, "response_format must be a mapping"),
    api_generate({"response_format": {"type": "json_schema"}}, 'needs {"json_schema"'),
    api_generate(schema(5), "a JSON Schema must be a JSON object"),
    api_generate(schema("{not json"), "the JSON Schema is not valid JSON"),
    api_generate(schema({"type": "nope"}), "the JSON Schema cannot be used: Invalid type"),
    api_generate(schema({"$ref": "#/nowhere"}), "the JSON Schema cannot be used"),
    api_generate({"grammar": Grammar.regex("([")}, "the regular expression cannot be used"),
    api_generate({"grammar": "start: ("}, "the Lark grammar cannot be used"),
    api_generate({"grammar": 5}, "grammar must be a Grammar or a Lark grammar"),
    api_generate({"grammar": ""}, "a Lark grammar must be a non-empty string"),
    api_generate({"grammar": "start: /a/", "response_format": {"type": "json_object"}},
                 "pass either response_format or grammar"),
    generate_cli("--json-schema", "{root}/missing.json", message="no such JSON Schema"),
    schema_cli("{not json", "not valid JSON"),
    schema_cli("[1, 2]", "a JSON Schema must be a JSON object"),
    schema_cli('{"type": "nope"}', "the JSON Schema cannot be used: Invalid type"),
]
# fmt: on


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_structured_input(row, tmp_path, monkeypatch):
    run_row(row, tmp_path, monkeypatch, {})
