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
  table for this machine, model and recipe, else a default shape (`default_costs`). When timing
  may be used, rounds can overrule the table, but only together: each round that follows a run
  of rounds of another k gives one estimate of the draft cost r in cost = 1 + r·k decode steps
  (`slope`, against the median of that run's last rounds, next to it in time: a shared
  machine's speed drifts 2-4x within minutes), the last SAMPLES estimates are kept, and their
  median replaces the table only where it makes another k the best and a sign test over the
  estimates says so clearly (`_decide`); until then probes test that k. One round against its
  neighbour is too noisy on a shared machine to learn a cost ratio from
  (benchmarks/results/decode.md, 2026-12-07: auto drafted in half the rounds where plain
  decoding was the fastest); many are not. A timed run's report says "measured" costs.
k = 0 is plain decoding and says nothing about acceptance, so every so many rounds auto probes
one round of one draft more than it would (`choose`); timed, the schedule goes on across the
model's runs (`Probes`).

Reproducible: with `timed=False` (a seed given, or deterministic=True) the choice uses the
table and past acceptance only; rounds are still timed, but only for the report. The choice
never looks at the tokens, only at how many drafts were accepted, and every round is an exact
greedy or speculative-sampling round whatever its k: decoding stays lossless.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import statistics
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
# Timed: a round right after a run of rounds of another k is compared with the median of that
# run's last RUN_SPAN rounds; the last SAMPLES comparisons (draft costs in decode steps, bounded
# to 0..MAX_SLOPE) overrule the table when more of them vote for another k than SIGN_Z
# standard deviations of a fair coin allow (at least 4 of 4, 6 of 8, 11 of 16, 22 of 32).
RUN_SPAN, SAMPLES, SIGN_Z, MAX_SLOPE = 5, 32, 2.0, 4.0
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


def slope(k: int, seconds: float, ref_k: int, ref_seconds: float) -> float:
    """The draft cost r (decode steps per draft) that makes a round of k drafts taking
    `seconds` and rounds of ref_k taking `ref_seconds` fit cost = 1 + r·k, bounded to
    0..MAX_SLOPE. It grows with seconds / ref_seconds where k > ref_k and shrinks where k <
    ref_k; a ratio past what any finite r gives (a round of more drafts over (k / ref_k)x the
    other's seconds, say) is MAX_SLOPE."""
    rho = seconds / ref_seconds
    denominator = k - rho * ref_k
    if denominator * (k - ref_k) <= 0:
        return MAX_SLOPE
    return min(max((rho - 1) / denominator, 0.0), MAX_SLOPE)


@dataclass
class Probes:
    """When the next probe comes (`DraftControl.choose`): part of the state, so that runs of a
    few tokens each (a server's requests) do not each start the schedule again."""

    gap: int = PROBE_GAP
    since: int = 0  # rounds since the last probe
    best: int | None = None  # the best k at the last choice
    probed: bool = False  # the last choice was a probe: did it change the best k?
    count: int = 0


@dataclass
class DraftState:
    """What auto has learnt: acceptance per depth, started from the table, (timing allowed)
    the last SAMPLES draft costs the rounds measured (`slope`), and the probe schedule. Kept
    per model between runs that may use timing."""

    acceptance: list[float]
    slopes: list[float]
    probes: Probes

    @classmethod
    def new(cls, table: CostTable, k_max: int = K_MAX) -> DraftState:
        seed = list(table.acceptance or ())[:k_max]
        seed += [DEFAULT_ACCEPTANCE] * (k_max - len(seed))
        return cls(seed, [], Probes())


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
        self._run: tuple[int, list[float]] | None = None  # k and seconds of the current run
        self._probe_from: int | None = None  # the best k when the round in flight is a probe

    @classmethod
    def fixed_k(cls, k: int) -> DraftControl:
        table = default_costs()
        return cls(table, DraftState.new(table, max(k, K_MAX)), timed=False, fixed=k)

    def costs(self) -> list[float]:
        """The cost of a round of each k as the choice sees it (only ratios matter): the
        table's, unless the draft costs timed rounds measured clearly make another k the best
        (`_decide`)."""
        return self._decide()[0]

    def _decide(self) -> tuple[list[float], int | None]:
        """The costs the choice uses and the k a probe should test, if any. The median of the
        measured draft costs may make another k than the table's the best; they take over
        only where a sign test (each draft cost votes for the k that is best at it) says so
        by SIGN_Z standard deviations of a fair coin. Until it does, that k is the suspect
        the probes test: rounds of it next to rounds of the table's k are the evidence that
        settles the question."""
        n = min(self.k_max, K_MAX) + 1
        table = list(self.table.round_s[:n])
        if not self.timed or not self.state.slopes:
            return table, None
        measured = [1.0 + statistics.median(self.state.slopes) * k for k in range(n)]
        b, m = self.best_at(table), self.best_at(measured)
        if m == b:
            return table, None
        tokens_b, tokens_m = (expected_tokens(self.state.acceptance, k) for k in (b, m))
        votes = sum(
            1 if tokens_m / (1 + r * m) > tokens_b / (1 + r * b) else -1 for r in self.state.slopes
        )
        if votes >= SIGN_Z * math.sqrt(len(self.state.slopes)):
            return measured, None
        return table, m

    def rates(self, costs: list[float]) -> list[float]:
        """Expected tokens per second (or per cost unit) of each k at these costs."""
        return [expected_tokens(self.state.acceptance, k) / c for k, c in enumerate(costs)]

    def best_at(self, costs: list[float]) -> int:
        """The k of the highest expected rate at these costs (the smaller k on a tie)."""
        rates = self.rates(costs)
        return rates.index(max(rates))

    def best(self) -> int:
        """The k of the highest expected rate under `costs`."""
        return self.best_at(self.costs())

    def choose(self) -> int:
        """The k of the next round: the best one, except that every `gap` rounds a probe
        drafts one more (timed: alternately a plain step, so k = 0's cost stays measured), or,
        timed, tests the suspect `_decide` names. The gap doubles while probes leave the best k
        as it was and resets when it changes or while there is a suspect."""
        if self._last is None:
            self._last = self.clock()
        if self.fixed is not None:
            return self.fixed
        costs, suspect = self._decide()
        best = self.best_at(costs)
        probes = self.state.probes
        if best != probes.best or suspect is not None:
            probes.gap = PROBE_GAP
        elif probes.probed:
            probes.gap = min(2 * probes.gap, MAX_PROBE_GAP)
        probes.best, probes.probed = best, False
        probes.since += 1
        if probes.since < probes.gap:
            return best
        if suspect is not None:
            candidates = [suspect]
        else:
            candidates = [best + 1] if best < K_MAX else []
            if self.timed and best > 0:
                candidates.append(0)
        if not candidates:
            return best
        probes.since, probes.probed = 0, True
        probes.count += 1
        self._probe_from = best
        return candidates[probes.count % len(candidates)]

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
        """A round of k right after a run of rounds of another k: one draft cost, from its
        seconds against the median of that run's last RUN_SPAN rounds."""
        seconds = max(seconds, 1e-6)  # a clock that did not move: not a free round
        if self._run is not None and self._run[0] == k:
            self._run[1].append(seconds)
            del self._run[1][:-RUN_SPAN]
            return
        if self._run is not None:
            ref_k, ref_seconds = self._run
            slopes = self.state.slopes
            slopes.append(slope(k, seconds, ref_k, statistics.median(ref_seconds)))
            del slopes[:-SAMPLES]
        self._run = (k, [seconds])

    def report(self) -> DraftReport:
        """What was chosen and why, for the last response of a generation."""
        auto = self.fixed is None
        rates = self.rates(self.costs())
        return DraftReport(
            auto=auto,
            rounds=tuple(self._rounds),
            round_ms=tuple(1e3 * s / r if r else None for s, r in zip(self._seconds, self._rounds)),
            acceptance=tuple(self.state.acceptance),
            costs="measured" if self.timed else self.table.source,
            speedup=tuple(r / rates[0] for r in rates) if auto else (),
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
