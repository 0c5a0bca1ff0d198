"""`verify_bundle`: is this folder still exactly what was built, safe to ship, and does it fit?

The manifest is not trusted: the app's Swift loader takes its device list, minimum iOS,
memory check and cache limit from it, so every field is re-derived — the plan is made
again from model/config.json with the manifest's settings on the manifest's target (from
the device table), the expected manifest is rebuilt with the same `make_manifest` that
`bundle build` writes it with, and the two are compared field by field. A field added to
`make_manifest` later is covered without a change here; the model's name is the one
`bundle build` gives the recorded source. Only `files` (checked against the disk), `source`
and `created_by` (where and by what it was built: informational, read by no app) are not
re-derived. What the app reads beside the weights (config.json's token ids, the tokenizer,
generation and preprocessor files, the Core ML export's records) is held to what the bundle
fixes itself (tokenizer.json, the tower's config) and, when the recorded source is on this
machine, re-derived from it: a sha256 only shows that a file is the one the manifest lists.
The drafter's draft vocabulary (mtp/draft_vocab.json: mlxkit's loader drafts over it, MLX
Swift's never opens it) is held to the manifest's `mtp.draft_vocab` and the bytes the plan
counts, and re-derived from the recorded source's calibration set when the source is here.
A bundle of recipe auto is re-planned with the rules its config.json files record (the
allocation came from a sensitivity measurement that need not be on this machine); the tensors
are then held to those rules. The rounding is re-planned with the one model/'s safetensors index
records (`convert --rounding gptq` marks it there): a manifest that calls GPTQ weights nearest
rounding's, or the reverse, differs from the re-plan.

`quality` (the recipe's KL vs the source when the plan knew it) is re-derived only on request,
by measuring: `verify_quality` (`bundle verify --quality --reference SRC`) runs `mlxkit eval` on
the bundle against SRC on the manifest's evaluation set and fails beyond QUALITY_TOLERANCE of
measured figures (or beyond PREDICTION_FACTOR times a predicted KL). Measured figures must be
of weights rounded as model/'s are (the block's `rounding`); a prediction is nearest rounding's,
and a GPTQ bundle's measurement is held to it with the same factor.

Each check is independent and reported on its own line, so one broken file does not hide
the others. Input that is not a bundle at all (no folder, no manifest, manifest not JSON)
raises ManifestError instead: the CLI exits 2 for bad input and 1 for a bundle that fails.
"""

from __future__ import annotations

import dataclasses
import json
import stat
from dataclasses import dataclass, field
from pathlib import Path

from mlxkit.bundle_files import (
    FileEntry,
    bad_path,
    bundle_files,
    check_files,
    file_entries,
    read_manifest,
    resolves_inside,
)
from mlxkit.checkpoint import short
from mlxkit.errors import ConfigError, ManifestError, MlxkitError
from mlxkit.fields import local_path, shown
from mlxkit.layout import VISION_TOKEN_KEYS, ModelConfig
from mlxkit.load import BUNDLE_MODEL_DIR as MODEL_DIR
from mlxkit.load import MTP_DIR

from .manifest import COREML_PATH, COREML_RECORDED, MANIFEST, schema_errors

NOT_DERIVED = ("files", "source", "created_by", "quality")
# How far a re-measured figure may be from a measured one in the manifest: relative for KL and
# perplexity (+ an absolute floor for a KL near 0), absolute for top-1. The same text and
# tokens give the same figures on one machine; another machine's float32 arithmetic (a Mac's
# GPU against this CPU) moves a KL of 0.03 by well under these.
QUALITY_TOLERANCE = {
    "kl_mean": (0.10, 1e-4),
    "kl_p99": (0.20, 1e-3),
    "top1": (0.0, 0.02),
    "ppl": (0.05, 0.0),
}
# A predicted KL (sum of per-group KLs on the calibration set) is a third to a half of the
# measured one on micro (benchmarks/results/quality.md), a fifth for the quality recipe: a
# measurement more than this many times the prediction says the prediction is wrong.
PREDICTION_FACTOR = 6.0
COREML_SPEC_VERSION = 9  # iOS 18: multifunction packages, scaled_dot_product_attention

# What MLX Swift's VLM loader needs of preprocessor_config.json: `processor_class` picks the
# processor (mlx-swift-lm Libraries/MLXVLM/VLMModelFactory.swift, VLMProcessorTypeRegistry),
# and Qwen3VLProcessorConfiguration (Libraries/MLXVLM/Models/Qwen3VL.swift) decodes the rest
# as non-optional keys.
SWIFT_PROCESSOR_CLASS = "Qwen3VLProcessor"
SWIFT_PREPROCESSOR_KEYS = (
    "processor_class",
    "image_mean",
    "image_std",
    "merge_size",
    "patch_size",
    "temporal_patch_size",
    "image_processor_type",
)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    bundle: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, problems: list[str], passed: str) -> None:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        self.checks.append(Check(name, not problems, shown if problems else passed))


# --- the manifest against a re-plan ------------------------------------------------------------


def _manifest_target(t: dict):
    """The target the manifest names, from the device table: a bare budget, a device or
    tier, or a device or tier whose usable memory was replaced (`--memory-budget`)."""
    from .devices import resolve_target

    if t.get("kind") == "budget":
        return resolve_target(None, t["usable_bytes"])
    tgt = resolve_target(t["name"])
    if tgt.kind == "mac":
        raise MlxkitError(f"target {tgt.name} is a Mac; bundles are for iPhones")
    if (t["usable_bytes"], t["usable_bytes_entitled"]) != (
        tgt.usable_bytes,
        tgt.usable_bytes_entitled,
    ):
        tgt = resolve_target(t["name"], t["usable_bytes"])
    return tgt


