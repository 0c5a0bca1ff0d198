"""A model, in Python, of what MLX Swift does with an mlxkit iPhone bundle: which factory
`MLXKitBundle.load` uses, which model type that factory builds for model/config.json, which
drafter registration matches mtp/config.json and whether that drafter accepts the model, how
each `sanitize` renames (and transposes) the tensors, whether the result is exactly the set of
parameters the Swift model declares (`update(parameters:verify: .all)`), and which generation
parameters apply. mlx-swift-lm cannot run here; every rule below is read from its source at the
runtime's commit and cited by file and line (ml-explore/mlx-swift-lm, commit 1441444 =
14414441fa44f45eee35a61e9fa0bab577cf9734 unless a line says 3.31.4 = bd4b743).

What it cannot see: Swift types and compilation, the tokenizer and processor code, the values
of the weights (only names, shapes from the safetensors headers, and the norm-shift rule), the
math of the forward pass, and anything at run time (memory, speed, Metal). The MoE models and
checkpoints in other layouts are outside it: mlxkit writes neither.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

LIB = "Libraries"

# --- which factory ------------------------------------------------------------------------------


def factory_of(manifest: dict) -> str:
    """MLXKitBundle.load (ios_bridge/templates/MLXKitBundle.swift): the VLM loader when
    manifest.json → vision.encoder is "mlx" (model/ holds the tower), else the text loader."""
    return "VLMModelFactory" if manifest["vision"]["encoder"] == "mlx" else "LLMModelFactory"


# --- which model type each factory builds ---------------------------------------------------------

# LLMTypeRegistry.shared: Libraries/MLXLLM/LLMModelFactory.swift:70-72 (dense types only).
# VLMTypeRegistry.shared: Libraries/MLXVLM/VLMModelFactory.swift:95.
MODEL_TYPES = {
    "LLMModelFactory": {"qwen3_5": "MLXLLM.Qwen35Model", "qwen3_5_text": "MLXLLM.Qwen35TextModel"},
    "VLMModelFactory": {"qwen3_5": "MLXVLM.Qwen35"},
}
# Qwen3VLConfiguration.VisionConfiguration's non-optional keys, which MLXVLM's
# Qwen35Configuration decodes `vision_config` as (Libraries/MLXVLM/Models/Qwen35.swift:188,
# Libraries/MLXVLM/Models/Qwen3VL.swift:353-385). `text_config` and `model_type` are
# non-optional too (Qwen35.swift:190-192, 212-215).
VISION_CONFIG_KEYS = (
    "model_type",
    "depth",
    "hidden_size",
    "intermediate_size",
    "out_hidden_size",
    "num_heads",
    "patch_size",
    "spatial_merge_size",
    "temporal_patch_size",
    "num_position_embeddings",
)


class SwiftRefuses(Exception):
    """What mlx-swift-lm throws (a Swift error the app can show)."""


class SwiftCrashes(Exception):
    """What mlx-swift-lm stops the app on (`fatalError`, `precondition`)."""


def model_type_built(factory: str, config: dict) -> str:
    """ModelTypeRegistry.createModel (Libraries/MLXLMCommon/Registries/ModelTypeRegistry.swift:
    44-52) for config.json's top-level `model_type`; the VLM's configuration must decode."""
    built = MODEL_TYPES[factory].get(config.get("model_type"))
    if built is None:
        raise SwiftRefuses(f"{factory}: unsupportedModelType({config.get('model_type')!r})")
    if built == "MLXVLM.Qwen35":
        decode_vlm_configuration(config, "model/config.json")
    return built


def decode_vlm_configuration(config: dict, where: str) -> None:
    """JSONDecoder on MLXVLM's Qwen35Configuration: a missing non-optional key throws."""
    missing = [k for k in ("text_config", "vision_config", "model_type") if k not in config]
    vision = config.get("vision_config")
    if isinstance(vision, dict):
        missing += [f"vision_config.{k}" for k in VISION_CONFIG_KEYS if k not in vision]
    if missing:
        raise SwiftRefuses(
            f"{where}: keyNotFound {', '.join(missing)} (MLXVLM Qwen35Configuration)"
        )


# --- which drafter ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """One `registerModelType` call: a model type, its config-shape predicate, what it builds."""

    model_type: str
    matches: str  # "always" | "no vision_config" | "vision_config"
    drafter: str
    preconverted_norms: bool
    replaces: bool  # registerModelType(_:creator:) replaces the list; with `matches:` appends


