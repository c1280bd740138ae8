"""Tests for samplemix.reporting.evaluation_report: statistics over seeds, verdict, Markdown, CSV,
plots and files. Every expected number is worked by hand:

    variant    objectives (= heldout)   mean   std (ddof=1)   web losses          code
    vanilla    2.0, 2.2, 2.4            2.2    0.2            2.0, 2.2, 2.4       1.0 ×3
    samplemix  1.7, 1.8, 1.9            1.8    0.1            1.6, 1.7, 1.8       1.8, 1.9, 2.0
    quadmix    1.75, 1.85, 1.95         1.85   0.1            1.5, 1.6, 1.7       2.0, 2.1, 2.2

Paired by seed: samplemix − vanilla = −0.3, −0.4, −0.5: mean −0.4, sd 0.1, SE 0.1/√3 =
0.0577, t = −6.9; 95% CI −0.4 ± 4.303·0.0577 = [−0.6484, −0.1516]: resolved; MDD
(4.303 + 1.061)·0.0577 = 0.3097. samplemix − quadmix = −0.05 at every seed: SE 0, resolved.
Per domain the lowest mean is quadmix on web (1.6) and vanilla on code (1.0).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math

import pytest

from samplemix.reporting.evaluation_report import (
    PLOTS,
    ProxyRun,
    evaluation_markdown,
    evaluation_plots,
    results_csv,
    variant_stats,
    verdict,
    write_evaluation,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(
    variant: str,
    seed: int,
    objective: float,
    web: float = 2.0,
    code: float = 1.0,
    target: float | None = None,
    cached: bool = False,
) -> ProxyRun:
    return ProxyRun(
        variant=variant,
        seed=seed,
        losses={"web": web, "code": code},
        heldout=objective if target is None else (web + code) / 2,
        target=target,
        objective=objective if target is None else target,
        seconds=12.5 + seed,
        epochs=1.25,
        mixture_tokens=1000 + seed,
        cached=cached,
    )


RUNS = [
    run("vanilla", 0, 2.0, web=2.0, code=1.0),
    run("vanilla", 1, 2.2, web=2.2, code=1.0),
    run("vanilla", 2, 2.4, web=2.4, code=1.0),
    run("samplemix", 0, 1.7, web=1.6, code=1.8),
    run("samplemix", 1, 1.8, web=1.7, code=1.9, cached=True),
    run("samplemix", 2, 1.9, web=1.8, code=2.0),
    run("quadmix", 0, 1.75, web=1.5, code=2.0),
    run("quadmix", 1, 1.85, web=1.6, code=2.1),
    run("quadmix", 2, 1.95, web=1.7, code=2.2),
]


def line_about(lines: list[str], variant: str) -> str:
    (hit,) = [line for line in lines if f" {variant} by Δ" in line]
    return hit


# ---- statistics ---------------------------------------------------------------------------


def test_variant_stats_means_and_sample_stds() -> None:
    stats = variant_stats(RUNS)
    assert list(stats) == ["vanilla", "samplemix", "quadmix"]  # first appearance
    v = stats["vanilla"]
    assert v.n == 3
    assert v.mean == pytest.approx(2.2) and v.std == pytest.approx(0.2)
    assert v.heldout == pytest.approx((2.2, 0.2))
    assert v.target is None
    assert v.domains["web"] == pytest.approx((2.2, 0.2))
    assert v.domains["code"] == pytest.approx((1.0, 0.0))
    assert stats["samplemix"].std == pytest.approx(0.1)
    assert stats["quadmix"].mean == pytest.approx(1.85)


def test_single_seed_has_zero_std_and_target_stats() -> None:
    stats = variant_stats(
        [run("a", 0, 0, target=3.0), run("b", 0, 0, target=2.0), run("b", 1, 0, target=2.5)]
    )
    assert stats["a"].n == 1 and stats["a"].std == 0.0 and stats["a"].mean == 3.0
    assert stats["b"].target == pytest.approx((2.25, math.sqrt(0.125)))
    assert stats["b"].heldout == pytest.approx((1.5, 0.0))


def test_variant_stats_refuses_double_seeds_and_mixed_targets() -> None:
    with pytest.raises(ValueError, match="'vanilla' seed 0 appears twice"):
        variant_stats([run("vanilla", 0, 2.0), run("vanilla", 0, 2.1)])
    with pytest.raises(ValueError, match="target"):
        variant_stats([run("a", 0, 2.0, target=3.0), run("b", 0, 2.0)])


def test_from_summary_reads_run_proxy_summary() -> None:
    summary = {
        "losses": {"web": 2.5, "code": 1.5},
        "heldout": 2.0,
        "target": None,
        "objective": 2.0,
        "curve": [[0, 9.0], [10, 4.0]],
        "steps": 10,
        "tokens_trained": 5120,
        "mixture_tokens": 4096,
        "epochs": 1.25,
        "n_params": 123,
        "device": "cpu",
        "seconds": 3.5,
    }
    r = ProxyRun.from_summary("samplemix-a0.8", 7, summary, cached=True)
    assert r == ProxyRun(
        "samplemix-a0.8", 7, {"web": 2.5, "code": 1.5}, 2.0, None, 2.0, 3.5, 1.25, 4096, True
    )
    with_target = ProxyRun.from_summary("v", 0, {**summary, "target": 3.0, "objective": 3.0}, False)
    assert with_target.target == 3.0 and with_target.objective == 3.0
    with pytest.raises(ValueError, match="epochs"):
        ProxyRun.from_summary("v", 0, {k: v for k, v in summary.items() if k != "epochs"}, False)


# ---- verdict ------------------------------------------------------------------------------


def test_verdict_pairs_by_seed() -> None:
    lines = verdict(RUNS, baseline="vanilla")
    assert len(lines) == 3
    assert "samplemix, 1.8000 ± 0.1000" in lines[0]
    runner_up = lines[1]
    assert runner_up.startswith("Against the runner-up: samplemix − quadmix = -0.0500")
    assert "paired over seeds 0, 1, 2" in runner_up and ": resolved" in runner_up
    base = lines[2]
    assert base.startswith("Against the baseline: samplemix − vanilla = -0.4000")
    assert "per seed -0.3000, -0.4000, -0.5000" in base
    assert "95% CI [-0.6484, -0.1516]" in base and "paired SE 0.0577" in base
    assert "t = -6.9" in base and "minimum detectable difference here is 0.3097" in base


def test_verdict_not_resolved_when_the_ci_includes_zero() -> None:
    # samplemix − close = -0.12, +0.08, -0.22: mean -0.0867, SE 0.0882, CI includes 0.
    close = [run("close", s, y) for s, y in enumerate((1.82, 1.72, 2.12))]
    lines = verdict([*RUNS[3:6], *close], baseline=None)
    assert "samplemix − close = -0.0867" in lines[1]
    assert "not resolved, the CI includes 0" in lines[1]
    assert "minimum detectable difference at these seeds is 0.4730" in lines[1]


def test_verdict_single_seed_cannot_be_judged() -> None:
    lines = verdict([run("a", 0, 2.5), run("b", 0, 2.0)], baseline=None)
    assert "b, 2.0000 nats/token over 1 seed." in lines[0]
    assert len(lines) == 2 and "b − a = -0.5000" in lines[1]
    assert "needs at least 2 seeds" in lines[1] and "cannot be judged" in lines[1]


def test_verdict_baseline_roles() -> None:
    two = verdict(RUNS[:6], baseline="vanilla")
    assert len(two) == 2 and two[1].startswith("Against the baseline and runner-up:")
    best = verdict(RUNS[:6], baseline="samplemix")
    assert "samplemix is the baseline: no variant beats it" in best[-1]
    gone = verdict(RUNS, baseline="temperature")
    assert "temperature was not evaluated" in gone[-1]
    assert verdict([], None) == ["No proxy runs to compare."]
    alone = verdict(RUNS[:3], "vanilla")
    assert "nothing to compare" in alone[-1]


def test_verdict_ranks_a_diverged_variant_last() -> None:
    lines = verdict([run("nan", 0, math.nan), run("ok", 0, 3.0)], None)
    assert "ok, 3.0000" in lines[0] and "a loss is not finite" in lines[1]


# ---- Markdown -----------------------------------------------------------------------------


def cells(markdown: str, first: str) -> list[str]:
    """The cells of the first table row starting with ``first``."""
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {first} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_markdown_sections_labels_and_best_per_domain() -> None:
    stats = variant_stats(RUNS)
    labels = {"samplemix": "SampleMix (α=0.8)"}
    md = evaluation_markdown(
        RUNS,
        stats,
        labels,
        {"steps": 200, "lr": 0.0003},
        {"evaluate_methods.png": "evaluate_methods.png"},
        baseline="vanilla",
    )
    for section in (
        "# Proxy evaluation",
        "## Verdict",
        "## Variants",
        "## Per-domain",
        "## Runs",
        "## Settings",
    ):
        assert section in md
    assert "- " + verdict(RUNS, "vanilla")[2] in md
    assert "## Paired differences to vanilla" in md and "minimum detectable" in md
    paired_row = [line for line in md.splitlines() if line.startswith("| SampleMix")][1]
    assert "-0.3000, -0.4000, -0.5000" in paired_row and "[-0.6484, -0.1516]" in paired_row
    # Columns: Domain, vanilla, SampleMix (α=0.8), quadmix (unlabelled: its name).
    assert "| Domain | vanilla | SampleMix (α=0.8) | quadmix |" in md
    assert cells(md, "web") == ["web", "2.2000 ± 0.2000", "1.7000 ± 0.1000", "**1.6000 ± 0.1000**"]
    assert cells(md, "code") == [
        "code",
        "**1.0000 ± 0.0000**",
        "1.9000 ± 0.1000",
        "2.1000 ± 0.1000",
    ]
    row = cells(md, "SampleMix (α=0.8) (samplemix)")
    assert row == [
        "SampleMix (α=0.8) (samplemix)",
        "3",
        "**1.8000 ± 0.1000**",
        "1.8000 ± 0.1000",
        "1.25",
    ]
    assert cells(md, "vanilla")[2] == "2.2000 ± 0.2000"
    assert "![Objective per variant](evaluate_methods.png)" in md
    assert "evaluate_alpha.png" not in md  # not given, not linked
    assert cells(md, "lr") == ["lr", "0.0003"] and cells(md, "steps") == ["steps", "200"]
    # Per-run table: variant names, seconds, cached.
    assert "| samplemix | 1 | 1.8000 | 1.9000 | 1.7000 | 13.5 | yes |" in md


def test_markdown_target_column_and_single_seed_without_spread() -> None:
    runs = [run("a", 0, 0, web=2.0, code=1.0, target=3.0)]
    md = evaluation_markdown(runs, variant_stats(runs), {}, {})
    assert "| Variant | Seeds | Objective | Held-out | Target | Epochs |" in md
    assert cells(md, "a") == ["a", "1", "**3.0000**", "1.5000", "3.0000", "1.25"]
    assert "target loss" in md and "none recorded" in md


# ---- CSV, plots, files --------------------------------------------------------------------


def test_results_csv_round_trips() -> None:
    no_code = dataclasses.replace(RUNS[2], losses={"web": 2.4})
    runs = [*RUNS[:2], no_code, run("t", 0, 0, web=2.25, code=1.125, target=2.75)]
    rows = list(csv.DictReader(io.StringIO(results_csv(runs))))
    assert list(rows[0]) == [
        "variant",
        "seed",
        "objective",
        "heldout",
        "pooled",
        "target",
        "loss:code",
        "loss:web",
        "seconds",
        "epochs",
        "mixture_tokens",
        "cached",
        "diff",
        "paired_mean",
        "paired_se",
        "ci_low",
        "ci_high",
        "mdd",
        "resolved",
    ]
    assert len(rows) == 4
    for r, row in zip(runs, rows, strict=True):
        assert row["variant"] == r.variant and int(row["seed"]) == r.seed
        assert float(row["objective"]) == r.objective and float(row["heldout"]) == r.heldout
        assert float(row["loss:web"]) == r.losses["web"]
        assert row["loss:code"] == (repr(r.losses["code"]) if "code" in r.losses else "")
        assert float(row["seconds"]) == r.seconds and float(row["epochs"]) == r.epochs
        assert int(row["mixture_tokens"]) == r.mixture_tokens
        assert row["cached"] == ("true" if r.cached else "false")
    assert rows[0]["target"] == "" and float(rows[3]["target"]) == 2.75
    assert rows[2]["loss:code"] == ""  # a domain the run did not report
    assert float(rows[1]["objective"]) == 2.2
    assert rows[0]["pooled"] == ""  # the evaluation sets' sizes were not given
    # The first variant is the reference: its own paired cells are empty; t's diff is
    # 2.75 − vanilla's 2.0 at seed 0, one shared seed: no spread, not resolved.
    assert rows[0]["diff"] == "" and rows[0]["resolved"] == ""
    assert float(rows[3]["diff"]) == pytest.approx(0.75) and rows[3]["paired_se"] == ""
    assert rows[3]["resolved"] == "false"


def test_results_csv_paired_columns_against_the_baseline() -> None:
    rows = list(csv.DictReader(io.StringIO(results_csv(RUNS, "vanilla"))))
    sm = [r for r in rows if r["variant"] == "samplemix"]
    assert [float(r["diff"]) for r in sm] == pytest.approx([-0.3, -0.4, -0.5])
    assert {r["paired_mean"] for r in sm} == {sm[0]["paired_mean"]}
    assert float(sm[0]["paired_mean"]) == pytest.approx(-0.4)
    assert float(sm[0]["paired_se"]) == pytest.approx(0.1 / math.sqrt(3))
    assert float(sm[0]["ci_low"]) == pytest.approx(-0.6484, abs=1e-4)
    assert float(sm[0]["mdd"]) == pytest.approx(0.3097, abs=1e-4)
    assert sm[0]["resolved"] == "true"


def test_pooled_loss_weights_domains_by_their_tokens() -> None:
    summary = {
        "losses": {"web": 2.0, "code": 1.0},
        "heldout": 1.5,
        "target": None,
        "objective": 1.5,
        "seconds": 1.0,
        "epochs": 1.0,
        "mixture_tokens": 10,
    }
    r = ProxyRun.from_summary("v", 0, summary, False, {"domain/web": 300, "domain/code": 100})
    assert r.pooled == pytest.approx((300 * 2.0 + 100 * 1.0) / 400)
    assert math.isnan(ProxyRun.from_summary("v", 0, summary, False, {"domain/web": 1}).pooled)


def test_plots_are_png_for_every_name_including_no_alpha_sweep() -> None:
    stats = variant_stats(RUNS)
    sweep = evaluation_plots(RUNS, stats, {}, {"samplemix": 0.8, "quadmix": 0.4}, "vanilla")
    single = evaluation_plots(RUNS, stats, {}, {"samplemix": 0.8}, None)
    for pngs in (sweep, single):
        assert list(pngs) == [f"{p}.png" for p in PLOTS]
        assert all(data.startswith(PNG_MAGIC) for data in pngs.values())
    assert sweep["evaluate_alpha.png"] != single["evaluate_alpha.png"]
    # Empty input still renders every picture (no-data panels).
    assert all(d.startswith(PNG_MAGIC) for d in evaluation_plots([], {}, {}, {}, None).values())


def test_write_evaluation_files_and_summary(tmp_path) -> None:
    out = tmp_path / "report" / "evaluate"
    summary = write_evaluation(
        RUNS, {"samplemix": "SampleMix"}, {"samplemix": 0.8}, "vanilla", {"steps": 200}, str(out)
    )
    names = {p.name for p in out.iterdir()}
    assert names == {"evaluate.md", "results.csv", *(f"{p}.png" for p in PLOTS)}
    assert all((out / f"{p}.png").read_bytes().startswith(PNG_MAGIC) for p in PLOTS)
    md = (out / "evaluate.md").read_text()
    assert all(f"({p}.png)" in md for p in PLOTS)
    assert len(list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))) == len(RUNS)
    assert summary["best"] == "samplemix"
    assert summary["samplemix"]["mean"] == pytest.approx(1.8)
    assert summary["vanilla"]["std"] == pytest.approx(0.2) and summary["vanilla"]["n"] == 3
    assert summary["quadmix"]["domains"]["web"] == pytest.approx(1.6)
    assert summary["verdict"] == verdict(RUNS, "vanilla")
    assert summary["vanilla"]["paired"] is None
    assert summary["samplemix"]["paired"]["mean"] == pytest.approx(-0.4)
    assert summary["samplemix"]["paired"]["resolved"] is True
    assert json.loads(json.dumps(summary)) == summary
    with pytest.raises(ValueError, match="reserved"):
        write_evaluation([run("best", 0, 1.0)], {}, {}, None, {}, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="no proxy runs"):
        write_evaluation([], {}, {}, None, {}, str(tmp_path / "y"))
