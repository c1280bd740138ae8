"""Tests for samplemix.reporting.compare: selection statistics, overlaps, Markdown, plots, files.

Five hand-made documents in two domains; every expected number is worked on paper:

    id  domain tokens quality diversity cluster | A  B  C
    d1  web      10     0.5      0.2       0    | 2  1  1
    d2  web      20     0.7      0.4       0    | 0  1  0
    d3  code     30     0.9      0.6       1    | 1  0  1
    d4  code     40     0.1      0.8       2    | 0  1  0
    d5  web     100     0.3      0.1       3    | 0  0  0

Source: 200 tokens, web 130 (65%), code 70 (35%); token-weighted means
q = (5 + 14 + 27 + 4 + 30) / 200 = 0.4 and d = (2 + 8 + 18 + 32 + 10) / 200 = 0.35;
4 clusters.
A: 2·10 + 30 = 50 tokens, 3 copies, 2 docs; web 20/50 = 40%, code 60%;
   q = (2·10·0.5 + 1·30·0.9) / 50 = 0.74, d = (20·0.2 + 30·0.6) / 50 = 0.44;
   repeated (n > 1): 20/50 = 0.4; clusters {0, 1}.
B: 10 + 20 + 40 = 70 tokens, 3 copies, 3 docs; web 30/70, code 40/70;
   q = (5 + 14 + 4) / 70 = 23/70, d = (2 + 8 + 32) / 70 = 0.6; clusters {0, 2}.
C: 10 + 30 = 40 tokens; contained in A up to copies.
overlap(A, B) = min(2,1)·10 / min(50, 70) = 0.2; jaccard(A, B) = |{d1}| / |{d1..d4}| = 0.25.
overlap(A, C) = (1·10 + 1·30) / min(50, 40) = 1; jaccard(A, C) = 2/2 = 1.
overlap(B, C) = 1·10 / min(70, 40) = 0.25; jaccard(B, C) = |{d1}| / |{d1..d4}| = 0.25.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from samplemix.reporting import compare
from samplemix.reporting.compare import (
    PLOTS,
    compare_markdown,
    compare_plots,
    jaccard,
    overlap,
    selection_stats,
    write_comparison,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

IDS = ["d1", "d2", "d3", "d4", "d5"]
COUNTS = {
    "A": [2, 0, 1, 0, 0],
    "B": [1, 1, 0, 1, 0],
    "C": [1, 0, 1, 0, 0],
    "empty": [0, 0, 0, 0, 0],
}


def plan(counts: list[int], ids: list[str] = IDS, tokens: list[int] | None = None) -> pa.Table:
    """A full plan table (every column ``samplemix run`` writes) for the 5 documents."""
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "domain": pa.array(["web", "web", "code", "code", "web"], pa.string()),
            "tokens": pa.array(tokens or [10, 20, 30, 40, 100], pa.int64()),
            "quality": pa.array([0.5, 0.7, 0.9, 0.1, 0.3], pa.float64()),
            "diversity": pa.array([0.2, 0.4, 0.6, 0.8, 0.1], pa.float64()),
            "weight": pa.array([0.4, 0.2, 0.3, 0.1, 0.0], pa.float64()),
            "expected_count": pa.array([float(c) for c in counts], pa.float64()),
            "count": pa.array(counts, pa.int64()),
            "cluster": pa.array([0, 0, 1, 2, 3], pa.int32()),
            "shard": pa.array(["s0"] * 5, pa.string()),
            "row": pa.array(range(5), pa.int64()),
        }
    )


def write_run(out: Path, table: pa.Table, split: int = 3) -> str:
    """Write ``table`` as a run's plan, in two parts (rows [:split], [split:])."""
    (out / "plan").mkdir(parents=True)
    pq.write_table(table.slice(0, split), out / "plan" / "part-00000.parquet")
    pq.write_table(table.slice(split), out / "plan" / "part-00001.parquet")
    return str(out)


# ---------------------------------------------------------------------------------------
# selection_stats


def test_stats_of_selection_a():
    s = selection_stats(plan(COUNTS["A"]))
    assert s.realised_tokens == 50
    assert s.copies == 3
    assert s.distinct_docs == 2
    assert s.source_docs == 5
    assert s.source_tokens == 200
    assert list(s.domain_shares) == ["web", "code"]  # first appearance in the plan
    assert s.domain_shares == pytest.approx({"web": 0.4, "code": 0.6})
    assert s.natural_shares == pytest.approx({"web": 0.65, "code": 0.35})
    assert s.quality_mean == pytest.approx((2 * 10 * 0.5 + 1 * 30 * 0.9) / (2 * 10 + 1 * 30))
    assert s.quality_mean == pytest.approx(0.74)
    assert s.diversity_mean == pytest.approx(0.44)
    assert s.source_quality_mean == pytest.approx(0.4)
    assert s.source_diversity_mean == pytest.approx(0.35)
    assert s.repeated_token_share == pytest.approx(0.4)
    assert (s.clusters_covered, s.clusters_total) == (2, 4)


