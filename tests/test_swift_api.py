"""The Swift an app compiles (the generated MLXKitBundle.swift and examples/ios_app's
ChatView.swift), checked without a Swift compiler: tree-sitter's Swift grammar parses it,
and every name it uses that it does not declare itself is either an Apple SDK / Swift name
(listed below) or an mlx-swift-lm / mlx-swift name in tests/swift_api.toml, a table read
from mlx-swift-lm's source with the file and commit of each entry. For calls the argument
labels are checked against the declaration (defaulted parameters may be left out, a trailing
closure fills the last parameter), the file must import the module the name comes from, a
macro's `requires_imports` must be imported, and deprecated entries may not be used.
Types are not checked: a name is matched by spelling, whatever it is called on."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mlxkit.ios_bridge import build_bundle
from mlxkit.ios_bridge.xcode import RUNTIME, SWIFT_PACKAGES

from tests.helpers import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
TABLE = tomllib.loads((Path(__file__).parent / "swift_api.toml").read_text())
CHAT_VIEW = ROOT / "examples" / "ios_app" / "ChatView.swift"

# Apple SDK and Swift standard library names the files use (Foundation, os, Darwin, SwiftUI,
# Observation, CoreGraphics, CoreImage, CoreML, the standard library). Not label-checked.
APPLE_MODULES = {"CoreGraphics", "CoreImage", "CoreML", "Foundation", "os", "SwiftUI"}
APPLE_TYPES = {
    "Bool",
    "Bundle",
    "Button",
    "CGAffineTransform",
    "CGColorSpace",
    "CGRect",
    "CGSize",
    "CIContext",
    "CIImage",
    "CodingKey",
    "Data",
    "Decodable",
    "Double",
    "FileManager",
    "Float",
    "HStack",
    "Int",
    "JSONDecoder",
    "LocalizedError",
    "MLDictionaryFeatureProvider",
    "MLFeatureValue",
    "MLModel",
    "MLModelConfiguration",
    "MLMultiArray",
    "MainActor",
    "MemoryLayout",
    "NSNull",
    "NSNumber",
    "Observable",
    "OperatingSystemVersion",
    "ProcessInfo",
    "ScrollView",
    "Self",
    "Sendable",
    "State",
    "String",
    "Task",
    "Text",
    "TextField",
    "URL",
    "UTF8",
    "VStack",
    "View",
}
APPLE_MEMBERS = {
    "RGBAf",
    "append",
    "appendingPathComponent",
    "applicationSupportDirectory",
    "applyingFilter",
    "caption",
    "compactMap",
    "compileModel",
    "computeUnits",
    "contains",
    "count",
    "cpuAndNeuralEngine",
    "cropped",
    "decode",
    "default",
    "down",
    "extent",
    "featureValue",
    "fileExists",
    "filter",
    "first",
    "float32",
    "font",
    "frame",
    "functionName",
    "height",
    "infinity",
    "intValue",
    "isEmpty",
    "isInfinite",
    "isOperatingSystemAtLeast",
    "leading",
    "localizedDescription",
    "machine",
    "main",
    "map",
    "min",
    "multiArrayValue",
    "origin",
    "padding",
    "path",
    "prediction",
    "prefix",
    "processInfo",
    "render",
    "rounded",
    "sRGB",
    "split",
    "squareRoot",
    "strides",
    "task",
    "transformed",
    "url",
    "urls",
    "userDomainMask",
    "width",
    "withUnsafeBufferPointer",
    "withUnsafeMutableBufferPointer",
    "workingColorSpace",
    "x",
    "y",
}
APPLE_FUNCTIONS = {
    "abs",
    "log",
    "max",
    "min",
    "os_proc_available_memory",
    "uname",
    "utsname",
    "withUnsafeBytes",
}
APPLE_CONSTANTS = {"kCIInputAspectRatioKey", "kCIInputScaleKey"}  # CoreImage filter keys
# `error` is the implicit binding of a `catch`; `simulator` the argument of targetEnvironment
SWIFT_KEYWORD_IDENTIFIERS = {"$0", "error", "self", "simulator", "targetEnvironment"}


@dataclass
class Use:
    kind: str  # type | member | call | ident | macro
    name: str
    labels: list[str] | None = None  # for calls: argument labels, "_" when unlabeled
    trailing: bool = False  # a trailing closure follows the parenthesized arguments
    line: int = 0


@dataclass
class SwiftFile:
    imports: set[str] = field(default_factory=set)
    types: set[str] = field(default_factory=set)  # declared types
    members: set[str] = field(default_factory=set)  # declared in type bodies / at top level
    locals: set[str] = field(default_factory=set)  # parameters, bindings, local constants
    uses: list[Use] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _parser():
    import tree_sitter as ts
    import tree_sitter_swift as swift

    return ts.Parser(ts.Language(swift.language()))


def parse_swift(source: str) -> SwiftFile:
    """Declarations and uses of one Swift file, from its tree-sitter parse."""
    data = source.encode()
    tree = _parser().parse(data)
    out = SwiftFile()

    def text(node) -> str:
        return data[node.start_byte : node.end_byte].decode()

    def kids(node, *types):
        return [c for c in node.children if not types or c.type in types]

    def call_labels(suffix) -> tuple[list[str], bool]:
        labels, trailing = [], False
        for part in suffix.children:
            if part.type == "value_arguments":
                for arg in kids(part, "value_argument"):
                    label = kids(arg, "value_argument_label")
                    labels.append(text(label[0]) if label else "_")
            elif part.type == "lambda_literal":
                trailing = True
        return labels, trailing

    def walk(node, in_type_body: bool) -> None:
        t = node.type
        line = node.start_point[0] + 1
        if node.type == "ERROR" or node.is_missing:
            out.errors.append(f"line {line}: {text(node)[:60]!r}")
        if t == "import_declaration":
            out.imports.add(text(kids(node, "identifier")[0]))
            return
        if t in ("class_declaration", "protocol_declaration"):
            out.types.add(text(kids(node, "type_identifier")[0]))
            for child in node.children:
                walk(child, child.type in ("class_body", "enum_class_body", "protocol_body"))
            return
        if t in ("class_body", "enum_class_body", "protocol_body"):
            for child in node.children:
                walk(child, True)
            return
        if t == "enum_entry":
            out.members.update(text(c) for c in kids(node, "simple_identifier"))
        elif t == "function_declaration":
            name = kids(node, "simple_identifier")
            if name:
                (
                    out.members if in_type_body or node.parent.type == "source_file" else out.locals
                ).add(text(name[0]))
        elif t == "property_declaration":
            for pattern in kids(node, "pattern"):
                for ident in kids(pattern, "simple_identifier"):
                    (out.members if in_type_body else out.locals).add(text(ident))
        elif t in ("parameter", "lambda_parameter"):
            out.locals.update(text(c) for c in kids(node, "simple_identifier"))
        elif t in ("guard_statement", "if_statement", "pattern", "for_statement"):
            for before, c in zip(node.children, node.children[1:]):  # `let name`
                if c.type == "simple_identifier" and before.type == "value_binding_pattern":
                    out.locals.add(text(c))
            if t == "for_statement":
                for pattern in kids(node, "pattern"):
                    out.locals.update(text(c) for c in kids(pattern, "simple_identifier"))
        elif t == "user_type":
            for ident in kids(node, "type_identifier"):
                out.uses.append(Use("type", text(ident), line=line))
        elif t == "macro_invocation":
            suffix = kids(node, "call_suffix")
            labels, trailing = call_labels(suffix[0]) if suffix else ([], False)
            name = text(kids(node, "simple_identifier")[0])
            out.uses.append(Use("macro", name, labels, trailing, line))
            for child in suffix:
                walk(child, False)
            return
        elif t == "call_expression":
            callee, suffix = node.children[0], kids(node, "call_suffix")[0]
            labels, trailing = call_labels(suffix)
            if callee.type == "simple_identifier":
                out.uses.append(Use("call", text(callee), labels, trailing, line))
                for child in node.children[1:]:
                    walk(child, False)
                return
            if callee.type == "navigation_expression":
                member = kids(callee.children[-1], "simple_identifier")
                out.uses.append(Use("member", text(member[0]), labels, trailing, line))
                for child in callee.children[:-1] + node.children[1:]:
                    walk(child, False)
                return
            if callee.type == "prefix_expression" and text(callee.children[0]) == ".":
                name = text(kids(callee, "simple_identifier")[0])
                out.uses.append(Use("member", name, labels, trailing, line))
                for child in node.children[1:]:
                    walk(child, False)
                return
        elif t == "navigation_suffix":
            for ident in kids(node, "simple_identifier"):
                out.uses.append(Use("member", text(ident), line=line))
            return
        elif t == "prefix_expression" and node.children and text(node.children[0]) == ".":
            name = kids(node, "simple_identifier")
            if name:
                out.uses.append(Use("member", text(name[0]), line=line))
                return
        elif (
            t == "simple_identifier"
            and node.parent is not None
            and node.parent.type
            not in (
                "value_argument_label",
                "pattern",
                "parameter",
                "lambda_parameter",
                "enum_entry",
                "function_declaration",
                "identifier",
            )
        ):
            out.uses.append(Use("ident", text(node), line=line))
        for child in node.children:
            walk(child, in_type_body and t not in ("function_body", "computed_property"))

    walk(tree.root_node, False)
    return out


def labels_match(call: list[str], trailing: bool, declared: list[str], defaulted: list[str]):
    """Whether a call with these labels can bind to a declaration with these parameter
    labels: a trailing closure takes the last parameter, and only defaulted parameters may
    be left out (in order, as Swift requires)."""
    params = list(declared)
    if trailing:
        if not params:
            return False
        params.pop()
    i = 0
    for label in call:
        while i < len(params) and params[i] != label:
            if params[i] not in defaulted:
                return False
            i += 1
        if i == len(params):
            return False
        i += 1
    return all(p in defaulted for p in params[i:])


def resolve(use: Use, kinds: tuple[str, ...], by_name: dict, imports: set[str]) -> str | None:
    """Why `use` does not resolve to a table entry of one of `kinds`, or None when it does."""
    entries = [e for e in by_name.get(use.name, []) if e["kind"] in kinds]
    if not entries:
        return "not in tests/swift_api.toml"
    live = [e for e in entries if "deprecated" not in e]
    if not live:
        return f"deprecated in mlx-swift-lm ({entries[0]['deprecated']})"
    # a call binds to a callable entry (a type's name called is its initializer)
    callables = [e for e in live if e["kind"] in ("function", "init", "case", "macro")]
    if (
        use.labels is not None
        and callables
        and not any(
            labels_match(use.labels, use.trailing, e.get("labels", []), e.get("defaulted", []))
            for e in callables
        )
    ):
        got = "".join(f"{label}:" for label in use.labels) + ("{…}" if use.trailing else "")
        return f"no declaration takes the arguments ({got})"
    modules = {e.get("module", e["name"]) for e in live}
    if not modules & imports:
        return f"needs `import {' or '.join(sorted(modules))}`"
    for e in live:
        for module in e.get("requires_imports", []):
            if module not in imports:
                return f"its expansion needs `import {module}` ({e['file']})"
    return None


def check_swift(files: dict[str, SwiftFile], table: dict = TABLE) -> list[str]:
    """Every problem found, as "file:line: message"; empty when all names resolve."""
    symbols = table["symbol"]
    by_name: dict[str, list[dict]] = {}
    for entry in symbols:
        by_name.setdefault(entry["name"], []).append(entry)
    project_types = set().union(*(f.types for f in files.values()))
    project_members = set().union(*(f.members for f in files.values()))
    problems = []

    for fname, f in files.items():
        known_modules = APPLE_MODULES | {e["name"] for e in symbols if e["kind"] == "module"}
        for module in f.imports - known_modules:
            problems.append(f"{fname}: imports {module}, which the table does not list")
        for error in f.errors:
            problems.append(f"{fname}: {error}: not valid Swift")
        local = f.locals | project_members

        for use in f.uses:
            error = None
            if use.kind == "type":
                if use.name not in project_types | APPLE_TYPES:
                    error = resolve(use, ("type",), by_name, f.imports)
            elif use.kind == "member":
                if use.name not in (
                    project_members | APPLE_MEMBERS | project_types | SWIFT_KEYWORD_IDENTIFIERS
                ):
                    error = resolve(
                        use, ("property", "function", "type", "init", "case"), by_name, f.imports
                    )
            elif use.kind == "call":
                if use.name[:1].isupper():  # an initializer
                    if use.name not in project_types | APPLE_TYPES:
                        error = resolve(use, ("init",), by_name, f.imports)
                elif use.name not in local | APPLE_FUNCTIONS:
                    error = resolve(use, ("function",), by_name, f.imports)
            elif use.kind == "macro":
                error = resolve(use, ("macro",), by_name, f.imports)
            elif use.kind == "ident":
                # `$name` is SwiftUI's binding to the property `name`; `$0` a closure argument
                binding = use.name.startswith("$") and use.name[1:2].isalpha()
                name = use.name[1:] if binding else use.name
                if name not in (
                    local
                    | project_types
                    | APPLE_TYPES
                    | APPLE_FUNCTIONS
                    | APPLE_CONSTANTS
                    | SWIFT_KEYWORD_IDENTIFIERS
                    | f.imports
                ):
                    error = resolve(use, ("type", "module"), by_name, f.imports)
            if error:
                problems.append(f"{fname}:{use.line}: `{use.name}`: {error}")
    return problems


SWIFT_FILES = ("MLXKitBundle.swift", "ChatView.swift", "MLXKitVisionEncoder.swift")


@pytest.fixture(scope="module")
def swift_sources(tmp_path_factory) -> dict[str, str]:
    """The Swift of a text bundle, ChatView, and the Core ML glue of a Core ML bundle (the
    tiny vision fixture, one grid: seconds)."""
    root = tmp_path_factory.mktemp("swift")
    out, coreml = root / "tiny-iphone12", root / "tiny-coreml"
    build_bundle(FIXTURES / "tiny_tied", out, "iphone12")
    build_bundle(
        FIXTURES / "tiny_vision_p6", coreml, "iphone15", vision_encoder="coreml", coreml_grids="6x9"
    )
    return {
        "MLXKitBundle.swift": (out / "xcode" / "MLXKitBundle.swift").read_text(),
        "ChatView.swift": CHAT_VIEW.read_text(),
        "MLXKitVisionEncoder.swift": (coreml / "xcode" / "MLXKitVisionEncoder.swift").read_text(),
        "README.md": (out / "xcode" / "README.md").read_text(),
        "manifest.json": (out / "manifest.json").read_text(),
    }


def parsed(sources: dict[str, str], **replace: tuple[str, str]) -> dict[str, SwiftFile]:
    """The Swift files parsed, with `file=(old, new)` edits applied first."""
    out = {}
    for name in SWIFT_FILES:
        text = sources[name]
        key = name.split(".")[0]
        if key in replace:
            old, new = replace[key]
            assert old in text, f"{old!r} is not in {name}"
            text = text.replace(old, new)
        out[name] = parse_swift(text)
    return out


def test_every_mlx_swift_lm_name_the_swift_uses_is_in_the_table(swift_sources):
    files = parsed(swift_sources)
    assert check_swift(files) == []
    used = {u.name for f in files.values() for u in f.uses}
    # the names issue 12 is about are used, and resolve to the table
    assert {
        "Qwen35TextMTPRegistration",
        "register",
        "MTPDrafterModelFactory",
        "prefill",
        "stepSize",
        "huggingFaceTokenizerLoader",
        "VLMModelFactory",
        "ciImage",
        "MLXArray",
    } <= used
    assert "Tokenizers" in files["ChatView.swift"].imports
    imported = set().union(*(f.imports for f in files.values()))
    for e in TABLE["symbol"]:  # the table holds what the Swift uses, nothing more
        if "deprecated" not in e:
            assert e["name"] in (imported if e["kind"] == "module" else used), e


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            {"MLXKitBundle": ("parameters.prefill.stepSize", "parameters.prefillStepSize")},
            "`prefillStepSize`: deprecated in mlx-swift-lm",
        ),
        (
            {"MLXKitBundle": ("parameters.prefill.stepSize", "parameters.prefill.chunkSize")},
            "`chunkSize`: not in tests/swift_api.toml",
        ),
        (
            {
                "MLXKitBundle": (
                    "await Qwen35TextMTPRegistration.register()",
                    "await Qwen35MTPRegistration.register()",
                )
            },
            "`Qwen35MTPRegistration`: not in tests/swift_api.toml",
        ),
        (
            {
                "MLXKitBundle": (
                    "loadContainer(\n            from: url, using: tokenizerLoader)",
                    "loadContainer(\n            directory: url, using: tokenizerLoader)",
                )
            },
            "`loadContainer`: no declaration takes the arguments (directory:using:)",
        ),
        (
            {"ChatView": ("import Tokenizers", "")},
            "`huggingFaceTokenizerLoader`: its expansion needs `import Tokenizers`",
        ),
        ({"ChatView": ("import MLXLMCommon\n", "")}, "`UserInput`: needs `import MLXLMCommon`"),
        (
            {
                "ChatView": (
                    "UserInput(chat: [.user(prompt, images: images)]",
                    "UserInput(messages: [.user(prompt, images: images)]",
                )
            },
            "`UserInput`: no declaration takes the arguments (messages:processing:)",
        ),
        (
            {
                "MLXKitBundle": (
                    "VLMModelFactory.shared.loadContainer",
                    "VLMModelFactory.common.loadContainer",
                )
            },
            "`common`: not in tests/swift_api.toml",
        ),
        ({"MLXKitBundle": ("import MLXVLM\n", "")}, "`VLMModelFactory`: needs `import MLXVLM`"),
        (
            {
                "MLXKitBundle": (
                    "UserInput.Processing(\n            resize:",
                    "UserInput.Processing(\n            size:",
                )
            },
            "`Processing`: no declaration takes the arguments (size:)",
        ),
        ({"ChatView": (".ciImage($0)", ".cgImage($0)")}, "`cgImage`: not in tests/swift_api.toml"),
        (
            {
                "MLXKitVisionEncoder": (
                    "MLXArray(values, [tokens, hidden])",
                    "MLXArray(values, shape: [tokens, hidden])",
                )
            },
            "`MLXArray`: no declaration takes the arguments (_:shape:)",
        ),
        ({"MLXKitVisionEncoder": ("import MLX\n", "")}, "`MLXArray`: needs `import MLX`"),
    ],
    ids=[
        "deprecated",
        "unknown-member",
        "unknown-type",
        "wrong-label",
        "no-import-tokenizers",
        "no-import-module",
        "wrong-init-label",
        "unknown-vlm-member",
        "no-import-mlxvlm",
        "wrong-processing-label",
        "unknown-image-case",
        "wrong-mlxarray-label",
        "no-import-mlx",
    ],
)
def test_the_check_fails_on_names_the_table_does_not_hold(swift_sources, edit, message):
    problems = check_swift(parsed(swift_sources, **edit))
    assert any(message in p for p in problems), problems


def test_label_rule():
    declared = ["input", "cache", "parameters", "context", "tools"]
    defaulted = ["cache", "tools"]
    assert labels_match(["input", "parameters", "context"], False, declared, defaulted)
    assert not labels_match(["parameters", "input", "context"], False, declared, defaulted)
    assert not labels_match(["input", "context"], False, declared, defaulted)
    assert labels_match([], True, ["_"], [])  # perform { ... }
    assert not labels_match([], False, ["_"], [])


def test_table_entries_say_where_they_were_read():
    symbols = TABLE["symbol"]
    assert TABLE["runtime"] == RUNTIME
    for e in symbols:
        assert e["kind"] in ("type", "property", "function", "init", "case", "macro", "module"), e
        assert e["repo"] in ("ml-explore/mlx-swift-lm", "ml-explore/mlx-swift"), e
        assert len(e["commit"]) == 40 and int(e["commit"], 16) >= 0, e
        assert e["file"].endswith(".swift") and e["source"], e
        if e["kind"] != "module":
            assert e["module"] in {m["name"] for m in symbols if m["kind"] == "module"}, e
    keys = [(e["name"], e["kind"], e.get("owner")) for e in symbols]
    assert len(keys) == len(set(keys))


def test_the_bundle_readme_lists_the_packages_and_their_versions(swift_sources):
    readme = swift_sources["README.md"]
    products = {m["name"] for m in TABLE["symbol"] if m["kind"] == "module"}
    for url, rule, names in SWIFT_PACKAGES:
        row = next(line for line in readme.splitlines() if f"`{url}`" in line)
        assert rule in row and all(f"`{n}`" in row for n in names), row
        assert set(names) <= products
    assert f"{RUNTIME['name']} {RUNTIME['min_version']}" in readme
    assert json.loads(swift_sources["manifest.json"])["runtime"] == TABLE["runtime"]
    snippet = readme.split("```swift")[1].split("```")[0]
    assert "import Tokenizers" in snippet and "#huggingFaceTokenizerLoader()" in snippet
    assert "MLXKIT_MTP" not in readme and "main branch" not in readme
