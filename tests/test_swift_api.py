"""The Swift an app compiles (the generated MLXKitBundle.swift and MLXKitVisionEncoder.swift of
each Swift runtime, and examples/ios_app's ChatView.swift), checked without a Swift compiler:
tree-sitter's Swift grammar parses it, and a lint over the parse tree checks that every name it
uses that it does not declare itself is either an Apple SDK / Swift name (listed below) or an
mlx-swift-lm / mlx-swift name in tests/swift_api.toml at the file's runtime (a table read from
mlx-swift-lm's source, with the file and line of each entry at each runtime's commit). For calls
the argument labels are checked against the declaration (defaulted parameters may be left out,
a trailing closure fills the last parameter), the file must import the module the name comes
from, a macro's `requires_imports` must be imported, deprecated entries may not be used, and no
local `var` may be captured by a closure passed where the table says the closure is @Sendable
(Swift 6: "reference to captured var in concurrently-executing code"). Types are not checked:
a name is matched by spelling, whatever it is called on."""

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
from mlxkit.ios_bridge.runtimes import SWIFT_RUNTIME_DETAILS, runtime_record, swift_runtime
from mlxkit.ios_bridge.settings import DEFAULT_SWIFT_RUNTIME, SWIFT_RUNTIMES
from mlxkit.ios_bridge.xcode import swift_packages

from tests.helpers import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
TABLE = tomllib.loads((Path(__file__).parent / "swift_api.toml").read_text())
CHAT_VIEW = ROOT / "examples" / "ios_app" / "ChatView.swift"

