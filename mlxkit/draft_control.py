"""How many tokens each MTP round drafts: a fixed `num_draft`, or `num_draft="auto"`, which
before every round picks the k in 0..K_MAX with the most expected tokens per second.

Why: whether drafting pays depends on the machine, the weights and the prompt. Where a verify
pass over k+1 positions costs nearly k+1 decode steps (this project's CPU, 4-bit weights) MTP
loses even at 80 % acceptance; where it costs about one step (an Apple GPU) it wins
(benchmarks/results/decode.md). A user should not have to know which case they are in.

The model of a round of k drafts:
- expected tokens 1 + a_1 + a_1·a_2 + … + a_1⋯a_k, a_j being the chance that draft j is
  accepted once drafts 1..j−1 were: an exponentially weighted mean of what the verify passes
  accepted at depth j, seeded from `mlxkit tune`'s run on this model, the model's last run in
  this process (timing allowed), or DEFAULT_ACCEPTANCE;
- its cost, the seconds of a round of k drafts (k = 0: one plain decode step): `mlxkit tune`'s
  table for this machine, model and recipe, else a default shape (`default_costs`); when timing
  may be used, corrected by the seconds of adjacent rounds of different ks (COST_ALPHA).
k = 0 is plain decoding and says nothing about acceptance, so every so many rounds auto probes
one round of one draft more than it would (`choose`).

Reproducible: with `timed=False` (a seed given, or deterministic=True) the choice uses the
table and past acceptance only; rounds are still timed, but only for the report. The choice
never looks at the tokens, only at how many drafts were accepted, and every round is an exact
greedy or speculative-sampling round whatever its k: decoding stays lossless.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlxkit.models.qwen3_5 import Model
from mlxkit.response import DraftReport

K_MAX = 3  # auto drafts at most this many per round (k = 3 was never the best here)
DEFAULT_ACCEPTANCE = 0.7  # per depth, before anything is measured (micro: 0.84 at depth 1)
ALPHA = 0.1  # weight of a new acceptance observation (0.25 left drafting on short streaks)
PROBE_ALPHA = 0.5  # a probe's new depth: probes are rare, so a rise shows within two of them
# Timed, a k's cost is learnt only where a round of it follows a round of another k: the ratio
# of the two rounds' seconds, next to each other in time. A shared machine's speed drifts 2-4x
# within minutes, so costs timed apart are not comparable; rounds side by side are.
COST_ALPHA, PAIR_BOUND = 0.5, 10.0  # in log space; a pair's ratio bounded to 10x either way
PROBE_GAP, MAX_PROBE_GAP = 16, 64  # rounds between probes; doubles while probes change nothing
# A round of k drafts costs about 1 + r·k decode steps. CPU: measured in the loop on micro
# (bf16: rounds of 1.70, 2.34, 2.97 steps for k = 1, 2, 3; 4-bit: 2.1 steps for k = 1, as
# quantized matmuls are linear in the rows too). GPU: mlx-vlm's Qwen3.5-4B 4-bit, 1.32x at
# 73.5 % acceptance with 2 drafts, gives ~0.45.
DRAFT_COST = {"cpu": 0.65, "cpu quantized": 1.05, "gpu": 0.45}


@dataclass(frozen=True)
class CostTable:
    """Seconds of a round of k drafts for k = 0..K_MAX (units do not matter: only ratios do),
    where they come from ("tune" or "default"), and the acceptance per depth tune measured."""

    round_s: tuple[float, ...]
    source: str
    acceptance: tuple[float, ...] | None = None


def default_costs(quantized: bool = False) -> CostTable:
    """The cost shape of DRAFT_COST for the device MLX runs on, in decode steps."""
    if mx.default_device().type == mx.DeviceType.gpu:
        r = DRAFT_COST["gpu"]
    else:
        r = DRAFT_COST["cpu quantized" if quantized else "cpu"]
    return CostTable(tuple(1.0 + r * k for k in range(K_MAX + 1)), "default")


@dataclass
class DraftState:
    """What auto has learnt: acceptance per depth and (timing allowed) the relative cost of a
    round of each k, started from the table. Kept per model between runs that may use
    timing."""

    acceptance: list[float]
    cost: list[float]

    @classmethod
    def new(cls, table: CostTable, k_max: int = K_MAX) -> DraftState:
        seed = list(table.acceptance or ())[:k_max]
        seed += [DEFAULT_ACCEPTANCE] * (k_max - len(seed))
        return cls(seed, list(table.round_s))


def expected_tokens(acceptance: list[float], k: int) -> float:
    """Tokens a round of k drafts yields on average: the verified token plus each draft times
    the chance that it and every draft before it is accepted."""
    total = run = 1.0
    for a in acceptance[:k]:
        run *= a
        total += run
    return total


class DraftControl:
    """Picks each round's k (`choose`) and learns from its outcome (`observe`). `fixed` k:
    always that k, still measured for the report."""

    def __init__(
        self,
        table: CostTable,
        state: DraftState,
        *,
        timed: bool,
        fixed: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.table, self.state, self.timed, self.fixed, self.clock = (
            table,
            state,
            timed,
            fixed,
            clock,
        )
        self.k_max = len(state.acceptance)
        self._rounds = [0] * (self.k_max + 1)
        self._seconds = [0.0] * (self.k_max + 1)
        self._last: float | None = None  # when the last round ended
        self._previous: tuple[int, float] | None = None  # the last round's k and seconds
        self._gap, self._since_probe = PROBE_GAP, 0
        self._best: int | None = None  # the best k at the last choice
        self._probe_from: int | None = None  # the best k when the round in flight is a probe
        self._probed = False  # the last choice was a probe: did it change the best k?
        self._probes = 0

    @classmethod
    def fixed_k(cls, k: int) -> DraftControl:
        table = default_costs()
        return cls(table, DraftState.new(table, max(k, K_MAX)), timed=False, fixed=k)

    def cost(self, k: int) -> float:
        """The cost of a round of k drafts as the choice sees it (only ratios matter)."""
        return self.state.cost[k] if self.timed else self.table.round_s[k]

    def rate(self, k: int) -> float:
        """Expected tokens per second (or per table unit) with k drafts."""
        return expected_tokens(self.state.acceptance, k) / self.cost(k)

    def best(self) -> int:
        """The k of the highest expected rate (the smaller k on a tie)."""
        rates = [self.rate(k) for k in range(min(self.k_max, K_MAX) + 1)]
        return rates.index(max(rates))

    def choose(self) -> int:
        """The k of the next round: the best one, except that every `_gap` rounds a probe
        drafts one more (timed: alternately a plain step, so k = 0's cost stays measured). The
        gap doubles while probes leave the best k as it was and resets when it changes."""
        if self._last is None:
            self._last = self.clock()
        if self.fixed is not None:
            return self.fixed
        best = self.best()
        if best != self._best:
            self._gap = PROBE_GAP
        elif self._probed:
            self._gap = min(2 * self._gap, MAX_PROBE_GAP)
        self._best, self._probed = best, False
        self._since_probe += 1
        if self._since_probe < self._gap:
            return best
        candidates = [best + 1] if best < K_MAX else []
        if self.timed and best > 0:
            candidates.append(0)
        if not candidates:
            return best
        self._since_probe, self._probed = 0, True
        self._probes += 1
        self._probe_from = best
        return candidates[self._probes % len(candidates)]

    def observe(self, k: int, accepted: int) -> None:
        """A round of k drafts ended with `accepted` of them accepted: learn acceptance at the
        depths it tested (each accepted one, and the first rejected) and its cost."""
        now = self.clock()
        seconds, self._last = now - (self._last if self._last is not None else now), now
        self._rounds[k] += 1
        self._seconds[k] += seconds
        probe_from = self._probe_from if k > 0 else None
        if k > 0:
            self._probe_from = None
        for depth in range(min(accepted + 1, k)):
            alpha = PROBE_ALPHA if probe_from is not None and depth >= probe_from else ALPHA
            a = self.state.acceptance
            a[depth] += alpha * (float(depth < accepted) - a[depth])
        if self.timed:
            self._learn_cost(k, seconds)

    def _learn_cost(self, k: int, seconds: float) -> None:
        """A round of k right after a round of another k: move k's cost towards what the
        pair's seconds say, relative to the other's cost."""
        seconds = max(seconds, 1e-6)  # a clock that did not move: not a free round
        if self._previous is not None and self._previous[0] != k:
            before, before_s = self._previous
            cost = self.state.cost
            ratio = min(max(seconds / before_s, 1 / PAIR_BOUND), PAIR_BOUND)
            target = cost[before] * ratio
            cost[k] *= (target / cost[k]) ** COST_ALPHA
        self._previous = (k, seconds)

    def report(self) -> DraftReport:
        """What was chosen and why, for the last response of a generation."""
        n = min(self.k_max, K_MAX) + 1
        auto = self.fixed is None
        return DraftReport(
            auto=auto,
            rounds=tuple(self._rounds),
            round_ms=tuple(1e3 * s / r if r else None for s, r in zip(self._seconds, self._rounds)),
            acceptance=tuple(self.state.acceptance),
            costs="measured" if self.timed else self.table.source,
            speedup=tuple(self.rate(k) / self.rate(0) for k in range(n)) if auto else (),
        )


# ----------------------------------------------------------- the cost table `mlxkit tune` caches

TUNE_VERSION = 1  # of the files `mlxkit tune` writes


@dataclass
class _Notes:
    """What is kept per model object while it lives: its digest, and what auto learnt in its
    last run that could use timing (the next such run starts from it)."""

    ref: weakref.ref
    digest: str | None = None
    state: DraftState | None = None


_notes: dict[int, _Notes] = {}


def _notes_of(model: Model) -> _Notes:
    key = id(model)
    notes = _notes.get(key)
    if notes is None or notes.ref() is not model:
        notes = _notes[key] = _Notes(weakref.ref(model, lambda _: _notes.pop(key, None)))
    return notes


def last_state(model: Model, table: CostTable) -> DraftState:
    """The DraftState this model's last timed auto run left (a new one, seeded from the
    table's acceptance, the first time): the 'model's last run' auto starts from."""
    notes = _notes_of(model)
    if notes.state is None:
        notes.state = DraftState.new(table)
    return notes.state


def tune_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlxkit" / "tune"


@functools.cache
def machine_id() -> str:
    """What decides the costs besides the model: CPU (or chip), cores, MLX and its device."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1] for ln in cpuinfo.read_text().splitlines() if "model name" in ln
        ]
        cpu = names[0].strip() if names else cpu
    device = mx.default_device().type.name
    return f"{platform.system()} {cpu}, {os.cpu_count()} cores, mlx {mx.__version__} {device}"