def test_stats_of_selection_b():
    s = selection_stats(plan(COUNTS["B"]))
    assert (s.realised_tokens, s.copies, s.distinct_docs) == (70, 3, 3)
    assert s.domain_shares == pytest.approx({"web": 3 / 7, "code": 4 / 7})
    assert s.quality_mean == pytest.approx(23 / 70)
    assert s.diversity_mean == pytest.approx(0.6)
    assert s.repeated_token_share == 0.0
    assert (s.clusters_covered, s.clusters_total) == (2, 4)


def test_stats_of_empty_selection():
    s = selection_stats(plan(COUNTS["empty"]))
    assert (s.realised_tokens, s.copies, s.distinct_docs) == (0, 0, 0)
    assert s.domain_shares == {"web": 0.0, "code": 0.0}
    assert s.natural_shares == pytest.approx({"web": 0.65, "code": 0.35})
    assert math.isnan(s.quality_mean) and math.isnan(s.diversity_mean)
    assert s.source_quality_mean == pytest.approx(0.4)
    assert s.repeated_token_share == 0.0
    assert (s.clusters_covered, s.clusters_total) == (0, 4)


def test_stats_of_empty_plan():
    s = selection_stats(plan(COUNTS["A"]).slice(0, 0))
    assert (s.realised_tokens, s.source_tokens, s.source_docs) == (0, 0, 0)
    assert s.domain_shares == {} and s.natural_shares == {}
    assert math.isnan(s.source_quality_mean)
    assert (s.clusters_covered, s.clusters_total) == (0, 0)


def test_stats_leave_non_finite_scores_out_of_means():
    t = plan(COUNTS["A"])
    t = t.set_column(3, "quality", pa.array([0.5, 0.7, math.nan, 0.1, 0.3]))
    s = selection_stats(t)
    # d3 (q NaN) drops out: only d1's 2·10 tokens at q = 0.5 are left.
    assert s.quality_mean == pytest.approx(0.5)
    assert s.diversity_mean == pytest.approx(0.44)


# ---------------------------------------------------------------------------------------
# overlap and jaccard


def test_overlap_and_jaccard_by_hand():
    a, b, c = plan(COUNTS["A"]), plan(COUNTS["B"]), plan(COUNTS["C"])
    assert overlap(a, b) == pytest.approx(0.2)
    assert overlap(b, a) == pytest.approx(0.2)
    assert jaccard(a, b) == pytest.approx(0.25)
    # C is contained in A up to copies.
    assert overlap(a, c) == pytest.approx(1.0)
    assert jaccard(a, c) == pytest.approx(1.0)
    assert overlap(b, c) == pytest.approx(0.25)
    assert jaccard(b, c) == pytest.approx(0.25)
    assert overlap(a, a) == pytest.approx(1.0)


def test_overlap_joins_on_id_not_row_order():
    a = plan(COUNTS["A"])
    shuffled = plan(COUNTS["B"]).take([4, 3, 2, 1, 0])
    assert overlap(a, shuffled) == pytest.approx(0.2)
    assert jaccard(a, shuffled) == pytest.approx(0.25)


def test_overlap_disjoint_and_empty():
    a = plan([0, 1, 0, 0, 0])
    b = plan([0, 0, 0, 2, 0])
    assert overlap(a, b) == 0.0
    assert jaccard(a, b) == 0.0
    empty = plan(COUNTS["empty"])
    assert math.isnan(overlap(a, empty))
    assert math.isnan(overlap(empty, empty))
    assert jaccard(a, empty) == 0.0
    assert math.isnan(jaccard(empty, empty))


def test_overlap_rejects_duplicate_ids():
    dup = plan([1, 1, 0, 0, 0], ids=["d1", "d1", "d3", "d4", "d5"])
    with pytest.raises(ValueError, match="duplicate ids"):
        overlap(dup, plan(COUNTS["A"]))


# ---------------------------------------------------------------------------------------
# Markdown and plots


def three_methods() -> tuple[dict, np.ndarray, list[str]]:
    methods = ["A", "B", "empty"]
    stats = {m: selection_stats(plan(COUNTS[m])) for m in methods}
    ov = np.array([[1.0, 0.2, np.nan], [0.2, 1.0, np.nan], [np.nan, np.nan, np.nan]])
    return stats, ov, methods


