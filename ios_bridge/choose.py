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
reports is the limit the app will run under. When the checkpoint's sensitivity was measured
(`convert --recipe auto` caches it; the planner reads the cache and measures nothing), the
recipes are tried least predicted KL first and the plan carries that KL (`Plan.quality`).

Then the KV cache precision and the prefill chunk (unless given): the goal is the requested
context, or else the most the target holds (up to the model's positions) with the smallest of
both; the first of 16, 8, 4 bits, and within it the largest of PREFILL_CHUNKS, that reaches the
goal is planned. Precision comes first: it is what the model's answers depend on, the chunk only
how fast a long prompt is read.
"""

from __future__ import annotations

from pathlib import Path

from mlxkit.convert.coreml import vision_tokens
from mlxkit.convert.quantize import load_recipe
from mlxkit.convert.sensitivity import Sensitivity, cached_for_checkpoint

from mlxkit import fields
from mlxkit.errors import ConfigError, MlxkitError
from mlxkit.layout import ModelConfig

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


def measured_sensitivity(size_or_config: ModelLike) -> Sensitivity | None:
    """The cached sensitivity measurement of a checkpoint directory (`mlxkit convert --recipe
    auto` makes it), None for a size, a config or a directory never measured: the planner
    reads the cache and never measures."""
    if not isinstance(size_or_config, (str, Path)) or not Path(size_or_config).is_dir():
        return None
    try:
        return cached_for_checkpoint(size_or_config)
    except MlxkitError:  # not a Hugging Face checkpoint (a converted model, say)
        return None


def by_quality(s: Sensitivity | None, bits: int | None, group_size: int | None) -> list[str]:
    """RECIPES, least predicted KL first when the checkpoint was measured."""
    if s is None:
        return list(RECIPES)
    kl = {r: s.predicted_kl(load_recipe(r, bits, group_size)) for r in RECIPES}
    return sorted(RECIPES, key=lambda r: (kl[r] is None, kl[r] or 0.0))


def candidates(
    recipe: str | None, mtp: bool | None, has_mtp: bool, recipes: list[str] | None = None
) -> list[tuple[str, bool]]:
    """(recipe, MTP) pairs to try, best first; without MTP only the smallest recipe (the last
    of RECIPES)."""
    recipes = [recipe] if recipe is not None else (recipes or list(RECIPES))
    with_mtp = [mtp and has_mtp] if mtp is not None else ([True, False] if has_mtp else [False])
    smallest = recipes[-1:] if recipe is not None else list(RECIPES[-1:])
    return [(r, m) for m in with_mtp for r in (recipes if m else smallest)]


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
    recipe: str | None, mtp: bool | None, vision: list[bool], need: int, image_tokens: int
) -> str | None:
    if recipe is not None and mtp is not None and len(vision) == 1:
        return None
    pairs = candidates(recipe, mtp, True)
    tried = ", ".join(f"{r}{' + MTP' if m else ' without MTP'}" for r, m in pairs)
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
    **settings,
) -> Plan:
    """The plan of the first candidate that leaves room for the context (see the module
    docstring); PlanRefused for the least demanding candidate when none does. `recipe` /
    `mtp` / `vision` / `kv_bits` / `prefill_chunk` None mean "choose"; the other `settings`
    are Settings fields, as for `plan`."""
    if context is not None:
        fields.integer(context, "context")
    for flag, value in (("mtp", mtp), ("vision", vision)):
        if value is not None:
            fields.boolean(value, flag)
    shapes, label = resolve_config(size_or_config)
    cfg = shapes.text
    tgt = target if isinstance(target, Target) else resolve_target(target, memory_budget)
    options = {"name": name or label, **settings}
    group = settings.get("kv_group_size", Settings.kv_group_size)
    quantizable = not isinstance(group, int) or cfg.head_dim % group == 0  # else: validate's
    caches = cache_candidates(kv_bits, prefill_chunk, quantizable)
    image_tokens = settings.get("image_tokens", Settings.image_tokens)
    if settings.get("vision_encoder") == "coreml" and shapes.vision is not None:
        vision = True if vision is None else vision  # Core ML encodes images: keep the tower
        grids = coreml_grids(make_settings(**settings), shapes.vision)
        image_tokens = max(vision_tokens(g, shapes.vision.spatial_merge_size) for g in grids)
    has_mtp = has_mtp and drafter_runs(
        tgt, mtp, settings.get("swift_runtime", Settings.swift_runtime)
    )
    sensitivity = measured_sensitivity(size_or_config)
    bits, group_size = settings.get("bits"), settings.get("group_size")
    order = by_quality(sensitivity, bits, group_size)
    pairs = candidates(recipe, mtp, has_mtp and cfg.mtp_num_hidden_layers > 0, order)
    visions = vision_candidates(vision, shapes.vision is not None)
    last = None
    for v in visions:
        floor = min_context(cfg, image_tokens if v else 0)
        preferred = max(min(DEFAULT_CONTEXT, cfg.max_position_embeddings), floor)
        needs = [context] if context else [preferred, floor]
        for need in needs:
            for r, m in pairs:
                candidate = {"recipe": r, "mtp": m, "vision": v, **options}
                chosen = _within_the_default_limit(shapes, tgt, context, need, candidate, caches)
                if chosen is not None:
                    how = [
                        _describe(recipe, mtp, visions, need, image_tokens),
                        _describe_cache(kv_bits, prefill_chunk, chosen.max_context),
                    ]
                    chosen.choice = "; ".join(h for h in how if h) or None
                    chosen.quality = _predicted(sensitivity, r, bits, group_size)
                    return chosen
        last = v
    r, m = pairs[-1]  # the least demanding candidate: what fits instead is measured from it
    b, c = caches[-1]
    return plan(  # refuses
        shapes, tgt, context, recipe=r, mtp=m, vision=last, kv_bits=b, prefill_chunk=c, **options
    )


def _predicted(
    s: Sensitivity | None, recipe: str, bits: int | None, group_size: int | None
) -> dict | None:
    kl = None if s is None else s.predicted_kl(load_recipe(recipe, bits, group_size))
    return None if kl is None else {"kl": kl, "calibration_tokens": s.tokens}


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
