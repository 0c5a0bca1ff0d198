"""`plan()`: will this model, quantized this way, run on that target — and with how much context?

Everything is computed from the model config alone (no weights): the weight bytes come from
`mlxkit.layout.planned_tensors` (the tensors `convert` writes, tensor for tensor), the
runtime bytes from `memory.py`, the speed from `roofline.py` for the runtime that will run
the model (`runtimes.py`). The total is compared with the memory an app may use on the
target. `evaluate` never refuses (tables, refusals, verification use it); `plan` raises
`PlanRefused` when the plan does not fit, and whoever catches it may ask refusal.py what
would fit instead.

Total = weights + Gated-DeltaNet state (fixed) + KV cache (as allocated, at the planned
context plus the draft positions verification appends) + one layer's old KV buffers while
the cache grows + activation peak + runtime reserve + MLX buffer-cache limit. The KV cache is
kept at `kv_bits` (16: the activation dtype; 8 or 4: quantized in groups of `kv_group_size`,
from the first token), and prompts are prefilled `prefill_chunk` tokens at a time: at long
context the attention scores of one chunk against the whole cache are prefill's largest term.

With the vision tower (a checkpoint that has one, `vision` on): its weights are a part of
their own; the activation peak is the larger of prefill / verification and encoding one
image of `image_tokens` vision tokens (memory.vision_activations: attention over all of its
patches); and the context must hold that image's tokens besides MIN_CONTEXT of text.
With `vision_encoder="coreml"` the app encodes images with the Core ML package instead of the
tower: the vision part is that package's weight file (convert.coreml.weight_file_bytes, to the
byte), model/ holds no tower tensors, the image cap is the largest of its grids, and encoding
one is estimated as the same graph in float16 with its attention scores materialised (Core
ML's own memory cannot be measured here); those arrays are Core ML's, not MLX's, so they do
not count against the Metal buffer limit.

`rounding` "gptq" (learned rounding, convert/rounding.py) writes the same tensors as nearest
rounding, so it changes no byte and no speed here; it changes the quality figures (choose.py)
and what converting takes: where its working set (`rounding.peak_bytes`) exceeds the
converter's memory bound, the plan says so in a warning (the bundle is still built).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from mlxkit.convert.coreml import (
    Grid,
    check_grids,
    default_grids,
    parse_grids,
    vision_tokens,
    weight_file_bytes,
)
from mlxkit.convert.quantize import AUTO, Recipe, check_vision_bits, load_recipe
from mlxkit.convert.rounding import MEMORY_BOUND, check_rounding, peak_bytes

from mlxkit import draft_vocab, fields
from mlxkit.cache import KV_GROUP_SIZES, KVQuantization
from mlxkit.draft_control import K_MAX
from mlxkit.errors import ConfigError, MlxkitError
from mlxkit.generate import MAX_DRAFT
from mlxkit.layout import (
    DTYPE_BYTES,
    OUTPUT_DTYPES,
    ModelConfig,
    bytes_by_part,
    model_parameters,
    part_of,
    planned_tensors,
    weight_rule,
)
from mlxkit.load import load_model_config, resolve_model_dir
from mlxkit.models.qwen3_5 import TextConfig
from mlxkit.models.qwen3_5_vision import VisionConfig
from mlxkit.presets import HUB_REPOS, model_config, sizes, text_config

from . import memory as mem
from .devices import GB, MAX_BUDGET, Target, load_catalog, resolve_target
from .roofline import Speed, WeightReads, predict_speed
from .runtimes import MLXKIT, DecodeRuntime, runtime_for, swift_runtime
from .settings import KV_BITS, MIN_CONTEXT, SWIFT_RUNTIMES, VISION_ENCODERS, Settings

COREML_PRECISION = "float16"  # what a bundle's Core ML encoder computes in (the Neural Engine's)
# What a Core ML bundle cannot do on the phone, said at plan and build time. Read in mlx-swift-lm
# at 1441444: Libraries/MLXVLM/Models/Qwen35.swift:1000 keeps the tower `private`, :1132
# `prepare` runs it on LMInput's pixels (Libraries/MLXLMCommon/LanguageModel.swift:155,
# ProcessedImage holds pixels, not features); MLXLLM's Qwen35 embeds token ids only.
COREML_SWIFT_GAP = (
    "MLX Swift cannot use the Core ML encoder's output yet: mlx-swift-lm's Qwen 3.5 "
    "(MLXVLM Qwen35) runs its own private vision tower on pixels in prepare(), so this bundle "
    "answers text only in the app. The smallest upstream change that would let it answer about "
    "pictures: a public entry in MLXVLM's Qwen35 that takes precomputed image features in place "
    "of running its tower, keeping its merge at the <|image_pad|> positions and its M-RoPE "
    "positions (see docs/verification.md)"
)

MAX_PREFILL_CHUNK = 1 << 20  # tokens: 4× Qwen 3.5's 262,144 positions


class _WithVision:
    """What a plan's checkpoint and settings say about the vision tower (Plan and _Inputs)."""

    checkpoint: ModelConfig
    settings: Settings

    @property
    def vision(self) -> VisionConfig | None:
        """The vision tower the plan includes (None: a text-only plan)."""
        return self.checkpoint.vision if self.settings.vision else None

    @property
    def vision_encoder(self) -> str | None:
        """What encodes images in the app: "mlx", "coreml", or None without vision."""
        return self.settings.vision_encoder if self.vision is not None else None

    @property
    def mlx_vision(self) -> VisionConfig | None:
        """The tower model/ holds for MLX (None with the Core ML encoder)."""
        return self.vision if self.vision_encoder == "mlx" else None

    @property
    def coreml_grids(self) -> list[Grid]:
        """The Core ML encoder's grids ([] unless it encodes)."""
        if self.vision_encoder != "coreml":
            return []
        return coreml_grids(self.settings, self.vision)

    @property
    def image_tokens(self) -> int:
        """Vision tokens of the largest image the plan leaves room for (0: no vision): the
        largest Core ML grid, or the cap set for the MLX tower."""
        if self.vision_encoder == "coreml":
            return max(vision_tokens(g, self.vision.spatial_merge_size) for g in self.coreml_grids)
        return self.settings.image_tokens if self.vision is not None else 0