# Apple SDK and Swift standard library names the files use (Foundation, os, Darwin, SwiftUI,
# Observation, CoreGraphics, CoreImage, CoreML, the standard library). Not label-checked.
APPLE_MODULES = {"CoreGraphics", "CoreImage", "CoreML", "Foundation", "os", "PhotosUI", "SwiftUI"}
APPLE_TYPES = {
    "AsyncStream",
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
    "Int32",
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
    "PhotosPicker",
    "PhotosPickerItem",
    "ProcessInfo",
    "ScrollView",
    "Self",
    "Sendable",
    "State",
    "String",
    "Task",
    "Text",
    "TextField",
    "Toggle",
    "URL",
    "UTF8",
    "VStack",
    "View",
    "discardableResult",  # the attribute @discardableResult parses as a type
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
    "images",
    "loadTransferable",
    "localizedDescription",
    "machine",
    "main",
    "map",
    "min",
    "multiArrayValue",
    "onChange",
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
    "utf8",
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
                return f"its expansion needs `import {module}` ({next(iter(e['at'].values()))})"
    return None


def entries_at(runtime: str, table: dict = TABLE) -> list[dict]:
    """The table's entries that `runtime` has, with `deprecated` set only where it is
    deprecated at that runtime."""
    out = []
    for e in table["symbol"]:
        if runtime in e["at"]:
            entry = {k: v for k, v in e.items() if k != "deprecated"}
            if runtime in e.get("deprecated", {}):
                entry["deprecated"] = e["deprecated"][runtime]
            out.append(entry)
    return out


def sendable_captures(source: str, sendable: set[str]) -> list[str]:
    """ "line N: captured var `name`" for each local `var` used inside a closure passed to a call
    of a function in `sendable` (whose closure parameter is @Sendable), declared outside that
    closure in an enclosing block before it."""
    data = source.encode()
    tree = _parser().parse(data)
    found = []

    def text(node) -> str:
        return data[node.start_byte : node.end_byte].decode()

    def callee(call) -> str | None:
        head = call.children[0]
        if head.type == "simple_identifier":
            return text(head)
        if head.type == "navigation_expression":
            idents = [c for c in head.children[-1].children if c.type == "simple_identifier"]
            return text(idents[0]) if idents else None
        return None

    def closures(call):
        for suffix in (c for c in call.children if c.type == "call_suffix"):
            for part in suffix.children:
                if part.type == "lambda_literal":
                    yield part
                elif part.type == "value_arguments":
                    for arg in part.children:
                        yield from (c for c in arg.children if c.type == "lambda_literal")

    def declared(node, binding: str | None) -> set[str]:
        """Names a property_declaration binds (`binding`: only `var` or `let`; None: any)."""
        kinds = [text(c) for c in node.children if c.type == "value_binding_pattern"]
        if binding is not None and kinds != [binding]:
            return set()
        return {
            text(i)
            for pattern in node.children
            if pattern.type == "pattern"
            for i in pattern.children
            if i.type == "simple_identifier"
        }

    def inside(lam) -> tuple[set[str], list]:
        """(names bound inside the closure, identifier nodes it reads)."""
        bound, reads, stack = set(), [], [lam]
        while stack:
            node = stack.pop()
            if node.type == "property_declaration":
                bound |= declared(node, None)
            elif node.type == "lambda_parameter":
                bound |= {text(c) for c in node.children if c.type == "simple_identifier"}
            elif node.type == "simple_identifier" and node.parent.type not in (
                "navigation_suffix",
                "value_argument_label",
                "pattern",
                "lambda_parameter",
            ):
                reads.append(node)
            stack.extend(node.children)
        return bound, reads

    def outer_vars(lam) -> set[str]:
        names, node = set(), lam
        while node.parent is not None:
            node = node.parent
            if node.type == "statements":
                for stmt in node.children:
                    if stmt.start_byte < lam.start_byte and stmt.type == "property_declaration":
                        names |= declared(stmt, "var")
        return names

    def walk(node) -> None:
        if node.type == "call_expression" and callee(node) in sendable:
            for lam in closures(node):
                bound, reads = inside(lam)
                captured = outer_vars(lam) - bound
                for ident in reads:
                    if text(ident) in captured:
                        line = ident.start_point[0] + 1
                        found.append(f"line {line}: captured var `{text(ident)}`")
        for child in node.children:
            walk(child)

    walk(tree.root_node)
    return found


def check_swift(
    files: dict[str, SwiftFile],
    runtime: str = DEFAULT_SWIFT_RUNTIME,
    sources: dict[str, str] | None = None,
    table: dict = TABLE,
) -> list[str]:
    """Every problem found in `files` (parsed) written for `runtime`, as "file:line: message";
    empty when all names resolve. With `sources` (the same files' text) the sendable-capture
    rule runs too."""
    symbols = entries_at(runtime, table)
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
    sendable = {e["name"] for e in symbols if e.get("sendable_closure")}
    for fname, source in (sources or {}).items():
        for capture in sendable_captures(source, sendable):
            problems.append(f"{fname}: {capture} in a @Sendable closure: not allowed in Swift 6")
    return problems


SWIFT_FILES = ("MLXKitBundle.swift", "ChatView.swift", "MLXKitVisionEncoder.swift")
# The example is written for the default runtime (its drafter code needs it).
FILES_OF = {
    "1441444": SWIFT_FILES,
    "3.31.4": ("MLXKitBundle.swift", "MLXKitVisionEncoder.swift"),
}


@pytest.fixture(scope="module")
def swift_sources(tmp_path_factory) -> dict[str, dict[str, str]]:
    """runtime → the Swift of an MLX-vision bundle with MTP (and a JSON Schema, where the
    runtime has guided generation), ChatView, the Core ML glue of a Core ML bundle, and the
    README and manifest of the first (the tiny fixtures, one Core ML grid: seconds)."""
    root = tmp_path_factory.mktemp("swift")
    schema = root / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"name": {"type": "string"}}}))
    out = {}
    for runtime in SWIFT_RUNTIMES:
        mlx, coreml = root / f"mlx-{runtime}", root / f"coreml-{runtime}"
        mtp = SWIFT_RUNTIME_DETAILS[runtime].mtp_drafter
        guided = schema if SWIFT_RUNTIME_DETAILS[runtime].guided_generation else None
        build_bundle(
            FIXTURES / "tiny_tied",
            mlx,
            "iphone12",
            mtp=mtp,
            swift_runtime=runtime,
            json_schema=guided,
        )
        build_bundle(
            FIXTURES / "tiny_vision_p6",
            coreml,
            "iphone15",
            vision_encoder="coreml",
            coreml_grids="6x9",
            mtp=mtp,
            swift_runtime=runtime,
        )
        out[runtime] = {
            "MLXKitBundle.swift": (mlx / "xcode" / "MLXKitBundle.swift").read_text(),
            "ChatView.swift": CHAT_VIEW.read_text(),
            "MLXKitVisionEncoder.swift": (
                coreml / "xcode" / "MLXKitVisionEncoder.swift"
            ).read_text(),
            "README.md": (mlx / "xcode" / "README.md").read_text(),
            "manifest.json": (mlx / "manifest.json").read_text(),
            "coreml README.md": (coreml / "xcode" / "README.md").read_text(),
        }
    return out


