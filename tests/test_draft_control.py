"""num_draft="auto" (mlxkit/draft_control.py): the controller's decisions on synthetic costs
and acceptances (no timing), its reproducibility with a seed whatever the clock says, its
cost table (`mlxkit tune`), and that decoding under it, whatever k sequence it picks, gives
plain decoding's greedy tokens and caches in float32."""

from __future__ import annotations

import itertools
import json
import math
import random
import time

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlxkit import draft_control
from mlxkit.cli import main
from mlxkit.draft_control import (
    K_MAX,
    MAX_PROBE_GAP,
    MAX_SLOPE,
    CostTable,
    DraftControl,
    DraftState,
    cached_table,
    default_costs,
    expected_tokens,
    slope,
    table_path,
)
from mlxkit.generate import stream_generate
from mlxkit.load import load
from tests.test_generate import PROMPTS, assert_mtp_cache_is_a_pass_over, fixture_model, run
from tests.test_speculative_sampling import PROMPT, SilentTokenizer, small_vocab_model


def control(per_draft: float, acceptance: float, timed: bool = False, clock=None) -> DraftControl:
    """Rounds of k drafts costing 1 + per_draft·k plain steps, `acceptance` at every depth."""
    costs = tuple(1.0 + per_draft * k for k in range(K_MAX + 1))
    table = CostTable(costs, "test", (acceptance,) * K_MAX)
    return DraftControl(table, DraftState.new(table), timed=timed, clock=clock or (lambda: 0.0))


def simulate(ctl: DraftControl, accept, rounds: int) -> list[int]:
    """The ks chosen over `rounds` rounds when `accept(round, depth)` says whether a draft at
    that depth (1-based) is accepted."""
    ks = []
    for r in range(rounds):
        k = ctl.choose()
        n = next((d - 1 for d in range(1, k + 1) if not accept(r, d)), k)
        ctl.observe(k, n)
        ks.append(k)
    return ks


def test_expected_tokens():
    assert expected_tokens([0.5, 0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5, 0.5], 2) == 1.75
    assert expected_tokens([0.8, 0.5], 2) == pytest.approx(2.2)


def test_picks_plain_when_a_verify_costs_more_than_it_gains():
    # a round of one draft costs 2 steps and yields 1.8 tokens: plain is faster
    assert control(per_draft=1.0, acceptance=0.8).best() == 0
    # the default CPU shape at 60 % acceptance: 1.6 tokens for 1.65 steps
    assert control(per_draft=0.65, acceptance=0.6).best() == 0


def test_picks_drafts_when_acceptance_is_high_and_verify_cheap():
    assert control(per_draft=0.1, acceptance=0.9).best() == 3
    assert control(per_draft=0.65, acceptance=0.8).best() == 1  # 1.8 / 1.65 beats 2.44 / 2.3


def test_stops_drafting_when_drafts_are_rejected():
    ks = simulate(control(per_draft=0.65, acceptance=0.7), lambda r, d: False, 300)
    assert ks[0] == 1 and ks[1:4] == [0, 0, 0]
    # the probes back off: one draft every MAX_PROBE_GAP rounds at the end
    assert sum(k > 0 for k in ks[100:]) <= 200 // MAX_PROBE_GAP + 1
    assert sum(k > 0 for k in ks[1:]) >= 3  # but it keeps probing


def test_recovers_when_acceptance_rises():
    ctl = control(per_draft=0.65, acceptance=0.7)
    ks = simulate(ctl, lambda r, d: r >= 200, 400)
    assert sum(k > 0 for k in ks[150:200]) <= 1  # off while drafts are rejected
    first = next(r for r in range(200, 400) if ks[r] > 0)
    assert first <= 200 + MAX_PROBE_GAP
    assert all(k > 0 for k in ks[first + 2 * MAX_PROBE_GAP :])  # on again, for good
    assert ctl.best() >= 1 and ctl.state.acceptance[0] > 0.9


def test_goes_deeper_with_probes_when_deeper_drafts_pay():
    """Starting from a prior that prefers one draft, upward probes find that 3 pay."""
    ctl = control(per_draft=0.1, acceptance=0.3)
    ks = simulate(ctl, lambda r, d: True, 200)
    assert ks[-1] == 3


