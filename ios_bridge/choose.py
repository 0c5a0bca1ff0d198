"""`choose_plan`: the settings `mlxkit plan` shows and `convert --target` builds, picked the same
way for both so that the plan a user reads is the bundle they get.

Without an explicit recipe or MTP choice, the candidates are tried in order — quality recipe
with MTP, uniform with MTP, uniform without MTP — and the first whose largest context
reaches the requested context (or DEFAULT_CONTEXT, or at least MIN_CONTEXT) wins. The
entitlement is asked for only when the plan needs it: a plan that fits within the default
limit is made within it, so the usable memory it reports is the limit the app will run
under.
"""

from __future__ import annotations

from pathlib import Path

from mlxkit.models.qwen3_5 import TextConfig

from .devices import Target, resolve_target
from .plan import Plan, evaluate, plan, resolve_config
from .settings import DEFAULT_CONTEXT, MIN_CONTEXT

RECIPES = ("quality", "uniform")  # best first


def candidates(recipe: str | None, mtp: bool | None, has_mtp: bool) -> list[tuple[str, bool]]:
    """(recipe, MTP) pairs to try, best first; without MTP only the smallest recipe."""
    recipes = [recipe] if recipe else list(RECIPES)
    with_mtp = [mtp and has_mtp] if mtp is not None else ([True, False] if has_mtp else [False])
    return [(r, m) for m in with_mtp for r in (recipes if m else recipes[-1:])]


def _describe(recipe: str | None, mtp: bool | None, need: int) -> str | None:
    if recipe and mtp is not None:
        return None
    pairs = candidates(recipe, mtp, True)
    tried = ", ".join(f"{r}{' + MTP' if m else ' without MTP'}" for r, m in pairs)
    return f"the first of {tried} that leaves room for {need:,} tokens"


def choose_plan(
    size_or_config: str | Path | dict | TextConfig,
    target: str | Target | None = None,
    context: int | None = None,
    *,
    memory_budget: int | str | None = None,
    name: str | None = None,
    has_mtp: bool = True,
    recipe: str | None = None,
    mtp: bool | None = None,
    **settings,
) -> Plan:
    """The plan of the first candidate that leaves room for the context (see the module
    docstring); PlanRefused for the least demanding candidate when none does. `recipe` / `mtp` None
    mean "choose"; the other `settings` are Settings fields, as for `plan`."""
    cfg, label = resolve_config(size_or_config)
    tgt = target if isinstance(target, Target) else resolve_target(target, memory_budget)
    options = {"name": name or label, **settings}
    limit = cfg.max_position_embeddings
    needs = [context] if context else [min(DEFAULT_CONTEXT, limit), min(MIN_CONTEXT, limit)]
    pairs = candidates(recipe, mtp, has_mtp and cfg.mtp_num_hidden_layers > 0)
    for need in needs:
        for r, m in pairs:
            chosen = _within_the_default_limit(cfg, tgt, context, need, r, m, options)
            if chosen is not None:
                chosen.choice = _describe(recipe, mtp, need)
                return chosen
    r, m = pairs[-1]  # the least demanding candidate: what fits instead is measured from it
    return plan(cfg, tgt, context, recipe=r, mtp=m, **options)  # refuses


def _within_the_default_limit(
    cfg: TextConfig,
    target: Target,
    context: int | None,
    need: int,
    recipe: str,
    mtp: bool,
    options: dict,
) -> Plan | None:
    """The plan for (recipe, mtp) if it leaves room for `need` tokens: within the default
    memory limit when that is enough (ask for no capability the app does not need), else
    within the increased one when it is allowed; None if neither."""
    allowed = options.get("entitlement", True)
    for entitlement in dict.fromkeys([False, allowed]):
        lean = {**options, "entitlement": entitlement}
        p = evaluate(cfg, target, None, recipe=recipe, mtp=mtp, **lean)
        if p.fits and p.largest_context_that_fits >= need:
            return plan(cfg, target, context, recipe=recipe, mtp=mtp, **lean)
    return None