def edited(
    sources: dict[str, str], runtime: str = DEFAULT_SWIFT_RUNTIME, **replace: tuple[str, str]
) -> dict[str, str]:
    """The runtime's Swift files, with `file=(old, new)` edits applied."""
    out = {}
    for name in FILES_OF[runtime]:
        text = sources[name]
        key = name.split(".")[0]
        if key in replace:
            old, new = replace[key]
            assert old in text, f"{old!r} is not in {name}"
            text = text.replace(old, new)
        out[name] = text
    return out


def lint(sources: dict[str, str], runtime: str = DEFAULT_SWIFT_RUNTIME) -> list[str]:
    """Every rule over these files (name → text) written for `runtime`."""
    files = {name: parse_swift(text) for name, text in sources.items()}
    return check_swift(files, runtime, sources)


@pytest.mark.parametrize("runtime", SWIFT_RUNTIMES)
def test_the_glue_and_the_example_parse_and_pass_the_lint(swift_sources, runtime):
    sources = edited(swift_sources[runtime], runtime)
    for name, text in sources.items():
        assert parse_swift(text).errors == [], name
    assert lint(sources, runtime) == []


def test_every_mlx_swift_lm_name_the_swift_uses_is_in_the_table(swift_sources):
    used_at = {}
    for runtime in SWIFT_RUNTIMES:
        files = {n: parse_swift(t) for n, t in edited(swift_sources[runtime], runtime).items()}
        used_at[runtime] = {u.name for f in files.values() for u in f.uses}
        used_at[runtime] |= set().union(*(f.imports for f in files.values()))
    # the names issues 12 and 22 are about are used, and resolve to the table
    assert {
        "Qwen35TextMTPRegistration",
        "Qwen35VLMMTPRegistration",
        "register",
        "MTPDrafterModelFactory",
        "prefill",
        "stepSize",
        "huggingFaceTokenizerLoader",
        "VLMModelFactory",
        "ciImage",
        "MLXArray",
        "acceptedDraftTokens",
        "PhotosPicker",
        "MLXGuidedGeneration",
        "TokenizerVocabExtractor",
        "GrammarTokenizer",
        "GrammarConstraint",
        "GuidedGenerationLoop",
        "generateJSON",
    } <= used_at["1441444"]
    assert "prefillStepSize" in used_at["3.31.4"] and "loadDrafter" not in used_at["3.31.4"]
    for e in TABLE["symbol"]:  # the table holds what the Swift uses, nothing more
        assert any(e["name"] in used_at[r] for r in e["at"]), e


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
            {"ChatView": ("mtpDrafter: mtpDrafter, blockSize: 2", "drafter: mtpDrafter")},
            "`generate`: no declaration takes the arguments (input:parameters:context:drafter:)",
        ),
        (
            {"ChatView": ("let processing =", "var processing =")},
            "captured var `processing` in a @Sendable closure",
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
        (
            {"MLXKitBundle": ("import MLXGuidedGeneration\n", "")},
            "`GuidedGenerationLoop`: needs `import MLXGuidedGeneration`",
        ),
        (
            {
                "MLXKitBundle": (
                    "grammarTokenizer, jsonSchema: jsonSchema",
                    "grammarTokenizer, schema: jsonSchema",
                )
            },
            "`GrammarConstraint`: no declaration takes the arguments (tokenizer:schema:",
        ),
        (
            {
                "MLXKitBundle": (
                    "TokenizerVocabExtractor.extractForGrammar(from: tokenizer)",
                    "TokenizerVocabExtractor.extract(from: tokenizer)",
                )
            },
            "`extract`: not in tests/swift_api.toml",
        ),
        (
            {
                "MLXKitBundle": (
                    "prefill: parameters.prefill, emit: emit)",
                    "emit: emit, prefill: parameters.prefill)",
                )
            },
            "`run`: no declaration takes the arguments",
        ),
    ],
    ids=[
        "deprecated",
        "unknown-member",
        "unknown-type",
        "wrong-label",
        "no-import-tokenizers",
        "no-import-module",
        "wrong-drafter-label",
        "captured-var",
        "unknown-vlm-member",
        "no-import-mlxvlm",
        "wrong-processing-label",
        "unknown-image-case",
        "wrong-mlxarray-label",
        "no-import-mlx",
        "no-import-guided",
        "wrong-constraint-label",
        "unknown-guided-member",
        "guided-labels-out-of-order",
    ],
)
def test_the_check_fails_on_names_the_table_does_not_hold(swift_sources, edit, message):
    problems = lint(edited(swift_sources[DEFAULT_SWIFT_RUNTIME], **edit))
    assert any(message in p for p in problems), problems