def noisy_clock(seed: int):
    rng, t = random.Random(seed), [0.0]

    def clock() -> float:
        t[0] += rng.uniform(0.001, 0.2)
        return t[0]

    return clock


def test_reproducible_choice_ignores_the_clock_and_the_timed_one_does_not():
    def accept(r, d):
        return (r * 7 + d * 3) % 5 != 0

    runs = [
        simulate(control(0.65, 0.7, timed=False, clock=noisy_clock(s)), accept, 200)
        for s in range(3)
    ]
    assert runs[0] == runs[1] == runs[2]
    timed = [
        simulate(control(0.65, 0.7, timed=True, clock=noisy_clock(s)), accept, 200)
        for s in range(3)
    ]
    assert len({tuple(ks) for ks in timed}) > 1


def test_timed_choice_follows_measured_costs():
    """Timed, rounds of drafts that measure 1 + 2k plain steps next to plain steps (the
    probes) stop, at an acceptance the table says pays."""
    ks = timed_run(lambda r, k: 1.0 + 2.0 * k)
    assert ks[0] == 3 and sum(k > 0 for k in ks[-30:]) <= 1


def test_timed_costs_are_learnt_from_adjacent_rounds_not_from_drift():
    """The machine slows down 2.5x, steadily, while auto drafts: nothing to learn from that
    (drafting goes on). The plain step probes cost a fifth of the rounds next to them:
    drafting stops."""
    ks = timed_run(lambda r, k: (1.0 + 0.2 * k if k else 0.3) * (1 + r / 10))
    assert ks[:15] == [3] * 15 and ks[15] == 0  # the first probe
    assert sum(k > 0 for k in ks[-30:]) <= 1


def timed_run(seconds, rounds: int = 100) -> list[int]:
    """The ks a timed control (table: 1 + 0.2k, acceptance 0.9, every draft accepted)
    chooses when a round of k drafts takes `seconds(round, k)`."""
    t = [0.0]
    ctl = control(per_draft=0.2, acceptance=0.9, timed=True, clock=lambda: t[0])
    ks = []
    for r in range(rounds):
        k = ctl.choose()
        t[0] += seconds(r, k)
        ctl.observe(k, k)
        ks.append(k)
    return ks


def test_one_stalled_round_does_not_stop_drafting():
    ks = timed_run(lambda r, k: 50.0 if r == 15 else 1.0 + 0.2 * k)  # 15: a plain step probe
    assert ks[15] == 0 and ks[16:47] == [3] * 31


def noisy_run(
    true_slope: float,
    acceptance,
    *,
    prior_slope: float,
    jitter: float = 0.15,
    rounds: int = 1500,
    seed: int = 0,
) -> list[int]:
    """The ks a timed control chooses (table: 1 + prior_slope·k, acceptance 0.7) on a noisy
    shared machine: a round of k drafts takes (1 + true_slope·k) plain steps times a speed that
    drifts 4x (0.5..2) over a few hundred rounds, times log-normal jitter (σ `jitter`; a plain
    step on micro here: 0.05, with tails to 2x), one round in six stalled 1.5-5x; each draft is
    accepted with chance `acceptance(round)` while the ones before it were."""
    rng, t = random.Random(seed), [0.0]
    ctl = control(per_draft=prior_slope, acceptance=0.7, timed=True, clock=lambda: t[0])
    ks = []
    for r in range(rounds):
        k = ctl.choose()
        stall = rng.uniform(1.5, 5.0) if rng.random() < 1 / 6 else 1.0
        speed = 2 ** math.sin(r / 50)
        t[0] += (1 + true_slope * k) * speed * rng.lognormvariate(0, jitter) * stall
        a = acceptance(r)
        ctl.observe(k, next((d for d in range(k) if rng.random() >= a), k))
        ks.append(k)
    return ks


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("jitter", [0.15, 0.5])
def test_noisy_timings_agreeing_with_the_table_leave_it_the_choice(seed, jitter):
    """4-bit micro here: plain is the fastest (a draft costs 1.3 steps), the default shape says
    so (1.05), and single rounds' seconds are noisy: auto stays plain but for rare probes (it
    drafted in half the rounds when it learnt from each pair of adjacent rounds)."""
    ks = noisy_run(1.3, lambda r: 0.82, prior_slope=1.05, jitter=jitter, seed=seed)
    assert sum(k == 0 for k in ks) >= 0.95 * len(ks)


