"""Comparing mixtures: several methods' plans over the same corpus, side by side.

A comparison runs several mixing methods (``samplemix``, ``quadmix``, ``vanilla``,
``temperature``, ``ce``, or ``samplemix-a0.4`` for an α sweep) over the same corpus and
cached scores, each into its own output folder. Every run's ``plan/part-*.parquet``
holds one row per accepted source document with its copies ``count`` = n(x); the plans
of the methods hold the same documents (ids, len(x), q(x), d(x)) and differ only in
weight, expected count and count. This module turns those plan tables into:

* ``SelectionStats`` per method (``selection_stats``): tokens, copies, documents,
  per-domain token shares, token-weighted mean quality and diversity, repeats and
  cluster coverage of the selection, next to the source's;
* the token-weighted ``overlap`` and the id ``jaccard`` of two selections;
* a Markdown report (``compare_markdown``), PNG plots (``compare_plots``) and a CSV,
  written together by ``write_comparison``.

Like ``samplemix.reporting.run_report`` this is pure presentation and arithmetic over plan
tables: it never imports Prefect, and it never touches pyplot's global state (figures are built on
``matplotlib.figure.Figure`` with an explicit Agg canvas).
"""

from __future__ import annotations

import csv
import io
import math
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from matplotlib import colormaps
from matplotlib.figure import Figure

from samplemix.reporting.formatting import (
    csv_float,
    image_lines,
    json_float,
    label_ticks,
    markdown_table,
    new_figure,
    no_data_panel,
    percent_of_share,
    png_bytes,
    significant,
)

#: Plot names in report order; ``compare_plots`` returns ``<name>.png`` for each, and the
#: ``images`` argument of ``compare_markdown`` is keyed by these names.
PLOTS = ("compare_domain_shares", "compare_quality_diversity", "compare_overlap")

#: The plan columns a comparison reads (the rest of the plan is not needed).
PLAN_COLUMNS = ("id", "domain", "tokens", "quality", "diversity", "count", "cluster")

#: Keys of ``write_comparison``'s summary besides the method names.
RESERVED = ("overlap", "jaccard")

_SOURCE_COLOR = "#333333"


# ---------------------------------------------------------------------------------------
# Statistics of one selection


@dataclass
class SelectionStats:
    """What one method selected from the source, and the source itself.

    Selected tokens are Σ n(x)·len(x) over the plan; a document is selected when
    n(x) > 0. ``domain_shares`` and ``natural_shares`` are token shares in [0, 1] keyed
    by every source domain (in order of first appearance in the plan), so a domain
    the method left out reads 0. Means are token-weighted: weights n·len for the
    selection, len for the source; non-finite scores are left out of a mean.

    An empty selection (every n = 0) does not raise: its tokens, copies and documents
    are 0, every domain share is 0, ``repeated_token_share`` is 0, ``clusters_covered``
    is 0, and ``quality_mean``/``diversity_mean`` are NaN (a mean of nothing). An empty
    plan likewise has no natural shares and NaN source means.
    """

    realised_tokens: int
    copies: int
    distinct_docs: int
    source_docs: int
    source_tokens: int
    domain_shares: dict[str, float]
    natural_shares: dict[str, float]
    quality_mean: float
    diversity_mean: float
    source_quality_mean: float
    source_diversity_mean: float
    #: Share of the selected tokens that come from documents with n(x) > 1.
    repeated_token_share: float
    #: Distinct ``cluster`` values among the selected documents ...
    clusters_covered: int
    #: ... out of the distinct ``cluster`` values among all plan rows (not K: a cluster
    #: no accepted document was assigned to is not in the plan).
    clusters_total: int


def _column(plan: pa.Table, name: str) -> pa.Array:
    if name not in plan.column_names:
        raise ValueError(f"plan has no column {name!r}; columns: {plan.column_names}")
    return plan.column(name).combine_chunks()


