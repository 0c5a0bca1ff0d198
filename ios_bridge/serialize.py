"""A plan as JSON-ready data: what `mlxkit plan --json` prints and what a bundle's
manifest.json embeds, so both always show the same numbers."""

from __future__ import annotations

from .plan import COREML_PRECISION, Plan
from .roofline import Speed, speed_model


def target_to_dict(plan: Plan) -> dict:
    t = plan.target
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


def vision_to_dict(plan: Plan) -> dict:
    """The vision tower in the plan: whether the model has one (as far as the plan looked:
    not with --no-vision) and it is included, what encodes images (the MLX tower in model/, or
    the Core ML package and its functions), the image cap and bits, and the activations of
    encoding one image (what the plan made room for)."""
    enc = plan.vision_encoding
    return {
        "available": plan.checkpoint.vision is not None,
        "included": plan.vision is not None,
        "encoder": plan.vision_encoder,
        "image_tokens": plan.image_tokens or None,
        # an app resizes pictures to whole vision tokens of (patch · merge)² pixels
        "patch_size": plan.vision.patch_size if plan.vision is not None else None,
        "spatial_merge_size": plan.vision.spatial_merge_size if plan.vision is not None else None,
        "bits": plan.settings.vision_bits if plan.vision is not None else None,
        "weights_bytes": plan.weights["vision"],
        "encoding_peak_bytes": enc.total if enc else None,
        "encoding_largest_layer": enc.layer_kind if enc else None,
        "coreml": coreml_to_dict(plan) if plan.vision_encoder == "coreml" else None,
    }


def coreml_to_dict(plan: Plan) -> dict:
    """The Core ML encoder as planned: one function per grid, with the shapes and dtypes of
    its input and output (what `bundle verify` holds the package's spec to), and the memory
    its export takes on the machine that builds the bundle (an estimate)."""
    from mlxkit.convert.coreml import (
        COMPUTE_UNITS,
        INPUT_NAME,
        OUTPUT_NAME,
        export_peak_estimate,
        function_name,
        parameter_counts,
        vision_tokens,
    )

    v, grids = plan.vision, plan.coreml_grids
    m = v.spatial_merge_size
    functions = [
        {
            "name": function_name(g),
            "grid": list(g),
            "tokens": vision_tokens(g, m),
            "input": {"name": INPUT_NAME, "shape": [g[0] * g[1], v.patch_dim], "dtype": "float32"},
            "output": {
                "name": OUTPUT_NAME,
                "shape": [vision_tokens(g, m), v.out_hidden_size],
                "dtype": "float32",
            },
        }
        for g in grids
    ]
    return {
        "precision": COREML_PRECISION,
        "compute_units": COMPUTE_UNITS,
        "functions": functions,
        "default_function": functions[0]["name"],
        "weight_bytes": plan.weights["vision"],
        "export_peak_bytes_estimate": export_peak_estimate(sum(parameter_counts(v)), len(grids)),
    }


def memory_to_dict(plan: Plan) -> dict:
    a = plan.activations
    return {
        "peak_bytes": plan.total,
        "usable_bytes": plan.usable,
        "usable_bytes_without_entitlement": plan.usable_without_entitlement,
        "headroom_bytes": plan.usable - plan.total,
        "breakdown": plan.breakdown,
        "weights_by_part": plan.weights,
        "kv_bytes_per_token": plan.kv_bytes_per_token,
        "activations": {
            "phase": a.phase,
            "largest_layer": a.layer_kind,
            "layer_peak_bytes": a.layer_peak,
            "retained_bytes": a.retained,
            "logits_bytes": a.logits,
        },
        "largest_array": {"name": plan.largest_array[0], "bytes": plan.largest_array[1]},
    }


def speed_to_dict(speed: Speed | None) -> dict:
    return {
        "runtime": speed.runtime.name if speed else None,
        "num_draft": speed.num_draft if speed else None,
        "mtp_greedy_only": speed.runtime.greedy_only if speed else None,
        "decode_tokens_per_s_1k": speed.decode_tps if speed else None,
        "decode_tokens_per_s_at_context": speed.decode_tps_at_context if speed else None,
        "mtp_speedup": speed.mtp_speedup if speed else None,
        "mtp_tokens_per_s_1k": speed.mtp_tps if speed else None,
    }


def performance_to_dict(plan: Plan) -> dict:
    """Predicted speed in the runtime that runs the model, and (where that is not mlxkit)
    in mlxkit's own loop; None where the target's bandwidth is unknown."""
    model = speed_model()
    return {
        "speed_model": {
            "efficiency": model.efficiency,
            "fixed_seconds_per_token": model.fixed_seconds,
            "leave_one_out_median_error": model.loo_median_error,
            "fitted_on": "benchmarks/data/mac_decode_speeds.md of the mlxkit repository "
            "(benchmarks/fit_speed_model.py)",
        },
        "mtp_acceptance": plan.settings.acceptance,
        **speed_to_dict(plan.speed),
        "mlxkit_loop": speed_to_dict(plan.mlxkit_speed) if plan.mlxkit_speed else None,
    }


def plan_to_dict(plan: Plan) -> dict:
    s = plan.settings
    recipe = plan.recipe
    return {
        "model": plan.model,
        "size": plan.size,
        "target": target_to_dict(plan),
        "fits": plan.fits,
        "max_context": plan.max_context,
        "largest_context_that_fits": plan.largest_context_that_fits,
        "choice": plan.choice,
        "entitlement_allowed": s.entitlement,
        "entitlement_required": plan.entitlement_required,
        "quantization": {
            "recipe": s.recipe,
            "bits": recipe.bits,
            "group_size": recipe.group_size,
            # nearest, or gptq: learned rounding (convert --rounding), the same tensors
            "rounding": s.rounding,
            "dtype": s.dtype,
            "bits_per_part": plan.bits_per_part,
        },
        "mtp": {
            "included": s.mtp,
            "num_draft": plan.num_draft,
            "runtime": plan.runtime.name,
            "draft_vocab": s.draft_vocab,  # N: the drafter's shortlist, None: the whole head
        },
        "vision": vision_to_dict(plan),
        "prefill_chunk": s.prefill_chunk,
        # bits 16: the activation dtype; 8 or 4: quantized from the first position
        "kv_cache": {"bits": s.kv_bits, "group_size": s.kv_group_size, "quantized_kv_start": 0},
        "memory": memory_to_dict(plan),
        "performance": performance_to_dict(plan),
        "warnings": plan.warnings,
    }