def replan(root: Path, manifest: dict, target=None):
    """The plan `bundle build` made, made again from model/config.json with the settings
    the manifest records, at its max context; on `target` instead when given (a Target),
    within the memory limit the manifest declares it needs.

    Settings the manifest holds only through their effect are read back from it: whether
    the entitlement was allowed (the limit planned in), mlxkit's own drafts per round (its
    loop's speed, where the target has one), the runtime reserve and MLX cache limit (the
    memory breakdown). The vision tower's settings are its section's: whether it is in, its
    bits, and the image cap planned for (absent when it is not in). The rounding is model/'s
    (its index). Each is then checked like every other field, through what it implies."""
    from mlxkit.quality import model_rounding

    from .plan import evaluate

    q, m, t, memory = (manifest[k] for k in ("quantization", "mtp", "target", "memory"))
    tgt = target or _manifest_target(t)
    if target is None:
        entitlement = memory["usable_bytes"] != tgt.usable(False)
    else:
        entitlement = manifest["entitlement_required"]
    performance, breakdown = manifest["performance"], memory["breakdown"]
    v = manifest["vision"]
    vision = {"vision": v["included"], "vision_bits": v.get("bits")}
    if v["image_tokens"] is not None:
        vision["image_tokens"] = v["image_tokens"]
    model: Path | ModelConfig = root / MODEL_DIR
    if v.get("encoder") == "coreml":  # model/ is text only; the tower is the package's
        model, vision["vision_encoder"], vision["coreml_grids"] = _coreml_settings(root, v)
    auto = recipe_from_configs(root) if q["recipe"] == "auto" else None
    loop = performance.get("mlxkit_loop")
    num_draft = (loop.get("num_draft") if isinstance(loop, dict) else None) or m["num_draft"] or 2
    return evaluate(
        model,
        tgt,
        manifest["max_context"],
        name=_built_name(manifest),
        recipe=q["recipe"],
        auto_recipe=auto,
        bits=q["bits"],
        group_size=q["group_size"],
        rounding=model_rounding(root / MODEL_DIR),
        dtype=q["dtype"],
        mtp=m["included"],
        draft_vocab=m["draft_vocab"],
        num_draft=num_draft,
        prefill_chunk=manifest["prefill_chunk"],
        kv_bits=manifest["kv_cache"]["bits"],
        kv_group_size=manifest["kv_cache"]["group_size"],
        entitlement=entitlement,
        acceptance=performance.get("mtp_acceptance", 0.7),
        reserve=breakdown.get("runtime_reserve"),
        cache_limit=breakdown.get("mlx_cache_limit"),
        swift_runtime=manifest["runtime"]["version"],
        **vision,
    )


def recipe_from_configs(root: Path):
    """Recipe auto as model/ and mtp/ config.json record it: their defaults, and one exact
    rule per module that differs (mlx-lm's `quantization` block)."""
    import re

    from mlxkit.convert.quantize import AUTO, Recipe, Rule

    from mlxkit.checkpoint import read_config

    blocks = [read_config(root / MODEL_DIR).get("quantization")]
    if (root / MTP_DIR / "config.json").is_file():
        blocks.append(read_config(root / MTP_DIR).get("quantization"))
    if not all(isinstance(b, dict) and {"bits", "group_size"} <= b.keys() for b in blocks):
        raise MlxkitError(
            "recipe auto: config.json has no quantization block with bits and group_size"
        )
    try:
        rules = tuple(
            Rule(re.compile(f"^{re.escape(module)}$"), int(e["bits"]), int(e["group_size"]))
            for b in blocks
            for module, e in b.items()
            if isinstance(e, dict)
        )
        return Recipe(AUTO, int(blocks[0]["bits"]), int(blocks[0]["group_size"]), rules, "")
    except (KeyError, TypeError, ValueError):
        raise MlxkitError(
            "recipe auto: a module's quantization entry lacks bits or group_size"
        ) from None


def _built_name(manifest: dict) -> str:
    """The model name `bundle build` gives the recorded source: the repo's name for a --size
    download, else the source folder's (a cache snapshot passed as a folder is named by its
    revision, so either is accepted where the source has a repo)."""
    source, name = manifest["source"], manifest["model"]["name"]
    candidates = [Path(source["path"]).name]
    if isinstance(source.get("repo"), str):
        candidates.insert(0, source["repo"].split("/")[-1])
    return name if name in candidates else candidates[0]


def _coreml_settings(root: Path, v: dict) -> tuple[ModelConfig, str, str]:
    """The checkpoint shapes and settings a Core ML bundle was planned with: model/'s text
    model, the tower config and grids the manifest records (`bundle verify` holds the
    package's spec to them)."""
    from mlxkit.convert.coreml import vision_config_of

    from mlxkit.load import load_model_config

    coreml = v["coreml"]
    if not isinstance(coreml, dict) or not isinstance(coreml.get("functions"), list):
        raise MlxkitError("vision.coreml: the manifest does not describe the Core ML encoder")
    try:
        grids = ",".join(f"{f['grid'][0]}x{f['grid'][1]}" for f in coreml["functions"])
    except (TypeError, KeyError, IndexError):
        raise MlxkitError("vision.coreml.functions: each needs a grid [rows, cols]") from None
    tower = vision_config_of(coreml.get("vision_config"), "vision.coreml.vision_config")
    text = load_model_config(root / MODEL_DIR).text
    return ModelConfig(text, tower), "coreml", grids


