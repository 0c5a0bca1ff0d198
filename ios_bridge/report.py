"""Plain-text renderings for the CLI: the device table and a plan's breakdown."""

from __future__ import annotations

from .devices import ENTITLEMENT, GB, Catalog, load_catalog
from .memory import KV_STEP
from .plan import Plan
from .roofline import EFFICIENCY


def _u(value: str, key: str, unconfirmed: tuple[str, ...]) -> str:
    return f"{value}(u)" if key in unconfirmed else value


def format_tiers(catalog: Catalog | None = None) -> str:
    """One block per tier, one line per device; (u) marks an unconfirmed number."""
    catalog = catalog or load_catalog()
    lines = [
        (
            f"iPhone tiers for MLX (iOS {catalog.min_ios}+, A14 or newer; GB = 10^9 bytes; "
            "(u) = unconfirmed)"
        ),
        "usable = memory an app may use without / with the increased-memory-limit entitlement",
        "",
    ]
    header = (f"  {'target':<16}{'device':<19}{'SoC':<22}{'GPU':>4}{'RAM':>6}"
              f"{'GB/s':>9}{'usable GB':>16}  model ids")  # fmt: skip
    for tier in catalog.tiers.values():
        u = tier.unconfirmed
        lines.append(
            f"tier-{tier.id}: {tier.name if tier.memory in tier.name else tier.name + ' ' + tier.memory}"
            ", usable "
            f"{_u(f'{tier.usable_bytes / GB:.1f}', 'usable_gb', u)} / "
            f"{_u(f'{tier.usable_bytes_entitled / GB:.1f}', 'usable_gb_entitled', u)} GB, "
            f"Metal buffer cap {_u(str(tier.metal_buffer_limit // 2**20), 'metal_buffer_limit_mb', u)}"
            " MiB"
        )
        lines.append(header)
        for d in catalog.devices_in(tier.id):
            du = d.unconfirmed
            usable = (
                f"{_u(f'{d.usable_bytes / GB:.1f}', 'usable_gb', du + u)} / "
                f"{_u(f'{d.usable_bytes_entitled / GB:.1f}', 'usable_gb_entitled', du + u)}"
            )
            lines.append(
                f"  {d.id:<16}{d.name:<19}{d.soc:<22}{d.gpu_cores:>4}"
                f"{_u(str(d.ram_gb), 'ram_gb', du):>6}"
                f"{_u(f'{d.bandwidth / GB:.1f}', 'bandwidth_gbs', du):>9}"
                f"{usable:>16}  {_u(', '.join(d.model_ids), 'model_ids', du)}"
            )  # fmt: skip
        lines.append("")
    lines.append("sources:")
    lines += [f"  {k}: {v}" for k, v in catalog.sources.items()]
    lines.append("Any other device: --memory-budget 3.5GB (check os_proc_available_memory()).")
    return "\n".join(lines)


def _gb(n: float) -> str:
    return f"{n / GB:7.3f} GB"


def _row(label: str, value: int, indent: int = 4) -> str:
    return f"{' ' * indent}{label:<{46 - indent}}{_gb(value)}"


def format_plan(p: Plan) -> str:
    s = p.settings
    cfg = p.cfg
    bits = ", ".join(f"{part} {'/'.join(map(str, b))}" for part, b in p.bits_per_part.items())
    a = p.activations
    lines = [
        f"{p.model} on {p.target.label}",
        f"  quantization: {s.recipe} recipe, {s.bits}-bit default ({bits}); dtype {s.dtype}",
        (f"  MTP: {f'on, {s.num_draft} drafts per round' if s.mtp else 'off'}; "
        f"prefill chunk {s.prefill_chunk}"),
        f"  context: {p.context:,} tokens planned; the largest that fits: {p.max_context:,}",
        "",
        _row("weights", p.weight_bytes, 2),
        *(_row(part, n, 6) for part, n in p.weights.items() if n),
        _row(f"KV cache ({p.kv_bytes_per_token:,} B/token, {KV_STEP}-token steps)",
             p.kv_cache_bytes, 2),
        _row("KV growth copy (one layer's buffers)", p.kv_growth_bytes, 2),
        _row("Gated-DeltaNet conv + recurrent state", p.state_bytes, 2),
        _row(f"activations ({a.phase} peak)", a.total, 2),
        _row(f"largest layer ({a.layer_kind})", a.layer_peak, 6),
        _row("retained buffers", a.retained, 6),
        _row("logits", a.logits, 6),
        _row("runtime reserve", s.reserve, 2),
        _row("MLX buffer cache limit", s.cache_limit, 2),
        _row("total", p.total, 2),
        _row(f"usable ({'with' if s.entitlement else 'without'} the entitlement)", p.usable, 2),
        _row("headroom", p.usable - p.total, 2),
        "",
        (f"  fits: {'yes' if p.fits else 'NO'}; {ENTITLEMENT}: "
        f"{'required' if p.entitlement_required else 'not required'}"
        f"{'' if s.entitlement else ' (not allowed by --no-entitlement)'}"),
        (f"  largest array: {p.largest_array[0]}, {p.largest_array[1] / 2**20:,.1f} MiB "
        f"(Metal cap {p.metal_buffer_limit / 2**20:,.0f} MiB)"),
    ]  # fmt: skip
    if p.decode_tps is not None:
        lines.append(
            f"  decode (roofline, {EFFICIENCY:.0%} of {p.target.bandwidth / GB:.1f} GB/s): "
            f"{p.decode_tps:.1f} tokens/s at 1k context, {p.decode_tps_at_context:.1f} at "
            f"{p.context:,}"
        )
        if p.mtp_speedup is not None:
            lines.append(
                f"  with MTP ({s.num_draft} drafts, acceptance {s.acceptance:.0%}): "
                f"x{p.mtp_speedup:.2f} -> {p.mtp_tps:.1f} tokens/s (upper bound)"
            )
    lines.append(f"  model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                 f"vocab {cfg.vocab_size:,}")  # fmt: skip
    lines += [f"  warning: {w}" for w in p.warnings]
    return "\n".join(lines)
