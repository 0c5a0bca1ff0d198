"""`plan()`: will this model, quantized this way, run on that iPhone — and with how much context?

Everything is computed from the model config alone (no weights): the weight bytes come from
the converter's own `planned_tensors` (so the planner's bytes are the bytes `convert`
writes, tensor for tensor), the runtime bytes from `memory.py`, the speed from
`roofline.py`. The total is compared with the memory an app may use on the target; when
nothing fits, `PlanRefused` says what would.

Total = weights + Gated-DeltaNet state (fixed) + KV cache (as allocated, at the planned
context plus the k draft positions verification appends) + one layer's old KV buffers while
the cache grows + activation peak + runtime reserve + MLX buffer-cache limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from mlxkit.errors import ConfigError, MlxkitError
from mlxkit.load import load_config, resolve_model_dir
from mlxkit.models.qwen3_5 import TextConfig
from mlxkit.presets import HUB_REPOS, sizes, text_config

from . import memory as mem
from .devices import ENTITLEMENT, GB, Target, load_catalog, resolve_target
from .roofline import EFFICIENCY, WeightReads, mtp_speedup, step_bytes, tokens_per_second

# Runtime reserve: what the app process holds besides MLX arrays. Not measurable here
# (no iPhone); an itemised estimate, overridable with `reserve=`:
#   ~40 MB  app binary, Swift runtime, UIKit/SwiftUI dirty memory of a small app
#   ~100 MB tokenizer: swift-transformers parses the 11 MB tokenizer.json (248k vocab and
#           merges) into Swift strings and dictionaries
#   ~60 MB  MLX runtime: Metal library and compiled pipelines, command buffers, residency
#   ~56 MB  margin for allocator fragmentation and the app's own UI/data
DEFAULT_RESERVE = 256 * 2**20
# MLX keeps freed buffers for reuse up to this limit; on a phone they count against the
# jetsam limit, so the limit is set small (what the MLX Swift example apps use) and counted.
DEFAULT_CACHE_LIMIT = 20 * 2**20
MIN_CONTEXT = 512  # a plan with less room than this is refused: not a useful chat
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
MAX_DRAFT = 8


class PlanRefused(MlxkitError):
    """Nothing fits; the message names what would. `plan` holds the failed attempt."""

    def __init__(self, message: str, plan: Plan | None = None):
        super().__init__(message)
        self.plan = plan


@dataclass(frozen=True)
class Settings:
    recipe: str = "uniform"
    bits: int | None = 4
    group_size: int | None = None
    dtype: str = "bfloat16"
    entitlement: bool = True
    mtp: bool = True
    num_draft: int = 2
    prefill_chunk: int = 512
    acceptance: float = 0.7
    reserve: int = DEFAULT_RESERVE
    cache_limit: int = DEFAULT_CACHE_LIMIT


@dataclass
class Plan:
    model: str  # "Qwen3.5-2B", or the model directory's name
    size: str | None  # preset size when the config is one of them
    cfg: TextConfig = field(repr=False)
    target: Target = field(repr=False)
    settings: Settings
    weights: dict[str, int]  # bytes per part: embeddings, layers, mtp, vision
    bits_per_part: dict[str, list]
    weight_reads: WeightReads
    kv_bytes_per_token: int  # all KV layers, logical (before the 256-token rounding)
    state_bytes: int
    context: int  # the context the totals below are computed at
    kv_cache_bytes: int  # as allocated at context + num_draft
    kv_growth_bytes: int
    activations: mem.Activations
    usable: int  # with the entitlement if allowed
    usable_without_entitlement: int
    max_context: int  # the largest context that fits (0: none)
    largest_array: tuple[str, int]
    decode_tps: float | None  # at a short (1k-token) context
    decode_tps_at_context: float | None
    mtp_speedup: float | None
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
    def fits(self) -> bool:
        return self.total <= self.usable and self.largest_array[1] <= self.metal_buffer_limit

    @property
    def entitlement_required(self) -> bool:
        return self.total > self.usable_without_entitlement

    @property
    def mtp_tps(self) -> float | None:
        if self.decode_tps is None or self.mtp_speedup is None:
            return None
        return self.decode_tps * self.mtp_speedup


# ---------------------------------------------------------------------------- inputs


def _size_of(cfg: TextConfig) -> str | None:
    for s in sizes():
        p = TextConfig.from_dict(text_config(s))
        if (p.hidden_size, p.num_hidden_layers, p.intermediate_size, p.vocab_size) == (
            cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size,
        ):  # fmt: skip
            return s
    return None


def resolve_config(size_or_config: str | Path | dict | TextConfig) -> tuple[TextConfig, str]:
    """(config, label) from a preset size ("2b"), a model directory or config.json, a config
    dict, or a TextConfig."""
    if isinstance(size_or_config, TextConfig):
        return size_or_config, _label(size_or_config, None)
    if isinstance(size_or_config, dict):
        cfg = TextConfig.from_dict(size_or_config)
        return cfg, _label(cfg, None)
    name = str(size_or_config)
    if name.lower() in sizes():
        return TextConfig.from_dict(text_config(name.lower())), _label(None, name.lower())
    path = Path(name).expanduser()
    if path.name == "config.json" and path.is_file():
        path = path.parent
    if name != "micro" and not path.is_dir():
        raise ConfigError(
            f"{name!r} is neither a size ({', '.join(sizes())}, micro) nor a model directory "
            "with a config.json"
        )
    model_dir = resolve_model_dir(name if name == "micro" else path)
    cfg = load_config(model_dir)
    return cfg, _label(cfg, None, model_dir.name)


def _label(cfg: TextConfig | None, size: str | None, fallback: str = "custom") -> str:
    size = size or (_size_of(cfg) if cfg is not None else None)
    return HUB_REPOS[size].split("/")[1] if size else fallback


def _validate(settings: Settings, context: int | None, cfg: TextConfig) -> None:
    if context is not None and context <= 0:
        raise ConfigError(f"context must be a positive number of tokens, got {context}")
    if context is not None and context > cfg.max_position_embeddings:
        raise ConfigError(
            f"context {context} exceeds the model's {cfg.max_position_embeddings} positions"
        )
    if settings.prefill_chunk <= 0:
        raise ConfigError(f"prefill chunk must be positive, got {settings.prefill_chunk}")
    if not 0.0 <= settings.acceptance <= 1.0:
        raise ConfigError(f"acceptance must be within [0, 1], got {settings.acceptance}")
    if not 1 <= settings.num_draft <= MAX_DRAFT:
        raise ConfigError(f"num_draft must be between 1 and {MAX_DRAFT}, got {settings.num_draft}")
    if settings.dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {settings.dtype}")
    if settings.reserve < 0 or settings.cache_limit < 0:
        raise ConfigError("reserve and cache limit must not be negative")


# ------------------------------------------------------------------------------ weights


@dataclass(frozen=True)
class _Weights:
    by_part: dict[str, int]
    bits_per_part: dict[str, list]
    reads: WeightReads
    largest: tuple[str, int]


def weight_plan(cfg: TextConfig, settings: Settings) -> _Weights:
    """Bytes per part, straight from the converter's `planned_tensors` (no formula here)."""
    from mlxkit.convert.quantize import load_recipe

    from mlxkit.layout import bytes_by_part, model_parameters, part_of, planned_tensors

    recipe = load_recipe(settings.recipe, settings.bits, settings.group_size)
    tensors = planned_tensors(cfg, recipe, include_mtp=settings.mtp, dtype=settings.dtype)
    by_part = bytes_by_part(tensors)
    bits: dict[str, set] = {p: set() for p in by_part}
    for path, shape in model_parameters(cfg, settings.mtp and cfg.mtp_num_hidden_layers > 0):
        if len(shape) == 2:
            rule = recipe.rule_for(path, shape)
            bits[part_of(path)].add(rule[0] if rule else settings.dtype)
    head = (
        "language_model.model.embed_tokens."
        if cfg.tie_word_embeddings
        else "language_model.lm_head."
    )
    reads = WeightReads(
        layers=by_part["layers"],
        lm_head=sum(t.nbytes for t in tensors if t.path.startswith(head)),
        mtp=by_part["mtp"],
    )
    big = max(tensors, key=lambda t: t.nbytes)
    order = lambda b: (isinstance(b, str), b if isinstance(b, int) else 0)
    return _Weights(
        by_part,
        {p: sorted(v, key=order) for p, v in bits.items() if v},
        reads,
        (big.path, big.nbytes),
    )