# Libraries/MLXLLM/Qwen35TextMTPRegistration.swift:11-47; the predicate :50-55 (true unless
# `vision_config` is a non-empty object).
TEXT_REGISTRATION = (
    Registration("qwen3_5_text", "always", "MLXLLM.Qwen35MTPDraftModel", False, True),
    Registration("qwen3_5_mtp", "no vision_config", "MLXLLM.Qwen35MTPDraftModel", True, False),
    Registration("qwen3_5", "no vision_config", "MLXLLM.Qwen35MTPDraftModel", False, False),
    Registration("qwen3_5_moe", "no vision_config", "MLXLLM.Qwen35MTPDraftModel", False, False),
)
# Libraries/MLXVLM/Qwen35VLMMTPRegistration.swift:13-41; the predicate :44-49 (a non-empty
# `vision_config` object).
VLM_REGISTRATION = (
    Registration("qwen3_5", "vision_config", "MLXVLM.Qwen35VLMNextNDraftModel", False, False),
    Registration("qwen3_5_mtp", "vision_config", "MLXVLM.Qwen35VLMNextNDraftModel", True, False),
    Registration("qwen3_5_moe", "vision_config", "MLXVLM.Qwen35VLMNextNDraftModel", False, False),
)
REGISTRATIONS = {
    "Qwen35TextMTPRegistration": TEXT_REGISTRATION,
    "Qwen35VLMMTPRegistration": VLM_REGISTRATION,
}
# The targets each drafter accepts; anything else is a fatalError at the first round:
# Libraries/MLXLLM/Models/Qwen35MTP.swift:248-257 (`as? Qwen35Model`, `as? Qwen35TextModel`);
# Libraries/MLXVLM/Models/Qwen35MTP.swift:120-121, 177-179, 226-227 (`as? Qwen35`).
DRAFTER_TARGETS = {
    "MLXLLM.Qwen35MTPDraftModel": {"MLXLLM.Qwen35Model", "MLXLLM.Qwen35TextModel"},
    "MLXVLM.Qwen35VLMNextNDraftModel": {"MLXVLM.Qwen35"},
}


def registered(glue: str) -> list[Registration]:
    """The registry after the `<Name>.register()` calls the glue's loadDrafter makes, in order
    (a registration the table does not know is an error of the glue, not a no-op)."""
    entries: list[Registration] = []
    for name in re.findall(r"await (\w+)\.register\(\)", glue):
        for r in REGISTRATIONS[name]:
            if r.replaces:
                entries = [e for e in entries if e.model_type != r.model_type]
            entries.append(r)
    return entries


def _matches(r: Registration, config: dict) -> bool:
    vision = config.get("vision_config")
    has_vision = isinstance(vision, dict) and bool(vision)
    return r.matches == "always" or (r.matches == "vision_config") == has_vision


def drafter_built(entries: list[Registration], config: dict) -> Registration:
    """MTPDrafterModelFactory._load (Libraries/MLXLMCommon/MTPDrafterModelFactory.swift:65-99):
    the first registration of config.json's `model_type` whose predicate matches
    (ModelTypeRegistry.swift:44-52); the VLM drafter decodes the whole config as MLXVLM's
    Qwen35Configuration (Libraries/MLXVLM/Qwen35VLMMTPRegistration.swift:18-20)."""
    model_type = config.get("model_type")
    for r in entries:
        if r.model_type == model_type and _matches(r, config):
            if r.drafter.startswith("MLXVLM."):
                decode_vlm_configuration(config, "mtp/config.json")
            return r
    raise SwiftRefuses(f"MTPDrafterModelFactory: unsupportedModelType({model_type!r})")


def check_pairing(drafter: str, target: str) -> None:
    """The drafter's first round on the target: a fatalError unless it accepts it."""
    if target not in DRAFTER_TARGETS[drafter]:
        raise SwiftCrashes(f"fatalError: {drafter} requires a Qwen35 target, got {target}")


# --- sanitize -----------------------------------------------------------------------------------

# The RMSNorm weights each sanitize adds 1 to, by key suffix, when it shifts norms.
MAIN_NORMS = (
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    "model.norm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
)  # Libraries/MLXLLM/Models/Qwen35.swift:1218-1224; Libraries/MLXVLM/Models/Qwen35.swift:1348-1354
DRAFTER_NORMS = (
    "mtp.norm.weight",
    "mtp.pre_fc_norm_embedding.weight",
    "mtp.pre_fc_norm_hidden.weight",
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
)  # Libraries/MLXLMCommon/QwenMTP.swift:44-52


