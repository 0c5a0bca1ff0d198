"""A plan as JSON-ready data: what `mlxkit plan --json` prints and what a bundle's
manifest.json embeds, so both always show the same numbers."""

from __future__ import annotations

from .plan import Plan
from .roofline import EFFICIENCY


def target_to_dict(p: Plan) -> dict:
    t = p.target
    return {
        "name": t.name,
        "label": t.label,
        "kind": t.kind,
        "tier": t.tier.id if t.tier else None,
        "devices": [d.name for d in t.devices],
        "device_model_ids": t.model_ids,
        "usable_bytes": t.usable_bytes,
        "usable_bytes_entitled": t.usable_bytes_entitled,
        "bandwidth_bytes_per_s": t.bandwidth,
        "metal_buffer_limit_bytes": t.metal_buffer_limit,
        "unconfirmed": list(t.unconfirmed),
    }


def memory_to_dict(p: Plan) -> dict:
    a = p.activations
    return {
        "peak_bytes": p.total,
        "usable_bytes": p.usable,
        "usable_bytes_without_entitlement": p.usable_without_entitlement,
        "headroom_bytes": p.usable - p.total,
        "breakdown": p.breakdown,
        "weights_by_part": p.weights,
        "kv_bytes_per_token": p.kv_bytes_per_token,
        "activations": {
            "phase": a.phase,
            "largest_layer": a.layer_kind,
            "layer_peak_bytes": a.layer_peak,
            "retained_bytes": a.retained,
            "logits_bytes": a.logits,
        },
        "largest_array": {"name": p.largest_array[0], "bytes": p.largest_array[1]},
    }


def plan_to_dict(p: Plan) -> dict:
    from mlxkit.convert.quantize import load_recipe

    s = p.settings
    recipe = load_recipe(s.recipe, s.bits, s.group_size)
    return {
        "model": p.model,
        "size": p.size,
        "target": target_to_dict(p),
        "fits": p.fits,
        "context": p.context,
        "max_context": p.max_context,
        "entitlement_allowed": s.entitlement,
        "entitlement_required": p.entitlement_required,
        "quantization": {
            "recipe": s.recipe,
            "bits": recipe.bits,
            "group_size": recipe.group_size,
            "dtype": s.dtype,
            "bits_per_part": p.bits_per_part,
        },
        "mtp": {"included": s.mtp, "num_draft": s.num_draft},
        "prefill_chunk": s.prefill_chunk,
        "memory": memory_to_dict(p),
        "performance": {
            "roofline_efficiency": EFFICIENCY,
            "decode_tokens_per_s_1k": p.decode_tps,
            "decode_tokens_per_s_at_context": p.decode_tps_at_context,
            "mtp_acceptance": s.acceptance,
            "mtp_speedup": p.mtp_speedup,
            "mtp_tokens_per_s_1k": p.mtp_tps,
        },
        "warnings": p.warnings,
    }
