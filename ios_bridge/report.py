"""Plain-text renderings for the CLI: the device tables, a plan's breakdown, a bundle's line."""

from __future__ import annotations

import json
from functools import cache

from mlxkit.presets import sizes

from .devices import ENTITLEMENT, GB, Catalog, Device, Tier, load_catalog
from .memory import KV_STEP, fused_attention, vision_patches
from .plan import Plan, evaluate, gb, usable_label
from .roofline import MIN_MTP_GAIN, SHORT_CONTEXT, Speed, mtp_recommended, speed_model
from .settings import KV_BITS, MIN_CONTEXT, PREFILL_CHUNKS, Settings


def _u(value: str, key: str, unconfirmed: tuple[str, ...]) -> str:
    return f"{value}(u)" if key in unconfirmed else value


def _tier_line(tier: Tier) -> str:
    u = tier.unconfirmed
    name = tier.name if tier.memory in tier.name else f"{tier.name} {tier.memory}"
    usable = _u(f"{tier.usable_bytes / GB:.1f}", "usable_gb", u)
    entitled = _u(f"{tier.usable_bytes_entitled / GB:.1f}", "usable_gb_entitled", u)
    cap = _u(str(tier.metal_buffer_limit // 2**20), "metal_buffer_limit_mb", u)
    return f"tier-{tier.id}: {name}, usable {usable} / {entitled} GB, Metal buffer cap {cap} MiB"


def _device_line(device: Device, tier: Tier) -> str:
    du, u = device.unconfirmed, device.unconfirmed + tier.unconfirmed
    usable = (
        f"{_u(f'{device.usable_bytes / GB:.1f}', 'usable_gb', u)} / "
        f"{_u(f'{device.usable_bytes_entitled / GB:.1f}', 'usable_gb_entitled', u)}"
    )
    ram = _u(str(device.ram_gb), "ram_gb", du)
    bandwidth = _u(f"{device.bandwidth / GB:.1f}", "bandwidth_gbs", du)
    ids = _u(", ".join(device.model_ids), "model_ids", du)
    return (
        f"  {device.id:<16}{device.name:<19}{device.soc:<22}{device.gpu_cores:>4}{ram:>6}"
        f"{bandwidth:>9}{usable:>16}  {ids}"
    )


def _mac_sources(catalog: Catalog) -> set[str]:
    return {key for mac in catalog.macs.values() for key in mac.source.values()}


def tier_contexts(tier: Tier, size: str) -> dict[int, int]:
    """The largest context `size` plans on `tier` with the KV cache at each of KV_BITS (0: it
    does not fit): text only, uniform recipe, MTP, the entitlement allowed, and the prefill
    chunk that holds the most (the smallest the planner chooses)."""
    contexts = {}
    for bits in KV_BITS:
        p = evaluate(
            size,
            f"tier-{tier.id}",
            recipe="uniform",
            vision=False,
            kv_bits=bits,
            prefill_chunk=PREFILL_CHUNKS[-1],
        )
        contexts[bits] = p.largest_context_that_fits if p.fits else 0
    return contexts


def _contexts_line(tier: Tier) -> str:
    def shown(n: int) -> str:
        return f"{n // 1024:,}K" if n >= MIN_CONTEXT else "-"

    cells = []
    for size in sizes():
        c = tier_contexts(tier, size)
        cells.append(f"{size} {' / '.join(shown(c[b]) for b in KV_BITS)}")
    return (
        "  largest context (K = 1,024 tokens), KV cache at 16 / 8 / 4 bits, text only: "
        + "; ".join(cells)
    )


# Published quality of the real models, beside micro's measured figures (not measured here).
PUBLISHED_QUALITY = (
    "published for the real models (mlx-community OptiQ model cards, GSM8K 3-shot; not measured "
    "here): Qwen3.5-0.8B uniform 4-bit 11.5 % against 27.0 % for a mixed 4/8-bit model at 4.5 bits "
    "per weight; 2B 48.5 % against 48.0 %; 9B no difference; 2B uniform 3-bit collapses to 6 %"
)


@cache
def micro_quality() -> dict:
    """mlxkit/data/micro/quality.json: micro's sensitivity measurement and the figures measured
    for the recipes the planner can pick (see its `about`)."""
    from mlxkit.micro import micro_dir

    return json.loads((micro_dir() / "quality.json").read_text())


def micro_pick(tier: Tier) -> tuple[str, dict | None]:
    """The recipe the planner picks for micro on `tier` with micro's sensitivity measurement
    (as a label: "auto 5 bpw", "quality"...), and its measured figures (None if not measured)."""
    from mlxkit.convert.sensitivity import Sensitivity

    from .choose import choose_plan

    s = Sensitivity.from_dict(micro_quality()["sensitivity"])
    p = choose_plan("micro", f"tier-{tier.id}", sensitivity=s)
    key = p.settings.recipe if p.bits_per_weight is None else f"auto {p.bits_per_weight:g}"
    label = key if p.bits_per_weight is None else f"{key} bpw"
    return label, micro_quality()["measured"].get(key)


def _quality_line(tier: Tier) -> str:
    label, m = micro_pick(tier)
    figures = (
        f"KL {m['kl_mean']:.4f} nats/token, top-1 {m['top1']:.1%} vs bf16, measured on "
        f"{m['tokens']:,} tokens"
        if m is not None
        else "not measured"
    )
    return f"  quality: micro (the one trained model here) gets recipe {label}: {figures}"


def format_tiers(catalog: Catalog | None = None) -> str:
    """One block per tier, one line per device, and the largest context of each size with the
    KV cache at 16, 8 and 4 bits; (u) marks an unconfirmed number."""
    catalog = catalog or load_catalog()
    lines = [
        (
            f"iPhone tiers for MLX (iOS {catalog.min_ios}+, A14 or newer; GB = 10^9 bytes; "
            "(u) = unconfirmed)"
        ),
        "usable = memory an app may use without / with the increased-memory-limit entitlement",
        "",
    ]
    header = (
        f"  {'target':<16}{'device':<19}{'SoC':<22}{'GPU':>4}{'RAM':>6}{'GB/s':>9}"
        f"{'usable GB':>16}  model ids"
    )
    for tier in catalog.tiers.values():
        lines += [_tier_line(tier), header]
        lines += [_device_line(d, tier) for d in catalog.devices_in(tier.id)]
        lines += [_contexts_line(tier), _quality_line(tier), ""]
    lines += [PUBLISHED_QUALITY + ".", "", "sources:"]
    lines += [f"  {k}: {v}" for k, v in catalog.sources.items() if k not in _mac_sources(catalog)]
    lines.append("Any other device: --memory-budget 3.5GB (check os_proc_available_memory()).")
    lines.append("Macs: mlxkit tiers --mac.")
    return "\n".join(lines)


def format_macs(catalog: Catalog | None = None) -> str:
    """One line per Mac target (chip and memory option)."""
    catalog = catalog or load_catalog()
    lines = [
        "Apple-silicon Macs (GB = 10^9 bytes; (u) = unconfirmed). usable = Metal's recommended",
        "GPU working set, about 2/3 of RAM up to 36 GB and 3/4 above; a bare chip name (m4pro)",
        "is its smallest memory option. A Mac runs mlxkit's own decode loop.",
        "",
        f"  {'target':<14}{'chip':<36}{'GB/s':>8}{'RAM GB':>8}{'usable GB':>11}",
    ]
    for mac in catalog.macs.values():
        bandwidth = _u(f"{mac.bandwidth / GB:.0f}", "bandwidth_gbs", mac.unconfirmed)
        ram = _u(str(mac.ram_gb), "memory_gb", mac.unconfirmed)
        usable = _u(f"{mac.usable_bytes / GB:.1f}", "usable_gb", mac.unconfirmed)
        lines.append(f"  {mac.id:<14}{mac.chip:<36}{bandwidth:>8}{ram:>8}{usable:>11}")
    lines += ["", "sources:"]
    lines += [
        f"  {k}: {v}" for k, v in catalog.sources.items() if k.startswith(("mac-", "metal-w"))
    ]
    return "\n".join(lines)


def _row(label: str, value: int, indent: int = 4) -> str:
    return f"{' ' * indent}{label:<{46 - indent}}{value / GB:7.3f} GB"


def _memory_lines(plan: Plan) -> list[str]:
    a = plan.activations
    kv = f"KV cache ({plan.kv_bytes_per_token:,} B/token, {KV_STEP}-token steps)"
    return [
        _row("weights", plan.weight_bytes, 2),
        *(_row(part, n, 6) for part, n in plan.weights.items() if n),
        _row(kv, plan.kv_cache_bytes, 2),
        _row("KV growth copy (one layer's buffers)", plan.kv_growth_bytes, 2),
        _row("Gated-DeltaNet conv + recurrent state", plan.state_bytes, 2),
        _row(f"activations ({a.phase} peak)", a.total, 2),
        _row(f"largest layer ({a.layer_kind})", a.layer_peak, 6),
        _row("retained buffers", a.retained, 6),
        _row("logits", a.logits, 6),
        _row("runtime reserve", plan.settings.reserve, 2),
        _row("MLX buffer cache limit", plan.settings.cache_limit, 2),
        _row("total", plan.total, 2),
        _row(usable_label(plan), plan.usable, 2),
        _row("headroom", plan.usable - plan.total, 2),
    ]


def _fit_line(plan: Plan) -> str:
    line = f"  fits: {'yes' if plan.fits else 'NO'}"
    if plan.target.kind == "mac":
        return line
    required = "required" if plan.entitlement_required else "not required"
    line += f"; {ENTITLEMENT}: {required}"
    if not plan.settings.entitlement and plan.usable_without_entitlement != plan.target.usable(
        True
    ):
        line += f" (planned without it; with it {gb(plan.target.usable(True))} usable)"
    return line


def _drafts(speed: Speed, settings: Settings) -> str:
    """mlxkit's loop: "2 drafts per round", or what auto is predicted to settle on."""
    drafts = f"{speed.num_draft} draft{'s' * (speed.num_draft != 1)} per round"
    return f"auto: {drafts} predicted fastest" if settings.num_draft == "auto" else drafts


def _mtp_line(speed: Speed, settings: Settings, phone: bool) -> str:
    """The expected MTP gain; on a phone, whether the bundle's Swift runs the drafter for it
    (not below MIN_MTP_GAIN: manifest.json → mtp.recommended)."""
    runtime = speed.runtime
    where = "on the phone" if phone else "on the Mac"
    detail = runtime.summary
    if runtime.name == "mlxkit":
        detail = f"{_drafts(speed, settings)}, greedy or sampled"
    line = (
        f"  MTP {where} in {runtime.name} ({detail}), acceptance {settings.acceptance:.0%} "
        f"(--acceptance): x{speed.mtp_speedup:.2f} -> {speed.mtp_tps:.1f} tokens/s (upper bound)"
    )
    if not phone:
        return line
    if mtp_recommended(speed.mtp_speedup):
        return line + f"; recommended (x{MIN_MTP_GAIN:.2f} or more)"
    return line + (
        f"; not recommended (below x{MIN_MTP_GAIN:.2f}): a bundle's Swift decodes without "
        "the drafter"
    )


def _speed_lines(plan: Plan) -> list[str]:
    if plan.speed is None:
        return []
    model = speed_model()
    speed = plan.speed
    lines = [
        (
            f"  decode predicted on {plan.target.label} ({model.efficiency:.0%} of "
            f"{plan.target.bandwidth / GB:.1f} GB/s + "
            f"{model.fixed_seconds * 1e3:.2f} ms per token, fitted on Macs): "
            f"{speed.decode_tps:.1f} tokens/s at {min(SHORT_CONTEXT, plan.max_context):,} tokens of "
            f"context, {speed.decode_tps_at_context:.1f} tokens/s at {plan.max_context:,} tokens"
        )
    ]
    phone = plan.target.kind != "mac"
    if speed.mtp_speedup is not None:
        lines.append(_mtp_line(speed, plan.settings, phone))
    if plan.mlxkit_speed is not None and plan.mlxkit_speed.mtp_speedup is not None:
        mlxkit = plan.mlxkit_speed
        lines.append(
            f"  MTP in mlxkit's own loop ({_drafts(mlxkit, plan.settings)}, greedy or "
            f"sampled; what a Mac runs, not this phone): x{mlxkit.mtp_speedup:.2f} -> "
            f"{mlxkit.mtp_tps:.1f} tokens/s"
        )
    return lines


def _vision_line(plan: Plan) -> str:
    """Whether the plan includes the vision tower, and what encoding one image costs."""
    if plan.checkpoint.vision is None:
        return "  vision: none (the checkpoint has no vision tower)"
    if plan.vision is None:
        return "  vision: off (text only; with --vision the plan keeps the tower or says what fits)"
    v, enc = plan.vision, plan.vision_encoding
    if plan.vision_encoder == "coreml":
        return _coreml_line(plan)
    bits = f"{plan.settings.vision_bits}-bit" if plan.settings.vision_bits else plan.settings.dtype
    attention = (
        "fused attention"
        if fused_attention(v.head_dim)
        else f"head dim {v.head_dim} has no fused MLX kernel: scores materialised"
    )
    return (
        f"  vision: on ({bits}), images up to {plan.image_tokens:,} vision tokens "
        f"({vision_patches(v, plan.image_tokens):,} patches, --image-tokens); encoding one "
        f"peaks at {gb(enc.total)} ({enc.layer_kind}; {attention})"
    )


def _coreml_line(plan: Plan) -> str:
    from mlxkit.convert.coreml import export_peak_estimate, function_name, parameter_counts

    grids, enc = plan.coreml_grids, plan.vision_encoding
    largest = max(grids, key=lambda g: g[0] * g[1])
    parameters = sum(parameter_counts(plan.vision))
    return (
        f"  vision: Core ML encoder (vision/VisionEncoder.mlpackage: {len(grids)} "
        f"function{'s' * (len(grids) != 1)}, "
        f"float16, for the Neural Engine; model/ holds no tower), images up to "
        f"{plan.image_tokens:,} vision tokens ({function_name(largest)}, --coreml-grids); "
        f"encoding one peaks at about {gb(enc.total)} ({enc.layer_kind}, scores materialised: "
        "an estimate, Core ML's own memory is not measured here); exporting it takes about "
        f"{gb(export_peak_estimate(parameters, len(grids)))} on the machine that builds the bundle"
    )


def _kv_words(bits: int, group_size: int) -> str:
    if bits == 16:
        return "KV cache at 16 bits (not quantized)"
    return f"KV cache at {bits} bits (groups of {group_size}, quantized from the first token)"


def rounding_words(rounding: str) -> str:
    """', rounding: gptq' after a recipe or a measurement of learned-rounding weights; nothing
    for nearest rounding, so that those read as before."""
    return "" if rounding == "nearest" else f", rounding: {rounding}"


def quality_words(q: dict, rounding: str = "nearest") -> str:
    """'quality vs bf16: KL …, top-1 …, measured on N tokens' (or predicted) of a plan's or a
    manifest's quality block (mlxkit.quality.quality_block), for weights rounded as `rounding`
    says: figures of another rounding's weights (a prediction, for GPTQ) are said to be so."""
    kind = q.get("rounding", "nearest")
    if q["method"] == "measured":
        return (
            f"quality vs bf16: KL {q['kl_mean']:.4f} nats/token, top-1 {q['top1']:.1%}, "
            f"measured on {q['tokens']:,} tokens (mlxkit eval, built-in set"
            f"{rounding_words(kind)})"
        )
    if kind != rounding:
        return (
            f"quality vs bf16: KL {q['kl_mean']:.4f} nats/token predicted for {kind} rounding "
            f"from the sensitivity measured on {q['tokens']:,} calibration tokens (rounding: "
            f"{rounding} is not predicted: mlxkit eval of the bundle measures it, and plans "
            "carry that measurement)"
        )
    return (
        f"quality vs bf16: KL {q['kl_mean']:.4f} nats/token, predicted from the sensitivity "
        f"measured on {q['tokens']:,} calibration tokens (top-1 and perplexity: mlxkit eval)"
    )


def _quality_lines(plan: Plan) -> list[str]:
    """The recipe's quality vs the source, measured or predicted (choose_plan); nothing when
    neither is known."""
    if plan.quality is None:
        return []
    return [f"  {quality_words(plan.quality, plan.settings.rounding)}"]


def format_plan(plan: Plan) -> str:
    s, cfg = plan.settings, plan.cfg
    bits = ", ".join(f"{part} {'/'.join(map(str, b))}" for part, b in plan.bits_per_part.items())
    chosen = f" (chosen: {plan.choice})" if plan.choice else ""
    budget = f" at {plan.bits_per_weight:g} bits per weight" if plan.bits_per_weight else ""
    budget += rounding_words(s.rounding)
    drafts = f"{plan.num_draft} draft{'s' * (plan.num_draft != 1)} per round"
    if s.num_draft == "auto" and plan.runtime.name == "mlxkit":
        drafts = f"auto, up to {drafts}"
    mtp = f"on, {drafts} in {plan.runtime.name}"
    if s.draft_vocab is not None:
        mtp += (
            f", drafting over {s.draft_vocab:,} tokens in mlxkit's loop (mtp/draft_vocab.json; "
            "MLX Swift drafts over the whole head)"
        )
    lines = [
        f"{plan.model} on {plan.target.label}",
        (
            f"  quantization: {s.recipe} recipe{budget}{chosen}, {s.bits}-bit default ({bits}); "
            f"dtype "
            f"{s.dtype}"
        ),
        *_quality_lines(plan),
        (
            f"  MTP: {mtp if s.mtp else 'off'}; prefill chunk {s.prefill_chunk} tokens; "
            + _kv_words(s.kv_bits, s.kv_group_size)
        ),
        _vision_line(plan),
        (
            f"  context: {plan.max_context:,} tokens planned; the largest that fits: "
            f"{plan.largest_context_that_fits:,} tokens"
        ),
        "",
        *_memory_lines(plan),
        "",
        _fit_line(plan),
        (
            f"  largest array: {plan.largest_array[0]}, {plan.largest_array[1] / 2**20:,.1f} MiB "
            f"(Metal cap {plan.metal_buffer_limit / 2**20:,.0f} MiB)"
        ),
        *_speed_lines(plan),
        (
            f"  model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
            f"vocab {cfg.vocab_size:,}"
        ),
    ]
    lines += [f"  warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def bundle_line(out: str, manifest: dict) -> str:
    """The line `convert --target` and `bundle build` print: the plan's own figures, then the
    plan's warnings (with a Core ML encoder: that MLX Swift cannot take its output yet)."""
    m, mtp = manifest["memory"], manifest["mtp"]
    ent = "without" if m["usable_bytes"] == m["usable_bytes_without_entitlement"] else "with"
    drafter = "MTP left out"
    if mtp["included"]:
        drafter = f"MTP included ({mtp['num_draft']} draft per round on the phone"
        if not mtp["recommended"]:
            drafter += (
                f"; not recommended: predicted x{mtp['predicted_gain']:.2f}, below "
                f"x{MIN_MTP_GAIN:.2f}, so the Swift glue does not load it"
            )
        if mtp["draft_vocab"] is not None:
            drafter += f"; a {mtp['draft_vocab']:,}-token draft vocabulary for mlxkit's loop"
        drafter += ")"
    if manifest["json_schema_path"] is not None:
        drafter += f", a JSON Schema for guided generation ({manifest['json_schema_path']})"
    coreml = manifest["vision"]["coreml"]
    if coreml is not None:
        drafter += f", a Core ML vision encoder ({len(coreml['functions'])} grids) in vision/"
    return (
        f"bundle {out}: {manifest['model']['name']} for {manifest['target']['label']}; "
        f"{manifest['quantization']['recipe']} recipe"
        f"{rounding_words(manifest['quantization']['rounding'])}, {drafter}; max context "
        f"{manifest['max_context']:,} tokens; peak {m['peak_bytes'] / GB:.2f} GB of "
        f"{m['usable_bytes'] / GB:.2f} GB usable {ent} the entitlement "
        f"({'required' if manifest['entitlement_required'] else 'not required'})"
    ) + "".join(f"\n  warning: {w}" for w in manifest["warnings"])