def expected_manifest(p, manifest: dict, root: Path | None = None) -> dict:
    """What `bundle build` writes for plan `p`, as JSON reads it back: the Core ML package's
    size and digest from the files under `root`, and what it records from the manifest (the
    Core ML check holds the spec to it)."""
    from .bundle import coreml_facts, make_manifest
    from .guided import JSON_SCHEMA_FILE

    coreml = None
    if p.vision_encoder == "coreml" and root is not None:
        coreml = coreml_facts(root, manifest["vision"]["coreml"])
    schema = root is not None and (root / JSON_SCHEMA_FILE).is_file()
    expected = make_manifest(p, manifest["source"], p.settings.mtp, coreml, schema)
    return json.loads(json.dumps(expected))


def differences(got: object, want: object, where: str = "") -> list[str]:
    """Field-by-field differences, as readable paths."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = []
        for key in want:
            if key not in got:
                out.append(f"{where}{key}: missing")
            else:
                out += differences(got[key], want[key], f"{where}{key}.")
        out += [f"{where}{short(k, 40)}: not a field mlxkit writes" for k in got if k not in want]
        return out
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [
            d for i, (g, w) in enumerate(zip(got, want)) for d in differences(g, w, f"{where}{i}.")
        ]
    if type(got) is type(want) and got == want:
        return []
    return [f"{where.rstrip('.')}: manifest says {shown(got)}, re-derived {shown(want)}"]


def _check_manifest(root: Path, manifest: dict) -> tuple[list[str], object]:
    """(problems, the re-derived plan or None)."""
    try:
        p = replan(root, manifest)
    except MlxkitError as e:
        return [f"cannot re-plan from the manifest's settings: {e}"], None
    try:
        want = expected_manifest(p, manifest, root)
    except (OSError, KeyError) as e:
        return [f"cannot read the Core ML package's files: {e}"], p
    got = {k: v for k, v in manifest.items() if k not in NOT_DERIVED}
    return differences(got, {k: v for k, v in want.items() if k not in NOT_DERIVED}), p


# --- files and paths ---------------------------------------------------------------------------


def _check_paths(root: Path, manifest: dict) -> tuple[list[str], list[FileEntry]]:
    """Listed paths and the manifest's model/drafter paths stay inside the bundle; so does
    every symlink in it. Returns the problems and the entries that are safe to open."""
    entries, _ = file_entries(manifest)  # malformed entries failed the schema check
    problems, usable = [], []
    for e in entries:
        why = bad_path(e.path)
        if why is None and not resolves_inside(root, e.path):
            why = f"{short(e.path, 40)} resolves outside the bundle (symlink)"
        if why:
            problems.append(why)
        else:
            usable.append(e)
    for key, rel in (
        ("model.path", manifest["model"]["path"]),
        ("model.mtp_path", manifest["model"]["mtp_path"]),
        ("mtp.path", manifest["mtp"]["path"]),
    ):
        if rel is not None and (bad_path(rel) or not resolves_inside(root, rel)):
            problems.append(f"{key} {short(rel, 40)} does not lie inside the bundle")
    for rel, st in bundle_files(root):
        if stat.S_ISLNK(st.st_mode) and not resolves_inside(root, rel):
            problems.append(f"{short(rel, 40)} links outside the bundle")
    return problems, usable


def _links_out_of_model(root: Path) -> bool:
    """model/ or mtp/, or something in them, is a symlink that leaves the bundle."""
    inside = [d for d in (MODEL_DIR, MTP_DIR) if not resolves_inside(root, d)]
    return bool(inside) or any(
        stat.S_ISLNK(st.st_mode) and not resolves_inside(root, rel)
        for rel, st in bundle_files(root)
        if rel.split("/")[0] in (MODEL_DIR, MTP_DIR)
    )


def _check_files(root: Path, entries: list[FileEntry]) -> list[str]:
    problems = check_files(root, entries)
    listed = {e.path for e in entries}
    for rel, st in bundle_files(root):
        if rel == MANIFEST or rel in listed:
            continue
        what = "file" if stat.S_ISREG(st.st_mode) else "entry that is not a regular file"
        problems.append(f"{short(rel, 60)}: an {what} not listed in the manifest")
    return problems


# --- tensors, loading, fitting -----------------------------------------------------------------


def _check_tensors(root: Path, p) -> list[str]:
    """Every tensor on disk has the name, dtype and shape the plan says the converter
    writes; none is missing and none is extra. (A bundle's drafter keeps the checkpoint's
    `mtp.` names: the layout mlx-swift-lm reads.)"""
    from mlxkit.convert.writer import SAFETENSORS_DTYPES

    from mlxkit.checkpoint import read_headers, weight_files
    from mlxkit.layout import planned_tensors

    s, recipe = p.settings, p.recipe
    planned = planned_tensors(
        p.cfg,
        recipe,
        include_mtp=s.mtp,
        dtype=s.dtype,
        vision=p.mlx_vision,
        vision_bits=s.vision_bits,
    )
    problems = []
    for directory, in_dir in (
        (MODEL_DIR, lambda t: t.part != "mtp"),
        (MTP_DIR, lambda t: t.part == "mtp"),
    ):
        want = {t.path: t for t in planned if in_dir(t)}
        if not want:
            continue
        try:
            have = read_headers(weight_files(root / directory))
        except MlxkitError as e:
            problems.append(str(e))
            continue
        for name, t in want.items():
            info = have.get(name)
            if info is None:
                problems.append(f"{directory}/: tensor {name} is missing")
            elif (info.dtype, info.shape) != (SAFETENSORS_DTYPES[t.dtype], t.shape):
                problems.append(
                    f"{directory}/: tensor {name} is {info.dtype} {list(info.shape)}, planned "
                    f"{SAFETENSORS_DTYPES[t.dtype]} {list(t.shape)}"
                )
        problems += [
            f"{directory}/: tensor {short(n)} is not planned" for n in have if n not in want
        ]
    return problems


def _check_quantization(root: Path, p) -> list[str]:
    """The `quantization` blocks of model/ and mtp/ config.json — what MLX and mlx-swift-lm
    dequantize the packed weights by — are the ones the converter writes for the plan."""
    from mlxkit.checkpoint import read_config
    from mlxkit.layout import model_parameters, weight_rule

    s, recipe = p.settings, p.recipe
    parameters = model_parameters(p.cfg, include_mtp=s.mtp, vision=p.vision)
    rules = {
        path.removesuffix(".weight"): weight_rule(path, shape, recipe, s.vision_bits)
        for path, shape in parameters
    }
    problems = []
    for directory, in_dir in (
        (MODEL_DIR, lambda m: not m.startswith("mtp.")),
        (MTP_DIR, lambda m: m.startswith("mtp.")),
    ):
        if directory == MTP_DIR and not s.mtp:
            continue
        want = recipe.quantization_config({m: r for m, r in rules.items() if in_dir(m)})
        try:
            config = read_config(root / directory)
        except MlxkitError as e:
            problems.append(str(e))
            continue
        problems += [
            f"{directory}/config.json: {key} is not what the plan quantizes by "
            f"({recipe.name}, {recipe.bits}-bit, group {recipe.group_size})"
            for key in ("quantization", "quantization_config")
            if config.get(key) != want
        ]
    return problems


def _check_entitlements(root: Path, manifest: dict) -> list[str]:
    """xcode/Entitlements.plist, which goes into the app, grants what the manifest says the
    plan needs and nothing else."""
    import plistlib

    from .xcode import ENTITLEMENTS_FILE, entitlements

    path = root / "xcode" / ENTITLEMENTS_FILE
    want = entitlements(manifest["entitlement_required"])
    try:
        got = plistlib.loads(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - plistlib raises expat's, ValueError, OverflowError
        return [f"xcode/{ENTITLEMENTS_FILE}: not a readable plist ({type(e).__name__})"]
    if got != want:

        def names(d: object) -> str:
            keys = sorted(map(str, d)) if isinstance(d, dict) else [shown(d)]
            return ", ".join(short(k, 60) for k in keys[:5]) or "nothing"

        return [f"xcode/{ENTITLEMENTS_FILE} grants {names(got)}; the plan needs {names(want)}"]
    return []


def _check_load(root: Path, mtp: bool) -> tuple[list[str], str]:
    """model/ alone with its tokenizer, then model/ with the bundle's drafter."""
    from mlxkit.load import load_model
    from mlxkit.tokenizer import load_tokenizer

    model_dir = root / MODEL_DIR
    try:
        model = load_model(model_dir, drafter=False)  # as a bare copy of model/
        load_tokenizer(model_dir)
        parts = f"{'with' if model.has_mtp else 'without'} MTP, "
        parts += f"{'with' if model.has_vision else 'without'} the vision tower"
        detail = (
            f"model/ loads ({parts}; names, shapes and dtypes checked, weights "
            "memory-mapped), and its tokenizer"
        )
        if mtp:
            if not load_model(model_dir, drafter=root / MTP_DIR).has_mtp:
                return [f"{MTP_DIR}/ did not provide the MTP head"], ""
            detail += f"; with {MTP_DIR}/ it loads with the MTP head"
        return [], detail
    except MlxkitError as e:
        return [str(e)], ""
    except Exception as e:  # noqa: BLE001 - MLX raises plain exceptions on bad files
        return [f"{type(e).__name__}: {e}"], ""


