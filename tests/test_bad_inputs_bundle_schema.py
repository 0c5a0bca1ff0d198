"""Bad JSON Schemas for a bundle (`bundle build` / `convert --target` with `--json-schema FILE`,
issue 28 item 4), through the shared harness (tests/badinput.py) with test_bad_inputs.py's row
makers: each refused in one line, exit 2, before anything is written."""

from __future__ import annotations

import pytest

from tests.badinput import Inputs, api, run_row, write_bytes
from tests.test_bad_inputs import _api_build, build, convert, to_bundle

NOT_A_SCHEMA = "not a valid JSON Schema"


def schema_path(i: Inputs):
    return i.root / "schema.json"


def holding(data: str):
    """A setup: schema.json holding `data`."""
    return write_bytes(schema_path, data)


# fmt: off
BUILD = [  # (what schema.json holds, the message)
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "a JSON Schema must be a JSON object"),
    ('"object"', "a JSON Schema must be a JSON object"),  # not "not valid JSON", as before
    ('"{\\"type\\": \\"object\\"}"', "a JSON Schema must be a JSON object"),  # a JSON string
    ('{"type": "nope"}', f"{NOT_A_SCHEMA}: 'nope' is not valid under any of the given schemas"),
    ('{"type": "object", "properties": {"n": {"type": "integer", "minimum": "1"}}}',
     f"{NOT_A_SCHEMA}: '1' is not of type 'number' (at $.properties.n.minimum)"),
    ('{"type": "object", "required": "name"}', f"{NOT_A_SCHEMA}: 'name' is not of type 'array'"),
    ('{"$schema": "https://example.com/mine", "type": "object"}',
     "$schema 'https://example.com/mine' is not a JSON Schema draft jsonschema knows"),
]
GOOD = '{"type": "object", "properties": {"name": {"type": "string"}}}'
ROWS = [
    *(build(f"bundle build --json-schema holding {data[:30]!r}", "--json-schema",
            "{root}/schema.json", setup=holding(data), message=message)
      for data, message in BUILD),
    build("bundle build --json-schema missing", "--json-schema", "{root}/missing.json",
          message="no such JSON Schema"),
    build("bundle build --json-schema a directory", "--json-schema", "{root}",
          message="JSON Schema"),
    to_bundle("convert --target --json-schema not a schema", "--json-schema",
              "{root}/schema.json", setup=holding('{"type": 5}'), message=NOT_A_SCHEMA),
    convert("convert --json-schema without --target", "--json-schema", "{root}/schema.json",
            setup=holding(GOOD),
            message="--json-schema: only with --target or --memory-budget (they plan a bundle)"),
    build("bundle build --json-schema with --swift-runtime 3.31.4", "--json-schema",
          "{root}/schema.json", "--swift-runtime", "3.31.4", setup=holding(GOOD),
          message="--json-schema: mlx-swift-lm 3.31.4 has no guided generation"),
    api("bundle: json_schema not a schema", lambda i: _api_build(i, json_schema=schema_path(i)),
        setup=holding('{"properties": []}'), message=NOT_A_SCHEMA),
    api("bundle: json_schema not a path", lambda i: _api_build(i, json_schema=5),
        message="--json-schema"),
]
# fmt: on


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_bundle_schema(row, tmp_path, monkeypatch):
    run_row(row, tmp_path, monkeypatch, {})
