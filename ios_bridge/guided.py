"""The JSON Schema a bundle carries for the app's prompts (`bundle build` / `convert --target`
with `--json-schema FILE`), for mlx-swift-lm's guided generation (the MLXGuidedGeneration
product: xgrammar compiles the schema, and `GuidedGenerationLoop` masks every step with it).

It is written beside manifest.json as JSON_SCHEMA_FILE, which the manifest names
(`json_schema_path`), rather than inside the manifest: the app hands the schema to
`GrammarConstraint(tokenizer:jsonSchema:…)` as a String, and Swift's Decodable cannot keep an
arbitrary JSON value as text, so the glue reads the file whole.

The file is checked when the bundle is built, so that a mistake shows here in one line and not
on the phone: it must hold a JSON object that is a valid JSON Schema (jsonschema's check
against the metaschema of its `$schema`, or of the newest draft it knows).
"""

from __future__ import annotations

from pathlib import Path

from mlxkit.errors import ConfigError
from mlxkit.structured import GrammarError, schema_file

from .runtimes import SWIFT_RUNTIME_DETAILS

JSON_SCHEMA_FILE = "json_schema.json"


def read_json_schema(path: str | Path) -> dict:
    """The JSON Schema in `path`, refused in one line (GrammarError) when the file is missing or
    not JSON, holds no JSON object, or is not a valid JSON Schema."""
    schema = schema_file(path)["json_schema"]["schema"]  # a JSON object, read within limits
    try:
        import jsonschema
    except ImportError:
        raise ConfigError(
            "--json-schema checks the schema with jsonschema: pip install 'mlxkit[structured]'"
        ) from None
    validator = jsonschema.validators.validator_for(schema, default=None)
    if validator is None and "$schema" in schema:
        raise GrammarError(
            f"{path}: $schema {schema['$schema']!r} is not a JSON Schema draft jsonschema knows"
        )
    try:
        (validator or jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        reason = " ".join(e.message.split())[:300]
        raise GrammarError(
            f"{path}: not a valid JSON Schema: {reason} (at {e.json_path})"
        ) from None
    return schema


def check_guided_runtime(version: str) -> None:
    """A schema is for mlx-swift-lm's guided generation, which `version` must have (3.31.4,
    the newest release, does not: MLXGuidedGeneration is on its main branch only)."""
    if not SWIFT_RUNTIME_DETAILS[version].guided_generation:
        raise ConfigError(
            f"--json-schema: mlx-swift-lm {version} has no guided generation (its "
            "MLXGuidedGeneration product is on the main branch only): leave --swift-runtime at "
            "its default"
        )