def kv_quantization(settings: Settings) -> KVQuantization | None:
    """The KV cache the settings plan for: None at 16 bits (the activation dtype), else
    quantized from the first token (the bundle sets quantizedKVStart 0)."""
    if settings.kv_bits == 16:
        return None
    return KVQuantization(settings.kv_bits, settings.kv_group_size, 0)


def coreml_grids(settings: Settings, vision: VisionConfig) -> list[Grid]:
    """The grids `settings` ask for (`coreml_grids`, "ROWSxCOLS,..."), or the default ones;
    ConfigError for one the tower cannot take."""
    merge = vision.spatial_merge_size
    if settings.coreml_grids is None:
        return default_grids(merge)
    return check_grids(parse_grids([settings.coreml_grids]), merge)


@dataclass
class Plan(_WithVision):
    model: str  # "Qwen3.5-2B", or the model directory's name
    size: str | None  # preset size when the config is one of them
    cfg: TextConfig = field(repr=False)
    checkpoint: ModelConfig = field(repr=False)  # what the checkpoint has (vision or not)
    target: Target = field(repr=False)
    settings: Settings
    recipe: Recipe = field(repr=False)  # settings.recipe resolved (an auto recipe's rules)
    runtime: DecodeRuntime  # what runs the model on the target
    num_draft: int  # drafts per MTP round in that runtime (0: no MTP head)
    weights: dict[str, int]  # bytes per part: embeddings, layers, mtp, vision
    bits_per_part: dict[str, list]
    weight_reads: WeightReads
    kv_bytes_per_token: int  # all KV layers, logical (before the 256-token rounding)
    state_bytes: int
    max_context: int  # the context the totals are computed at: prompt + generated tokens
    kv_cache_bytes: int  # as allocated at max_context + num_draft
    kv_growth_bytes: int
    activations: mem.Activations  # the peak: prefill, verification or image encoding
    vision_encoding: mem.Activations | None  # encoding one image (None: no vision tower)
    usable: int  # with the entitlement if allowed
    usable_without_entitlement: int
    largest_context_that_fits: int  # 0: none
    largest_array: tuple[str, int]
    speed: Speed | None  # in `runtime`; None when the target's bandwidth is unknown
    mlxkit_speed: Speed | None  # mlxkit's own loop, where `runtime` is another one
    choice: str | None = None  # how choose_plan picked the settings, when it did
    # The recipe's quality vs the source (mlxkit.quality.quality_block): measured by `mlxkit
    # eval` of this quantization of this checkpoint, or predicted from its sensitivity
    # measurement; set by choose_plan when either is cached, else None
    quality: dict | None = None
    bits_per_weight: float | None = None  # the budget of an auto recipe (choose_plan)
    warnings: list[str] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def breakdown(self) -> dict[str, int]:
        return {
            "weights": self.weight_bytes,
            "kv_cache": self.kv_cache_bytes,
            "kv_growth": self.kv_growth_bytes,
            "linear_state": self.state_bytes,
            "activations": self.activations.total,
            "runtime_reserve": self.settings.reserve,
            "mlx_cache_limit": self.settings.cache_limit,
        }

    @property
    def total(self) -> int:
        return sum(self.breakdown.values())

    @property
    def metal_buffer_limit(self) -> int:
        return self.target.metal_buffer_limit

    @property
    def fits_in_memory(self) -> bool:
        return self.total <= self.usable and self.largest_array[1] <= self.metal_buffer_limit

    @property
    def holds_an_image(self) -> bool:
        """The context has room for one image at the cap (trivially so without vision)."""
        return self.max_context >= self.image_tokens

    @property
    def fits(self) -> bool:
        return self.fits_in_memory and self.holds_an_image

    @property
    def entitlement_required(self) -> bool:
        return self.target.kind != "mac" and self.total > self.usable_without_entitlement


