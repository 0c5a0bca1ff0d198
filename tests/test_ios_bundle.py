"""Bundles: build from the tiny fixture, verify, tamper, and the Xcode hand-off files."""

from __future__ import annotations

import json
import plistlib
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlxkit.ios_bridge import build_bundle, verify_bundle
from mlxkit.ios_bridge.devices import ENTITLEMENT
from mlxkit.ios_bridge.manifest import SCHEMA, schema_errors

from mlxkit.cli import main
from tests.helpers import FIXTURES

SWIFT = "xcode/MLXKitBundle.swift"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny-iphone12"
    build_bundle(FIXTURES / "tiny_tied", out, "iphone12")
    return out


@pytest.fixture
def bundle(built, tmp_path) -> Path:
    """A private copy to tamper with."""
    return Path(shutil.copytree(built, tmp_path / built.name, symlinks=True))


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def failed(report) -> set[str]:
    return {c.name for c in report.checks if not c.ok}


def test_fresh_bundle_verifies(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert schema_errors(manifest) == []
    assert (built / "model" / "config.json").is_file() and (built / "mtp" / "config.json").is_file()
    assert not (built / "model" / "mtp").exists()  # model/ is a plain model directory
    assert manifest["mtp"]["included"] and manifest["model"]["mtp_path"] == "mtp"
    listed = {f["path"] for f in manifest["files"]}
    assert {"model/model.safetensors", "mtp/model.safetensors", SWIFT} <= listed
    report = verify_bundle(built)
    assert report.ok, [(c.name, c.detail) for c in report.checks]
    result = run("bundle", "verify", built)
    assert result.exit_code == 0 and "bundle OK" in result.output


def test_flipped_byte_fails(bundle):
    weights = bundle / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    report = verify_bundle(bundle, load=False)
    assert failed(report) == {"file sizes and sha256"}
    assert "sha256 differs" in next(c.detail for c in report.checks if not c.ok)
    result = run("bundle", "verify", bundle, "--no-load")
    assert result.exit_code == 1 and "FAIL  file sizes and sha256" in result.output


def test_missing_file_fails(bundle):
    (bundle / "mtp" / "model.safetensors").unlink()
    report = verify_bundle(bundle)
    assert {"file sizes and sha256", "model loads"} <= failed(report)
    assert run("bundle", "verify", bundle).exit_code == 1


@pytest.mark.parametrize("bad_path", ["../x", "model/../../x", "/etc/passwd"])
def test_escaping_manifest_path_fails(bundle, bad_path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"].append({"path": bad_path, "bytes": 1, "sha256": "0" * 64})
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    report = verify_bundle(bundle, load=False)
    assert "paths stay inside the bundle" in failed(report)
    assert run("bundle", "verify", bundle, "--no-load").exit_code == 1


def test_symlink_out_of_the_bundle_fails(bundle, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    (bundle / "xcode" / "evil.txt").symlink_to(outside)
    assert "paths stay inside the bundle" in failed(verify_bundle(bundle, load=False))


def test_plan_against_a_smaller_target(tmp_path):
    """A bundle that fits its iPhone 16 Pro Max only at a long context (the tiny model with
    4M positions: 250,000 tokens of KV cache) verifies on its own target and fails the plan
    check, and only that check, against the iPhone 12 (whose largest context is ~222k)."""
    src = tmp_path / "long"
    shutil.copytree(FIXTURES / "tiny_tied", src)
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 1 << 22
    (src / "config.json").write_text(json.dumps(config))
    build_bundle(src, tmp_path / "b", "iphone16promax", context=250_000)
    assert verify_bundle(tmp_path / "b", load=False).ok
    report = verify_bundle(tmp_path / "b", target="iphone12", load=False)
    assert failed(report) == {"plan fits the target"}
    assert "does not fit iPhone 12" in next(c.detail for c in report.checks if not c.ok)


def test_corrupted_manifest_is_bad_input(bundle):
    (bundle / "manifest.json").write_text('{"schema_version": 1, "files": [')
    result = run("bundle", "verify", bundle)
    assert result.exit_code == 2 and "not valid JSON" in result.output
    assert run("bundle", "verify", bundle.parent / "nope").exit_code == 2


def test_incomplete_manifest_fails_the_schema_check(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["memory"]["peak_bytes"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    report = verify_bundle(bundle, load=False)
    assert failed(report) == {"manifest schema"}
    assert "memory.peak_bytes: missing" in report.checks[0].detail


def test_plists_parse(built):
    manifest = json.loads((built / "manifest.json").read_text())
    entitlements = plistlib.loads((built / "xcode" / "Entitlements.plist").read_bytes())
    assert entitlements.get(ENTITLEMENT, False) == manifest["entitlement_required"]
    info = plistlib.loads((built / "xcode" / "Info-BackgroundAssets.plist").read_bytes())
    payload = sum(f["bytes"] for f in manifest["files"] if not f["path"].startswith("xcode/"))
    payload += (built / "manifest.json").stat().st_size
    assert info["BAMaxInstallSize"] == info["BAEssentialMaxInstallSize"] >= payload
    assert info["BAInitialDownloadRestrictions"]["BADownloadAllowance"] == info["BAMaxInstallSize"]


def test_entitlement_plist_when_required(built, tmp_path):
    """The entitlement is written exactly when the plan needs it."""
    from mlxkit.ios_bridge.xcode import write_xcode

    manifest = json.loads((built / "manifest.json").read_text())
    assert plistlib.loads((built / "xcode" / "Entitlements.plist").read_bytes()) == {}
    manifest["entitlement_required"] = True
    write_xcode(tmp_path, "b", manifest, 10**9)
    data = plistlib.loads((tmp_path / "Entitlements.plist").read_bytes())
    assert data == {ENTITLEMENT: True}
    assert "**required**" in (tmp_path / "README.md").read_text()


def _swift_structs(source: str) -> dict[str, set[str]]:
    """manifest path → the JSON keys the Swift structs marked with it decode."""
    found: dict[str, set[str]] = {}
    for match in re.finditer(
        r"// mlxkit-manifest-path: (\S+)(.*?)enum CodingKeys[^{]*\{(.*?)\}", source, re.DOTALL
    ):
        keys = set()
        for case in re.finditer(r"case (\w+)(?:\s*=\s*\"([^\"]+)\")?", match.group(3)):
            keys.add(case.group(2) or case.group(1))
        found[match.group(1)] = keys
    return found


def test_swift_keys_match_the_manifest(built):
    manifest = json.loads((built / "manifest.json").read_text())
    structs = _swift_structs((built / SWIFT).read_text())
    assert set(structs) == {".", "model", "target", "memory", "mlx", "mtp", "vision", "kv_cache"}
    for path, keys in structs.items():
        node = manifest if path == "." else manifest[path]
        assert keys <= set(node), f"{path}: Swift reads {keys - set(node)} absent from manifest"
        schema = SCHEMA if path == "." else SCHEMA[path]
        assert keys <= set(schema), f"{path}: {keys - set(schema)} not required by the schema"


def test_swift_file_is_syntactically_plausible(built):
    """Parsed with tree-sitter's Swift grammar (a dev extra): a syntax check, not a compile."""
    import tree_sitter as ts
    import tree_sitter_swift as swift

    parser = ts.Parser(ts.Language(swift.language()))
    source = (built / SWIFT).read_bytes()
    tree = parser.parse(source)
    errors = []

    def walk(node):
        if node.type == "ERROR" or node.is_missing:
            errors.append((node.start_point, source[node.start_byte : node.end_byte][:60]))
        for child in node.children:
            walk(child)

    walk(tree.root_node)
    assert not errors, errors
    assert b"{{" not in source and b"}}" not in source  # every template value was filled


@pytest.mark.parametrize(
    "args",
    [
        ["plan", "--size", "2b", "--target", "iphone99"],
        ["plan", "--size", "2b", "--target", "iphone15", "--context", "0"],
        ["plan", "--size", "2b", "--target", "iphone15", "--context", "-5"],
        ["plan", "--size", "2b", "--memory-budget", "0.5GB"],
        ["plan", "--size", "2b", "--memory-budget", "many"],
        ["plan", "--size", "9b", "--target", "iphone15"],
        ["plan", "--size", "3b", "--target", "iphone15"],
        ["plan", "--size", "2b"],
        ["bundle", "build", str(FIXTURES / "tiny_tied"), "{out}", "--target", "nokia"],
        ["bundle", "build", str(FIXTURES / "tiny_tied"), "{out}", "--memory-budget", "1MB"],
        [  # mlx-swift-lm 3.31.4 has no Qwen 3.5 drafter: mtp/ would never run
            "bundle",
            "build",
            str(FIXTURES / "tiny_tied"),
            "{out}",
            "--target",
            "iphone15",
            "--swift-runtime",
            "3.31.4",
            "--mtp",
        ],
        [
            "convert",
            "--hf-path",
            str(FIXTURES / "tiny_tied"),
            "--target",
            "iphone15",
            "--context",
            "0",
            "-o",
            "{out}",
        ],
    ],
)
def test_bad_input_exits_2(args, tmp_path):
    result = run(*(a.format(out=tmp_path / "out") for a in args))
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
    assert list(tmp_path.iterdir()) == []


def test_plan_and_tiers_commands():
    result = run("plan", "--size", "2b", "--target", "iphone15")
    assert result.exit_code == 0 and "largest that fits" in result.output
    data = json.loads(run("plan", "--size", "0.8b", "--target", "iphone12", "--json").output)
    assert data["fits"] and data["memory"]["peak_bytes"] <= data["memory"]["usable_bytes"]
    tiers = run("tiers").output
    assert "iPhone 16e" in tiers and "tier-12gb" in tiers and "(u)" in tiers


def test_the_swift_runtime_is_a_planner_knob():
    """--swift-runtime reaches plan (3.31.4: MTP left out, the release has no Qwen 3.5
    drafter) and is recorded in the bundle's manifest (test_swift_loading builds both)."""
    release = run("plan", "--size", "0.8b", "--target", "iphone15", "--swift-runtime", "3.31.4")
    assert release.exit_code == 0 and "  MTP: off" in release.output, release.output
    default = run("plan", "--size", "0.8b", "--target", "iphone15")
    assert "  MTP: on, 1 draft per round in mlx-swift-lm" in default.output
    assert "--swift-runtime" in run("bundle", "build", "--help").output


def test_a_core_ml_bundle_warns_at_plan_time_that_mlx_swift_cannot_use_it():
    args = ["plan", "--model", FIXTURES / "tiny_vision_p6", "--target", "iphone15"]
    coreml = run(*args, "--vision-encoder", "coreml", "--coreml-grids", "6x9")
    assert coreml.exit_code == 0, coreml.output
    assert "warning: MLX Swift cannot use the Core ML encoder's output yet" in coreml.output
    assert "public entry in MLXVLM's Qwen35 that takes precomputed image features" in (
        coreml.output.replace("\n", " ")
    )
    assert "Core ML encoder's output" not in run(*args).output


def test_convert_target_builds_a_bundle(tmp_path):
    out = tmp_path / "b"
    result = run(
        "convert",
        "--hf-path",
        FIXTURES / "tiny_untied",
        "--target",
        "iphone15",
        "-o",
        out,
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert verify_bundle(out).ok


@pytest.mark.parametrize(
    "field, value",
    [
        ("min_ios", "12.0"),
        ("target.device_model_ids", ["iPhone1,1"]),
        ("memory.check_available_bytes", 1),
        ("mlx.cache_limit_bytes", 10**12),
        ("target.kind", "budget"),
        ("target.usable_bytes", 10**15),
        ("model.path", "../other"),
        ("mtp.path", "../other"),
        ("entitlement_required", True),
        ("max_context", 8),
        ("mtp.num_draft", 5),
    ],
)
def test_serious_finding_2_verify_fails_an_edited_manifest(bundle, tmp_path, field, value):
    """Issue 10, finding 2: `bundle verify` passed a manifest.json edited in the fields the
    app's Swift loader trusts for its device and memory checks (and one whose model.path
    pointed outside the bundle, which it then loaded and planned)."""
    other = tmp_path / "other"
    shutil.copytree(bundle / "model", other)
    manifest = json.loads((bundle / "manifest.json").read_text())
    *parents, key = field.split(".")
    node = manifest
    for p in parents:
        node = node[p]
    assert node[key] != value
    node[key] = value
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    report = verify_bundle(bundle, load=True)
    assert not report.ok
    assert failed(report) & {"manifest matches a re-plan", "paths stay inside the bundle"}
    result = run("bundle", "verify", bundle)
    assert result.exit_code == 1 and "bundle FAILED" in result.stderr