@dataclass
class Sanitized:
    """Tensors after a sanitize: name → shape, and what was done to them."""

    shapes: dict[str, tuple[int, ...]]
    renamed: dict[str, str] = field(default_factory=dict)  # old name → new name
    transposed: set[str] = field(default_factory=set)  # new names whose axes were moved
    shifted: set[str] = field(default_factory=set)  # new names that got + 1


def sanitize_main(
    model: str, shapes: dict[str, tuple[int, ...]], metadata: dict, tied: bool
) -> Sanitized:
    """The main model's sanitize(weights:metadata:).

    MLXVLM.Qwen35 (Libraries/MLXVLM/Models/Qwen35.swift:1316-1389): a file whose metadata says
    `format: mlx` is taken as it is (:1319-1321); otherwise `model.language_model` →
    `language_model.model`, `model.visual` → `vision_tower`, bare `model.` → `language_model.`
    + name, `lm_head` → `language_model.lm_head` (:1360-1374), conv1d weights whose last axis
    is not 1 moved from [C, 1, K] to [C, K, 1] (:1376-1378), norms shifted when the file has
    `mtp.` tensors or such a conv1d (:1333-1337, 1379-1383), and then the tower's own sanitize
    (:1388, not modelled: mlxkit writes `format: mlx`).

    MLXLLM.Qwen35Model (Libraries/MLXLLM/Models/Qwen35.swift:1307-1325; the protocol's default
    sanitize(weights:metadata:) ignores the metadata, Libraries/MLXLMCommon/LanguageModel.swift
    :53-57): drop `vision_tower*` / `model.visual*`, `model.language_model` → `language_model.model`,
    anything else without `language_model.` gets it; then Qwen35TextModel.sanitize (:1206-1241):
    drop `mtp.` names, drop `lm_head` when the embeddings are tied (filterLMHeadWeights,
    Libraries/MLXLMCommon/LanguageModel.swift:67-75), move the conv1d axes, shift norms under the
    same rule."""
    out = Sanitized({})
    if model == "MLXVLM.Qwen35" and metadata.get("format", "").lower() == "mlx":
        out.shapes = dict(shapes)
        return out
    if model == "MLXVLM.Qwen35" and any(k.startswith("model.visual") for k in shapes):
        raise NotImplementedError("Qwen3VLVision.VisionModel.sanitize is not modelled")
    shift = any("mtp." in k for k in shapes) or any(
        "conv1d.weight" in k and s[-1] != 1 for k, s in shapes.items()
    )
    for key, shape in shapes.items():
        if "mtp." in key:
            continue
        new = key
        if model == "MLXLLM.Qwen35Model":
            if key.startswith(("vision_tower", "model.visual")):
                continue
            if key.startswith("model.language_model"):
                new = key.replace("model.language_model", "language_model.model")
            elif not key.startswith("language_model."):
                new = "language_model." + key
        elif model == "MLXVLM.Qwen35":
            if "model.language_model" in key:
                new = key.replace("model.language_model", "language_model.model")
            elif key.startswith("model."):
                new = "language_model." + key
            elif "lm_head" in key and "model" not in key:
                new = key.replace("lm_head", "language_model.lm_head")
        if tied and "lm_head" in new.split("."):
            continue
        if "conv1d.weight" in new and shape[-1] != 1:
            shape = (shape[0], shape[2], shape[1])
            out.transposed.add(new)
        if shift and new.endswith(MAIN_NORMS) and len(shape) == 1:
            out.shifted.add(new)
        if new != key:
            out.renamed[key] = new
        out.shapes[new] = shape
    return out


def sanitize_drafter(shapes: dict[str, tuple[int, ...]], preconverted_norms: bool) -> Sanitized:
    """qwenMTPSanitizeWeights (Libraries/MLXLMCommon/QwenMTP.swift:7-64), which both Qwen 3.5
    drafters' sanitize calls (Libraries/MLXLLM/Models/Qwen35MTP.swift:239-246, Libraries/MLXVLM/
    Models/Qwen35MTP.swift:261-268): keep the `mtp.` names (:13), regroup MoE experts (dense:
    nothing), add 1 to the 1-D norms unless the registration said preconvertedNorms (:54-61).
    No name is renamed and nothing transposed."""
    out = Sanitized({k: s for k, s in shapes.items() if k.startswith("mtp.")})
    if not preconverted_norms:
        out.shifted = {
            k for k, s in out.shapes.items() if k.endswith(DRAFTER_NORMS) and len(s) == 1
        }
    return out