@pytest.mark.parametrize("seed", range(4))
def test_noisy_timings_that_clearly_differ_overrule_the_table(seed):
    """The table says drafting pays (a GPU's shape, 0.45 steps a draft), the rounds say a
    draft costs 1.3 steps: auto stops drafting, through the noise and the drift."""
    ks = noisy_run(1.3, lambda r: 0.82, prior_slope=0.45, seed=seed)
    assert ks[0] > 0
    assert sum(k == 0 for k in ks[500:]) >= 0.9 * len(ks[500:])


@pytest.mark.parametrize("seed", range(4))
def test_noisy_timings_high_acceptance_and_cheap_drafts_keep_drafting(seed):
    """0.2 steps a draft at 90 % acceptance: drafting always pays, and 3 drafts pay most,
    which the table (0.65 a draft: 2) does not know and the rounds show."""
    ks = noisy_run(0.2, lambda r: 0.9, prior_slope=0.65, seed=seed)
    assert sum(k > 0 for k in ks) >= 0.97 * len(ks)
    assert sum(k == 3 for k in ks[500:]) >= 0.8 * len(ks[500:])


@pytest.mark.parametrize("seed", range(4))
def test_noisy_timings_recovers_when_acceptance_rises(seed):
    ks = noisy_run(0.3, lambda r: 0.0 if r < 500 else 0.9, prior_slope=0.65, seed=seed)
    assert sum(k > 0 for k in ks[100:500]) <= 400 // MAX_PROBE_GAP + 2  # probes only
    first = next(r for r in range(500, len(ks)) if ks[r] > 0)
    assert first <= 500 + MAX_PROBE_GAP
    after = ks[first + 2 * MAX_PROBE_GAP :]
    assert sum(k > 0 for k in after) >= 0.95 * len(after)


def test_measured_draft_costs_carry_over_and_only_a_timed_run_reads_them():
    """A model's next timed run starts from the draft costs its last one measured (the state
    `last_state` keeps); a reproducible run on the same state keeps to the table."""
    timed = control(per_draft=0.45, acceptance=0.82, timed=True)
    timed.state.slopes[:] = [1.3] * 8
    assert timed.best() == 0 and timed.costs()[1] == pytest.approx(2.3)
    again = DraftControl(timed.table, timed.state, timed=False)
    assert again.best() == 2 and again.costs() == list(timed.table.round_s)
    assert again.report().costs == "test" and timed.report().costs == "measured"


def test_short_timed_runs_keep_the_probe_schedule():
    """Twelve generations of 16 rounds on one model (a server's short requests), drafts never
    accepted: the probe gap keeps growing across them instead of every generation probing at
    its 16th round (the 0.8B-shaped benchmark: one probe in each 16-token generation)."""
    table = default_costs()
    state, t = DraftState.new(table), [0.0]
    ks = []
    for _ in range(12):
        ctl = DraftControl(table, state, timed=True, clock=lambda: t[0])
        for _ in range(16):
            ks.append(ctl.choose())
            t[0] += table.round_s[ks[-1]]  # rounds take what the table says
            ctl.observe(ks[-1], 0)
    assert ks[0] == 1 and sum(k > 0 for k in ks[16:]) <= 176 // 32


def test_slope_bounds():
    assert slope(1, 2.0, 0, 1.0) == pytest.approx(1.0)  # 1 + r = 2
    assert slope(0, 1.0, 2, 2.0) == pytest.approx(0.5)  # 1 + 2r = 2
    assert slope(3, 2.95, 2, 2.3) == pytest.approx(0.65)  # (1 + 3r) / (1 + 2r)
    assert slope(1, 0.5, 0, 1.0) == 0.0  # a draft round quicker than a plain step
    assert slope(2, 2.5, 1, 1.0) == MAX_SLOPE  # more than 2 rounds of 1 draft: no finite r
    assert slope(1, 0.4, 2, 1.0) == MAX_SLOPE