def _numbers(plan: pa.Table, name: str, dtype: type) -> np.ndarray:
    col = _column(plan, name)
    if col.null_count:
        raise ValueError(f"plan column {name!r} has {col.null_count} null values")
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=dtype)


def _mean(values: np.ndarray, weights: np.ndarray) -> float:
    """Weighted mean over the finite values; NaN when no weight is left."""
    ok = np.isfinite(values) & (weights > 0)
    total = float(weights[ok].sum())
    if total <= 0:
        return math.nan
    return float(np.dot(values[ok], weights[ok]) / total)


def _shares(codes: np.ndarray, names: Sequence[str], weights: np.ndarray) -> dict[str, float]:
    """Weight share per name (codes index into names); all 0 when there is no weight."""
    sums = np.bincount(codes, weights=weights, minlength=len(names))
    total = float(sums.sum())
    if total <= 0:
        return dict.fromkeys(names, 0.0)
    return {n: float(s / total) for n, s in zip(names, sums, strict=True)}


def selection_stats(plan: pa.Table) -> SelectionStats:
    """Statistics of the selection a plan describes (columns as in ``PLAN_COLUMNS``).

    See ``SelectionStats`` for the definitions and for what an empty selection gives.
    """
    tokens = _numbers(plan, "tokens", np.int64)
    n = _numbers(plan, "count", np.int64)
    if (n < 0).any() or (tokens < 0).any():
        raise ValueError("plan has negative counts or token lengths")
    quality = _numbers(plan, "quality", np.float64)
    diversity = _numbers(plan, "diversity", np.float64)
    domain = pc.fill_null(_column(plan, "domain").cast(pa.string()), "")
    encoded = pc.dictionary_encode(domain)
    names = [str(d) for d in encoded.dictionary.to_pylist()]
    codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    # A null cluster means "not assigned": it covers nothing.
    cluster_col = _column(plan, "cluster")
    valid = np.asarray(cluster_col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    cluster = np.asarray(pc.fill_null(cluster_col, 0).to_numpy(zero_copy_only=False))

    selected_tokens = n * tokens  # int64: exact for any realistic budget
    realised = int(selected_tokens.sum())
    picked = n > 0
    w_sel = selected_tokens.astype(np.float64)
    w_src = tokens.astype(np.float64)
    repeated = int(selected_tokens[n > 1].sum())
    return SelectionStats(
        realised_tokens=realised,
        copies=int(n.sum()),
        distinct_docs=int(picked.sum()),
        source_docs=int(plan.num_rows),
        source_tokens=int(tokens.sum()),
        domain_shares=_shares(codes, names, w_sel),
        natural_shares=_shares(codes, names, w_src),
        quality_mean=_mean(quality, w_sel),
        diversity_mean=_mean(diversity, w_sel),
        source_quality_mean=_mean(quality, w_src),
        source_diversity_mean=_mean(diversity, w_src),
        repeated_token_share=repeated / realised if realised else 0.0,
        clusters_covered=int(np.unique(cluster[valid & picked]).size),
        clusters_total=int(np.unique(cluster[valid]).size),
    )


# ---------------------------------------------------------------------------------------
# Overlap of two selections


def _selected(plan: pa.Table) -> pa.Table:
    """id, tokens, count of the selected documents; ids must be unique."""
    t = plan.select(["id", "tokens", "count"])
    t = t.filter(pc.greater(t.column("count"), 0))
    if pc.count_distinct(t.column("id")).as_py() != t.num_rows:
        raise ValueError("plan holds duplicate ids; a plan has one row per document")
    return t


def overlap(a: pa.Table, b: pa.Table) -> float:
    """Token-weighted overlap of two selections, in [0, 1].

    ``Σ_x min(n_a(x), n_b(x))·len(x) / min(Σ n_a·len, Σ n_b·len)``, documents joined on
    ``id`` (len(x) from ``a``; the plans of one comparison agree on it). 1 means one
    selection is contained in the other up to copies (each of its documents has at
    least as many copies in the other); 0 means no document in common. Undefined, and
    NaN, when either selection is empty.
    """
    sa, sb = _selected(a), _selected(b)
    ta = int(pc.sum(pc.multiply(sa.column("count"), sa.column("tokens"))).as_py() or 0)
    tb = int(pc.sum(pc.multiply(sb.column("count"), sb.column("tokens"))).as_py() or 0)
    den = min(ta, tb)
    if den <= 0:
        return math.nan
    right = sb.select(["id", "count"]).rename_columns(["id", "count_b"])
    joined = sa.join(right, "id", join_type="inner")
    if joined.num_rows == 0:
        return 0.0
    common = pc.min_element_wise(joined.column("count"), joined.column("count_b"))
    num = int(pc.sum(pc.multiply(common, joined.column("tokens"))).as_py())
    return num / den


def jaccard(a: pa.Table, b: pa.Table) -> float:
    """Jaccard index |A ∩ B| / |A ∪ B| of the sets of selected ids (n > 0), copies and
    lengths ignored; NaN when both selections are empty."""
    ia, ib = _selected(a).column("id"), _selected(b).column("id")
    union = len(ia) + len(ib)
    if union == 0:
        return math.nan
    inter = int(pc.sum(pc.is_in(ia, value_set=ib.combine_chunks())).as_py() or 0)
    return inter / (union - inter)


def _pairwise(plans: Sequence[pa.Table], fn) -> np.ndarray:
    m = len(plans)
    out = np.full((m, m), np.nan)
    for i in range(m):
        for j in range(i, m):
            out[i, j] = out[j, i] = fn(plans[i], plans[j])
    return out


# ---------------------------------------------------------------------------------------
# Markdown


def _delta(value: float, ref: float) -> str:
    return f"{value - ref:+.4g}" if math.isfinite(value) and math.isfinite(ref) else "–"


def _all_domains(stats: Mapping[str, SelectionStats], methods: Sequence[str]) -> list[str]:
    """Domains of every method's stats in order of first appearance."""
    seen: dict[str, None] = {}
    for m in methods:
        seen.update(dict.fromkeys(stats[m].natural_shares))
        seen.update(dict.fromkeys(stats[m].domain_shares))
    return list(seen)


def _same(values: Iterable[float]) -> bool:
    vals = list(values)
    finite = [v for v in vals if math.isfinite(v)]
    if len(finite) != len(vals) and finite:
        return False
    return all(math.isclose(v, finite[0], rel_tol=1e-9, abs_tol=1e-12) for v in finite)


def _check_inputs(
    stats: Mapping[str, SelectionStats], overlaps: np.ndarray, methods: Sequence[str]
) -> np.ndarray:
    missing = [m for m in methods if m not in stats]
    if missing:
        raise ValueError(f"no stats for method {missing[0]!r}; stats has {list(stats)}")
    ov = np.asarray(overlaps, dtype=float)
    if ov.shape != (len(methods), len(methods)):
        raise ValueError(
            f"overlaps has shape {ov.shape}, expected ({len(methods)}, {len(methods)})"
            f" for {len(methods)} methods"
        )
    return ov


def _budget_section(
    stats: Mapping[str, SelectionStats], methods: Sequence[str], target: int | None
) -> list[str]:
    first = stats[methods[0]]
    lines = ["## Budget", ""]
    lines.append(
        f"Source: {first.source_docs:,} documents, T_src = Σ len = {first.source_tokens:,} tokens."
        + (f" Target T_tgt = {target:,} tokens, shared by every method." if target else "")
    )
    lines.append("")
    headers = ["Method", "Realised Σ n·len"]
    if target:
        headers.append("Realised − T_tgt")
    headers += ["Copies Σ n", "Distinct docs (n > 0)", "Share of source docs"]
    rows = []
    for m in methods:
        s = stats[m]
        row: list[object] = [m, f"{s.realised_tokens:,}"]
        if target:
            dev = s.realised_tokens - target
            row.append(f"{dev:+,} ({100.0 * dev / target:+.3f}%)")
        docs_share = s.distinct_docs / s.source_docs if s.source_docs else math.nan
        row += [f"{s.copies:,}", f"{s.distinct_docs:,}", percent_of_share(docs_share)]
        rows.append(row)
    lines += [markdown_table(headers, rows), ""]
    empty = [m for m in methods if stats[m].realised_tokens == 0]
    if empty:
        lines += [f"Selected nothing: {', '.join(empty)}.", ""]
    return lines


def _domain_section(
    stats: Mapping[str, SelectionStats], methods: Sequence[str], images: Mapping[str, str]
) -> list[str]:
    domains = _all_domains(stats, methods)
    natural = stats[methods[0]].natural_shares
    lines = ["## Domain shares", ""]
    lines.append(
        "Token shares Σ n·len per domain of each selection; *natural* is the source's"
        " share Σ len, what uniform sampling would give."
    )
    lines.append("")
    rows = [
        (
            d,
            percent_of_share(natural.get(d, 0.0)),
            *(percent_of_share(stats[m].domain_shares.get(d, 0.0)) for m in methods),
        )
        for d in domains
    ]
    lines += [markdown_table(["Domain", "natural", *methods], rows), ""]
    return lines + image_lines(images, "compare_domain_shares", "Token share per domain per method")


def _score_section(
    stats: Mapping[str, SelectionStats], methods: Sequence[str], images: Mapping[str, str]
) -> list[str]:
    lines = ["## Quality and diversity of each selection", ""]
    lines.append(
        "Token-weighted means of the raw scores q(x) and d(x) (weights n·len for a"
        " selection, len for the source); Δ is the selection's mean minus the source's."
        " Repeated tokens: share of the selection from documents with n(x) > 1."
    )
    lines.append("")
    first = stats[methods[0]]
    rows: list[Sequence[object]] = [
        (
            "source (natural)",
            significant(first.source_quality_mean),
            "–",
            significant(first.source_diversity_mean),
            "–",
            "–",
            f"{first.clusters_total:,} of {first.clusters_total:,}",
        )
    ]
    for m in methods:
        s = stats[m]
        rows.append(
            (
                m,
                significant(s.quality_mean),
                _delta(s.quality_mean, s.source_quality_mean),
                significant(s.diversity_mean),
                _delta(s.diversity_mean, s.source_diversity_mean),
                percent_of_share(s.repeated_token_share),
                f"{s.clusters_covered:,} of {s.clusters_total:,}",
            )
        )
    headers = [
        "Selection",
        "Mean q",
        "Δq vs source",
        "Mean d",
        "Δd vs source",
        "Repeated tokens",
        "Clusters covered",
    ]
    lines += [markdown_table(headers, rows), ""]
    same_q = _same(stats[m].source_quality_mean for m in methods)
    same_d = _same(stats[m].source_diversity_mean for m in methods)
    if not (same_q and same_d):
        lines += [
            "Note: the plans hold different scores for the same documents (different"
            " scorer settings?), so the source row shows the first method's; each Δ is"
            " against that method's own source mean.",
            "",
        ]
    return lines + image_lines(
        images, "compare_quality_diversity", "Mean quality vs mean diversity"
    )


def _matrix(names: Sequence[str], values: np.ndarray) -> str:
    rows = [(n, *(percent_of_share(v) for v in row)) for n, row in zip(names, values, strict=True)]
    return markdown_table(["", *names], rows)


def _overlap_section(
    overlaps: np.ndarray,
    jaccards: np.ndarray | None,
    methods: Sequence[str],
    images: Mapping[str, str],
) -> list[str]:
    lines = ["## Overlap between selections", ""]
    lines.append(
        "Token-weighted overlap Σ_x min(n_a(x), n_b(x))·len(x) / min(Σ n_a·len, Σ n_b·len):"
        " 100% means one selection is contained in the other up to copies, 0% that they"
        " share no document; – where a selection is empty."
    )
    lines += ["", _matrix(methods, overlaps), ""]
    if len(methods) > 1:
        off = np.where(np.eye(len(methods), dtype=bool), np.nan, overlaps)
        if np.isfinite(off).any():
            i, j = np.unravel_index(int(np.nanargmax(off)), off.shape)
            k, m = np.unravel_index(int(np.nanargmin(off)), off.shape)
            lines += [
                f"Most alike: {methods[i]} and {methods[j]} ({percent_of_share(off[i, j])});"
                f" least alike: {methods[k]} and {methods[m]} ({percent_of_share(off[k, m])}).",
                "",
            ]
    if jaccards is not None:
        lines += [
            "Jaccard index of the sets of selected documents (n > 0), copies and lengths ignored:",
            "",
            _matrix(methods, jaccards),
            "",
        ]
    return lines + image_lines(images, "compare_overlap", "Overlap between selections")


def compare_markdown(
    stats: dict[str, SelectionStats],
    overlaps: np.ndarray,
    methods: list[str],
    target_tokens: int | None = None,
    images: dict[str, str] | None = None,
    jaccards: np.ndarray | None = None,
) -> str:
    """Render the comparison as Markdown: "# Mixture comparison", then Budget, Domain
    shares, Quality and diversity of each selection, Overlap between selections.

    ``overlaps[i, j]`` (and ``jaccards``, optional) are in [0, 1] with rows and columns
    in ``methods`` order; NaN shows as –. ``target_tokens`` adds each method's
    deviation from T_tgt. ``images`` maps a plot name from ``PLOTS`` (``".png"`` may be
    included) to a file name relative to the report; each is embedded in its section.
    """
    if not methods:
        raise ValueError("no methods to compare")
    ov = _check_inputs(stats, overlaps, methods)
    jac = None if jaccards is None else _check_inputs(stats, jaccards, methods)
    imgs = {k.removesuffix(".png"): v for k, v in (images or {}).items()}
    lines = ["# Mixture comparison", ""]
    lines += [
        f"Methods: {', '.join(methods)}. Every plan holds the same source documents;"
        " the methods differ only in how many copies n(x) each gets.",
        "",
    ]
    lines += _budget_section(stats, methods, target_tokens)
    lines += _domain_section(stats, methods, imgs)
    lines += _score_section(stats, methods, imgs)
    lines += _overlap_section(ov, jac, methods, imgs)
    return "\n".join(lines).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------
# Plots


def _colors(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _shares_plot(stats: Mapping[str, SelectionStats], methods: Sequence[str]) -> Figure:
    domains = _all_domains(stats, methods)
    width = min(max(6.0, (0.35 * len(methods) + 0.5) * len(domains) + 2.5), 18.0)
    fig = new_figure(width, 4.8)
    ax = fig.subplots()
    title = "Token share per domain: each method vs the natural share"
    if not domains:
        no_data_panel(ax, title, "domains")
        return fig
    x = np.arange(len(domains))
    group = 0.8
    w = group / len(methods)
    top = 0.0
    for k, (m, color) in enumerate(zip(methods, _colors(len(methods)), strict=True)):
        values = [100.0 * stats[m].domain_shares.get(d, 0.0) for d in domains]
        top = max(top, *values)
        ax.bar(x - group / 2 + (k + 0.5) * w, values, w, label=m, color=color)
    natural = [100.0 * stats[methods[0]].natural_shares.get(d, 0.0) for d in domains]
    top = max(top, *natural)
    ax.hlines(
        natural,
        x - group / 2 - 0.04,
        x + group / 2 + 0.04,
        colors=_SOURCE_COLOR,
        linestyles="--",
        lw=1.5,
        label="natural (source)",
        zorder=3,
    )
    label_ticks(ax, domains, x)
    ax.set_xlim(-0.6, len(domains) - 0.4)
    ax.set_ylim(0, max(top, 1.0) * 1.15)
    ax.set_xlabel("domain")
    ax.set_ylabel("token share (%)")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8, ncols=min(len(methods) + 1, 4))
    return fig


def _scores_plot(stats: Mapping[str, SelectionStats], methods: Sequence[str]) -> Figure:
    fig = new_figure(6.5, 5.0)
    ax = fig.subplots()
    title = "Mean quality vs mean diversity (token-weighted)"
    src = stats[methods[0]]
    points = [
        (m, stats[m].quality_mean, stats[m].diversity_mean, c)
        for m, c in zip(methods, _colors(len(methods)), strict=True)
    ]
    shown = [p for p in points if math.isfinite(p[1]) and math.isfinite(p[2])]
    has_source = math.isfinite(src.source_quality_mean) and math.isfinite(src.source_diversity_mean)
    if not shown and not has_source:
        no_data_panel(ax, title, "selection")
        return fig
    if has_source:
        ax.plot(
            [src.source_quality_mean],
            [src.source_diversity_mean],
            marker="*",
            ms=16,
            color=_SOURCE_COLOR,
            ls="none",
            zorder=3,
        )
        ax.annotate(
            "source",
            (src.source_quality_mean, src.source_diversity_mean),
            xytext=(6, -12),
            textcoords="offset points",
            fontsize=9,
            color=_SOURCE_COLOR,
        )
    for m, q, d, color in shown:
        ax.plot([q], [d], "o", ms=9, color=color, zorder=4)
        ax.annotate(m, (q, d), xytext=(6, 6), textcoords="offset points", fontsize=9)
    skipped = [p[0] for p in points if p not in shown]
    if skipped:
        ax.text(
            0.01,
            0.01,
            "nothing selected: " + ", ".join(skipped),
            transform=ax.transAxes,
            fontsize=8,
            va="bottom",
        )
    ax.margins(0.2)
    ax.set_xlabel("mean quality q(x) of the selection (raw)")
    ax.set_ylabel("mean diversity d(x) of the selection (raw)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def _overlap_plot(overlaps: np.ndarray, methods: Sequence[str]) -> Figure:
    side = min(max(4.5, 0.8 * len(methods) + 2.5), 16.0)
    fig = new_figure(side + 1.2, side)
    ax = fig.subplots()
    pct = 100.0 * np.asarray(overlaps, dtype=float)
    cmap = colormaps["Blues"].with_extremes(bad="#e6e6e6")
    im = ax.imshow(np.ma.masked_invalid(pct), cmap=cmap, vmin=0, vmax=100)
    if len(methods) <= 20:
        size = 9 if len(methods) <= 8 else 7
        for (i, j), v in np.ndenumerate(pct):
            text = f"{v:.0f}%" if math.isfinite(v) else "–"
            # Dark cells get white text so the number stays readable.
            color = "white" if math.isfinite(v) and v > 60 else "black"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=size)
    ax.set_yticks(range(len(methods)))
    ax.set_yticklabels(methods)
    label_ticks(ax, methods, range(len(methods)))
    ax.set_title("Token-weighted overlap between selections")
    fig.colorbar(im, ax=ax, label="overlap (% of the smaller selection's tokens)", shrink=0.8)
    return fig


def compare_plots(
    stats: dict[str, SelectionStats], overlaps: np.ndarray, methods: list[str]
) -> dict[str, bytes]:
    """PNG bytes for every plot in ``PLOTS``, keyed ``<name>.png``: grouped domain-share
    bars (natural shares dashed), mean quality vs mean diversity per method (source as
    ★), and the overlap heatmap in percent. Empty selections still render."""
    if not methods:
        raise ValueError("no methods to compare")
    ov = _check_inputs(stats, overlaps, methods)
    figures = {
        "compare_domain_shares": _shares_plot(stats, methods),
        "compare_quality_diversity": _scores_plot(stats, methods),
        "compare_overlap": _overlap_plot(ov, methods),
    }
    return {f"{name}.png": png_bytes(figures[name]) for name in PLOTS}


# ---------------------------------------------------------------------------------------
# Reading plans and writing the comparison


def read_plan(
    output: str, storage_options: dict | None = None, columns: Sequence[str] = PLAN_COLUMNS
) -> pa.Table:
    """The ``columns`` of ``<output>/plan/part-*.parquet``, parts in name order.

    ``output`` is a run's output folder, local or any fsspec URL (``s3://...``). A
    missing or empty ``plan`` folder raises ``ValueError`` naming the path.
    """
    fs, root = fsspec.core.url_to_fs(output, **(storage_options or {}))
    pattern = posixpath.join(root.rstrip("/"), "plan", "part-*.parquet")
    parts = sorted(fs.glob(pattern))
    if not parts:
        raise ValueError(f"no plan parts {output.rstrip('/')}/plan/part-*.parquet")
    tables = []
    for part in parts:
        with fs.open(part, "rb") as f:
            tables.append(pq.read_table(f, columns=list(columns)))
    return pa.concat_tables(tables, promote_options="permissive")


def _check_same_documents(ref: str, a: pa.Table, other: str, b: pa.Table) -> None:
    """Raise unless plans ``a`` (method ``ref``) and ``b`` hold the same ids and len."""
    what = (
        f"plans of {ref!r} and {other!r} hold different documents; a comparison needs"
        " plans from the same corpus and run (same shards, scores and tokenizer)"
    )
    ia, ib = a.column("id"), b.column("id")
    only_a = ia.filter(pc.invert(pc.is_in(ia, value_set=ib.combine_chunks())))
    only_b = ib.filter(pc.invert(pc.is_in(ib, value_set=ia.combine_chunks())))
    if len(only_a) or len(only_b):
        detail = []
        if len(only_a):
            detail.append(f"{len(only_a):,} only in {ref!r} (e.g. {only_a[0].as_py()!r})")
        if len(only_b):
            detail.append(f"{len(only_b):,} only in {other!r} (e.g. {only_b[0].as_py()!r})")
        raise ValueError(f"{what}: {'; '.join(detail)}")
    if a.num_rows != b.num_rows:
        raise ValueError(f"{what}: {a.num_rows:,} vs {b.num_rows:,} rows (duplicate ids?)")
    sa = a.select(["id", "tokens"]).sort_by("id")
    sb = b.select(["id", "tokens"]).sort_by("id")
    diff = pc.not_equal(sa.column("tokens"), sb.column("tokens"))
    if pc.any(diff).as_py():
        k = int(np.flatnonzero(diff.to_numpy(zero_copy_only=False))[0])
        raise ValueError(
            f"{what}: document {sa.column('id')[k].as_py()!r} has {sa.column('tokens')[k]} tokens"
            f" in {ref!r} but {sb.column('tokens')[k]} in {other!r}"
        )


def comparison_csv(stats: Mapping[str, SelectionStats], methods: Sequence[str]) -> str:
    """One row per method: method, realised_tokens, copies, distinct_docs, quality_mean,
    diversity_mean, repeated_token_share, clusters_covered, then ``share:<domain>`` (token
    share in [0, 1]) per domain. NaN (an empty selection's means) is an empty cell."""
    domains = _all_domains(stats, methods)
    header = [
        "method",
        "realised_tokens",
        "copies",
        "distinct_docs",
        "quality_mean",
        "diversity_mean",
        "repeated_token_share",
        "clusters_covered",
        *(f"share:{d}" for d in domains),
    ]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for m in methods:
        s = stats[m]
        writer.writerow(
            [
                m,
                s.realised_tokens,
                s.copies,
                s.distinct_docs,
                csv_float(s.quality_mean),
                csv_float(s.diversity_mean),
                csv_float(s.repeated_token_share),
                s.clusters_covered,
                *(csv_float(s.domain_shares.get(d, 0.0)) for d in domains),
            ]
        )
    return buf.getvalue()


def write_comparison(
    outputs: dict[str, str],
    out_dir: str,
    target_tokens: int | None = None,
    storage_options: dict | None = None,
) -> dict:
    """Compare the runs in ``outputs`` (method → run output folder) and write the result.

    Reads each method's ``plan/part-*.parquet`` (local or any fsspec URL;
    ``storage_options`` go to every filesystem), checks that all plans hold the same
    documents, and writes into ``out_dir``: the ``PLOTS`` PNGs, ``compare.csv``
    (``comparison_csv``) and ``compare.md``, last, so a reader never finds it with
    missing pictures. Methods keep the order of ``outputs``.

    Returns a JSON-able summary ``{method: {realised_tokens, copies, distinct_docs,
    quality_mean, diversity_mean, domain_shares: {domain: share}}, "overlap": M×M,
    "jaccard": M×M}`` (matrices in method order; NaN is ``None``).

    Raises ``ValueError`` when a method's plan folder is missing or empty (run that
    method first), when two plans hold different documents (naming both methods), or
    when a method is named like a summary key (``RESERVED``).
    """
    methods = list(outputs)
    if not methods:
        raise ValueError("no methods to compare: outputs is empty")
    clash = [m for m in methods if m in RESERVED]
    if clash:
        raise ValueError(f"method name {clash[0]!r} is reserved for the summary; rename it")
    options = storage_options or {}
    plans: dict[str, pa.Table] = {}
    for m in methods:
        try:
            plans[m] = read_plan(outputs[m], options)
        except ValueError as e:
            raise ValueError(
                f"method {m!r}: {e}; run {m!r} into {outputs[m]} first"
                " (its plan folder is missing or empty)"
            ) from None
    ref = methods[0]
    for m in methods[1:]:
        _check_same_documents(ref, plans[ref], m, plans[m])
    ordered = [plans[m] for m in methods]
    stats = {m: selection_stats(plans[m]) for m in methods}
    overlaps = _pairwise(ordered, overlap)
    jaccards = _pairwise(ordered, jaccard)

    fs, root = fsspec.core.url_to_fs(out_dir, **options)
    # Object stores have no directories; only a local target needs one created.
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(root, exist_ok=True)
    pngs = compare_plots(stats, overlaps, methods)
    for name, data in pngs.items():
        fs.pipe_file(posixpath.join(root, name), data)
    fs.pipe_file(
        posixpath.join(root, "compare.csv"), comparison_csv(stats, methods).encode("utf-8")
    )
    images = {name.removesuffix(".png"): name for name in pngs}
    text = compare_markdown(stats, overlaps, methods, target_tokens, images, jaccards)
    fs.pipe_file(posixpath.join(root, "compare.md"), text.encode("utf-8"))

    summary: dict = {
        m: {
            "realised_tokens": stats[m].realised_tokens,
            "copies": stats[m].copies,
            "distinct_docs": stats[m].distinct_docs,
            "quality_mean": json_float(stats[m].quality_mean),
            "diversity_mean": json_float(stats[m].diversity_mean),
            "domain_shares": dict(stats[m].domain_shares),
        }
        for m in methods
    }
    summary["overlap"] = [[json_float(v) for v in row] for row in overlaps]
    summary["jaccard"] = [[json_float(v) for v in row] for row in jaccards]
    return summary


__all__ = [
    "PLAN_COLUMNS",
    "PLOTS",
    "SelectionStats",
    "compare_markdown",
    "compare_plots",
    "comparison_csv",
    "jaccard",
    "overlap",
    "read_plan",
    "selection_stats",
    "write_comparison",
]