# --- what the Swift models declare ----------------------------------------------------------------


def _linear(prefix: str) -> set[str]:
    return {f"{prefix}.weight"}


def text_layer_keys(prefix: str, linear: bool) -> set[str]:
    """One decoder layer's parameters: Qwen35DecoderLayer (Libraries/MLXLLM/Models/Qwen35.swift:
    713-742; MLXVLM's Qwen35Language.DecoderLayer, Libraries/MLXVLM/Models/Qwen35.swift:678-715,
    declares the same keys): `linear_attn` (Qwen35GatedDeltaNet :285-295: conv1d, in_proj_qkv,
    in_proj_z, in_proj_b, in_proj_a, dt_bias, A_log, norm, out_proj) or `self_attn`
    (Qwen35Attention :523-529: q/k/v/o_proj, q_norm, k_norm), the dense MLP (gate/up/down_proj)
    and the two norms. All Linear layers here have no bias."""
    keys = {f"{prefix}.input_layernorm.weight", f"{prefix}.post_attention_layernorm.weight"}
    keys |= {f"{prefix}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    if linear:
        a = f"{prefix}.linear_attn"
        keys |= {f"{a}.{p}.weight" for p in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")}
        keys |= {f"{a}.conv1d.weight", f"{a}.dt_bias", f"{a}.A_log", f"{a}.norm.weight"}
        keys |= {f"{a}.out_proj.weight"}
    else:
        a = f"{prefix}.self_attn"
        keys |= {f"{a}.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        keys |= {f"{a}.q_norm.weight", f"{a}.k_norm.weight"}
    return keys


def text_model_keys(text: dict, tied: bool) -> set[str]:
    """`language_model` of either model: Qwen35TextModel / Qwen35Language.LanguageModel —
    `model.embed_tokens`, `model.layers.N` (linear unless (N + 1) % full_attention_interval == 0,
    Libraries/MLXLLM/Models/Qwen35.swift:725-726), `model.norm`, and `lm_head` unless the
    embeddings are tied (:1137, 1146)."""
    interval = text.get("full_attention_interval", 4)
    keys = {"language_model.model.embed_tokens.weight", "language_model.model.norm.weight"}
    for n in range(text["num_hidden_layers"]):
        keys |= text_layer_keys(f"language_model.model.layers.{n}", (n + 1) % interval != 0)
    if not tied:
        keys.add("language_model.lm_head.weight")
    return keys


def vision_tower_keys(vision: dict) -> set[str]:
    """`vision_tower` of MLXVLM.Qwen35 (Libraries/MLXVLM/Models/Qwen35.swift:1000), a
    Qwen3VLVision.VisionModel (Libraries/MLXVLM/Models/Qwen3VL.swift): patch_embed.proj (Conv3d
    with bias), pos_embed, blocks.N.{norm1, norm2, attn.qkv, attn.proj, mlp.linear_fc1,
    mlp.linear_fc2}, merger.{norm, linear_fc1, linear_fc2}, all with bias (no deepstack mergers
    in Qwen 3.5)."""
    affine = ("weight", "bias")
    keys = {f"patch_embed.proj.{p}" for p in affine} | {"pos_embed.weight"}
    block = ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")
    for i in range(vision["depth"]):
        keys |= {f"blocks.{i}.{m}.{p}" for m in block for p in affine}
    keys |= {f"merger.{m}.{p}" for m in ("norm", "linear_fc1", "linear_fc2") for p in affine}
    return {"vision_tower." + k for k in keys}


def main_model_keys(model: str, config: dict) -> set[str]:
    text = config.get("text_config", config)
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    keys = text_model_keys(text, tied)
    if model == "MLXVLM.Qwen35":
        keys |= vision_tower_keys(config["vision_config"])
    if model == "MLXLLM.Qwen35TextModel":
        keys = {k.removeprefix("language_model.") for k in keys}
    return keys


def drafter_keys(config: dict) -> set[str]:
    """The drafter's `mtp` predictor (Libraries/MLXLLM/Models/Qwen35MTP.swift:8-37; MLXVLM's
    Qwen35VLMNextNPredictor, Libraries/MLXVLM/Models/Qwen35MTP.swift:8-36, declares the same):
    fc, `max(mtp_num_hidden_layers, 1)` full-attention layers, norm, pre_fc_norm_embedding,
    pre_fc_norm_hidden, and embed_tokens only with mtp_use_dedicated_embeddings."""
    text = config.get("text_config", config)
    keys = {"mtp.fc.weight", "mtp.norm.weight"}
    keys |= {"mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight"}
    for n in range(max(text.get("mtp_num_hidden_layers", 0), 1)):
        keys |= text_layer_keys(f"mtp.layers.{n}", linear=False)
    if text.get("mtp_use_dedicated_embeddings", False):
        keys.add("mtp.embed_tokens.weight")
    return keys


def update_problems(where: str, loaded: Sanitized, expected: set[str], config: dict) -> list[str]:
    """Module.update(parameters:verify: .all) after loadWeights' quantize step
    (Libraries/MLXLMCommon/Load.swift:180-197): a layer is quantized when `<path>.scales` was
    loaded, with the per-layer block of config.json's `quantization` (false: not quantized, and
    then its packed weights do not fit); every declared parameter must be loaded and nothing
    else. conv1d must be [C, K, 1] after sanitize (MLX's Conv1d)."""
    problems = []
    quant = config.get("quantization") or {}
    names = set()
    for key in loaded.shapes:
        module, _, last = key.rpartition(".")
        if last == "biases" and f"{module}.scales" in loaded.shapes:
            continue
        if last != "scales" or f"{module}.weight" not in loaded.shapes:
            names.add(key)
            continue
        # BaseConfiguration.PerLayerQuantization.quantization(layer:): the module's entry, or
        # the block's defaults (Libraries/MLXLMCommon/BaseConfiguration.swift:89)
        entry = quant.get(module, quant)
        packed, scales = loaded.shapes[f"{module}.weight"], loaded.shapes[key]
        if not quant or entry is False:
            problems.append(f"{where}: {module} is packed but config.json does not quantize it")
        elif packed[-1] * 32 != scales[-1] * entry["group_size"] * entry["bits"]:
            problems.append(
                f"{where}: {module} quantized as {entry['bits']} bits, group "
                f"{entry['group_size']}, does not fit weight {packed} and scales {scales}"
            )
    problems += [f"{where}: missing {k}" for k in sorted(expected - names)]
    problems += [f"{where}: unexpected {k}" for k in sorted(names - expected)]
    for key, shape in loaded.shapes.items():
        if key.endswith("conv1d.weight") and shape[-1] != 1:
            problems.append(f"{where}: {key} is {shape}, not [C, K, 1]")
    return problems


# --- generation parameters ------------------------------------------------------------------------


def generation(runtime: dict, prefill_chunk: int, temperature: float, drafter: bool) -> dict:
    """What decides how a request runs, given the glue's `parameters` (prefill step set to the
    manifest's prefill_chunk) and whether it passes a drafter.

    1441444: `GenerateParameters.prefill.stepSize` (Libraries/MLXLMCommon/Evaluate.swift:83);
    with a drafter, MTPSpeculativeTokenIterator (Libraries/MLXLMCommon/
    MTPSpeculativeTokenIterator.swift) clamps the block to the drafter's `maximumBlockSize` 2
    (:141; Qwen35MTP.swift:70 in both modules), prefills the prompt unchunked because the Qwen
    drafters set `requiresPromptPrefill` (:169-177; Qwen35MTP.swift:72), and decodes without
    drafts when temperature != 0 (`requiresGreedySampling`, :181-185).
    3.31.4: `prefillStepSize` (Libraries/MLXLMCommon/Evaluate.swift:57 at 3.31.4); it has
    generate(…, mtpDrafter:) (Evaluate.swift:1676) but no Qwen 3.5 drafter registration."""
    if drafter and not runtime["mtp_drafter"]:
        raise SwiftRefuses(f"mlx-swift-lm {runtime['version']} has no Qwen 3.5 MTP drafter")
    speculative = drafter and temperature == 0
    return {
        "prefill_step": None if drafter else prefill_chunk,  # None: the whole prompt at once
        "block_size": 2 if drafter else 1,
        "speculative": speculative,
    }


def kv_cache(runtime: dict, kv_cache: dict, glue: str) -> dict:
    """The KV cache a request runs with, given the manifest's `kv_cache` and the glue: at bits
    below 16 the glue must set `parameters.kvBits`, `.kvGroupSize` and `.quantizedKVStart`
    from it (else the cache stays in the model's dtype, which the plan did not budget).

    Both runtimes declare the three (1441444: Libraries/MLXLMCommon/Evaluate.swift:118-124;
    3.31.4: :67-73). 1441444 turns them into an affine strategy (KVCachePlan.swift:464-474);
    both quantize a cache once its offset is greater than quantizedKVStart (1441444:
    KVCache.swift:2466-2494 through that plan; 3.31.4: KVCache.swift:2001-2030), so with 0 the
    first prefill step runs unquantized and the cache is quantized right after it."""
    wanted = kv_cache["bits"] < 16
    sets = [
        f"parameters.{name} = manifest.kvCache.{field}"
        for name, field in (
            ("kvBits", "bits"),
            ("kvGroupSize", "groupSize"),
            ("quantizedKVStart", "quantizedKVStart"),
        )
    ]
    if not all(line in glue for line in sets):
        if wanted:
            raise SwiftRefuses(
                f"mlx-swift-lm {runtime['version']} keeps the KV cache unquantized: the glue does "
                f"not set {', '.join(sets)}"
            )
        return {"kv_bits": None, "kv_group_size": 64, "quantized_kv_start": 0}
    if not wanted:
        return {"kv_bits": None, "kv_group_size": 64, "quantized_kv_start": 0}
    return {
        "kv_bits": kv_cache["bits"],
        "kv_group_size": kv_cache["group_size"],
        "quantized_kv_start": kv_cache["quantized_kv_start"],
    }


# --- a bundle, loaded -----------------------------------------------------------------------------


def drafter_files_read(directory: Path) -> list[str]:
    """The files of a drafter directory mlx-swift-lm opens: config.json
    (MTPDrafterModelFactory._load decodes it, Libraries/MLXLMCommon/MTPDrafterModelFactory.swift:
    65-99) and the top-level *.safetensors loadWeights reads (Libraries/MLXLMCommon/Load.swift:
    64-139). Anything else there, such as mlxkit's draft_vocab.json, is never read."""
    names = ["config.json"] if (directory / "config.json").is_file() else []
    return names + sorted(p.name for p in directory.glob("*.safetensors"))


def read_headers(directory: Path) -> tuple[dict[str, tuple[int, ...]], dict]:
    """Names and shapes of the top-level *.safetensors (what loadWeights reads:
    Libraries/MLXLMCommon/Load.swift:64-139, top level only), and the first file's metadata."""
    shapes: dict[str, tuple[int, ...]] = {}
    metadata: dict = {}
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        metadata = metadata or header.pop("__metadata__", {})
        header.pop("__metadata__", None)
        shapes.update({k: tuple(v["shape"]) for k, v in header.items()})
    return shapes, metadata


@dataclass
class SwiftLoad:
    factory: str
    model: str
    drafter: str | None
    main: Sanitized
    mtp: Sanitized | None


def load_bundle(root: Path, glue: str) -> SwiftLoad:
    """What MLXKitBundle.load and loadDrafter (as `glue` writes them) make of the bundle at
    `root`; raises SwiftRefuses / SwiftCrashes where mlx-swift-lm would throw or stop, and
    SwiftRefuses listing every parameter mismatch `update(verify: .all)` would throw on."""
    manifest = json.loads((root / "manifest.json").read_text())
    factory = factory_of(manifest)
    config = json.loads((root / manifest["model"]["path"] / "config.json").read_text())
    model = model_type_built(factory, config)
    shapes, metadata = read_headers(root / manifest["model"]["path"])
    text = config.get("text_config", config)
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    main = sanitize_main(model, shapes, metadata, tied)
    problems = update_problems("model/", main, main_model_keys(model, config), config)
    drafter = mtp = None
    # the glue leaves a drafter the plan does not recommend unloaded (mtpURL nil)
    skipped = "manifest.mtp.recommended" in glue and not manifest["mtp"]["recommended"]
    if manifest["mtp"]["included"] and not skipped:
        if "loadDrafter" not in glue:
            raise SwiftRefuses("the glue has no loadDrafter for this runtime")
        mtp_dir = root / manifest["mtp"]["path"]
        mtp_config = json.loads((mtp_dir / "config.json").read_text())
        r = drafter_built(registered(glue), mtp_config)
        mtp = sanitize_drafter(read_headers(mtp_dir)[0], r.preconverted_norms)
        problems += update_problems("mtp/", mtp, drafter_keys(mtp_config), mtp_config)
        drafter = r.drafter
    if problems:
        raise SwiftRefuses("; ".join(problems))
    if drafter is not None:
        check_pairing(drafter, model)
    return SwiftLoad(factory, model, drafter, main, mtp)