# ------------------------------------------------------------------------------ the plan


def _at_context(
    cfg: TextConfig, label: str, size: str | None, target: Target, s: Settings, w: _Weights,
    context: int,
) -> Plan:  # fmt: skip
    b = DTYPE_BYTES[s.dtype]
    k = s.num_draft if s.mtp else 0
    held = context + k  # verification appends k draft positions before trimming
    kv_buffer = mem.kv_layer_buffer_bytes(cfg, held, b)
    candidates = [
        w.largest,
        ("KV cache buffer of one layer", kv_buffer),
        ("attention score matrix (prefill)",
         mem.score_matrix_bytes(cfg, min(s.prefill_chunk, context), mem.kv_allocated_tokens(held),
                                b)),
    ]  # fmt: skip
    reads_ok = target.bandwidth is not None
    short = min(1024, context)
    plan = Plan(
        model=label,
        size=size,
        cfg=cfg,
        target=target,
        settings=s,
        weights=w.by_part,
        bits_per_part=w.bits_per_part,
        weight_reads=w.reads,
        kv_bytes_per_token=mem.kv_bytes_per_token(cfg, b, s.mtp),
        state_bytes=mem.linear_state_bytes(cfg, b),
        context=context,
        kv_cache_bytes=mem.kv_cache_bytes(cfg, held, b, s.mtp),
        kv_growth_bytes=2 * kv_buffer,
        activations=mem.activations(
            cfg, s.prefill_chunk, context, mem.kv_allocated_tokens(held), b, s.mtp, s.num_draft
        ),
        usable=target.usable(s.entitlement),
        usable_without_entitlement=target.usable(False),
        max_context=0,
        largest_array=max(candidates, key=lambda c: c[1]),
        decode_tps=(
            tokens_per_second(target.bandwidth, step_bytes(cfg, w.reads, short, b))
            if reads_ok else None
        ),
        decode_tps_at_context=(
            tokens_per_second(target.bandwidth, step_bytes(cfg, w.reads, context, b))
            if reads_ok else None
        ),
        mtp_speedup=(
            mtp_speedup(cfg, w.reads, short, b, s.acceptance, s.num_draft)
            if s.mtp and cfg.mtp_num_hidden_layers else None
        ),
    )  # fmt: skip
    return plan