class PlanRefused(MlxkitError):
    """The plan does not fit. The message says why; refusal.py's `refusal_message` adds
    what would fit (a search over the knobs that only a caller who shows it should pay)."""

    def __init__(self, plan: Plan, requested_context: int | None):
        super().__init__(shortfall(plan))
        self.plan = plan
        self.requested_context = requested_context


def gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def usable_label(plan: Plan) -> str:
    """'usable without the entitlement': the one wording of the limit a plan is made
    within, for `plan`, `convert --target` and refusals alike."""
    if plan.target.kind == "mac":
        return "usable (Metal's recommended working set)"
    entitled = plan.usable != plan.usable_without_entitlement
    return f"usable {'with' if entitled else 'without'} the entitlement"


def shortfall(plan: Plan) -> str:
    """Why a plan does not fit, in one sentence."""
    s = plan.settings
    extras = [", with MTP" if s.mtp else ""]
    if plan.vision is not None:
        encoder = "Core ML vision encoder" if plan.vision_encoder == "coreml" else "vision tower"
        extras.append(f", with the {encoder} at {plan.image_tokens:,} tokens per image")
    what = f"{plan.model} at {s.bits}-bit ({s.recipe} recipe{''.join(extras)})"
    reasons = []
    if not plan.holds_an_image:
        reasons.append(
            f"has {plan.max_context:,} tokens of context, which cannot hold one image of "
            f"{plan.image_tokens:,} vision tokens"
        )
    if plan.total > plan.usable:
        parts = ", ".join(f"{k.replace('_', ' ')} {gb(v)}" for k, v in plan.breakdown.items() if v)
        reasons.append(
            f"needs {gb(plan.total)} at {plan.max_context:,} tokens of context ({parts}) but "
            f"{plan.target.label} gives an app {gb(plan.usable)} {usable_label(plan)}"
        )
    if plan.largest_array[1] > plan.metal_buffer_limit:
        name, n = plan.largest_array
        reasons.append(
            f"its largest array ({name}, {n / 2**20:,.0f} MiB) exceeds the "
            f"{plan.metal_buffer_limit / 2**20:,.0f} MiB Metal buffer limit planned for it"
        )
    return f"{what} does not fit: it {'; and '.join(reasons) or 'does not fit'}."


# ---------------------------------------------------------------------------- inputs


def preset_size_of(cfg: TextConfig) -> str | None:
    """The published size whose shape this config has, if any."""
    shape = (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size)
    for size in sizes():
        p = TextConfig.from_dict(text_config(size))
        if (p.hidden_size, p.num_hidden_layers, p.intermediate_size, p.vocab_size) == shape:
            return size
    return None


ModelLike = str | Path | dict | TextConfig | ModelConfig