def _check_fit(p, entitlement_required: bool) -> tuple[list[str], str]:
    tgt = p.target
    problems = []
    if not p.fits:
        problems.append(
            f"does not fit {tgt.label}: peak {p.total / 1e9:.2f} GB at "
            f"{p.max_context:,} tokens, {p.usable / 1e9:.2f} GB usable"
        )
    ent = "with" if entitlement_required else "without"
    detail = (
        f"fits {tgt.label}: peak {p.total / 1e9:.2f} GB of {p.usable / 1e9:.2f} GB "
        f"usable {ent} the entitlement at {p.max_context:,} tokens"
    )
    return problems, detail


def _check_vision(root: Path, manifest: dict) -> tuple[list[str], str]:
    """model/ holds the vision tower exactly when the manifest says so, and then everything
    MLX Swift's VLM loader reads: the tensors, config.json's vision_config and four token ids,
    and the preprocessor configs it decodes."""
    from mlxkit.checkpoint import read_config, read_headers, weight_files
    from mlxkit.layout import ModelConfig, part_of
    from mlxkit.vision import PREPROCESSOR_FILES, Preprocessor

    model_dir = root / MODEL_DIR
    try:
        config = read_config(model_dir)
        tower = sum(part_of(n) == "vision" for n in read_headers(weight_files(model_dir)))
        shapes = ModelConfig.from_dict(config)
    except MlxkitError as e:
        return [str(e)], ""
    coreml = manifest["vision"].get("encoder") == "coreml"
    if not manifest["vision"]["included"] or coreml:
        if tower or shapes.vision is not None:
            said = "the Core ML encoder encodes images" if coreml else "text only"
            return [f"the manifest says {said}, but model/ has a vision tower"], ""
        if coreml:
            return [], f"model/ is text only; images go through {COREML_PATH}"
        return [], "text only, as the manifest says"
    problems = []
    if shapes.vision is None:
        problems.append("model/config.json has no vision_config")
    if not tower:
        problems.append("model/ holds no vision_tower.* tensors")
    problems += _preprocessor_problems(model_dir)
    if not problems:
        try:
            Preprocessor.from_dir(model_dir, shapes.vision)
        except MlxkitError as e:
            problems.append(str(e))
    ids = ", ".join(
        f"{k.removesuffix('_token_id')} {config[k]}"
        for k in (
            "image_token_id",
            "video_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
        )
        if k in config
    )
    return problems, (
        f"{tower} vision_tower.* tensors, vision_config and token ids ({ids}), "
        f"{' and '.join(PREPROCESSOR_FILES)} for MLX Swift's {SWIFT_PROCESSOR_CLASS}"
    )