def test_guided_generation_is_not_in_the_release(swift_sources):
    """The guided glue (a 1441444 bundle with a JSON Schema), checked against 3.31.4: the
    MLXGuidedGeneration product is not there."""
    glue = swift_sources[DEFAULT_SWIFT_RUNTIME]["MLXKitBundle.swift"]
    problems = lint({"MLXKitBundle.swift": glue}, "3.31.4")
    assert any("imports MLXGuidedGeneration, which the table does not list" in p for p in problems)
    assert any("`GrammarConstraint`: not in tests/swift_api.toml" in p for p in problems)


def test_the_drafter_api_is_not_in_the_release():
    """The example's drafter call, checked against 3.31.4: its Qwen 3.5 registrations and the
    acceptance counters are not there."""
    problems = lint({"ChatView.swift": CHAT_VIEW.read_text()}, "3.31.4")
    assert any("`loadDrafter`" in p or "`acceptedDraftTokens`" in p for p in problems), problems


# One failing snippet per rule of the lint (the glue and the example pass all of them, above).
SNIPPETS = {
    "captured var": (
        (
            "import MLXLMCommon\n"
            "func f(_ c: ModelContainer) async throws {\n"
            "    var n = 1\n"
            "    n += 1\n"
            "    try await c.perform { context in\n"
            "        let m = n + 1\n"
            "    }\n"
            "}\n"
        ),
        "line 6: captured var `n` in a @Sendable closure",
    ),
    "name not in the table": (
        "import MLXLMCommon\nlet p = GenerateParameters.fromManifest()\n",
        "`fromManifest`: not in tests/swift_api.toml",
    ),
    "labels differ": (
        "import MLXLMCommon\nlet i = UserInput(messages: [])\n",
        "`UserInput`: no declaration takes the arguments (messages:)",
    ),
    "import missing": (
        "let p = GenerateParameters()\n",
        "`GenerateParameters`: needs `import MLXLMCommon`",
    ),
}