def resolve_config(size_or_config: ModelLike) -> tuple[ModelConfig, str]:
    """(config, label) from a preset size ("2b", with its vision tower), a model directory or
    config.json, a config dict, a ModelConfig, or a TextConfig (a text-only model)."""
    if isinstance(size_or_config, (TextConfig, ModelConfig, dict)):
        shapes = size_or_config
        if isinstance(shapes, TextConfig):
            shapes = ModelConfig(shapes)
        elif isinstance(shapes, dict):
            shapes = ModelConfig.from_dict(shapes)
        return shapes, _label(preset_size_of(shapes.text))
    name = str(size_or_config)
    if name.lower() in sizes():
        return ModelConfig.from_dict(model_config(name.lower())), _label(name.lower())
    path = fields.local_path(name, "model")
    if path.name == "config.json" and path.is_file():
        path = path.parent
    if name != "micro" and not path.is_dir():
        raise ConfigError(
            f"{name!r} is neither a size ({', '.join(sizes())}, micro) nor a model directory "
            "with a config.json"
        )
    model_dir = resolve_model_dir(name if name == "micro" else path)
    shapes = load_model_config(model_dir)
    return shapes, _label(preset_size_of(shapes.text), model_dir.name)


def _label(size: str | None, fallback: str = "custom") -> str:
    return HUB_REPOS[size].split("/")[1] if size else fallback


def make_settings(auto_recipe: Recipe | None = None, **values) -> Settings:
    """Settings from keyword arguments, with the recipe's default bits filled in (bits None
    means "the recipe's")."""
    settings = Settings(**values)
    if settings.bits is None:
        bits = recipe_of(replace(settings, bits=None), auto_recipe).bits
        settings = replace(settings, bits=bits)
    return settings


def recipe_of(settings: Settings, auto_recipe: Recipe | None = None) -> Recipe:
    """The recipe the settings name; "auto" is `auto_recipe`, made from the checkpoint's
    sensitivity measurement (choose_plan) or read back from a bundle (verify)."""
    if settings.recipe != AUTO:
        return load_recipe(settings.recipe, settings.bits, settings.group_size)
    if auto_recipe is None:
        raise ConfigError(
            "recipe auto is made from the checkpoint's sensitivity measurement: plan a checkpoint "
            "directory (--model DIR) that `mlxkit convert --recipe auto` has measured"
        )
    if settings.bits is not None and settings.bits != auto_recipe.bits:
        raise ConfigError("recipe auto chooses the bits of each group: drop --bits")
    return auto_recipe


def validate(settings: Settings, context: int | None, cfg: TextConfig) -> None:
    if settings.num_draft != "auto":
        fields.integer(settings.num_draft, "num_draft")
    fields.integer(settings.prefill_chunk, "prefill_chunk")
    for name in ("reserve", "cache_limit"):  # bytes: bounded like a memory budget
        fields.integer(getattr(settings, name), name, hi=MAX_BUDGET)
    fields.number(settings.acceptance, "acceptance")
    fields.boolean(settings.mtp, "mtp")
    fields.boolean(settings.entitlement, "entitlement")
    check_rounding(settings.rounding)
    if context is not None:
        fields.integer(context, "context")
    if context is not None and context <= 0:
        raise ConfigError(f"context must be a positive number of tokens, got {context}")
    if context is not None and context > cfg.max_position_embeddings:
        raise ConfigError(
            f"context {context} exceeds the model's {cfg.max_position_embeddings} positions"
        )
    if not 1 <= settings.prefill_chunk <= MAX_PREFILL_CHUNK:
        raise ConfigError(
            f"prefill chunk must be between 1 and {MAX_PREFILL_CHUNK:,} tokens, got "
            f"{fields.shown(settings.prefill_chunk)}"
        )
    if not 0.0 <= settings.acceptance <= 1.0:
        raise ConfigError(f"acceptance must be within [0, 1], got {settings.acceptance}")
    validate_kv(settings, cfg)
    if settings.draft_vocab is not None:
        has_drafter = settings.mtp and cfg.mtp_num_hidden_layers > 0
        draft_vocab.check(settings.draft_vocab, cfg.vocab_size, has_drafter)
    if settings.num_draft != "auto" and not 1 <= settings.num_draft <= MAX_DRAFT:
        raise ConfigError(
            f'num_draft must be "auto" or between 1 and {MAX_DRAFT}, got {settings.num_draft}'
        )
    if settings.dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {settings.dtype}")
    if settings.reserve < 0 or settings.cache_limit < 0:
        raise ConfigError("reserve and cache limit must not be negative")
    tokens = settings.image_tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ConfigError(f"image tokens must be a positive number of tokens, got {tokens!r}")
    if tokens > cfg.max_position_embeddings:  # an image must fit in the context
        raise ConfigError(
            f"image tokens {fields.shown(tokens)} exceed the model's "
            f"{cfg.max_position_embeddings:,} positions"
        )
    if settings.vision_bits is not None:
        check_vision_bits(settings.vision_bits)
    if not isinstance(settings.vision, bool):
        raise ConfigError(f"vision must be true or false, got {settings.vision!r}")
    if settings.vision_encoder not in VISION_ENCODERS:
        raise ConfigError(
            f"vision encoder must be one of {', '.join(VISION_ENCODERS)}, got "
            f"{fields.shown(settings.vision_encoder)}"
        )
    if settings.vision_encoder != "coreml" and settings.coreml_grids is not None:
        raise ConfigError("--coreml-grids: only with --vision-encoder coreml")
    if settings.swift_runtime not in SWIFT_RUNTIMES:
        raise ConfigError(
            f"swift runtime must be one of {', '.join(SWIFT_RUNTIMES)}, got "
            f"{fields.shown(settings.swift_runtime)}"
        )


