"""A bundle carries the JSON Schema the app's prompts use (issue 28 item 4): `--json-schema FILE`
is checked, written beside manifest.json (json_schema.json, named by `json_schema_path`, listed
and hashed like every file), and the Swift glue reads it and hands it to mlx-swift-lm's guided
generation (MLXGuidedGeneration), which the bundle README asks the app to add. The Swift names
are checked against mlx-swift-lm's source by tests/test_swift_api.py."""

from __future__ import annotations

import json
import plistlib
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlxkit.ios_bridge import build_bundle, verify_bundle
from mlxkit.ios_bridge.guided import JSON_SCHEMA_FILE
from mlxkit.ios_bridge.manifest import sha256_file

from mlxkit.cli import main
from tests.helpers import FIXTURES

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "mode": {"enum": ["train", "car"]},
    },
    "required": ["city", "days"],
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """tiny_tied for the iPhone 12, with the schema (through the CLI) and without."""
    root = tmp_path_factory.mktemp("schema")
    (root / "schema.json").write_text(json.dumps(SCHEMA))
    result = CliRunner().invoke(
        main,
        [
            "bundle",
            "build",
            str(FIXTURES / "tiny_tied"),
            str(root / "with"),
            "--target",
            "iphone12",
            "--json-schema",
            str(root / "schema.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "a JSON Schema for guided generation (json_schema.json)" in result.stderr
    build_bundle(FIXTURES / "tiny_tied", root / "without", "iphone12")
    return {"with": root / "with", "without": root / "without"}


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_the_schema_is_beside_the_manifest_which_names_it(bundles):
    m, bundle = manifest(bundles["with"]), bundles["with"]
    assert m["json_schema_path"] == JSON_SCHEMA_FILE == "json_schema.json"
    assert json.loads((bundle / JSON_SCHEMA_FILE).read_text()) == SCHEMA
    entry = next(f for f in m["files"] if f["path"] == JSON_SCHEMA_FILE)
    assert entry["sha256"] == sha256_file(bundle / JSON_SCHEMA_FILE)
    assert manifest(bundles["without"])["json_schema_path"] is None
    assert not (bundles["without"] / JSON_SCHEMA_FILE).exists()
    # the app downloads it with model/ and mtp/: Background Assets' sizes count it
    sizes = [
        plistlib.loads((b / "xcode" / "Info-BackgroundAssets.plist").read_bytes())[
            "BAMaxInstallSize"
        ]
        for b in (bundle, bundles["without"])
    ]
    assert sizes[0] - sizes[1] == entry["bytes"]


def test_a_bundle_with_a_schema_verifies_and_a_missing_schema_fails(bundles, tmp_path):
    assert verify_bundle(bundles["with"], load=False).ok
    broken = Path(shutil.copytree(bundles["with"], tmp_path / "b"))
    (broken / JSON_SCHEMA_FILE).unlink()
    report = verify_bundle(broken, load=False)
    failed = {c.name: c.detail for c in report.checks if not c.ok}
    assert "json_schema.json" in failed["file sizes and sha256"]
    assert (
        "json_schema_path: manifest says 'json_schema.json', re-derived None"
        in (failed["manifest matches a re-plan"])
    )


def test_the_glue_hands_the_schema_to_guided_generation(bundles):
    swift = (bundles["with"] / "xcode" / "MLXKitBundle.swift").read_text()
    assert "import MLXGuidedGeneration\n" in swift
    assert 'case jsonSchemaPath = "json_schema_path"' in swift
    assert "contentsOf: bundleURL.appendingPathComponent(path), encoding: .utf8)" in swift
    assert "TokenizerVocabExtractor.extractForGrammar(from: tokenizer)" in swift
    assert (
        "GrammarConstraint(\n            tokenizer: grammarTokenizer, jsonSchema: jsonSchema"
        in (swift)
    )
    # the planned KV cache and prefill chunk, as the plain decode gets them
    assert "kvBits: kv.bits < 16 ? kv.bits : nil" in swift
    assert "prefill: parameters.prefill, emit: emit)" in swift
    readme = (bundles["with"] / "xcode" / "README.md").read_text()
    assert "## 7. JSON output (guided generation)" in readme
    row = next(
        line
        for line in readme.splitlines()
        if "`https://github.com/ml-explore/mlx-swift-lm`" in line
    )
    assert "`MLXGuidedGeneration`" in row
    assert '"enable_thinking": false' in readme and "loaded.generateJSON(" in readme


def test_without_a_schema_the_glue_does_not_need_guided_generation(bundles):
    """An app whose bundle carries no schema does not link xgrammar."""
    swift = (bundles["without"] / "xcode" / "MLXKitBundle.swift").read_text()
    assert "MLXGuidedGeneration" not in swift and "generateJSON" not in swift
    assert "public let jsonSchema: String?" in swift  # nil: read only when the manifest names one
    readme = (bundles["without"] / "xcode" / "README.md").read_text()
    assert "MLXGuidedGeneration" not in readme and "## 7." not in readme


def test_the_example_app_asks_for_json_with_thinking_off():
    chat = (Path(__file__).parents[1] / "examples" / "ios_app" / "ChatView.swift").read_text()
    assert "try loaded.generateJSON(" in chat
    assert 'additionalContext: ["enable_thinking": false]' in chat
    assert 'Toggle("Answer in JSON", isOn: $model.answersInJSON)' in chat