def _fits_at(cfg, target, s, w, context) -> bool:
    p = _at_context(cfg, "", None, target, s, w, context)
    return p.total <= p.usable and p.largest_array[1] <= target.metal_buffer_limit


def largest_context(cfg: TextConfig, target: Target, s: Settings, w: _Weights) -> int:
    """The largest context whose plan fits (0 if not even one token does). Memory grows
    monotonically with the context, in 256-token steps for the KV cache, so a bisection
    over [1, max_position_embeddings] finds the exact boundary."""
    lo, hi = 0, cfg.max_position_embeddings
    if _fits_at(cfg, target, s, w, hi):
        return hi
    while hi - lo > 1:  # invariant: fits(lo) (or lo == 0), not fits(hi)
        mid = (lo + hi) // 2
        if _fits_at(cfg, target, s, w, mid):
            lo = mid
        else:
            hi = mid
    return lo


def _evaluate(
    cfg: TextConfig, label: str, size: str | None, target: Target, s: Settings,
    context: int | None,
) -> Plan:  # fmt: skip
    w = weight_plan(cfg, s)
    best = largest_context(cfg, target, s, w)
    ctx = (
        context if context is not None else max(best, min(MIN_CONTEXT, cfg.max_position_embeddings))
    )
    p = _at_context(cfg, label, size, target, s, w, ctx)
    p.max_context = best
    guaranteed = load_catalog().metal_buffer_guaranteed
    if p.largest_array[1] > guaranteed:
        p.warnings.append(
            f"largest array ({p.largest_array[0]}, {p.largest_array[1] / 2**20:.0f} MiB) is over "
            f"the {guaranteed // 2**20} MiB Metal guarantees on every device"
        )
    if target.unconfirmed:
        p.warnings.append(f"unconfirmed target numbers: {', '.join(target.unconfirmed)}")
    return p