def model_digest(model: Model) -> str:
    """A digest of the model object (config, every decoding parameter's name, shape, dtype and
    first values), computed once per object: the model may have come from any directory or
    bundle. The vision tower is left out: reading its first values would read its weights,
    which a text generation never needs."""
    notes = _notes_of(model)
    if notes.digest is not None:
        return notes.digest
    h = hashlib.sha256(repr(model.config).encode())
    for name, p in tree_flatten(model.parameters()):
        if name.startswith("vision_tower."):
            continue
        head = np.array(p.reshape(-1)[:16].astype(mx.float32))
        h.update(f"{name} {p.shape} {p.dtype}".encode() + head.tobytes())
    notes.digest = h.hexdigest()[:16]
    return notes.digest


def model_is_quantized(model: Model) -> bool:
    """Whether any weight is quantized (a quantized matmul costs more per row on a CPU)."""
    return any(hasattr(m, "bits") for _, m in model.named_modules())


def recipe(model: Model) -> str:
    """The weights' bits and group sizes, then the dtype of what is not quantized."""
    quantized = {
        f"{m.bits}-bit g{m.group_size}" for _, m in model.named_modules() if hasattr(m, "bits")
    }
    dtype = str(model.language_model.model.norm.weight.dtype).removeprefix("mlx.core.")
    return " + ".join([*sorted(quantized), dtype])


def table_path(model: Model) -> Path:
    key = f"{machine_id()}|{model_digest(model)}|{recipe(model)}"
    return tune_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def cached_table(model: Model) -> CostTable | None:
    """This machine's table for the model, or None where `mlxkit tune` has not made one. A
    damaged file is ignored with a warning (run `mlxkit tune` again)."""
    path = table_path(model)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        round_ms = tuple(float(x) for x in record["round_ms"])
        acceptance = tuple(float(x) for x in record["acceptance"])
        usable = record["version"] == TUNE_VERSION and len(round_ms) == K_MAX + 1
        usable = usable and all(x > 0 for x in round_ms) and all(0 <= a <= 1 for a in acceptance)
    except (OSError, ValueError, KeyError, TypeError):
        usable = False
    if not usable:
        warnings.warn(f"{path}: not a tune table of this mlxkit; run `mlxkit tune` again")
        return None
    return CostTable(round_ms, "tune", acceptance)