def test_markdown_sections_and_numbers():
    stats, ov, methods = three_methods()
    images = {name: f"{name}.png" for name in PLOTS}
    md = compare_markdown(stats, ov, methods, target_tokens=60, images=images)
    assert md.startswith("# Mixture comparison\n")
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Budget",
        "## Domain shares",
        "## Quality and diversity of each selection",
        "## Overlap between selections",
    ]
    # Budget: realised vs T_tgt = 60 (50 − 60 = −10 = −16.667%), copies, distinct docs.
    assert "| A | 50 | -10 (-16.667%) | 3 | 2 | 40.0% |" in md
    assert "| B | 70 | +10 (+16.667%) | 3 | 3 | 60.0% |" in md
    assert "| empty | 0 | -60 (-100.000%) | 0 | 0 | 0.0% |" in md
    assert "Selected nothing: empty." in md
    # Domain shares, natural column first.
    assert "| Domain | natural | A | B | empty |" in md
    assert "| web | 65.0% | 40.0% | 42.9% | 0.0% |" in md
    assert "| code | 35.0% | 60.0% | 57.1% | 0.0% |" in md
    # Quality and diversity with deltas vs the source (0.4, 0.35).
    assert "| source (natural) | 0.4 | – | 0.35 | – | – | 4 of 4 |" in md
    assert "| A | 0.74 | +0.34 | 0.44 | +0.09 | 40.0% | 2 of 4 |" in md
    assert "| B | 0.3286 | -0.07143 | 0.6 | +0.25 | 0.0% | 2 of 4 |" in md
    assert "| empty | – | – | – | – | 0.0% | 0 of 4 |" in md
    # Overlap matrix in percent.
    assert "| A | 100.0% | 20.0% | – |" in md
    assert "| B | 20.0% | 100.0% | – |" in md
    assert "Most alike: A and B (20.0%)" in md
    # Each image in its section.
    sections = md.split("\n## ")
    for section, name in zip(sections[2:], PLOTS, strict=True):
        assert f"({name}.png)" in section


def test_markdown_without_target_or_images():
    stats, ov, methods = three_methods()
    md = compare_markdown(stats, ov, methods, None, None)
    assert "Realised − T_tgt" not in md
    assert "| A | 50 | 3 | 2 | 40.0% |" in md
    assert "![" not in md


def test_markdown_rejects_wrong_matrix_shape():
    stats, _, methods = three_methods()
    with pytest.raises(ValueError, match=r"expected \(3, 3\)"):
        compare_markdown(stats, np.eye(2), methods, None, None)


def test_plots_are_pngs_even_with_an_empty_selection():
    stats, ov, methods = three_methods()
    pngs = compare_plots(stats, ov, methods)
    assert list(pngs) == [f"{name}.png" for name in PLOTS]
    for data in pngs.values():
        assert data.startswith(PNG_MAGIC)
    only_empty = compare_plots({"empty": stats["empty"]}, np.array([[np.nan]]), ["empty"])
    assert all(d.startswith(PNG_MAGIC) for d in only_empty.values())


