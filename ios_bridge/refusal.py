"""What fits instead of a refused plan.

A bare "does not fit" leaves the user guessing which knob to turn, so a refusal's catcher
(the CLI, the README table) asks `refusal_message`, which tries the knobs — a shorter
context, the entitlement, no MTP, fewer bits, a smaller size, a bigger phone — and names
those that work, each with the largest context it allows and the flag that selects it. The
search costs a few dozen plans, so `plan()` itself only says why it refused.
"""

from __future__ import annotations

from dataclasses import asdict

from mlxkit.convert.quantize import VALID_BITS

from mlxkit.presets import sizes

from .devices import load_catalog, resolve_target
from .plan import Plan, PlanRefused, evaluate, min_context

VISION_BITS_TRIED = (8, 4)  # a quantized vision tower, the gentlest first


def _largest_context(refused: Plan, size: str | None = None, target=None, **changes) -> int:
    """The largest context that fits with `changes` to the refused plan's settings."""
    settings = {**asdict(refused.settings), **changes}
    model = size if size else refused.checkpoint
    name = None if size else refused.model
    p = evaluate(model, target or refused.target, None, name=name, **settings)
    return p.largest_context_that_fits


def _need(refused: PlanRefused, image_tokens: int) -> int:
    """The context a change must leave room for: the one asked for, or at least MIN_CONTEXT
    of text and one image of `image_tokens`."""
    context = refused.requested_context
    return context if context is not None else min_context(refused.plan.cfg, image_tokens)


def _smaller_image_cap(refused: PlanRefused) -> tuple[int, int] | None:
    """(cap, largest context) of the largest image cap below the refused one that fits:
    memory grows with the cap (N² attention, and the image's tokens in the context), so a
    bisection finds the boundary."""
    p = refused.plan

    def context_at(cap: int) -> int | None:
        if refused.requested_context is not None and refused.requested_context < cap:
            return None
        n = _largest_context(p, p.size, image_tokens=cap)
        return n if n >= _need(refused, cap) else None

    low, high = 0, p.image_tokens  # invariant: low fits (or is 0), high does not
    if context_at(1) is None:
        return None
    while high - low > 1:
        middle = (low + high) // 2
        if context_at(middle) is not None:
            low = middle
        else:
            high = middle
    return low, context_at(low)


def _fewer_grids(refused: PlanRefused) -> str | None:
    """The Core ML encoder with only its grids of fewer tokens than the largest, the most
    tokens first, if that fits: its largest image is what the plan makes room for."""
    from mlxkit.convert.coreml import vision_tokens

    p = refused.plan
    merge = p.vision.spatial_merge_size
    caps = sorted({vision_tokens(g, merge) for g in p.coreml_grids}, reverse=True)[1:]
    for cap in caps:
        grids = [g for g in p.coreml_grids if vision_tokens(g, merge) <= cap]
        spec = ",".join(f"{r}x{c}" for r, c in grids)
        n = _largest_context(p, p.size, coreml_grids=spec)
        if n >= _need(refused, cap):
            return (
                f"Core ML grids of up to {cap:,} vision tokens (--coreml-grids {spec}): up "
                f"to {n:,} tokens of context"
            )
    return None


def _vision_changes(refused: PlanRefused) -> list[str]:
    """What to change about the vision tower of a refused plan that includes one."""
    p, found = refused.plan, []
    if p.vision_encoder == "coreml":
        found += [grids for grids in [_fewer_grids(refused)] if grids]
        n = _largest_context(p, p.size, vision=False, vision_encoder="mlx", coreml_grids=None)
        if n >= _need(refused, 0):
            found.append(f"no vision tower (--no-vision, text only): up to {n:,} tokens")
        return found
    cap = _smaller_image_cap(refused)
    if cap is not None:
        found.append(
            f"images of up to {cap[0]:,} vision tokens (--image-tokens {cap[0]}): up to "
            f"{cap[1]:,} tokens of context"
        )
    bits = p.settings.vision_bits
    for fewer in (b for b in VISION_BITS_TRIED if bits is None or b < bits):
        n = _largest_context(p, p.size, vision_bits=fewer)
        if n >= _need(refused, p.image_tokens):
            article = "an" if fewer == 8 else "a"
            found.append(
                f"{article} {fewer}-bit vision tower (--vision-bits {fewer}): up to {n:,} tokens"
            )
            break
    n = _largest_context(p, p.size, vision=False)
    if n >= _need(refused, 0):
        found.append(f"no vision tower (--no-vision, text only): up to {n:,} tokens")
    return found


def _bigger_phone(refused: Plan, need: int) -> str | None:
    catalog = load_catalog()
    tiers = sorted(catalog.tiers.values(), key=lambda t: t.usable_bytes_entitled)
    for tier in tiers:
        if tier.usable_bytes_entitled <= refused.target.usable_bytes_entitled:
            continue
        device = catalog.devices_in(tier.id)[0]
        n = _largest_context(refused, refused.size, target=resolve_target(device.id))
        if n >= need:
            article = "an" if tier.name[0] == "8" else "a"
            return (
                f"{article} {tier.name} phone such as the {device.name} (--target {device.id}): "
                f"up to {n:,} tokens"
            )
    return None


def what_fits_instead(refused: PlanRefused) -> list[str]:
    p, context = refused.plan, refused.requested_context
    need = _need(refused, p.image_tokens)
    s = p.settings
    found: list[str] = []
    best = p.largest_context_that_fits
    if context is not None and best >= min(min_context(p.cfg, p.image_tokens), context):
        found.append(f"a shorter context: up to {best:,} tokens (--context {best})")
    if not s.entitlement and p.target.kind != "mac":
        n = _largest_context(p, p.size, entitlement=True)
        if n >= need:
            found.append(
                f"the increased-memory-limit entitlement (--entitlement): up to {n:,} tokens"
            )
    if s.mtp:
        n = _largest_context(p, p.size, mtp=False, draft_vocab=None)
        if n >= need:
            flags = "--no-mtp" + (", without --draft-vocab" if s.draft_vocab else "")
            found.append(f"no MTP head ({flags}): up to {n:,} tokens")
    if p.vision is not None:
        found += _vision_changes(refused)
    for fewer in sorted((b for b in VALID_BITS if b < s.bits), reverse=True):
        n = _largest_context(p, p.size, bits=fewer)
        if n >= need:
            found.append(f"{fewer}-bit weights (--bits {fewer}, lower quality): up to {n:,} tokens")
            break
    if p.size is not None:
        for smaller in reversed(sizes()[: sizes().index(p.size)]):
            n = _largest_context(p, smaller)
            if n >= need:
                found.append(f"the {smaller.upper()} model (--size {smaller}): up to {n:,} tokens")
                break
    if p.target.kind in ("device", "tier"):
        found += [phone for phone in [_bigger_phone(p, need)] if phone]
    return found


def refusal_message(refused: PlanRefused) -> str:
    """One paragraph: the plan's shortfall, then what fits."""
    alternatives = what_fits_instead(refused)
    if alternatives:
        return f"{refused} What fits instead: {'; '.join(alternatives)}."
    return (
        f"{refused} Nothing smaller fits this target either; if the device really has more "
        "memory than recorded, pass --memory-budget."
    )
