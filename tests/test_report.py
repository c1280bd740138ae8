"""Tests for samplemix.reporting.run_report: numbers in the Markdown, valid PNGs, fsspec writing.

The inputs are built by hand so every expected number can be checked on paper:
tokens before 10,000 / 6,000 / 4,000 (shares 50/30/20%), after 4,060 / 4,060 / 2,030
(40/40/20%), T_tgt 10,000, realised 10,150, σ 100 → deviation +150 tokens = +1.50 σ.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
from matplotlib.image import imread

from samplemix.reporting import run_report as report
from samplemix.reporting.run_report import (
    PLOTS,
    ReportInputs,
    plot_files,
    report_markdown,
    table_rows,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def three_domains() -> ReportInputs:
    return ReportInputs(
        target_tokens=10_000,
        source_tokens=20_000,
        expected_tokens=10_000.0,
        realised_tokens=10_150,
        sigma_tokens=100.0,
        docs_before={"web": 100, "code": 60, "books": 40},
        docs_after={"web": 41, "code": 70, "books": 20},
        tokens_before={"web": 10_000, "code": 6_000, "books": 4_000},
        tokens_after={"web": 4_060, "code": 4_060, "books": 2_030},
        quality_by_domain={
            "web": np.array([1.0, 2.0, 3.0, 4.0, 5.0]),
            "code": np.array([6.0, 7.0, 8.0]),
            "books": np.array([2.5]),
        },
        diversity_by_domain={
            "web": np.array([0.01, 0.02, 0.03]),
            "code": np.array([0.5]),
            "books": np.array([0.25, 0.25]),
        },
        count_histogram={0: 120, 1: 50, 2: 20, 5: 10},
        overlap_domains=["web", "code", "books"],
        overlap=np.array([[1.0, 0.25, 0.766], [0.5, 1.0, 0.0], [0.8, 0.1, 1.0]]),
        cluster_sizes=np.array([30, 5, 70, 0, 50, 45]),
        rejects={"too_short": 12, "non_utf8": 3},
        settings={"method": "samplemix", "alpha": 0.8, "K": 6, "seed": 7},
    )


def single_domain() -> ReportInputs:
    return ReportInputs(
        target_tokens=1_000,
        source_tokens=1_000,
        expected_tokens=1_000.0,
        realised_tokens=1_000,
        sigma_tokens=0.0,
        docs_before={"web": 10},
        docs_after={"web": 10},
        tokens_before={"web": 1_000},
        tokens_after={"web": 1_000},
        quality_by_domain={"web": np.arange(10, dtype=float)},
        diversity_by_domain={"web": np.full(10, 0.1)},
        count_histogram={1: 10},
        overlap_domains=["web"],
        overlap=np.array([[1.0]]),
        cluster_sizes=np.array([10]),
        rejects={},
        settings={},
    )


def empty_after() -> ReportInputs:
    """``books`` gets no copies: 0 in docs_after and missing from tokens_after entirely."""
    inp = three_domains()
    return dataclasses.replace(
        inp,
        docs_after={"web": 41, "code": 70, "books": 0},
        tokens_after={"web": 5_075, "code": 5_075},
        realised_tokens=10_150,
    )


def test_budget_section_numbers():
    md = report_markdown(three_domains())
    assert "## Budget" in md
    assert "| Target T_tgt | 10,000 |" in md
    assert "| Realised Σ n·len | 10,150 |" in md
    assert "+150 tokens (+1.500% of T_tgt)" in md
    assert "| Deviation in σ | +1.50 σ |" in md
    assert "| Expected Σ c·len | 10,000.0 |" in md
    assert "| Source T_src = Σ len | 20,000 |" in md
    assert "Floor + Bernoulli rounding leaves σ = 100.0 tokens" in md
    assert "within the rounding spread" in md
    # Σ c·len equals T_tgt here, so no lost-budget note.
    assert "differs from T_tgt" not in md


def test_budget_flags_large_deviation_and_lost_budget():
    inp = dataclasses.replace(three_domains(), realised_tokens=10_400, expected_tokens=9_800.0)
    md = report_markdown(inp)
    assert "+4.00 σ" in md
    assert "larger than rounding explains" in md
    assert "differs from T_tgt by -200.0 tokens" in md


def test_domain_table_shares_and_total():
    md = report_markdown(three_domains())
    assert "| web | 100 | 41 | 10,000 | 4,060 | 50.0% | 40.0% |" in md
    assert "| code | 60 | 70 | 6,000 | 4,060 | 30.0% | 40.0% |" in md
    assert "| books | 40 | 20 | 4,000 | 2,030 | 20.0% | 20.0% |" in md
    assert "| **total** | 200 | 131 | 20,000 | 10,150 | 100.0% | 100.0% |" in md


def test_table_rows_match_domain_table():
    rows = table_rows(three_domains())
    assert [r["domain"] for r in rows] == ["web", "code", "books", "total"]
    assert rows[0] == {
        "domain": "web",
        "docs_before": 100,
        "docs_after": 41,
        "tokens_before": 10_000,
        "tokens_after": 4_060,
        "share_before_pct": 50.0,
        "share_after_pct": 40.0,
    }
    assert rows[-1]["tokens_after"] == 10_150
    assert rows[-1]["share_after_pct"] == 100.0


def test_score_statistics():
    md = report_markdown(three_domains())
    # web q = 1..5: mean 3, median 3, p10 1.4, p90 4.6 (linear interpolation).
    assert "| web | 5 | 3 | 3 | 1.4 | 4.6 |" in md
    assert "| code | 3 | 7 | 7 | 6.2 | 7.8 |" in md
    assert "| books | 1 | 2.5 | 2.5 | 2.5 | 2.5 |" in md
    assert "| web | 3 | 0.02 | 0.02 | 0.012 | 0.028 |" in md


def test_score_only_domain_is_listed_with_scores_not_in_domain_table():
    inp = three_domains()
    inp.quality_by_domain["misc"] = np.array([1.0])
    md = report_markdown(inp)
    assert "| misc | 1 | 1 | 1 | 1 | 1 |" in md
    assert "misc" not in [r["domain"] for r in table_rows(inp)]


def test_non_finite_scores_are_left_out_and_counted():
    inp = three_domains()
    inp.quality_by_domain["web"] = np.array([1.0, 2.0, 3.0, 4.0, 5.0, np.nan])
    md = report_markdown(inp)
    assert "| web | 5 | 3 | 3 | 1.4 | 4.6 |" in md
    assert "1 non-finite values were left out" in md


def test_counts_clusters_overlap_rejects():
    md = report_markdown(three_domains())
    assert "| 0 | 120 | 60.0% |" in md
    assert "| 5 | 10 | 5.0% |" in md
    assert "80 of 200 documents (40.0%) are selected at least once" in md
    assert "most copies of one document is 5" in md
    # Largest clusters by size, ids kept: 70 (id 2), 50 (id 4), 45 (id 5), 30 (id 0).
    assert "| 1 | 2 | 70 | 35.0% |" in md
    assert "| 2 | 4 | 50 | 25.0% |" in md
    assert "| 4 | 0 | 30 | 15.0% |" in md
    assert "empty clusters: 1" in md
    assert "| web | 100.0% | 25.0% | 76.6% |" in md
    assert "| books | 80.0% | 10.0% | 100.0% |" in md
    assert "Highest: 80.0% of books's clusters also contain web." in md
    assert "| too_short | 12 |" in md
    assert "| non_utf8 | 3 |" in md
    assert "| **total** | 15 |" in md


def test_settings_table():
    md = report_markdown(three_domains())
    assert md.startswith("# Mixture report: samplemix\n")
    assert "| alpha | 0.8 |" in md
    assert "| K | 6 |" in md


def test_top_ten_clusters_only():
    inp = dataclasses.replace(three_domains(), cluster_sizes=np.arange(1, 16))
    md = report_markdown(inp)
    section = md.split("Largest clusters:", 1)[1].split("##", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    # Header plus ranks 1..10; sizes 15 down to 6 (cluster ids 14 down to 5).
    assert len(rows) == 11
    assert rows[-1] == "| 10 | 5 | 6 | 5.0% |"


def test_empty_rejects_say_none():
    md = report_markdown(single_domain())
    section = md.split("## Rows read, accepted and rejected", 1)[1]
    assert section.strip() == "No rows rejected."


def test_single_domain():
    md = report_markdown(single_domain())
    assert "| web | 10 | 10 | 1,000 | 1,000 | 100.0% | 100.0% |" in md
    assert "| Deviation in σ | n/a" in md
    assert "| web | 100.0% |" in md
    assert "Highest:" not in md
    for data in plot_files(single_domain()).values():
        assert data.startswith(PNG_MAGIC)


def test_empty_domain_after():
    inp = empty_after()
    md = report_markdown(inp)
    assert "| books | 40 | 0 | 4,000 | 0 | 20.0% | 0.0% |" in md
    assert "| web | 100 | 41 | 10,000 | 5,075 | 50.0% | 50.0% |" in md
    assert table_rows(inp)[2]["tokens_after"] == 0
    for data in plot_files(inp).values():
        assert data.startswith(PNG_MAGIC)


def test_missing_scores_and_no_data_plots_render():
    inp = dataclasses.replace(
        three_domains(),
        quality_by_domain={"web": np.array([]), "code": np.array([1.0])},
        diversity_by_domain={},
        count_histogram={},
        cluster_sizes=np.array([], dtype=int),
    )
    md = report_markdown(inp)
    assert "| web | 0 | – | – | – | – |" in md
    assert md.split("### Diversity d(x)", 1)[1].lstrip().startswith("none recorded")
    assert len(plot_files(inp)) == len(PLOTS)


def test_tiny_share_is_not_shown_as_zero():
    inp = dataclasses.replace(
        three_domains(),
        tokens_after={"web": 5_000, "code": 5_148, "books": 2},
    )
    assert "| books | 40 | 20 | 4,000 | 2 | 20.0% | <0.1% |" in report_markdown(inp)


def test_overlap_shape_is_checked():
    with pytest.raises(ValueError, match="overlap has shape"):
        dataclasses.replace(three_domains(), overlap=np.eye(2))


def test_pipes_in_names_do_not_break_tables():
    inp = dataclasses.replace(three_domains(), rejects={"a|b": 1})
    assert "| a\\|b | 1 |" in report_markdown(inp)


def test_images_are_embedded_in_their_sections():
    images = {name: f"{name}.png" for name in PLOTS} | {"extra": "x.png"}
    md = report_markdown(three_domains(), images)
    budget = md.split("## Budget", 1)[1].split("## Settings", 1)[0]
    assert "](budget.png)" in budget
    overlap = md.split("## Cross-domain cluster overlap", 1)[1]
    assert "](overlap.png)" in overlap
    for name in PLOTS:
        assert f"]({name}.png)" in md
    assert "## Other figures" in md and "](x.png)" in md
    assert "![" not in report_markdown(three_domains())


def test_plot_files_are_valid_pngs():
    files = plot_files(three_domains())
    assert list(files) == [f"{name}.png" for name in PLOTS]
    for name, data in files.items():
        assert data.startswith(PNG_MAGIC), name
        img = imread(io.BytesIO(data), format="png")
        assert img.ndim == 3 and img.shape[2] in (3, 4), name
        assert img.shape[0] >= 300 and img.shape[1] >= 400, (name, img.shape)


def test_wide_histogram_uses_log_scale():
    fig = report._counts_plot(
        dataclasses.replace(three_domains(), count_histogram={0: 10**6, 3: 2})
    )
    assert fig.axes[0].get_yscale() == "log"
    fig = report._counts_plot(three_domains())
    assert fig.axes[0].get_yscale() == "linear"


def test_write_report_local(tmp_path):
    out = tmp_path / "nested" / "report"
    written = report.write_report(three_domains(), str(out))
    names = [Path(p).name for p in written]
    assert names == [f"{name}.png" for name in PLOTS] + ["report.md"]
    for p in written:
        assert Path(p).is_file() and Path(p).stat().st_size > 0
    md = (out / "report.md").read_text(encoding="utf-8")
    for name in PLOTS:
        assert f"]({name}.png)" in md
        assert (out / f"{name}.png").read_bytes().startswith(PNG_MAGIC)


def test_write_report_through_fsspec_url():
    url = "memory://samplemix-report-test/run1"
    written = report.write_report(single_domain(), url, storage_options={})
    assert written[-1] == f"{url}/report.md"
    fs = fsspec.filesystem("memory")
    try:
        md = fs.cat_file("/samplemix-report-test/run1/report.md").decode()
        assert "](counts.png)" in md
        assert fs.cat_file("/samplemix-report-test/run1/budget.png").startswith(PNG_MAGIC)
    finally:
        fs.rm("/samplemix-report-test", recursive=True)


def test_module_imports_neither_prefect_nor_pyplot():
    """Engine rule: no Prefect in report.py; no pyplot, so the caller's backend is untouched."""
    tree = ast.parse(Path(report.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert not any(m.split(".")[0] == "prefect" for m in imported)
    assert "matplotlib.pyplot" not in imported


def test_plotting_leaves_pyplot_and_backend_alone():
    """In a fresh process (the sentinel backend unresolved), rendering imports no pyplot."""
    code = (
        "import sys; sys.path.insert(0, 'tests');"
        "from test_report import three_domains;"
        "from samplemix.reporting.run_report import plot_files;"
        "plot_files(three_domains());"
        "print('matplotlib.pyplot' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_budget_warning_only_beyond_five_percent_of_the_target():
    inp = three_domains()  # T_tgt 10,000
    edge = round(inp.target_tokens * (1 + report.BUDGET_TOLERANCE))
    for realised in (inp.realised_tokens, edge):
        quiet = dataclasses.replace(inp, realised_tokens=realised)
        assert report.budget_warning(quiet) is None
        assert "**Warning:**" not in report_markdown(quiet)
    loud = dataclasses.replace(inp, realised_tokens=edge + 1, sigma_tokens=400.0)
    assert report.budget_warning(loud).startswith("realised 10,501 tokens, +5.0% off the target")


def test_budget_warning_names_the_cause_it_finds():
    inp = dataclasses.replace(three_domains(), realised_tokens=10_600, sigma_tokens=400.0)
    doc = {"shard": "web/a.parquet", "tokens": 300, "expected": 2.5, "count": 3}
    # Ten documents holding 10 × 1,000 of σ² = 160,000: no few of them explain the miss.
    spread = [{**doc, "id": f"d{i}", "variance": 1_000.0} for i in range(10)]
    many = report.budget_warning(dataclasses.replace(inp, spread=spread))
    assert "σ = 400 tokens is 4.0% of T_tgt, spread over many documents" in many
    # Two documents holding 120,000 of it: they are named, with the cap (counts >= 1 round).
    spread[:2] = [{**doc, "id": f"big{i}", "variance": 60_000.0} for i in range(2)]
    few = report.budget_warning(dataclasses.replace(inp, spread=spread))
    assert "2 documents hold 75% of the rounding spread σ² (largest: 'big0'" in few
    assert "split documents of 300+ tokens" in few and "mixing.max_repeats" in few
    # Σ c·len itself short of T_tgt by more than the rounding moved: the allocation.
    short = dataclasses.replace(inp, expected_tokens=11_000.0, realised_tokens=11_100)
    assert "only 11,000 tokens were allocated" in report.budget_warning(short)


def test_shards_csv_has_skipped_rows_only_when_a_shard_was_skipped():
    rows = [{"shard": "a", "read": 2, "accepted": 2, "rejected": 0, "renamed": 0}]
    clean = dataclasses.replace(three_domains(), shards=[{**rows[0], "skipped_rows": None}])
    assert report.shards_csv(clean).splitlines()[0] == "shard,read,accepted,rejected,renamed"
    skipped = {"shard": "b", "read": 0, "accepted": 0, "rejected": 0, "renamed": 0}
    both = dataclasses.replace(clean, shards=[*clean.shards, {**skipped, "skipped_rows": 7}])
    lines = report.shards_csv(both).splitlines()
    assert lines == [
        "shard,read,accepted,rejected,renamed,skipped_rows",
        "a,2,2,0,0,",
        "b,0,0,0,0,7",
    ]
    assert report.skipped_shards_line(both.shards).startswith("1 unreadable shard skipped")
