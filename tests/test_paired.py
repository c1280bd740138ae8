"""Paired comparison of evaluation arms (samplemix.evaluation.paired) and the verdict built
on it. Every expected number is worked by hand or with scipy's own paired t test.

The issue's measurement (proxies on the shared corpus, seeds 0–2):
    vanilla       6.8261  6.7808  6.7413
    samplemix 0.8 6.8070  6.7479  6.7221
differences −0.0191, −0.0329, −0.0192: mean −0.02373, sd 0.007938, SE 0.004583,
t = −5.18; unpaired the two arms' stds (0.043, 0.044) swamp the −0.024.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from samplemix.evaluation.paired import critical_t, paired, spearman
from samplemix.reporting.evaluation_report import ProxyRun, comparisons, verdict

VANILLA = {0: 6.8261, 1: 6.7808, 2: 6.7413}
ALPHA08 = {0: 6.8070, 1: 6.7479, 2: 6.7221}


def test_the_issue_measurement_is_resolved_when_paired() -> None:
    p = paired("a0.8", ALPHA08, "vanilla", VANILLA)
    d = np.array([ALPHA08[s] - VANILLA[s] for s in (0, 1, 2)])
    assert p.seeds == (0, 1, 2) and p.diffs == pytest.approx(tuple(d))
    assert p.mean == pytest.approx(d.mean()) and p.se == pytest.approx(d.std(ddof=1) / math.sqrt(3))
    ref = stats.ttest_rel(list(ALPHA08.values()), list(VANILLA.values()))
    assert p.t == pytest.approx(ref.statistic)  # about -5.2
    assert p.resolved and ref.pvalue < 0.05
    half = stats.t.ppf(0.975, 2) * p.se
    assert p.ci == pytest.approx((p.mean - half, p.mean + half))
    # MDD at 3 seeds: (t_.975,2 + t_.80,2) · SE = (4.303 + 1.061) · SE.
    assert p.mdd == pytest.approx((4.302653 + 1.060660) * p.se, rel=1e-5)
    # Unpaired, the same numbers are not resolved: Welch's test cannot see it.
    assert stats.ttest_ind(list(ALPHA08.values()), list(VANILLA.values())).pvalue > 0.05


def test_identical_arms_are_never_resolved() -> None:
    same = paired("b", VANILLA, "vanilla", VANILLA)
    assert same.mean == 0 and same.se == 0 and not same.resolved
    assert math.isnan(same.t)


def test_a_constant_shift_is_resolved_and_one_seed_is_not_judged() -> None:
    shifted = paired("c", {s: v + 0.5 for s, v in VANILLA.items()}, "vanilla", VANILLA)
    assert shifted.resolved and shifted.mean == pytest.approx(0.5) and shifted.t == math.inf
    one = paired("d", {0: 7.0}, "vanilla", VANILLA)
    assert one.n == 1 and not one.resolved and math.isnan(one.se) and math.isnan(one.mdd)
    # Only the seeds both arms ran are paired.
    assert paired("e", {1: 7.0, 2: 7.1, 9: 1.0}, "vanilla", VANILLA).seeds == (1, 2)


def test_critical_values_and_spearman() -> None:
    assert critical_t(3) == pytest.approx((4.302653, 1.060660), rel=1e-5)
    assert spearman({"a": 1, "b": 2, "c": 3}, {"a": 10, "b": 30, "c": 20}) == pytest.approx(0.5)
    assert math.isnan(spearman({"a": 1, "b": 2}, {"a": 1, "b": 2}))  # too few arms


def runs_of(variant: str, losses: dict[int, float]) -> list[ProxyRun]:
    return [
        ProxyRun(variant, s, {"web": v}, v, None, v, 1.0, 1.0, 100, False)
        for s, v in losses.items()
    ]


def test_verdict_resolves_a_planted_control_and_not_two_identical_mixtures() -> None:
    # Seed noise shared by every arm (6.83, 6.78, 6.74) plus a small per-arm wobble.
    runs = runs_of("vanilla", VANILLA)
    runs += runs_of(
        "copy", {s: v + w for (s, v), w in zip(VANILLA.items(), (2e-4, -1e-4, 0), strict=True)}
    )
    runs += runs_of("control-one-domain-code", {s: v + 0.6 + 0.01 * s for s, v in VANILLA.items()})
    lines = verdict(runs, "vanilla", controls=["control-one-domain-code"])
    control = next(line for line in lines if line.startswith("Control "))
    assert "resolved as worse than vanilla" in control and "NOT" not in control
    assert not any(line.startswith("Inconclusive") for line in lines)
    pair = comparisons(runs, "vanilla")["copy"]
    assert not pair.resolved
    copy_line = next(line for line in lines if "copy − vanilla" in line or "vanilla − copy" in line)
    assert "not resolved" in copy_line and "minimum detectable difference" in copy_line


def test_an_unresolved_control_makes_the_verdict_inconclusive() -> None:
    runs = runs_of("vanilla", VANILLA)
    runs += runs_of("samplemix", ALPHA08)
    # A "control" whose differences straddle 0: the instrument did not see it.
    runs += runs_of("control-repeat-5", {0: 6.84, 1: 6.77, 2: 6.745})
    lines = verdict(runs, "vanilla", controls=["control-repeat-5"])
    assert any("NOT resolved" in line for line in lines)
    assert lines[-1].startswith("Inconclusive") and "control-repeat-5" in lines[-1]
    # The controls never win: the best is samplemix whatever the control scores.
    assert "samplemix" in lines[0]


def test_instrument_agreement_leaves_the_controls_out() -> None:
    from samplemix.reporting.evaluation_report import NgramRun, instrument_lines, variant_stats

    runs = runs_of("a", {0: 6.0, 1: 6.1}) + runs_of("b", {0: 6.2, 1: 6.3})
    runs += runs_of("c", {0: 6.4, 1: 6.5}) + runs_of("ctl", {0: 9.0, 1: 9.1})
    # The n-gram ranks a, b, c the other way round; the control agrees with the proxy.
    grams = [
        NgramRun(v, 4, o, {1: 9.9, 2: 9.9}, None)
        for v, o in [("a", 5.3), ("b", 5.2), ("c", 5.1), ("ctl", 7.0)]
    ]
    (line,) = instrument_lines(variant_stats(runs), grams, ["ctl"])
    assert "disagree" in line and "3 variants" in line and "ρ = -1.00" in line
    with_control = instrument_lines(variant_stats(runs), grams)[0]
    # Ranks 1, 2, 3, 4 against 3, 2, 1, 4: ρ = 1 − 6·8 / (4·15) = 0.2.
    assert "4 variants (" in with_control and "ρ = 0.20" in with_control