def _preprocessor_problems(model_dir: Path) -> list[str]:
    """The preprocessor configs are readable JSON, and the image one has what MLX Swift's
    processor requires."""
    from mlxkit.checkpoint import model_file, read_json
    from mlxkit.vision import PREPROCESSOR_FILES

    problems = []
    for name in PREPROCESSOR_FILES:
        try:  # bounded, and never a FIFO or a link out: the size check has not stopped us
            path = model_file(model_dir, name, name)
            if path is None:
                raise MlxkitError("no such file")
            data = read_json(path, name)
        except MlxkitError as e:
            problems.append(f"{MODEL_DIR}/{name} is not readable JSON ({e})")
            continue
        if name == PREPROCESSOR_FILES[0] and isinstance(data, dict):
            missing = [k for k in SWIFT_PREPROCESSOR_KEYS if k not in data]
            if missing:
                problems.append(f"{name} lacks {', '.join(missing)} (MLX Swift requires them)")
            elif data["processor_class"] != SWIFT_PROCESSOR_CLASS:
                problems.append(f"{name}: processor_class is not {SWIFT_PROCESSOR_CLASS}")
    return problems


# --- what the app reads beside the weights, re-derived --------------------------------------

# config.json fields an app reads that the converter copies from the source as they are (the
# quantization blocks are the plan's: _check_quantization); eos_token_id is generation's.
COPIED_CONFIG_KEYS = ("model_type", "text_config", "tie_word_embeddings", *VISION_TOKEN_KEYS)


def _check_derived(root: Path, manifest: dict) -> tuple[list[str], str]:
    """Everything the app reads beside the weights and the manifest's plan: config.json's token
    ids, the tokenizer, generation and preprocessor files, and what the manifest records of
    the Core ML export. Always checked against what the bundle itself fixes (the vision ids
    are tokenizer.json's ids of their tokens and no chat token's; the preprocessing within
    range and the tower's sizes); and re-derived from the recorded source when it is here
    (the sha256 of every file only shows a file is what the manifest lists, and a manifest
    is rewritten as easily as a file)."""
    from mlxkit.checkpoint import check_vision_token_ids, read_config

    model_dir = root / MODEL_DIR
    coreml = manifest["vision"]["coreml"] if manifest["vision"].get("encoder") == "coreml" else None
    try:
        config = read_config(model_dir)
        if any(k in config for k in VISION_TOKEN_KEYS):
            check_vision_token_ids(model_dir, config)
        if coreml is not None:
            _check_recorded_export(model_dir, config, coreml)
    except MlxkitError as e:
        return [str(e)], ""
    except (KeyError, TypeError, AttributeError):
        return ["vision.coreml: the manifest does not describe the encoder"], ""
    source, source_dir = manifest["source"]["path"], _recorded_source(manifest)
    fixed = "vision token ids are tokenizer.json's and no chat token's, preprocessing in range"
    if source_dir is None:
        return [], (
            f"{fixed}; the recorded source {short(source, 60)} is not here, so the files were "
            "not re-derived from it"
        )
    try:
        problems = _source_problems(root, source_dir, config, manifest, coreml)
    except MlxkitError as e:
        return [f"cannot re-derive from the recorded source: {e}"], ""
    return problems, (
        f"{fixed}; config.json, the tokenizer, generation and preprocessor files"
        + (" and the Core ML export's records" if coreml is not None else "")
        + f" re-derived from the recorded source {short(source, 60)}"
    )


def _recorded_source(manifest: dict) -> Path | None:
    """The recorded source checkpoint's directory when it is on this machine, else None."""
    try:
        source_dir = local_path(manifest["source"]["path"], "source")
        return source_dir if source_dir.is_dir() else None
    except (MlxkitError, OSError):
        return None


