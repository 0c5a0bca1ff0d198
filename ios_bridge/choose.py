"""`choose_plan`: the settings `mlxkit plan` shows and `convert --target` builds, picked the same
way for both so that the plan a user reads is the bundle they get.

Without an explicit recipe or MTP choice, the candidates are tried in order — quality recipe
with MTP, uniform with MTP, uniform without MTP — and the first whose largest context
reaches the requested context (or DEFAULT_CONTEXT, or at least MIN_CONTEXT) wins, judged with
the KV cache and prefill chunk that hold the most. A checkpoint
with a vision tower is tried with it first (images are what the model is picked for; MTP is
only a speedup), then, unless `vision=True` insists, without it. With the tower, the context
to reach includes one image of `image_tokens`. The entitlement is asked for only when the plan
needs it: a plan that fits within the default limit is made within it, so the usable memory it
reports is the limit the app will run under.

Quality: when the checkpoint's sensitivity was measured (`convert --recipe auto` caches it;
the planner reads the cache and measures nothing), the candidates are the shipped recipes and
`auto` at each of AUTO_BUDGETS bits per weight (the auto recipe `convert --recipe auto` writes
for that budget), tried least KL first: the lowest KL that leaves room for the context wins.
The KL is measured where `mlxkit eval` has measured that quantization of this checkpoint on
the built-in set (mlxkit.quality keeps the result), else predicted from the sensitivity; the
ranking uses one kind for all candidates (predicted, or measured when every candidate is), as
the two are not on one scale (on micro the prediction is a third to a half of the measurement).
The plan carries its recipe's figures (`Plan.quality`), and a bundle's manifest records them.
With `rounding="gptq"` (learned rounding: never chosen here, it costs the converter time and
memory) the figures are those of GPTQ-rounded weights where `mlxkit eval` measured them (kept
apart from nearest rounding's by their key); the sensitivity predicts nearest rounding only, so
a prediction stays labelled as nearest rounding's (the block's `rounding`) and ranks the recipes.

Then the KV cache precision and the prefill chunk (unless given): the goal is the requested
context, or else the most the target holds (up to the model's positions) with the smallest of
both; the first of 16, 8, 4 bits, and within it the largest of PREFILL_CHUNKS, that reaches the
goal is planned. Precision comes first: it is what the model's answers depend on, the chunk only
how fast a long prompt is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlxkit.convert.coreml import vision_tokens
from mlxkit.convert.quantize import AUTO, Recipe, load_recipe
from mlxkit.convert.rounding import check_rounding
from mlxkit.convert.sensitivity import (
    Sensitivity,
    auto_recipe,
    cached_for_checkpoint,
    smallest_bits_per_weight,
)

from mlxkit import fields
from mlxkit.errors import ConfigError, MlxkitError
from mlxkit.layout import ModelConfig, model_parameters, weight_rule
from mlxkit.load import resolve_model_dir
from mlxkit.models.qwen3_5 import TextConfig
from mlxkit.quality import cached_quality, checkpoint_digest, quality_block, quantization_key

from .devices import Target, resolve_target
from .plan import (
    ModelLike,
    Plan,
    coreml_grids,
    drafter_runs,
    evaluate,
    make_settings,
    min_context,
    plan,
    resolve_config,
)
from .settings import DEFAULT_CONTEXT, KV_BITS, PREFILL_CHUNKS, Settings

RECIPES = ("quality", "uniform")  # best first (least KL first), when nothing was measured
# Bits per weight the planner tries recipe auto at (with a sensitivity measurement): from uniform
# 4-bit group 32's bytes down to group 128's; more bytes lower the KL, fewer leave more context.
AUTO_BUDGETS = (5.0, 4.75, 4.5, 4.25)


@dataclass(frozen=True)
class Option:
    """A recipe the planner may pick: its name and rules (with --bits / --group-size), the
    budget an auto recipe was made for, and its quality (None when nothing is known)."""

    recipe: str
    rules: Recipe
    bits_per_weight: float | None = None
    quality: dict | None = None

    @property
    def auto(self) -> Recipe | None:
        """What recipe "auto" stands for in this option (`plan`'s auto_recipe)."""
        return self.rules if self.recipe == AUTO else None

    @property
    def label(self) -> str:
        return self.recipe if self.auto is None else f"auto {self.bits_per_weight:g} bpw"


def checkpoint_directory(size_or_config: ModelLike) -> Path | None:
    """The checkpoint directory a plan is made from (for "micro", the one mlxkit ships, which
    `convert --size micro` converts), None for a size or a config."""
    if isinstance(size_or_config, (str, Path)) and str(size_or_config) == "micro":
        return resolve_model_dir("micro")
    if isinstance(size_or_config, (str, Path)) and Path(size_or_config).is_dir():
        return Path(size_or_config)
    return None


def measured_sensitivity(checkpoint: Path | None, dtype: str) -> Sensitivity | None:
    """The sensitivity measurement `convert --recipe auto` would use for the checkpoint
    (cached by an earlier one), None for none or for a directory that is not a Hugging Face
    checkpoint: the planner reads the cache and never measures."""
    if checkpoint is None:
        return None
    try:
        return cached_for_checkpoint(checkpoint, dtype)
    except MlxkitError:  # not a Hugging Face checkpoint (a converted model, say)
        return None


def recipe_options(
    cfg: TextConfig,
    checkpoint: Path | None,
    sensitivity: Sensitivity | None,
    recipe: str | None,
    bits: int | None,
    group_size: int | None,
    dtype: str,
    rounding: str = "nearest",
) -> list[Option]:
    """The recipes to try, least KL first (see the module docstring): `recipe` alone when
    given (auto: at every budget of AUTO_BUDGETS that keeps 4 bits), else RECIPES and, with a
    sensitivity measurement and no --bits / --group-size, auto at AUTO_BUDGETS; their figures
    are those of weights rounded as `rounding` says."""
    names = [recipe] if recipe is not None else list(RECIPES)
    options = [Option(r, load_recipe(r, bits, group_size)) for r in names if r != AUTO]
    if recipe == AUTO or (recipe is None and bits is None and group_size is None):
        if sensitivity is not None:
            least = smallest_bits_per_weight(sensitivity)
            budgets = [b for b in AUTO_BUDGETS if b >= least]
            options += [Option(AUTO, auto_recipe(sensitivity, b), b) for b in budgets]
        if recipe == AUTO and not options:
            raise ConfigError(
                "recipe auto is made from the checkpoint's sensitivity measurement: plan a "
                "checkpoint directory (--model DIR) after `mlxkit convert --recipe auto` has "
                "measured it once (it is cached)"
            )
    digest = _digest(checkpoint)
    options = [
        Option(
            o.recipe,
            o.rules,
            o.bits_per_weight,
            _quality(o, cfg, digest, sensitivity, dtype, rounding),
        )
        for o in options
    ]
    if options and all(o.quality and o.quality["method"] == "measured" for o in options):
        return sorted(options, key=lambda o: o.quality["kl_mean"])
    if sensitivity is not None:
        return sorted(options, key=lambda o: _predicted(sensitivity, o))
    return options  # RECIPES' own order


def _digest(checkpoint: Path | None) -> str | None:
    if checkpoint is None:
        return None
    try:
        return checkpoint_digest(checkpoint)
    except MlxkitError:
        return None


def _predicted(s: Sensitivity, o: Option) -> tuple[bool, float]:
    """The ranking key of a prediction (none: last)."""
    kl = s.predicted_kl(o.rules)
    return kl is None, kl or 0.0


def _quality(
    o: Option,
    cfg: TextConfig,
    digest: str | None,
    s: Sensitivity | None,
    dtype: str,
    rounding: str,
) -> dict | None:
    """The option's figures (mlxkit.quality.quality_block): measured (`mlxkit eval` of this
    quantization, this rounding included, of this checkpoint on the built-in set) when kept,
    else predicted from the sensitivity (nearest rounding's), else None."""
    recipe = o.rules
    measured = None
    if digest is not None:
        rules = {
            path.removesuffix(".weight"): weight_rule(path, shape, recipe)
            for path, shape in model_parameters(cfg, include_mtp=False)
        }
        measured = cached_quality(
            digest, quantization_key(recipe.quantization_config(rules), dtype, rounding)
        )
    if s is None:
        return quality_block(measured, rounding=rounding)
    calibration = {"tokens": s.tokens, "digest": s.calibration_digest}
    return quality_block(measured, s.predicted_kl(recipe), calibration, rounding)


def candidates(
    options: list[Option], mtp: bool | None, has_mtp: bool, explicit: bool
) -> list[tuple[Option, bool]]:
    """(recipe option, MTP) pairs to try, best first; without MTP only the smallest recipe (the
    last of RECIPES) unless the recipe was given."""
    with_mtp = [mtp and has_mtp] if mtp is not None else ([True, False] if has_mtp else [False])
    smallest = options if explicit else [o for o in options if o.recipe == RECIPES[-1]]
    return [(o, m) for m in with_mtp for o in (options if m else smallest)]


def vision_candidates(vision: bool | None, has_vision: bool) -> list[bool]:
    """With the vision tower, then without, unless the caller decided (or there is none)."""
    if not has_vision:
        if vision:
            raise ConfigError("--vision: this checkpoint has no vision tower (vision_config)")
        return [False]
    return [vision] if vision is not None else [True, False]


def cache_candidates(
    kv_bits: int | None, prefill_chunk: int | None, quantizable: bool = True
) -> list[tuple[int, int]]:
    """(KV bits, prefill chunk) pairs to try, preferred first; the last holds the most. Not
    `quantizable` (the group size does not divide the head dim): 16 bits only, unless asked."""
    bits = [kv_bits] if kv_bits is not None else list(KV_BITS if quantizable else KV_BITS[:1])
    chunks = [prefill_chunk] if prefill_chunk is not None else list(PREFILL_CHUNKS)
    return [(b, c) for b in bits for c in chunks]


def _describe_cache(kv_bits: int | None, prefill_chunk: int | None, goal: int) -> str | None:
    if kv_bits is not None and prefill_chunk is not None:
        return None
    chunks = f"the largest prefill chunk of {', '.join(map(str, PREFILL_CHUNKS))} tokens"
    if kv_bits is None:
        tried = "the first of 16, 8, 4 bits for the KV cache" + (
            f" with {chunks}" if prefill_chunk is None else ""
        )
    else:
        tried = chunks
    return f"{tried} that reaches {goal:,} tokens"


def _describe(
    options: list[Option],
    recipe: str | None,
    mtp: bool | None,
    vision: list[bool],
    need: int,
    image_tokens: int,
) -> str | None:
    if len(options) == 1 and mtp is not None and len(vision) == 1:
        return None
    pairs = candidates(options, mtp, True, recipe is not None)
    tried = ", ".join(f"{o.label}{' + MTP' if m else ' without MTP'}" for o, m in pairs)
    if len(vision) > 1:
        tried += " — with the vision tower, then without —"
    room = f"{need:,} tokens"
    if vision[0]:
        room += f" (one image of up to {image_tokens:,} of them)"
    return f"the first of {tried} that leaves room for {room}"


def choose_plan(
    size_or_config: ModelLike,
    target: str | Target | None = None,
    context: int | None = None,
    *,
    memory_budget: int | str | None = None,
    name: str | None = None,
    has_mtp: bool = True,
    recipe: str | None = None,
    mtp: bool | None = None,
    vision: bool | None = None,
    kv_bits: int | None = None,
    prefill_chunk: int | None = None,
    checkpoint: str | Path | None = None,
    sensitivity: Sensitivity | None = None,
    **settings,
) -> Plan:
    """The plan of the first candidate that leaves room for the context (see the module
    docstring); PlanRefused for the least demanding candidate when none does. `recipe` /
    `mtp` / `vision` / `kv_bits` / `prefill_chunk` None mean "choose" (`mtp` is True with a
    `draft_vocab`: the shortlist is the drafter's); the other `settings`
    are Settings fields, as for `plan`. `checkpoint`: the checkpoint directory whose kept
    measurements (sensitivity, `mlxkit eval` results) the choice reads, when `size_or_config`
    is its config (default: `size_or_config` when it is a directory); `sensitivity`: a
    measurement to use instead of the cached one."""
    if context is not None:
        fields.integer(context, "context")
    for flag, value in (("mtp", mtp), ("vision", vision)):
        if value is not None:
            fields.boolean(value, flag)
    shapes, label = resolve_config(size_or_config)
    cfg = shapes.text
    tgt = target if isinstance(target, Target) else resolve_target(target, memory_budget)
    common = {"name": name or label, **settings}
    group = settings.get("kv_group_size", Settings.kv_group_size)
    quantizable = not isinstance(group, int) or cfg.head_dim % group == 0  # else: validate's
    caches = cache_candidates(kv_bits, prefill_chunk, quantizable)
    image_tokens = settings.get("image_tokens", Settings.image_tokens)
    if settings.get("vision_encoder") == "coreml" and shapes.vision is not None:
        vision = True if vision is None else vision  # Core ML encodes images: keep the tower
        grids = coreml_grids(make_settings(**settings), shapes.vision)
        image_tokens = max(vision_tokens(g, shapes.vision.spatial_merge_size) for g in grids)
    if mtp is None and settings.get("draft_vocab") is not None:
        mtp = True  # a draft vocabulary is the drafter's: no candidate leaves the drafter out
    has_mtp = has_mtp and drafter_runs(
        tgt, mtp, settings.get("swift_runtime", Settings.swift_runtime)
    )
    bits, group_size = settings.get("bits"), settings.get("group_size")
    dtype = settings.get("dtype", Settings.dtype)
    rounding = check_rounding(settings.get("rounding", Settings.rounding))
    directory = Path(checkpoint) if checkpoint is not None else checkpoint_directory(size_or_config)
    if sensitivity is None:
        sensitivity = measured_sensitivity(directory, dtype)
    options = recipe_options(cfg, directory, sensitivity, recipe, bits, group_size, dtype, rounding)
    has = has_mtp and cfg.mtp_num_hidden_layers > 0
    pairs = candidates(options, mtp, has, recipe is not None)
    visions = vision_candidates(vision, shapes.vision is not None)
    last = None
    for v in visions:
        floor = min_context(cfg, image_tokens if v else 0)
        preferred = max(min(DEFAULT_CONTEXT, cfg.max_position_embeddings), floor)
        needs = [context] if context else [preferred, floor]
        for need in needs:
            for o, m in pairs:
                candidate = {"recipe": o.recipe, "auto_recipe": o.auto, "mtp": m, "vision": v}
                candidate.update(common)
                chosen = _within_the_default_limit(shapes, tgt, context, need, candidate, caches)
                if chosen is not None:
                    how = [
                        _describe(options, recipe, mtp, visions, need, image_tokens),
                        _describe_cache(kv_bits, prefill_chunk, chosen.max_context),
                    ]
                    chosen.choice = "; ".join(h for h in how if h) or None
                    chosen.quality, chosen.bits_per_weight = o.quality, o.bits_per_weight
                    return chosen
        last = v
    o, m = pairs[-1]  # the least demanding candidate: what fits instead is measured from it
    b, c = caches[-1]
    return plan(  # refuses
        shapes,
        tgt,
        context,
        recipe=o.recipe,
        auto_recipe=o.auto,
        mtp=m,
        vision=last,
        kv_bits=b,
        prefill_chunk=c,
        **common,
    )


def _within_the_default_limit(
    shapes: ModelConfig,
    target: Target,
    context: int | None,
    need: int,
    candidate: dict,
    caches: list[tuple[int, int]],
) -> Plan | None:
    """The plan for a candidate's settings (recipe, mtp, vision...) if, with the cache that
    holds the most, it leaves room for `need` tokens: within the default memory limit when
    that is enough (ask for no capability the app does not need), else within the increased
    one when it is allowed; None if neither. Its KV bits and prefill chunk are then the first
    of `caches` that reaches the context asked for, or else the most this limit holds."""
    allowed = candidate.get("entitlement", True)
    for entitlement in dict.fromkeys([False, allowed]):
        lean = {**candidate, "entitlement": entitlement}
        bits, chunk = caches[-1]
        most = evaluate(shapes, target, None, kv_bits=bits, prefill_chunk=chunk, **lean)
        if not (most.fits and most.largest_context_that_fits >= need):
            continue
        goal = context or most.largest_context_that_fits
        for bits, chunk in caches:
            p = evaluate(shapes, target, None, kv_bits=bits, prefill_chunk=chunk, **lean)
            if p.fits and p.largest_context_that_fits >= goal:
                return plan(shapes, target, context, kv_bits=bits, prefill_chunk=chunk, **lean)
    return None