# ------------------------------------------------------------------ through the decode loop


def recording(monkeypatch) -> list[int]:
    """Records every k DraftControl.choose returns."""
    chosen = []
    choose = DraftControl.choose

    def spy(self):
        chosen.append(choose(self))
        return chosen[-1]

    monkeypatch.setattr(DraftControl, "choose", spy)
    return chosen


def test_same_seed_same_rounds_and_text_whatever_the_clock(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model, tok = small_vocab_model(), SilentTokenizer()
    chosen = recording(monkeypatch)
    outcomes = []
    for clock_seed in range(3):
        monkeypatch.setattr(time, "perf_counter", noisy_clock(clock_seed))
        tokens = [
            r.token
            for r in stream_generate(model, tok, PROMPT, max_tokens=40, temperature=1.0, seed=7)
        ]
        outcomes.append((tokens, list(chosen)))
        chosen.clear()
    assert outcomes[0] == outcomes[1] == outcomes[2]
    assert len(set(outcomes[0][1])) > 1  # the run did change its k


def test_deterministic_without_a_seed_ignores_the_clock(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model, tok = small_vocab_model(), SilentTokenizer()
    chosen = recording(monkeypatch)
    runs = []
    for clock_seed in range(2):
        monkeypatch.setattr(time, "perf_counter", noisy_clock(clock_seed))
        last = list(stream_generate(model, tok, PROMPT, max_tokens=30, deterministic=True))[-1]
        runs.append((list(chosen), last.drafting.costs))
        chosen.clear()
    assert runs[0] == runs[1] and runs[0][1] == "default"


@pytest.fixture(scope="module")
def micro_f32():
    return load("micro", dtype=mx.float32)


@pytest.mark.parametrize("seed", [None, 3])
def test_auto_greedy_equals_plain_on_micro_in_float32(micro_f32, seed, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model, tokenizer = micro_f32
    chosen = recording(monkeypatch)
    for prompt in PROMPTS[:3]:
        plain = [
            r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=48, mtp=False)
        ]
        auto = list(stream_generate(model, tokenizer, prompt, max_tokens=48, seed=seed))
        assert [r.token for r in auto] == plain, prompt
        report = auto[-1].drafting
        assert report.auto and sum(report.rounds[1:]) > 0
        assert len(report.speedup) == K_MAX + 1 and report.speedup[0] == 1.0
    # seeded: the default costs make the same choices every time, plain steps among them
    assert seed is None or 0 in chosen


# a k sequence with every transition: plain runs of several steps, single plain steps, and
# rounds of 1..3 drafts in every order
SCRIPT = [0, 0, 0, 2, 0, 1, 3, 3, 0, 1, 2, 0, 0, 3, 1]


@pytest.mark.parametrize("kind", ["rejecting", "accepting", "mixed"])
def test_any_k_sequence_gives_plain_tokens_and_caches(kind, monkeypatch):
    """Lossless whatever auto picks: plain steps between rounds keep the MTP head's pending
    states, which the next round consumes; tokens, main caches and the MTP cache all end as
    plain decoding's and as an MTP pass over the sequence."""
    model, tokenizer = fixture_model(kind)
    script, choose = itertools.cycle(SCRIPT), DraftControl.choose
    monkeypatch.setattr(DraftControl, "choose", lambda self: choose(self) * 0 + next(script))
    for prompt in PROMPTS[:3]:
        plain, plain_cache = run(model, tokenizer, prompt, max_tokens=30, mtp=False)
        auto, auto_cache = run(model, tokenizer, prompt, max_tokens=30)
        assert [r.token for r in auto] == [r.token for r in plain], prompt
        assert auto_cache.tokens == plain_cache.tokens
        for a, b in zip(auto_cache.main, plain_cache.main):
            for key, value in b.state.items():
                assert mx.abs(a.state[key] - value).max().item() <= 1e-5, key
        assert_mtp_cache_is_a_pass_over(model, auto_cache)
        assert sum(auto[-1].drafting.rounds[1:]) > 0 and auto[-1].drafting.rounds[0] > 0


def test_fixed_num_draft_reports_its_rounds():
    model, tokenizer = fixture_model("accepting")
    responses, _ = run(model, tokenizer, PROMPTS[0], max_tokens=20, num_draft=2)
    report = responses[-1].drafting
    assert not report.auto and report.rounds == (0, 0, 7, 0)  # 3 tokens a round, 20 in all
    assert min(report.acceptance[:2]) > 0.8 and report.speedup == ()  # from 0.7, rising
    assert report.summary().startswith("fixed drafts: rounds k=2 7x; ms per round k=2 ")
    assert all(r.drafting is None for r in responses[:-1])


# ------------------------------------------------------------------------- the cost table


def test_tune_writes_the_table_seeded_runs_use(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model, _ = load("micro", dtype=mx.float32)
    assert cached_table(model) is None
    result = CliRunner().invoke(main, ["tune", "micro", "--max-tokens", "8", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    path = table_path(load("micro")[0])  # bfloat16, as `mlxkit tune micro` loads it
    assert path.parent == tmp_path / "mlxkit" / "tune" and str(path) in result.output
    record = json.loads(path.read_text())
    assert len(record["round_ms"]) == K_MAX + 1 and all(ms > 0 for ms in record["round_ms"])
    assert record["recipe"] == "bfloat16" and len(record["acceptance"]) == K_MAX
    assert cached_table(model) is None  # float32 is another recipe: its own table
    # a seeded run reads the table: a table where drafting costs nothing makes it draft 3
    record["round_ms"] = [1.0] * (K_MAX + 1)
    record["acceptance"] = [0.9] * K_MAX
    path.write_text(json.dumps(record))
    bf16, tokenizer = load("micro")
    last = list(stream_generate(bf16, tokenizer, "def f(x):", max_tokens=8, seed=1))[-1]
    assert last.drafting.costs == "tune" and last.drafting.rounds[3] > 0


def test_a_damaged_table_is_ignored_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model, tokenizer = load("micro")
    path = table_path(model)
    path.parent.mkdir(parents=True)
    path.write_text('{"version": 1, "round_ms": [1, 2]}')
    with pytest.warns(UserWarning, match="run `mlxkit tune` again"):
        last = list(stream_generate(model, tokenizer, "def f(x):", max_tokens=4, seed=1))[-1]
    assert last.drafting.costs == "default"


def test_the_digest_names_the_weights():
    a, _ = load("micro")
    b, _ = load("micro")
    assert draft_control.model_digest(a) == draft_control.model_digest(b)
    c, _ = load("micro")
    c.load_weights([("mtp.norm.weight", c.mtp.norm.weight + 1)], strict=False)
    assert draft_control.model_digest(c) != draft_control.model_digest(a)


# ------------------------------------------------------------------------------ the server


def test_the_server_counts_rounds_per_k_and_reports_the_last_choice(monkeypatch, tmp_path):
    from mlxkit.serve.engine import Engine

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from mlxkit.serve.protocol import usage

    model, tokenizer = load("micro")
    engine = Engine(model, tokenizer, max_queue=1, prompt_cache_bytes=0)
    reports = []
    for seed in (1, 2):
        last = list(stream_generate(model, tokenizer, "def f(x):", max_tokens=12, seed=seed))[-1]
        engine._count(last, 0)
        reports.append(last.drafting)
    mtp = engine.stats()["mtp"]
    assert mtp["num_draft"] == "auto"
    assert mtp["rounds_per_k"] == [a + b for a, b in zip(*(r.rounds for r in reports))]
    assert mtp["last"] == reports[-1].as_dict() and mtp["last"]["costs"] == "default"
    block = usage(5, 0, 12, last.drafted, last.accepted, last.drafting)
    assert block["mtp"]["rounds_per_k"] == list(last.drafting.rounds)
    assert "mtp" not in usage(5, 0, 12, 0, 0)