def _check_draft_vocab(root: Path, manifest: dict) -> tuple[list[str], str]:
    """mtp/draft_vocab.json is there exactly when the manifest gives the drafter a draft
    vocabulary (mlxkit's loader drafts over any it finds), reads back as the manifest's N ids
    of model/'s vocabulary in the bytes the plan counts, and, when the recorded source is here,
    is the shortlist the converter ranks from it (its tokenizer on the calibration set)."""
    from mlxkit.convert.shortlist import shortlist

    from mlxkit import draft_vocab
    from mlxkit.checkpoint import model_file
    from mlxkit.load import load_model_config

    n, name = manifest["mtp"]["draft_vocab"], f"{MTP_DIR}/{draft_vocab.FILE}"
    try:
        path = model_file(root / MTP_DIR, draft_vocab.FILE, "draft vocabulary")
        if n is None:
            if path is not None:
                return [f"{name} is there, but the manifest gives the drafter none"], ""
            return [], "none: the drafter drafts over the whole head"
        if path is None:
            return [f"{name} is missing; the manifest gives the drafter {shown(n)} tokens"], ""
        vocab = load_model_config(root / MODEL_DIR).text.vocab_size
        ids = draft_vocab.read(path, vocab)
    except MlxkitError as e:
        return [str(e)], ""
    planned = draft_vocab.file_bytes(vocab, len(ids))
    if len(ids) != n:
        return [f"{name} holds {len(ids):,} tokens, the manifest says {shown(n)}"], ""
    if path.stat().st_size != planned:
        return [f"{name} has {path.stat().st_size:,} bytes, the plan counts {planned:,}"], ""
    detail = f"{name}: {n:,} of {vocab:,} tokens, {planned:,} bytes as planned"
    source = _recorded_source(manifest)
    if source is None:
        return [], f"{detail}; the recorded source is not here, so it was not re-derived"
    try:
        chosen = shortlist(source, n, vocab)
    except MlxkitError as e:
        return [f"cannot re-derive it from the recorded source: {e}"], ""
    if path.read_bytes() != draft_vocab.encode(chosen.ids.tolist(), vocab, chosen.calibration):
        return [f"{name} is not the shortlist the recorded source's calibration set gives"], ""
    return [], f"{detail}; re-derived from the recorded source's calibration set"


def _check_recorded_export(model_dir: Path, config: dict, coreml: dict) -> None:
    """What the manifest (and the package's spec, held to it) records of a Core ML export: the
    token ids are model/config.json's, the preprocessing is in range and fits the tower."""
    from mlxkit.vision import preprocessor_normalization

    where = "manifest vision.coreml"
    ids = {k: config.get(k) for k in VISION_TOKEN_KEYS}
    if coreml["token_ids"] != ids:
        raise MlxkitError(f"{where}.token_ids are not model/config.json's {ids}")
    pre = coreml["preprocessing"]
    preprocessor_normalization(f"{where}.preprocessing", pre)
    tower = coreml["vision_config"]
    sizes = {"patch_size": "patch_size", "temporal_patch_size": "temporal_patch_size"}
    sizes["merge_size"] = "spatial_merge_size"
    for key, tower_key in sizes.items():
        if pre.get(key) != tower.get(tower_key):
            raise MlxkitError(
                f"{where}.preprocessing: {key} {shown(pre.get(key))} is not the tower's "
                f"{tower_key} {shown(tower.get(tower_key))}"
            )


def _source_problems(
    root: Path, source: Path, config: dict, manifest: dict, coreml: dict | None
) -> list[str]:
    """model/ and mtp/'s side files and config.json's copied fields against what `convert`
    writes from `source`; with the Core ML encoder, the preprocessing, tower config and token
    ids the export records."""
    from mlxkit.convert.converter import (
        DRAFTER_TOKENIZER_FILES,
        TOKENIZER_FILES,
        preprocessor_configs,
    )

    from mlxkit.bundle_files import sha256_file
    from mlxkit.checkpoint import CHAT_TEMPLATE_FILE, model_file, read_config, read_json_object

    src_config = read_config(source)
    problems = []
    want = {k: src_config[k] for k in COPIED_CONFIG_KEYS if k in src_config}
    generation = read_json_object(source, "generation_config.json") or {}
    if generation.get("eos_token_id"):
        want["eos_token_id"] = generation["eos_token_id"]
    if "vision_config" in config:
        want["vision_config"] = src_config.get("vision_config")
    problems += [
        f"{MODEL_DIR}/config.json: {key} is not the recorded source's"
        for key, value in want.items()
        if config.get(key) != value
    ]
    copied = [(MODEL_DIR, n) for n in TOKENIZER_FILES]
    if manifest["mtp"]["included"] is True:
        copied += [(MTP_DIR, n) for n in DRAFTER_TOKENIZER_FILES]
    for directory, name in copied:
        origin = model_file(source, name, name)
        path = root / directory / name
        if origin is not None:
            same = path.is_file() and sha256_file(path) == sha256_file(origin)
        elif name == CHAT_TEMPLATE_FILE and directory == MODEL_DIR:
            # without the file, convert writes tokenizer_config.json's template out as one
            inline = (read_json_object(source, "tokenizer_config.json") or {}).get("chat_template")
            same = not isinstance(inline, str) or (
                path.is_file() and path.read_bytes() == inline.encode()
            )
        else:
            same = not path.exists()
        if not same:
            problems.append(f"{directory}/{name} is not the recorded source's")
    vision = ModelConfig.from_dict(src_config).vision
    if manifest["vision"]["included"] and vision is not None and coreml is None:
        for name, default in preprocessor_configs(vision).items():
            origin = model_file(source, name, name)
            theirs = read_json_object(root / MODEL_DIR, name)
            if theirs != (default if origin is None else read_json_object(source, name)):
                problems.append(f"{MODEL_DIR}/{name} is not the recorded source's")
    if coreml is not None and vision is not None:
        problems += _export_record_problems(source, vision, coreml)
    return problems


def _export_record_problems(source: Path, vision, coreml: dict) -> list[str]:
    """The preprocessing and tower config a Core ML export of `source` records."""
    from mlxkit.convert.coreml import preprocessing

    from mlxkit.vision import Preprocessor

    want = {
        "preprocessing": preprocessing(Preprocessor.from_dir(source, vision)),
        "vision_config": dataclasses.asdict(vision),
    }
    return [
        f"manifest vision.coreml.{key} is not what the recorded source exports"
        for key, value in json.loads(json.dumps(want)).items()
        if coreml[key] != value
    ]