def validate_kv(settings: Settings, cfg: TextConfig) -> None:
    """kv_bits one of 16, 8, 4; a group size mx.quantize takes that divides the head dim."""
    if isinstance(settings.kv_bits, bool) or settings.kv_bits not in KV_BITS:
        raise ConfigError(
            f"kv bits must be 16 (not quantized), 8 or 4, got {fields.shown(settings.kv_bits)}"
        )
    group = settings.kv_group_size
    if isinstance(group, bool) or group not in KV_GROUP_SIZES:
        raise ConfigError(f"kv group size must be 32, 64 or 128, got {fields.shown(group)}")
    if settings.kv_bits != 16 and cfg.head_dim % group:
        raise ConfigError(
            f"kv group size {group} does not divide the head dim {cfg.head_dim}: pass "
            "--kv-group-size 32"
        )


def drafter_runs(target: Target, mtp: bool | None, swift: str) -> bool:
    """Whether the runtime that runs a plan on `target` has an MTP drafter: mlxkit on a Mac
    does, and on an iPhone the mlx-swift-lm of `--swift-runtime` (3.31.4 has none). Asking for
    MTP (`mtp` True) where it has none is refused: mtp/ would be weight the app never runs."""
    if target.kind == "mac" or swift not in SWIFT_RUNTIMES or swift_runtime(swift).mtp_drafter:
        return True
    if mtp:
        raise ConfigError(
            f"mlx-swift-lm {swift} has no Qwen 3.5 MTP drafter: build with --no-mtp, or leave "
            "--swift-runtime at its default (a main-branch commit that has one)"
        )
    return False


def validate_vision_encoder(settings: Settings, shapes: ModelConfig, label: str) -> None:
    """The Core ML encoder needs the checkpoint's tower, kept, unquantized, and grids it takes."""
    if settings.vision_encoder != "coreml":
        return
    if shapes.vision is None:
        raise ConfigError(f"{label} has no vision tower: --vision-encoder coreml needs one")
    if not settings.vision:
        raise ConfigError("--vision-encoder coreml encodes images: drop --no-vision")
    if settings.vision_bits is not None:
        raise ConfigError(
            "--vision-bits quantizes the MLX tower, and the Core ML encoder is float16: drop "
            "--vision-bits"
        )
    if not isinstance(settings.coreml_grids, (str, type(None))):
        raise ConfigError(f"coreml grids must be a string, got {settings.coreml_grids!r}")
    coreml_grids(settings, shapes.vision)


def min_context(cfg: TextConfig, image_tokens: int) -> int:
    """The least context a plan must leave: MIN_CONTEXT tokens of text, plus one image's
    tokens when it plans for images (within the model's positions)."""
    return min(MIN_CONTEXT + image_tokens, cfg.max_position_embeddings)


# ------------------------------------------------------------------------------ weights


@dataclass(frozen=True)
class WeightPlan:
    by_part: dict[str, int]
    bits_per_part: dict[str, list]  # e.g. {"embeddings": [8], "layers": [4, 6, 8]}
    reads: WeightReads
    largest: tuple[str, int]  # (parameter path, bytes) of the largest tensor