def plan(
    size_or_config: str | Path | dict | TextConfig,
    target: str | Target | None = None,
    *,
    bits: int | None = 4,
    recipe: str = "uniform",
    group_size: int | None = None,
    dtype: str = "bfloat16",
    context: int | None = None,
    entitlement: bool = True,
    mtp: bool = True,
    prefill_chunk: int = 512,
    acceptance: float = 0.7,
    num_draft: int = 2,
    memory_budget: int | str | None = None,
    reserve: int = DEFAULT_RESERVE,
    cache_limit: int = DEFAULT_CACHE_LIMIT,
    name: str | None = None,
) -> Plan:
    """Plans `size_or_config` on `target` (a device or tier name, see `mlxkit tiers`; or None
    with `memory_budget`). With `context` None the plan is made at the largest context that
    fits. Raises PlanRefused, naming what would fit, when nothing does."""
    cfg, label = resolve_config(size_or_config)
    label = name or label
    size = size_or_config.lower() if isinstance(size_or_config, str) and (
        size_or_config.lower() in sizes()) else _size_of(cfg)  # fmt: skip
    tgt = target if isinstance(target, Target) else resolve_target(target, memory_budget)
    s = _settings(recipe=recipe, bits=bits, group_size=group_size, dtype=dtype,
                  entitlement=entitlement, mtp=mtp, num_draft=num_draft,
                  prefill_chunk=prefill_chunk, acceptance=acceptance, reserve=reserve,
                  cache_limit=cache_limit)  # fmt: skip
    _validate(s, context, cfg)
    p = _evaluate(cfg, label, size, tgt, s, context)
    if not p.fits:
        from .refusal import refusal_message

        raise PlanRefused(refusal_message(p, context), p)
    return p


def evaluate(
    size_or_config: str | Path | dict | TextConfig,
    target: str | Target,
    context: int | None = None,
    name: str | None = None,
    **settings,
) -> Plan:
    """Like `plan` but never refuses: returns the plan with `fits` False (for tables)."""
    cfg, label = resolve_config(size_or_config)
    tgt = target if isinstance(target, Target) else resolve_target(target)
    s = _settings(**settings)
    _validate(s, context, cfg)
    return _evaluate(cfg, name or label, _size_of(cfg), tgt, s, context)


def _settings(**values) -> Settings:
    """Settings with the recipe's default bits filled in (bits=None means "the recipe's")."""
    s = Settings(**values)
    if s.bits is None:
        from mlxkit.convert.quantize import load_recipe

        s = replace(s, bits=load_recipe(s.recipe, None, s.group_size).bits)
    return s


def gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


__all__ = [
    "DEFAULT_CACHE_LIMIT", "DEFAULT_RESERVE", "EFFICIENCY", "ENTITLEMENT", "MIN_CONTEXT",
    "Plan", "PlanRefused", "Settings", "evaluate", "plan", "resolve_config",
]  # fmt: skip