def weight_bytes_on_disk(root: Path, manifest: dict) -> dict[str, int]:
    """Tensor bytes per part, read from the safetensors headers of model/ and mtp/; the vision
    part of a Core ML bundle is its package's weight file."""
    from mlxkit.convert.coreml import WEIGHT_FILE

    from mlxkit.layout import bytes_by_part_on_disk

    parts = bytes_by_part_on_disk(
        root / MODEL_DIR, root / MTP_DIR if manifest["mtp"]["included"] is True else None
    )
    if manifest["vision"].get("encoder") == "coreml":
        parts["vision"] = (root / COREML_PATH / WEIGHT_FILE).stat().st_size
    return parts


def _check_coreml(root: Path, coreml: dict) -> tuple[list[str], str]:
    """The package's spec (read with skip_model_load=True: nothing compiled or run) against
    the manifest: its functions in order, each one's input and output names, shapes and dtypes,
    what it records (grids, precision, preprocessing, tower config, token ids), and the size
    of the weight file the plan counted."""
    from mlxkit.convert.coreml import WEIGHT_FILE, read_package_spec

    package = root / COREML_PATH
    try:
        spec = read_package_spec(package)
    except MlxkitError as e:
        return [str(e)], ""
    have = {f["name"]: f for f in spec.functions}
    problems = _function_problems(spec, have, coreml) + _recorded_problems(spec.metadata, coreml)
    if spec.specification_version < COREML_SPEC_VERSION:
        problems.append(
            f"spec version {spec.specification_version}, not iOS 18's {COREML_SPEC_VERSION}"
        )
    size = (package / WEIGHT_FILE).stat().st_size if (package / WEIGHT_FILE).is_file() else None
    if size != coreml["weight_bytes"]:
        problems.append(f"{WEIGHT_FILE} has {size} bytes, the plan counts {coreml['weight_bytes']}")
    return problems, (
        f"{len(have)} functions ({', '.join(have)}): inputs, outputs, grids, preprocessing and "
        f"token ids as the manifest says; one {size:,}-byte weight file, as planned (spec read "
        "with skip_model_load)"
    ) if not problems else ""


def _function_problems(spec, have: dict, coreml: dict) -> list[str]:
    """The package's functions against the manifest's: names in order, the default, and each
    one's input and output."""
    want = {f["name"]: f for f in coreml["functions"]}
    problems = [
        f"{name} is in the manifest but not in the package" for name in want if name not in have
    ]
    problems += [
        f"{name} is in the package but not in the manifest" for name in have if name not in want
    ]
    if not problems and list(have) != list(want):
        problems.append(f"the package's functions are {list(have)}, the manifest's {list(want)}")
    if spec.default_function != coreml["default_function"]:
        problems.append(
            f"default function {spec.default_function!r}, manifest says "
            f"{coreml['default_function']!r}"
        )
    for name in [n for n in want if n in have]:
        for key in ("input", "output"):
            if have[name][key] != [want[name][key]]:
                problems.append(
                    f"{name}: {key} {have[name][key]}, manifest says {[want[name][key]]}"
                )
    return problems


def _recorded_problems(meta: dict, coreml: dict) -> list[str]:
    """What the spec's metadata records (grids, precision, preprocessing, tower config, token
    ids) against the manifest."""
    problems = []
    grids = ",".join(f"{f['grid'][0]}x{f['grid'][1]}" for f in coreml["functions"])
    recorded = {"grids": grids, "precision": coreml["precision"]}
    for key, value in recorded.items():
        if meta.get(f"mlxkit.{key}") != value:
            problems.append(
                f"the spec records {key} {meta.get(f'mlxkit.{key}')!r}, the manifest {value!r}"
            )
    for key in COREML_RECORDED:
        try:
            value = json.loads(meta[f"mlxkit.{key}"])
        except (KeyError, ValueError):
            value = None
        if value != coreml[key]:
            problems.append(f"the spec records {key} {value!r}, the manifest {coreml[key]!r}")
    return problems


def _report_manifest_and_files(root: Path, manifest: dict, report: Report) -> bool:
    """The schema, then (when it is complete) the listed paths and the files' sizes and
    sha256; False when the schema is not complete."""
    errors = schema_errors(manifest)
    report.add("manifest schema", errors, f"schema {manifest.get('schema_version')} complete")
    if errors:
        return False
    path_problems, entries = _check_paths(root, manifest)
    report.add("paths stay inside the bundle", path_problems, f"{len(entries)} paths")
    file_problems = _check_files(root, entries)
    total = sum(e.bytes for e in entries)
    report.add(
        "file sizes and sha256", file_problems, f"{len(entries)} files, {total / 1e9:.3f} GB"
    )
    return True


def _check_coreml_described(root: Path, manifest: dict) -> tuple[list[str], str]:
    try:
        return _check_coreml(root, manifest["vision"]["coreml"])
    except (KeyError, TypeError, IndexError, AttributeError):
        return ["vision.coreml: the manifest does not describe the encoder"], ""