def weight_plan(
    cfg: TextConfig,
    settings: Settings,
    vision: VisionConfig | None = None,
    coreml: tuple[VisionConfig, list[Grid]] | None = None,
    recipe: Recipe | None = None,
    copies_shortlist: bool = False,
) -> WeightPlan:
    """Bytes per part of `recipe` (default: the one the settings name), straight from
    `planned_tensors` (no formula here); `vision` is the tower model/ holds. With `coreml` (a
    tower and its grids) the vision part is the Core ML package's weight file instead, from
    `weight_file_bytes`. With a draft vocabulary the mtp part holds its file too (its size
    follows from the vocabulary and N: `draft_vocab.file_bytes`), as the converter counts it;
    a draft step does not read the file, so the weight reads leave it out. Where the runtime
    drafts over the shortlist (`copies_shortlist`: mlxkit on a Mac; MLX Swift ignores the
    file) the mtp part also holds the head's N rows it copies (`ShortlistHead`)."""
    recipe = recipe or recipe_of(settings)
    vb = settings.vision_bits
    tensors = planned_tensors(
        cfg, recipe, include_mtp=settings.mtp, dtype=settings.dtype, vision=vision, vision_bits=vb
    )
    by_part = bytes_by_part(tensors)
    bits: dict[str, set] = {part: set() for part in by_part}
    mtp = settings.mtp and cfg.mtp_num_hidden_layers > 0
    for path, shape in model_parameters(cfg, mtp, vision):
        if len(shape) == 2:
            rule = weight_rule(path, shape, recipe, vb)
            bits[part_of(path)].add(rule[0] if rule else settings.dtype)
    if coreml:
        by_part["vision"] = weight_file_bytes(*coreml, COREML_PRECISION)
        bits["vision"].add(f"{COREML_PRECISION} (Core ML)")
    tied = cfg.tie_word_embeddings
    head = "language_model.model.embed_tokens." if tied else "language_model.lm_head."
    reads = WeightReads(
        layers=by_part["layers"],
        lm_head=sum(t.nbytes for t in tensors if t.path.startswith(head)),
        mtp=by_part["mtp"],
    )
    if settings.draft_vocab is not None:
        by_part["mtp"] += draft_vocab.file_bytes(cfg.vocab_size, settings.draft_vocab)
        if copies_shortlist:  # whole rows of the head, scales and biases included
            by_part["mtp"] += reads.lm_head * settings.draft_vocab // cfg.vocab_size
    big = max(tensors, key=lambda t: t.nbytes)
    order = lambda b: (isinstance(b, str), b if isinstance(b, int) else 0)
    bits_per_part = {part: sorted(v, key=order) for part, v in bits.items() if v}
    return WeightPlan(by_part, bits_per_part, reads, (big.path, big.nbytes))


# ------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class _Inputs(_WithVision):
    """What every context of one plan shares: resolved once, evaluated many times."""

    checkpoint: ModelConfig
    model: str
    size: str | None
    target: Target
    settings: Settings
    recipe: Recipe
    weights: WeightPlan

    @property
    def cfg(self) -> TextConfig:
        return self.checkpoint.text

    @property
    def vision_encoding(self) -> mem.Activations | None:
        if self.vision is None:
            return None
        if self.vision_encoder == "coreml":
            b = DTYPE_BYTES[COREML_PRECISION]
            return mem.vision_activations(self.vision, self.image_tokens, b, False, fused=False)
        mask = self.runtime.builds_vision_mask
        return mem.vision_activations(self.vision, self.image_tokens, self.dtype_bytes, mask)

    @property
    def runtime(self) -> DecodeRuntime:
        return runtime_for(self.target)

    @property
    def num_draft(self) -> int:
        """Drafts per round in the target's runtime: the settings', within what it can run
        (with "auto", the most auto may draft: the memory plan holds that many)."""
        if not (self.settings.mtp and self.cfg.mtp_num_hidden_layers):
            return 0
        return min(most_drafts(self.settings), self.runtime.max_draft)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.settings.dtype]

    @property
    def kv(self) -> KVQuantization | None:
        return kv_quantization(self.settings)


