"""The message of a refused plan: why it does not fit, and what would.

A bare "does not fit" leaves the user guessing which knob to turn, so every refusal tries
the knobs — a shorter context, the entitlement, no MTP, fewer bits, a smaller size, a
bigger phone — and names those that work, each with the largest context it allows and the
flag that selects it.
"""

from __future__ import annotations

from dataclasses import replace

from mlxkit.convert.quantize import VALID_BITS

from mlxkit.models.qwen3_5 import TextConfig
from mlxkit.presets import sizes, text_config

from .devices import load_catalog, resolve_target
from .plan import MIN_CONTEXT, Plan, _evaluate, gb


def _needed(p: Plan, context: int | None) -> int:
    return context if context is not None else min(MIN_CONTEXT, p.cfg.max_position_embeddings)


def _max_ctx(p: Plan, size: str | None, target=None, **changes) -> int:
    cfg = TextConfig.from_dict(text_config(size)) if size else p.cfg
    s = replace(p.settings, **changes)
    return _evaluate(cfg, p.model, size, target or p.target, s, None).max_context


def _alternatives(p: Plan, context: int | None) -> list[str]:
    need = _needed(p, context)
    s = p.settings
    found: list[str] = []
    if context is not None and p.max_context >= min(MIN_CONTEXT, context):
        found.append(
            f"a shorter context: up to {p.max_context:,} tokens (--context {p.max_context})"
        )
    if not s.entitlement:
        n = _max_ctx(p, p.size, entitlement=True)
        if n >= need:
            found.append(
                f"the increased-memory-limit entitlement (--entitlement): up to {n:,} tokens"
            )
    if s.mtp:
        n = _max_ctx(p, p.size, mtp=False)
        if n >= need:
            found.append(f"no MTP head (--no-mtp): up to {n:,} tokens")
    bits = s.bits or 4
    for fewer in sorted((b for b in VALID_BITS if b < bits), reverse=True):
        n = _max_ctx(p, p.size, bits=fewer)
        if n >= need:
            found.append(f"{fewer}-bit weights (--bits {fewer}, lower quality): up to {n:,} tokens")
            break
    if p.size is not None:
        for smaller in reversed(sizes()[: sizes().index(p.size)]):
            n = _max_ctx(p, smaller)
            if n >= need:
                found.append(f"the {smaller.upper()} model (--size {smaller}): up to {n:,} tokens")
                break
    if p.target.kind != "budget":
        catalog = load_catalog()
        tiers = sorted(catalog.tiers.values(), key=lambda t: t.usable_bytes_entitled)
        current = p.target.usable_bytes_entitled
        for tier in tiers:
            if tier.usable_bytes_entitled <= current:
                continue
            device = catalog.devices_in(tier.id)[0]
            n = _max_ctx(p, p.size, target=resolve_target(device.id))
            if n >= need:
                article = "an" if tier.name[0] == "8" else "a"
                found.append(
                    f"{article} {tier.name} phone such as the {device.name} (--target {device.id}): "
                    f"up to {n:,} tokens"
                )
                break
    return found


def refusal_message(p: Plan, context: int | None) -> str:
    """One paragraph: the plan's shortfall, then what fits."""
    s = p.settings
    what = f"{p.model} at {s.bits}-bit ({s.recipe} recipe{', with MTP' if s.mtp else ''})"
    ent = "with" if s.entitlement else "without"
    reasons = []
    if p.total > p.usable:
        parts = ", ".join(f"{k.replace('_', ' ')} {gb(v)}" for k, v in p.breakdown.items() if v)
        reasons.append(
            f"needs {gb(p.total)} at {p.context:,} tokens of context ({parts}) but "
            f"{p.target.label} gives an app {gb(p.usable)} {ent} the increased-memory-limit "
            "entitlement"
        )
    if p.largest_array[1] > p.metal_buffer_limit:
        name, n = p.largest_array
        reasons.append(
            f"its largest array ({name}, {n / 2**20:,.0f} MiB) exceeds the "
            f"{p.metal_buffer_limit / 2**20:,.0f} MiB Metal buffer limit planned for this phone"
        )
    msg = f"{what} does not fit: it {'; and '.join(reasons) or 'does not fit'}."
    alternatives = _alternatives(p, context)
    if alternatives:
        msg += " What fits instead: " + "; ".join(alternatives) + "."
    else:
        msg += (
            " Nothing smaller fits this target either; if the device really has more memory "
            "than recorded, pass --memory-budget."
        )
    return msg