def test_module_imports_neither_prefect_nor_pyplot():
    tree = ast.parse(Path(compare.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert not any(m.split(".")[0] == "prefect" for m in imported)
    assert "matplotlib.pyplot" not in imported


# ---------------------------------------------------------------------------------------
# write_comparison


def test_write_comparison_files_and_summary(tmp_path):
    outputs = {
        "samplemix": write_run(tmp_path / "samplemix", plan(COUNTS["A"])),
        "vanilla": write_run(tmp_path / "vanilla", plan(COUNTS["B"]).take([4, 0, 2, 1, 3])),
    }
    out = tmp_path / "cmp"
    summary = write_comparison(outputs, str(out), target_tokens=60)

    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["compare.md", "compare.csv", *(f"{n}.png" for n in PLOTS)])
    for name in PLOTS:
        assert (out / f"{name}.png").read_bytes().startswith(PNG_MAGIC)

    md = (out / "compare.md").read_text()
    assert "samplemix" in md and "vanilla" in md
    for share in ("65.0%", "35.0%", "40.0%", "60.0%", "42.9%", "57.1%"):
        assert share in md
    assert "| web | 65.0% | 40.0% | 42.9% |" in md
    assert "| samplemix | 100.0% | 20.0% |" in md
    assert "| samplemix | 100.0% | 25.0% |" in md  # the Jaccard table
    assert "![Overlap between selections](compare_overlap.png)" in md

    rows = list(csv.reader(io.StringIO((out / "compare.csv").read_text())))
    assert rows[0] == [
        "method",
        "realised_tokens",
        "copies",
        "distinct_docs",
        "quality_mean",
        "diversity_mean",
        "repeated_token_share",
        "clusters_covered",
        "share:web",
        "share:code",
    ]
    assert [r[0] for r in rows[1:]] == ["samplemix", "vanilla"]
    a, b = rows[1], rows[2]
    assert [int(v) for v in a[1:4]] == [50, 3, 2]
    assert float(a[4]) == pytest.approx(0.74)
    assert float(a[6]) == pytest.approx(0.4)
    assert int(a[7]) == 2
    assert float(a[8]) == pytest.approx(0.4) and float(a[9]) == pytest.approx(0.6)
    assert int(b[1]) == 70 and float(b[5]) == pytest.approx(0.6)

    json.dumps(summary, allow_nan=False)  # JSON-able, no NaN
    assert summary["samplemix"]["realised_tokens"] == 50
    assert summary["samplemix"]["copies"] == 3
    assert summary["samplemix"]["distinct_docs"] == 2
    assert summary["samplemix"]["quality_mean"] == pytest.approx(0.74)
    assert summary["vanilla"]["diversity_mean"] == pytest.approx(0.6)
    assert summary["vanilla"]["domain_shares"] == pytest.approx({"web": 3 / 7, "code": 4 / 7})
    assert np.allclose(summary["overlap"], [[1.0, 0.2], [0.2, 1.0]])
    assert np.allclose(summary["jaccard"], [[1.0, 0.25], [0.25, 1.0]])


def test_write_comparison_with_empty_selection_is_json_able(tmp_path):
    outputs = {
        "samplemix": write_run(tmp_path / "a", plan(COUNTS["A"])),
        "ce": write_run(tmp_path / "b", plan(COUNTS["empty"])),
    }
    summary = write_comparison(outputs, str(tmp_path / "cmp"))
    assert summary["ce"]["quality_mean"] is None
    assert summary["overlap"] == [[1.0, None], [None, None]]
    json.dumps(summary, allow_nan=False)
    rows = list(csv.reader(io.StringIO((tmp_path / "cmp" / "compare.csv").read_text())))
    assert rows[2][:6] == ["ce", "0", "0", "0", "", ""]


def test_write_comparison_missing_plan_names_path(tmp_path):
    missing = tmp_path / "quadmix"
    outputs = {
        "samplemix": write_run(tmp_path / "samplemix", plan(COUNTS["A"])),
        "quadmix": str(missing),
    }
    with pytest.raises(ValueError, match="quadmix") as err:
        write_comparison(outputs, str(tmp_path / "cmp"))
    assert str(missing) in str(err.value)
    assert "first" in str(err.value)
    # An existing but empty plan folder is as good as missing.
    (missing / "plan").mkdir(parents=True)
    with pytest.raises(ValueError, match="run 'quadmix'"):
        write_comparison(outputs, str(tmp_path / "cmp"))
    assert not (tmp_path / "cmp").exists()


def test_write_comparison_mismatched_documents_names_methods(tmp_path):
    other_ids = ["d1", "d2", "d3", "d4", "x9"]
    outputs = {
        "samplemix": write_run(tmp_path / "a", plan(COUNTS["A"])),
        "temperature": write_run(tmp_path / "b", plan(COUNTS["B"], ids=other_ids)),
    }
    with pytest.raises(ValueError, match="different documents") as err:
        write_comparison(outputs, str(tmp_path / "cmp"))
    assert "'samplemix'" in str(err.value) and "'temperature'" in str(err.value)
    assert "'x9'" in str(err.value) and "'d5'" in str(err.value)


def test_write_comparison_mismatched_lengths_names_methods(tmp_path):
    outputs = {
        "samplemix": write_run(tmp_path / "a", plan(COUNTS["A"])),
        "samplemix-a0.4": write_run(
            tmp_path / "b", plan(COUNTS["B"], tokens=[10, 20, 31, 40, 100])
        ),
    }
    with pytest.raises(ValueError, match="'samplemix-a0.4'") as err:
        write_comparison(outputs, str(tmp_path / "cmp"))
    assert "'d3' has 30 tokens in 'samplemix' but 31" in str(err.value)


def test_write_comparison_rejects_reserved_method_name(tmp_path):
    outputs = {"overlap": write_run(tmp_path / "a", plan(COUNTS["A"]))}
    with pytest.raises(ValueError, match="reserved"):
        write_comparison(outputs, str(tmp_path / "cmp"))


def test_plotting_leaves_pyplot_and_backend_alone():
    """In a fresh process (backend unresolved), rendering the plots imports no pyplot."""
    code = (
        "import sys, numpy as np;"
        "from samplemix.reporting.compare import compare_plots, selection_stats;"
        "from test_compare import plan, COUNTS;"
        "s = {'A': selection_stats(plan(COUNTS['A']))};"
        "compare_plots(s, np.array([[1.0]]), ['A']);"
        "print('matplotlib.pyplot' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root / "tests"), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