def _largest_array(inputs: _Inputs, held: int, kv_buffer: int, context: int) -> tuple[str, int]:
    chunk = min(inputs.settings.prefill_chunk, context)
    keys = mem.kv_allocated_tokens(held)
    scores = mem.score_matrix_bytes(inputs.cfg, chunk, keys, inputs.dtype_bytes, inputs.kv)
    candidates = [
        inputs.weights.largest,
        ("KV cache buffer of one layer", kv_buffer),
        ("attention score matrix (prefill)", scores),
    ]
    if inputs.mlx_vision is not None:  # Core ML's arrays are not Metal buffers
        n, b = inputs.image_tokens, inputs.dtype_bytes
        candidates.append(
            ("vision attention scores (one image)", mem.vision_score_bytes(inputs.vision, n, b))
        )
        if inputs.runtime.builds_vision_mask:
            candidates.append(
                ("vision attention mask (one image)", mem.vision_mask_bytes(inputs.vision, n, b))
            )
    return max(candidates, key=lambda c: c[1])


def _speeds(inputs: _Inputs, context: int) -> tuple[Speed | None, Speed | None]:
    """The target runtime's speed, and mlxkit's loop's where that runtime is another one."""
    bandwidth = inputs.target.bandwidth
    if bandwidth is None:
        return None, None
    s, cfg = inputs.settings, inputs.cfg

    def speed(runtime: DecodeRuntime, num_draft: int) -> Speed:
        reads = inputs.weights.reads
        args = (inputs.dtype_bytes, bandwidth, context, runtime, num_draft, s.acceptance)
        auto = s.num_draft == "auto"
        return predict_speed(cfg, reads, *args, kv_quantization=inputs.kv, auto=auto)

    own = speed(inputs.runtime, inputs.num_draft)
    if inputs.runtime is MLXKIT:
        return own, None
    return own, speed(MLXKIT, most_drafts(s) if inputs.num_draft else 0)


def most_drafts(settings: Settings) -> int:
    """The most drafts per round mlxkit's loop makes: `num_draft`, or auto's K_MAX."""
    return K_MAX if settings.num_draft == "auto" else settings.num_draft


def plan_at(inputs: _Inputs, context: int, with_speed: bool = True) -> Plan:
    """The plan at `context` tokens (its largest context that fits is filled in by the
    caller: it takes a search)."""
    cfg, s, b, k, kv = inputs.cfg, inputs.settings, inputs.dtype_bytes, inputs.num_draft, inputs.kv
    held = context + k  # verification appends k draft positions before trimming
    kv_buffer = mem.kv_layer_buffer_bytes(cfg, held, b, kv)
    keys = mem.kv_allocated_tokens(held)
    speed, mlxkit_speed = _speeds(inputs, context) if with_speed else (None, None)
    text = mem.activations(
        cfg, s.prefill_chunk, context, keys, b, s.mtp, max(k, 1), inputs.image_tokens, kv
    )
    encoding = inputs.vision_encoding
    peak = text if encoding is None or text.total >= encoding.total else encoding
    return Plan(
        model=inputs.model,
        size=inputs.size,
        cfg=cfg,
        checkpoint=inputs.checkpoint,
        target=inputs.target,
        settings=s,
        recipe=inputs.recipe,
        runtime=inputs.runtime,
        num_draft=k,
        weights=inputs.weights.by_part,
        bits_per_part=inputs.weights.bits_per_part,
        weight_reads=inputs.weights.reads,
        kv_bytes_per_token=mem.kv_bytes_per_token(cfg, b, s.mtp, kv),
        state_bytes=mem.linear_state_bytes(cfg, b),
        max_context=context,
        kv_cache_bytes=mem.kv_cache_bytes(cfg, held, b, s.mtp, kv),
        kv_growth_bytes=2 * kv_buffer,
        activations=peak,
        vision_encoding=encoding,
        usable=inputs.target.usable(s.entitlement),
        usable_without_entitlement=inputs.target.usable(False),
        largest_context_that_fits=0,
        largest_array=_largest_array(inputs, held, kv_buffer, context),
        speed=speed,
        mlxkit_speed=mlxkit_speed,
    )


