"""The phone's expected MTP gain (issue 24 item 4): the planner predicts it from its cost model
(roofline.py: 1 greedy draft per round in mlx-swift-lm, at --acceptance), prints it, and below
MIN_MTP_GAIN the bundle's manifest says so (mtp.recommended false, predicted_gain) and its
Swift skips the drafter. Also: the planner's --num-draft takes "auto"."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from mlxkit.ios_bridge.plan import evaluate
from mlxkit.ios_bridge.report import format_plan
from mlxkit.ios_bridge.roofline import MIN_MTP_GAIN, mtp_recommended

from mlxkit.cli import main
from mlxkit.draft_control import K_MAX


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_the_recommendation_threshold():
    assert MIN_MTP_GAIN == 1.05
    assert mtp_recommended(1.05) and mtp_recommended(1.3) and mtp_recommended(None)
    assert not mtp_recommended(1.049) and not mtp_recommended(0.7)


@pytest.mark.parametrize("acceptance, recommended", [(0.7, True), (0.3, False)])
def test_the_plan_prints_the_phone_gain_and_whether_the_drafter_runs(acceptance, recommended):
    """0.8B on an iPhone 15: at 70 % acceptance one draft is predicted to pay; at 30 % the
    draft step (whose lm_head is a third of the weights) costs more than it gains."""
    p = evaluate("0.8b", "iphone15", 4096, acceptance=acceptance)
    gain = p.speed.mtp_speedup
    assert p.speed.num_draft == 1 and p.speed.runtime.name == "mlx-swift-lm"
    assert (gain >= MIN_MTP_GAIN) is recommended and (1.1 < gain < 1.3 if recommended else gain < 1)
    text = format_plan(p)
    assert f"acceptance {acceptance:.0%} (--acceptance): x{gain:.2f}" in text
    if recommended:
        assert "; recommended (x1.05 or more)" in text
    else:
        assert "; not recommended (below x1.05): a bundle's Swift decodes without the drafter" in (
            text
        )


def test_a_mac_plan_says_nothing_of_recommendation():
    text = format_plan(evaluate("0.8b", "m4pro-24gb", 4096, acceptance=0.3))
    assert "MTP on the Mac" in text and "recommended (" not in text


def test_the_planner_takes_num_draft_auto():
    """auto: the speed of the k in 1..K_MAX the cost model predicts fastest, the memory of
    K_MAX drafts (what auto may draft in a round)."""
    auto = evaluate("2b", "m4pro-24gb", 4096, num_draft="auto")
    fixed = {k: evaluate("2b", "m4pro-24gb", 4096, num_draft=k) for k in range(1, K_MAX + 1)}
    best = max(fixed, key=lambda k: fixed[k].speed.mtp_speedup)
    assert auto.speed.num_draft == best and auto.speed.mtp_speedup == fixed[best].speed.mtp_speedup
    assert auto.num_draft == K_MAX and auto.total == fixed[K_MAX].total
    # on a phone mlx-swift-lm drafts one per round whatever it says; mlxkit's loop is shown too
    phone = evaluate("2b", "iphone15", 4096, num_draft="auto")
    assert phone.num_draft == 1 and phone.mlxkit_speed.num_draft == best

    result = run("plan", "--size", "2b", "--target", "m4pro-24gb", "--num-draft", "auto")
    assert result.exit_code == 0, result.output
    assert f"MTP: on, auto, up to {K_MAX} drafts per round in mlxkit" in result.output
    assert f"(auto: {best} drafts per round predicted fastest, greedy or sampled)" in (
        result.output
    )
