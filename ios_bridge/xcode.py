"""The xcode/ folder of a bundle: Entitlements.plist, an Info.plist fragment for Background
Assets, the Swift loader (and the Core ML vision encoder's glue, for bundles that have one), and
a README. The plists are written with plistlib (so they are valid by construction); the Swift
files and README are jinja2 templates in templates/."""

from __future__ import annotations

import plistlib
from pathlib import Path

import jinja2

from mlxkit import __version__

from .devices import ENTITLEMENT
from .manifest import SCHEMA_VERSION
from .runtimes import SwiftRuntime, swift_runtime

TEMPLATES = Path(__file__).parent / "templates"
MLX_SWIFT_LM_URL = "https://github.com/ml-explore/mlx-swift-lm"
# swift-transformers is not a dependency of mlx-swift-lm: its README asks apps to add it for
# `Tokenizers` (README.md:69 at 1441444, :68 at 3.31.4, "from: 1.3.0").
SWIFT_TRANSFORMERS = (
    "https://github.com/huggingface/swift-transformers",
    "Up to Next Major from 1.3.0",
)


def swift_packages(runtime: SwiftRuntime, guided: bool = False) -> list[tuple[str, str, list[str]]]:
    """What an app adds in Xcode for `runtime`: (package URL, version rule, products). mlx-swift
    is added only for `import MLX`, with the rule mlx-swift-lm's own Package.swift declares (so
    SwiftPM can satisfy both). `guided` (the bundle carries a JSON Schema) adds
    MLXGuidedGeneration, a product of its own (it compiles the vendored xgrammar C++), which
    only such bundles' Swift imports."""
    lm = ["MLXLLM", "MLXVLM", "MLXLMCommon", "MLXHuggingFace"]
    return [
        (MLX_SWIFT_LM_URL, runtime.swiftpm, [*lm, "MLXGuidedGeneration"] if guided else lm),
        (SWIFT_TRANSFORMERS[0], SWIFT_TRANSFORMERS[1], ["Tokenizers"]),
        ("https://github.com/ml-explore/mlx-swift", runtime.mlx_swift, ["MLX"]),
    ]


SWIFT_FILE = "MLXKitBundle.swift"
COREML_SWIFT_FILE = "MLXKitVisionEncoder.swift"  # bundles whose images go through Core ML
ENTITLEMENTS_FILE = "Entitlements.plist"
INFO_FRAGMENT_FILE = "Info-BackgroundAssets.plist"
PLACEHOLDER = "REPLACE-ME"


def entitlements(required: bool) -> dict:
    """The increased-memory-limit entitlement when the plan needs it; otherwise empty."""
    return {ENTITLEMENT: True} if required else {}


def background_assets(download_bytes: int) -> dict:
    """Info.plist keys for Background Assets. BAMaxInstallSize is the installed size (the
    App Store shows it); the download allowances take the downloaded size, which is the
    same here since the files are stored uncompressed. URL and domain are placeholders."""
    return {
        "BAInitialDownloadRestrictions": {
            "BADownloadAllowance": download_bytes,
            "BAEssentialDownloadAllowance": download_bytes,
            "BADownloadDomainAllowList": [f"{PLACEHOLDER}.example.com"],
        },
        "BAMaxInstallSize": download_bytes,
        "BAEssentialMaxInstallSize": download_bytes,
        "BAManifestURL": f"https://{PLACEHOLDER}.example.com/{{bundle}}/manifest.json",
    }


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def write_xcode(out: Path, bundle_name: str, manifest: dict, download_bytes: int) -> list[Path]:
    """Writes xcode/ from the (file-less) manifest; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    ba = background_assets(download_bytes)
    ba["BAManifestURL"] = ba["BAManifestURL"].replace("{bundle}", bundle_name)
    files = {
        ENTITLEMENTS_FILE: plistlib.dumps(entitlements(manifest["entitlement_required"])),
        INFO_FRAGMENT_FILE: plistlib.dumps(ba),
    }
    q = manifest["quantization"]
    values = {
        "version": __version__,
        "bundle_name": bundle_name,
        "model_name": manifest["model"]["name"],
        "target_label": manifest["target"]["label"],
        "schema_version": SCHEMA_VERSION,
        "recipe": q["recipe"],
        "bits": q["bits"],
        "peak_gb": f"{manifest['memory']['peak_bytes'] / 1e9:.2f}",
        "usable_gb": f"{manifest['memory']['usable_bytes'] / 1e9:.2f}",
        "max_context": f"{manifest['max_context']:,}",
        "kv_cache": manifest["kv_cache"],
        "entitlement_required": manifest["entitlement_required"],
        "min_ios": manifest["min_ios"],
        "download_gb": f"{download_bytes / 1e9:.2f}",
        "runtime": swift_runtime(manifest["runtime"]["version"]),
        "packages": swift_packages(
            swift_runtime(manifest["runtime"]["version"]), manifest["json_schema_path"] is not None
        ),
        "has_drafter": manifest["mtp"]["included"],
        "mtp": manifest["mtp"],
        "json_schema_path": manifest["json_schema_path"],
    }
    vision = manifest["vision"]
    values["vision_encoder"] = vision["encoder"]
    values["coreml_functions"] = [f["name"] for f in (vision["coreml"] or {}).get("functions", [])]
    env = _env()
    files[SWIFT_FILE] = env.get_template(SWIFT_FILE).render(values).encode()
    if vision["encoder"] == "coreml":
        files[COREML_SWIFT_FILE] = env.get_template(COREML_SWIFT_FILE).render(values).encode()
    files["README.md"] = env.get_template("README.md").render(values).encode()
    written = []
    for name, data in files.items():
        (out / name).write_bytes(data)
        written.append(out / name)
    return written