def largest_context_that_fits(inputs: _Inputs) -> int:
    """The largest context whose plan fits in memory (0 if not even one token does; whether
    it holds an image is the caller's floor, `min_context`). Memory grows
    monotonically with the context, in 256-token steps for the KV cache, so a bisection
    over [1, max_position_embeddings] finds the exact boundary."""

    def fits(context: int) -> bool:
        return plan_at(inputs, context, with_speed=False).fits_in_memory

    low, high = 0, inputs.cfg.max_position_embeddings
    if fits(high):
        return high
    while high - low > 1:  # invariant: fits(low) (or low == 0), not fits(high)
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def _warnings(plan: Plan) -> list[str]:
    found = []
    guaranteed = load_catalog().metal_buffer_guaranteed
    name, nbytes = plan.largest_array
    if plan.target.kind != "mac" and nbytes > guaranteed:
        found.append(
            f"largest array ({name}, {nbytes / 2**20:.0f} MiB) is over the "
            f"{guaranteed // 2**20} MiB Metal guarantees on every device"
        )
    if plan.target.unconfirmed:
        found.append(f"unconfirmed target numbers: {', '.join(plan.target.unconfirmed)}")
    if plan.vision_encoder == "coreml" and plan.target.kind != "mac":
        found.append(COREML_SWIFT_GAP)
    held = peak_bytes(plan.cfg) if plan.settings.rounding == "gptq" else 0
    if held > MEMORY_BOUND:
        found.append(
            f"--rounding gptq holds at least {gb(held)} at once while converting "
            f"this model (its widest linear's Hessian and inverse), above the converter's "
            f"{MEMORY_BOUND / 1e9:g} GB bound: build it where that much memory is free"
        )
    same = same_memory_as_less_ram(plan.target)
    if same:
        tier = plan.target.tier
        found.append(
            f"{tier.name} phones are planned with the usable memory of {same} phones "
            f"({plan.target.usable_bytes / GB:.1f} / {plan.target.usable_bytes_entitled / GB:.1f} "
            "GB without / with the entitlement: no larger limit is confirmed for them), so they "
            "plan no more context; --memory-budget plans a limit you have measured "
            "(os_proc_available_memory())"
        )
    return found


def same_memory_as_less_ram(target: Target) -> str | None:
    """The name of a tier with less RAM whose planned usable memory equals `target`'s (why a
    12 GB phone plans no more context than an 8 GB one), or None."""
    if target.tier is None or target.kind == "mac":
        return None
    for tier in load_catalog().tiers.values():
        if tier.ram_gb < target.tier.ram_gb and (
            tier.usable_bytes,
            tier.usable_bytes_entitled,
        ) == (target.usable_bytes, target.usable_bytes_entitled):
            return tier.name
    return None


def evaluate(
    size_or_config: ModelLike,
    target: str | Target | None,
    context: int | None = None,
    *,
    memory_budget: int | str | None = None,
    name: str | None = None,
    auto_recipe: Recipe | None = None,
    **settings,
) -> Plan:
    """The plan of `size_or_config` on `target` (a device, tier or Mac name, see `mlxkit
    tiers`; or None with `memory_budget`) at `context` tokens, or at the largest context
    that fits when `context` is None. Never refuses: the plan says whether it `fits`.
    `settings` are the fields of `Settings` (`vision`: include the checkpoint's tower, if it
    has one); `auto_recipe` is what recipe "auto" stands for (`recipe_of`)."""
    shapes, label = resolve_config(size_or_config)
    cfg = shapes.text
    if isinstance(size_or_config, str) and size_or_config.lower() in sizes():
        size = size_or_config.lower()
    else:
        size = preset_size_of(cfg)
    tgt = target if isinstance(target, Target) else resolve_target(target, memory_budget)
    s = make_settings(auto_recipe, **settings)
    recipe = recipe_of(s, auto_recipe)
    validate(s, context, cfg)
    drafter_runs(tgt, s.mtp, s.swift_runtime)
    validate_vision_encoder(s, shapes, name or label)
    vision = shapes.vision if s.vision else None
    coreml = (vision, coreml_grids(s, vision)) if s.vision_encoder == "coreml" else None
    tower = None if coreml else vision
    weights = weight_plan(cfg, s, tower, coreml, recipe, runtime_for(tgt) is MLXKIT)
    inputs = _Inputs(shapes, name or label, size, tgt, s, recipe, weights)
    best = largest_context_that_fits(inputs)
    floor = min_context(cfg, inputs.image_tokens)
    planned = context if context is not None else max(best, floor)
    p = plan_at(inputs, planned)
    p.largest_context_that_fits = best
    p.warnings = _warnings(p)
    return p


def plan(
    size_or_config: ModelLike,
    target: str | Target | None = None,
    context: int | None = None,
    **options,
) -> Plan:
    """Like `evaluate`, but raises PlanRefused when the plan does not fit."""
    p = evaluate(size_or_config, target, context, **options)
    if not p.fits:
        raise PlanRefused(p, context)
    return p