@pytest.mark.parametrize("rule", SNIPPETS)
def test_each_lint_rule_fails_its_snippet(rule):
    source, message = SNIPPETS[rule]
    problems = lint({"snippet.swift": source})
    assert any(message in p for p in problems), problems
    fixed = source.replace("var n", "let n").replace("    n += 1\n", "")
    if rule == "captured var":  # a `let` may be captured
        assert lint({"snippet.swift": fixed}) == []


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
    assert tuple(TABLE["runtime"]) == SWIFT_RUNTIMES == tuple(SWIFT_RUNTIME_DETAILS)
    assert DEFAULT_SWIFT_RUNTIME in SWIFT_RUNTIMES
    for version, refs in TABLE["runtime"].items():
        assert refs["ml-explore/mlx-swift-lm"] == version  # a tag, or the commit's short hash
        assert swift_runtime(version).commit.startswith(version) or version == "3.31.4"
        assert swift_runtime(version).mlx_swift.endswith(refs["ml-explore/mlx-swift"])
    modules = {m["name"] for m in symbols if m["kind"] == "module"}
    for e in symbols:
        assert e["kind"] in ("type", "property", "function", "init", "case", "macro", "module"), e
        assert e["repo"] in ("ml-explore/mlx-swift-lm", "ml-explore/mlx-swift"), e
        assert e["at"] and set(e["at"]) <= set(SWIFT_RUNTIMES), e
        for runtime, where in e["at"].items():
            ref, path, line = where.split(":")
            assert ref == TABLE["runtime"][runtime][e["repo"]], e
            assert path.endswith((".swift", "README.md")) and int(line) > 0, e
        assert set(e.get("deprecated", {})) <= set(e["at"]) and e["source"], e
        if e["kind"] != "module":
            assert e["module"] in modules, e
    keys = [
        (e["name"], e["kind"], e.get("owner"), str(e.get("labels")), r)
        for e in symbols
        for r in e["at"]
    ]
    assert len(keys) == len(set(keys))


def test_a_name_without_a_source_line_fails(swift_sources):
    """An entry whose `at` does not name the runtime is not there for it."""
    table = {
        "runtime": TABLE["runtime"],
        "symbol": [e for e in TABLE["symbol"] if e["name"] != "Qwen35VLMMTPRegistration"],
    }
    sources = edited(swift_sources[DEFAULT_SWIFT_RUNTIME])
    files = {name: parse_swift(text) for name, text in sources.items()}
    problems = check_swift(files, DEFAULT_SWIFT_RUNTIME, sources, table)
    assert any("`Qwen35VLMMTPRegistration`: not in tests/swift_api.toml" in p for p in problems)


@pytest.mark.parametrize("runtime", SWIFT_RUNTIMES)
def test_the_bundle_readme_lists_the_packages_and_their_versions(swift_sources, runtime):
    sources = swift_sources[runtime]
    readme = sources["README.md"]
    products = {m["name"] for m in TABLE["symbol"] if m["kind"] == "module"}
    guided = json.loads(sources["manifest.json"])["json_schema_path"] is not None
    assert guided == swift_runtime(runtime).guided_generation  # the fixture gives it a schema
    for url, rule, names in swift_packages(swift_runtime(runtime), guided):
        row = next(line for line in readme.splitlines() if f"`{url}`" in line)
        assert rule in row and all(f"`{n}`" in row for n in names), row
        assert set(names) <= products
    assert f"mlx-swift-lm {runtime}" in readme and swift_runtime(runtime).commit in readme
    assert json.loads(sources["manifest.json"])["runtime"] == runtime_record(runtime)
    snippet = readme.split("```swift")[1].split("```")[0]
    assert "import Tokenizers" in snippet and "#huggingFaceTokenizerLoader()" in snippet
    assert "docs/verification.md" in readme and "3.32.3" not in readme
    assert "0182a49" not in readme and "0182a49" not in sources["coreml README.md"]