def _check_quality(root: Path, manifest: dict, reference: Path) -> tuple[list[str], str]:
    """The manifest's quality figures against a measurement of the bundle against `reference`
    on the same evaluation text and number of tokens (see QUALITY_TOLERANCE and
    PREDICTION_FACTOR), its figures of weights rounded as model/'s are when measured."""
    from mlxkit.quality import measure_quality, model_rounding

    q = manifest.get("quality")
    if q is None:
        none = (
            "the manifest has no quality figures (the plan had neither a sensitivity measurement "
            "nor an mlxkit eval result of the source): measure with mlxkit eval BUNDLE --reference "
            "SRC"
        )
        return [none], ""
    method = q.get("method") if isinstance(q, dict) else None
    tokens, kl = (q.get("tokens"), q.get("kl_mean")) if isinstance(q, dict) else (None, None)
    if method not in ("measured", "predicted") or not isinstance(tokens, int) or tokens < 1:
        return ["quality: the manifest's block is not one mlxkit writes (method, tokens)"], ""
    if not isinstance(kl, (int, float)) or isinstance(kl, bool):
        return ["quality.kl_mean: the manifest's figure is not a number"], ""
    try:
        rounding, weights = q.get("rounding", "nearest"), model_rounding(root / MODEL_DIR)
    except MlxkitError as e:
        return [f"cannot read how {MODEL_DIR}/'s weights were rounded: {e}"], ""
    if rounding != (weights if method == "measured" else "nearest"):
        return [
            f"quality.rounding: the manifest's figures are {method} for {shown(rounding)} "
            f"rounding, and {MODEL_DIR}/ holds {weights} rounding's weights"
            + ("" if method == "measured" else " (a prediction is nearest rounding's)")
        ], ""
    try:
        r = measure_quality(root, reference, max_tokens=tokens, quiet=True)
    except MlxkitError as e:
        return [f"cannot measure the bundle against {short(str(reference), 60)}: {e}"], ""
    got = r.to_dict()
    problems = []
    if method == "measured":
        if r.text_digest != q.get("eval_set_digest"):
            problems.append(
                f"the evaluation set is not the one the figures were measured on (digest "
                f"{r.text_digest[:16]}, the manifest's {shown(q.get('eval_set_digest'))}): "
                "another mlxkit version's built-in set"
            )
        for key, (rel, floor) in QUALITY_TOLERANCE.items():
            want = q.get(key)
            if not isinstance(want, (int, float)) or abs(got[key] - want) > rel * abs(want) + floor:
                problems.append(
                    f"{key} {got[key]:.5g} measured, the manifest says {shown(want)} (tolerance "
                    f"{rel:.0%} + {floor:g})"
                )
    elif r.kl_mean > PREDICTION_FACTOR * kl + 1e-4:
        problems.append(
            f"KL {r.kl_mean:.5f} measured, more than {PREDICTION_FACTOR:g}x the {kl:.5f} the "
            "manifest predicts"
        )
    detail = (
        f"measured against {short(str(reference), 60)} on {r.tokens:,} tokens: KL "
        f"{r.kl_mean:.5f} (the manifest's, {method} for {rounding} rounding: {kl:.5f}), top-1 "
        f"{r.top1:.1%}, perplexity {r.ppl:.3f}; "
        + (
            "within tolerance"
            if method == "measured"
            else f"within {PREDICTION_FACTOR:g}x the prediction"
        )
    )
    return problems, detail if not problems else ""


def verify_bundle(
    path: str | Path,
    target: str | None = None,
    load: bool = True,
    quality_reference: str | Path | None = None,
) -> Report:
    """Every check of the module docstring, each reported on its own line; with
    `quality_reference` (the source checkpoint), also the manifest's quality figures,
    re-measured against it."""
    from mlxkit.load import resolve_model_dir

    from .devices import resolve_target

    root = local_path(path, "bundle", ManifestError)
    manifest = read_manifest(root)  # raises ManifestError on bad input
    reference = None
    if quality_reference is not None:  # a reference that is no model: bad input, exit 2
        reference = resolve_model_dir(local_path(quality_reference, "--reference"))
    other = resolve_target(target) if target is not None else None  # bad --target: exit 2
    if other is not None and other.kind == "mac":
        raise ConfigError(f"--target {other.name} is a Mac; bundles are checked against iPhones")
    report = Report(root)
    if not _report_manifest_and_files(root, manifest, report):
        return report  # the other checks read the fields the schema check found missing
    later = [
        "manifest matches a re-plan",
        "tensors as planned",
        "vision tower",
        "model loads",
        "plan fits the target",
        "draft vocabulary",
    ]
    if _links_out_of_model(root):  # nothing is read through a link that leaves the bundle
        for name in later if load else [n for n in later if n != "model loads"]:
            report.add(name, [f"not run: {MODEL_DIR}/ or {MTP_DIR}/ links outside the bundle"], "")
        return report
    problems, p = _check_manifest(root, manifest)
    report.add(later[0], problems, "every field re-derived from the device table and a re-plan")
    if p is not None:
        report.add(
            later[1],
            _check_tensors(root, p) + _check_quantization(root, p),
            "every tensor's name, dtype and shape, and the quantization of both "
            "config.json, are the plan's",
        )
    report.add(later[2], *_check_vision(root, manifest))
    if manifest["vision"].get("encoder") == "coreml":
        report.add("Core ML vision encoder", *_check_coreml_described(root, manifest))
    report.add("files the app reads, re-derived", *_check_derived(root, manifest))
    report.add(later[5], *_check_draft_vocab(root, manifest))
    report.add(
        "xcode/ entitlements",
        _check_entitlements(root, manifest),
        "xcode/Entitlements.plist grants what the manifest says",
    )
    if load:
        problems, detail = _check_load(root, manifest["mtp"]["included"] is True)
        report.add(later[3], problems, detail)
    try:
        fit = replan(root, manifest, other) if other is not None or p is None else p
        problems, detail = _check_fit(fit, manifest["entitlement_required"])
    except MlxkitError as e:
        problems, detail = [str(e)], ""
    report.add(later[4], problems, detail)
    if reference is not None:
        report.add("quality vs the source", *_check_quality(root, manifest, reference))
    return report
