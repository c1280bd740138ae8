"""The run report: why the mixture looks the way it does.

A run ends with a ``ReportInputs`` (aggregates only: no document text, arrays at most
a bounded sample per domain) and this module turns it into Markdown, PNG plots, and
row dicts for a table artifact. It is pure presentation: nothing here recomputes the
mixture, so a report can be rebuilt from saved aggregates.

Engine rule: this module never imports Prefect (flows import it, not the other way
round), and it never touches pyplot's global state: figures are built on
``matplotlib.figure.Figure`` with an explicit Agg canvas, so rendering a report neither
imports pyplot nor resolves or changes the process's backend.
"""

from __future__ import annotations

import csv
import io
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from matplotlib import cbook
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import EngFormatter, MaxNLocator

from samplemix.reporting.formatting import (
    image_lines,
    label_ticks,
    markdown_table,
    new_figure,
    no_data_panel,
    percent,
    png_bytes,
    significant,
)

#: Plot names in report order; ``plot_files`` writes ``<name>.png`` for each, and the
#: ``images`` argument of ``report_markdown`` is keyed by these names.
PLOTS = ("budget", "domain_shares", "quality", "diversity", "counts", "overlap")

#: A realised total further than this share of T_tgt from it gets a warning
#: (``budget_warning``), whatever the rounding spread says.
BUDGET_TOLERANCE = 0.05

_BEFORE_COLOR = "#9aa5b1"
_AFTER_COLOR = "#1f77b4"


@dataclass
class ReportInputs:
    """Aggregates of one run, enough to explain the mixture.

    Domain-keyed dicts may omit a domain (read as 0, e.g. a domain with no copies
    selected). ``overlap[i, j]`` is the share in [0, 1] of domain i's clusters that also
    contain domain j, rows and columns in ``overlap_domains`` order. ``shards`` has one
    row per source shard: shard, read, accepted, rejected, renamed (duplicate ids
    renamed) and skipped_rows (None for a shard that was read; for a shard skipped whole,
    read 0, its rows or "unknown"); ``truncated`` counts the documents each model read
    only a prefix of. ``passed_over`` lists the files under corpus.input that are not
    shards ({path, reason}); ``spread`` the documents with the largest rounding variance
    f(1−f)·len², largest first ({id, shard, tokens, expected, count, variance}).
    """

    target_tokens: int
    source_tokens: int
    expected_tokens: float
    realised_tokens: int
    sigma_tokens: float
    docs_before: dict[str, int]
    docs_after: dict[str, int]
    tokens_before: dict[str, int]
    tokens_after: dict[str, int]
    quality_by_domain: dict[str, np.ndarray]
    diversity_by_domain: dict[str, np.ndarray]
    count_histogram: dict[int, int]
    overlap_domains: list[str]
    overlap: np.ndarray
    cluster_sizes: np.ndarray
    rejects: dict[str, int]
    settings: dict[str, object]
    shards: list[dict] = field(default_factory=list)
    truncated: dict[str, int] = field(default_factory=dict)
    passed_over: list[dict] = field(default_factory=list)
    spread: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.overlap = np.asarray(self.overlap, dtype=float)
        self.cluster_sizes = np.asarray(self.cluster_sizes).reshape(-1)
        d = len(self.overlap_domains)
        # A mislabelled matrix would silently attribute overlaps to the wrong domains.
        if self.overlap.shape != (d, d):
            raise ValueError(
                f"overlap has shape {self.overlap.shape}, expected ({d}, {d})"
                f" for {d} overlap_domains"
            )


# ---------------------------------------------------------------------------------------
# Derived numbers


def _domains(inp: ReportInputs) -> list[str]:
    """Domains of the doc/token dicts in order of first appearance (pipeline order, unsorted)."""
    seen: dict[str, None] = {}
    for keys in (inp.docs_before, inp.tokens_before, inp.docs_after, inp.tokens_after):
        seen.update(dict.fromkeys(keys))
    return list(seen)


def _ordered(values: dict[str, np.ndarray], order: Sequence[str]) -> list[str]:
    """Keys of ``values`` in domain-table order, then any the table lacks (shown, not lost)."""
    return [d for d in order if d in values] + [d for d in values if d not in order]


def _shares(tokens: dict[str, int], domains: Sequence[str]) -> list[float]:
    """Token share per domain in percent; all zeros when there are no tokens at all."""
    total = sum(tokens.get(d, 0) for d in domains)
    if total <= 0:
        return [0.0] * len(domains)
    return [100.0 * tokens.get(d, 0) / total for d in domains]


def _domain_rows(inp: ReportInputs) -> list[dict]:
    """``table_rows`` with unrounded shares, so the Markdown rounds only once."""
    domains = _domains(inp)
    before = _shares(inp.tokens_before, domains)
    after = _shares(inp.tokens_after, domains)
    rows = [
        {
            "domain": d,
            "docs_before": int(inp.docs_before.get(d, 0)),
            "docs_after": int(inp.docs_after.get(d, 0)),
            "tokens_before": int(inp.tokens_before.get(d, 0)),
            "tokens_after": int(inp.tokens_after.get(d, 0)),
            "share_before_pct": b,
            "share_after_pct": a,
        }
        for d, b, a in zip(domains, before, after, strict=True)
    ]
    total = {
        key: sum(r[key] for r in rows)
        for key in ("docs_before", "docs_after", "tokens_before", "tokens_after")
    }
    rows.append(
        {
            "domain": "total",
            **total,
            "share_before_pct": 100.0 if total["tokens_before"] else 0.0,
            "share_after_pct": 100.0 if total["tokens_after"] else 0.0,
        }
    )
    return rows


def table_rows(inp: ReportInputs) -> list[dict]:
    """The domain table as row dicts, one per domain then a final ``domain="total"`` row.

    Keys: ``domain``, ``docs_before``, ``docs_after`` (copies selected, Σ n),
    ``tokens_before``, ``tokens_after``, ``share_before_pct``, ``share_after_pct`` (token
    shares in percent, rounded to 2 decimals). Values are plain ints/floats/str so the
    rows can go straight into a table artifact or JSON.
    """
    return [
        {
            **r,
            "share_before_pct": round(r["share_before_pct"], 2),
            "share_after_pct": round(r["share_after_pct"], 2),
        }
        for r in _domain_rows(inp)
    ]


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float).reshape(-1)
    return values[np.isfinite(values)]


# ---------------------------------------------------------------------------------------
# Warnings: one line each, for the report, the run's log and the terminal


def budget_warning(inp: ReportInputs) -> str | None:
    """One line when the realised total is more than ``BUDGET_TOLERANCE`` of T_tgt off
    it: by how much, the cause and the fix; None when it is within (or T_tgt is 0).

    The cause comes from ``inp``: the budget not allocated in full (Σ c·len off T_tgt)
    when that is most of the miss; else the rounding draws, naming the fewest
    documents of ``inp.spread`` that hold half of the rounding variance σ², or saying
    that no few documents do.
    """
    target = inp.target_tokens
    dev = inp.realised_tokens - target
    if not target or abs(dev) <= BUDGET_TOLERANCE * target:
        return None
    head = (
        f"realised {inp.realised_tokens:,} tokens, {100.0 * dev / target:+.1f}% off the target "
        f"T_tgt = {target:,} (more than ±{BUDGET_TOLERANCE:.0%})"
    )
    gap = inp.expected_tokens - target
    if abs(gap) > abs(inp.realised_tokens - inp.expected_tokens):
        return (
            f"{head}: only {inp.expected_tokens:,.0f} tokens were allocated (Σ c·len), the "
            "repeat cap leaving the rest; raise mixing.max_repeats or lower the budget"
        )
    variance = inp.sigma_tokens**2
    held = np.cumsum([d["variance"] for d in inp.spread])
    k = int(np.searchsorted(held, 0.5 * variance)) + 1  # the fewest holding half of σ²
    if variance > 0 and k <= len(inp.spread):
        top = inp.spread[0]
        # A capped count is whole and does not round: the cap helps documents expected
        # at least one copy, not one expected 0.9.
        cap = (
            ", or cap copies with mixing.max_repeats (a capped count is whole)"
            if top["expected"] >= 1
            else ""
        )
        shortest = min(d["tokens"] for d in inp.spread[:k])
        few = f"{k} documents hold" if k > 1 else "1 document holds"
        return (
            f"{head}: {few} {held[k - 1] / variance:.0%} of the rounding spread σ² (largest: "
            f"{top['id']!r} in {top['shard']}, {top['tokens']:,} tokens, expected "
            f"{top['expected']:.2f} copies, drew {top['count']}); split documents of "
            f"{shortest:,}+ tokens into smaller ones, or raise the budget (mixing.budget or "
            f"mixing.budget_ratio) so that each is expected many copies{cap}"
        )
    return (
        f"{head}: the rounding spread σ = {inp.sigma_tokens:,.0f} tokens is "
        f"{inp.sigma_tokens / target:.1%} of T_tgt, spread over many documents; raise the "
        "budget (mixing.budget or mixing.budget_ratio) or add documents: σ shrinks relative "
        "to T_tgt as they grow"
    )


def skipped_shards_line(shards: list[dict]) -> str | None:
    """One line on the shards skipped whole (rows of ``ReportInputs.shards`` whose
    skipped_rows is set): how many, their rows where known, how many could not tell;
    None when none was skipped."""
    skipped = [r["skipped_rows"] for r in shards if r.get("skipped_rows") is not None]
    if not skipped:
        return None
    rows = sum(n for n in skipped if n != "unknown")
    unknown = sum(n == "unknown" for n in skipped)
    cannot = f"; {unknown:,} shard{'s' if unknown > 1 else ''} unknown" if unknown else ""
    return (
        f"{len(skipped):,} unreadable shard{'s' if len(skipped) > 1 else ''} skipped "
        f"(corpus.on_bad_shard: skip): {rows:,} rows in skipped shards{cannot}; each is "
        "listed in rejects/rejects.parquet (row -1) with its error: fix or remove the file"
    )


def passed_over_line(passed_over: list[dict]) -> str | None:
    """One line on the files under corpus.input that are not shards; None when none."""
    if not passed_over:
        return None
    first = passed_over[0]
    return (
        f"{len(passed_over):,} path{'s' if len(passed_over) > 1 else ''} under corpus.input "
        f"not read as shards (e.g. {first['path']}: {first['reason']}); every one is listed "
        "in report/passed_over.csv"
    )


def run_warnings(inp: ReportInputs) -> list[str]:
    """The report's warnings, one line each, for the run's log and the terminal:
    budget missed (``budget_warning``), shards skipped, files passed over."""
    lines = (
        budget_warning(inp),
        skipped_shards_line(inp.shards),
        passed_over_line(inp.passed_over),
    )
    return [line for line in lines if line]


# ---------------------------------------------------------------------------------------
# Markdown


def _setting(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _budget_section(inp: ReportInputs, images: dict[str, str]) -> list[str]:
    dev = inp.realised_tokens - inp.target_tokens
    rel = f" ({100.0 * dev / inp.target_tokens:+.3f}% of T_tgt)" if inp.target_tokens else ""
    if inp.sigma_tokens > 0:
        z = dev / inp.sigma_tokens
        dev_sigma = f"{z:+.2f} σ"
        # |z| > 3 happens with probability < 0.3% under the rounding model alone.
        verdict = (
            "within the rounding spread"
            if abs(z) <= 2
            else "larger than rounding explains: check for capped or dropped documents"
            if abs(z) > 3
            else "at the edge of the rounding spread"
        )
    else:
        dev_sigma = "n/a (σ = 0: every expected count is an integer)"
        verdict = "exact" if dev == 0 else "nonzero although rounding is deterministic"
    ratio = (
        f"{inp.target_tokens / inp.source_tokens:.3g}×" if inp.source_tokens else "n/a (T_src = 0)"
    )
    rows = [
        ("Target T_tgt", f"{inp.target_tokens:,}"),
        ("Realised Σ n·len", f"{inp.realised_tokens:,}"),
        ("Deviation (realised − T_tgt)", f"{dev:+,} tokens{rel}"),
        ("Deviation in σ", dev_sigma),
        ("Expected Σ c·len", f"{inp.expected_tokens:,.1f}"),
        ("Source T_src = Σ len", f"{inp.source_tokens:,}"),
        ("T_tgt / T_src", ratio),
    ]
    lines = ["## Budget", ""]
    warning = budget_warning(inp)
    if warning:
        lines += [f"**Warning:** {warning}.", ""]
    lines += [markdown_table(["Quantity", "Value"], rows), ""]
    lines.append(
        f"Floor + Bernoulli rounding leaves σ = {inp.sigma_tokens:,.1f} tokens of spread around"
        " Σ c·len (σ = √Σ f(1−f)·len², f = c − ⌊c⌋), so the realised total is expected within"
        f" ±2 σ of the target; this run is {verdict}."
    )
    # Σ c·len equals T_tgt by construction; a gap beyond float noise means budget was lost.
    gap = inp.expected_tokens - inp.target_tokens
    if abs(gap) > max(1.0, 1e-9 * inp.target_tokens):
        lines.append(
            f"Note: Σ c·len differs from T_tgt by {gap:+,.1f} tokens: part of the budget was not"
            " allocated (e.g. a repeat cap without redistribution)."
        )
    lines.append("")
    return lines + image_lines(images, "budget", "Target vs realised tokens")


def _domain_section(inp: ReportInputs, images: dict[str, str]) -> list[str]:
    body = [
        (
            r["domain"],
            f"{r['docs_before']:,}",
            f"{r['docs_after']:,}",
            f"{r['tokens_before']:,}",
            f"{r['tokens_after']:,}",
            percent(r["share_before_pct"]),
            percent(r["share_after_pct"]),
        )
        for r in _domain_rows(inp)
    ]
    body[-1] = ("**total**", *body[-1][1:])
    headers = [
        "Domain",
        "Docs before",
        "Docs after (Σ n)",
        "Tokens before",
        "Tokens after",
        "Share before",
        "Share after",
    ]
    lines = ["## Domains", ""]
    lines.append(
        "Domain proportions are not set by hand: they emerge from the per-document counts."
        " Shares are token shares; docs after counts copies."
    )
    lines += ["", markdown_table(headers, body), ""]
    return lines + image_lines(images, "domain_shares", "Token share per domain before and after")


def _score_section(
    title: str,
    name: str,
    values: dict[str, np.ndarray],
    order: Sequence[str],
    images: dict[str, str],
) -> list[str]:
    rows = []
    dropped = 0
    for d in _ordered(values, order):
        raw = np.asarray(values[d]).reshape(-1)
        v = _finite(raw)
        dropped += raw.size - v.size
        if v.size == 0:
            rows.append((d, "0", "–", "–", "–", "–"))
            continue
        p10, median, p90 = np.percentile(v, [10, 50, 90])
        rows.append(
            (
                d,
                f"{v.size:,}",
                significant(v.mean()),
                significant(median),
                significant(p10),
                significant(p90),
            ),
        )
    lines = [f"### {title}", ""]
    if not rows:
        return lines + ["none recorded", ""]
    lines += [markdown_table(["Domain", "n", "Mean", "Median", "p10", "p90"], rows), ""]
    if dropped:
        lines += [f"{dropped:,} non-finite values were left out of these statistics.", ""]
    return lines + image_lines(images, name, f"{title} per domain")


def _counts_section(inp: ReportInputs, images: dict[str, str]) -> list[str]:
    lines = ["## Count distribution", ""]
    hist = sorted((int(n), int(k)) for n, k in inp.count_histogram.items())
    total = sum(k for _, k in hist)
    if not total:
        return lines + ["none recorded", ""]
    rows = [(n, f"{k:,}", percent(100.0 * k / total)) for n, k in hist]
    picked = sum(k for n, k in hist if n > 0)
    lines.append(
        f"{picked:,} of {total:,} documents ({percent(100.0 * picked / total)}) are selected"
        f" at least once; the most copies of one document is {hist[-1][0]}."
    )
    lines += ["", markdown_table(["n(x)", "Documents", "Share"], rows), ""]
    return lines + image_lines(images, "counts", "Histogram of copies per document")


def _cluster_section(inp: ReportInputs) -> list[str]:
    lines = ["## Clusters", ""]
    sizes = inp.cluster_sizes.astype(np.int64)
    if sizes.size == 0:
        return lines + ["none recorded", ""]
    total = int(sizes.sum())
    lines.append(
        f"K = {sizes.size:,} clusters over {total:,} documents; size min {sizes.min():,},"
        f" median {np.median(sizes):,.0f}, max {sizes.max():,}; empty clusters:"
        f" {int((sizes == 0).sum()):,}."
    )
    # Stable sort so ties list the lower cluster id first, run after run.
    top = np.argsort(-sizes, kind="stable")[:10]
    rows = [
        (rank, int(k), f"{int(sizes[k]):,}", percent(100.0 * sizes[k] / total) if total else "–")
        for rank, k in enumerate(top, start=1)
    ]
    lines += [
        "",
        "Largest clusters:",
        "",
        markdown_table(["Rank", "Cluster", "Documents", "Share"], rows),
    ]
    return lines + [""]


def _overlap_section(inp: ReportInputs, images: dict[str, str]) -> list[str]:
    lines = ["## Cross-domain cluster overlap", ""]
    names = inp.overlap_domains
    if not names:
        return lines + ["none recorded", ""]
    lines.append(
        "Row i, column j: share of domain i's clusters that also contain documents of"
        " domain j. High values mean the domains share topics, so diversity is measured"
        " across domains rather than inside each."
    )
    pct = 100.0 * inp.overlap
    off = pct.copy()
    np.fill_diagonal(off, -np.inf)
    if len(names) > 1:
        i, j = np.unravel_index(int(np.argmax(off)), off.shape)
        lines += [
            "",
            f"Highest: {pct[i, j]:.1f}% of {names[i]}'s clusters also contain {names[j]}.",
        ]
    rows = [(n, *(f"{v:.1f}%" for v in row)) for n, row in zip(names, pct, strict=True)]
    lines += ["", markdown_table(["clusters of ↓ / also contain →", *names], rows), ""]
    return lines + image_lines(images, "overlap", "Cross-domain cluster overlap")


SHARD_ROWS = 20  # shards listed in report.md; shards.csv has them all


def _rows_section(inp: ReportInputs) -> list[str]:
    lines = ["## Rows read, accepted and rejected", ""]
    if inp.shards:
        total = {k: sum(r[k] for r in inp.shards) for k in ("read", "accepted", "rejected")}
        lines += [
            f"{total['read']:,} rows read = {total['accepted']:,} accepted + "
            f"{total['rejected']:,} rejected, over {len(inp.shards):,} shards "
            "(every shard: `shards.csv`).",
            "",
        ]
        renamed = sum(r["renamed"] for r in inp.shards)
        if renamed:
            lines += [
                f"{renamed:,} documents with a duplicate id were renamed `<id>#<shard>:<row>`.",
                "",
            ]
        skipped = skipped_shards_line(inp.shards)
        if skipped:
            body = [
                (r["shard"], _count(r["skipped_rows"]))
                for r in inp.shards
                if r.get("skipped_rows") is not None
            ]
            shown = f" ({SHARD_ROWS} of {len(body)} listed)" if len(body) > SHARD_ROWS else ""
            lines += [
                f"**Skipped shards:** {skipped}. Their rows are in none of the counts above"
                f"{shown}.",
                "",
                markdown_table(["Skipped shard", "Rows"], body[:SHARD_ROWS]),
                "",
            ]
    if inp.passed_over:
        shown = inp.passed_over[:SHARD_ROWS]
        title = (
            f"Files under corpus.input that are not shards, not read ({len(shown)} of "
            f"{len(inp.passed_over)}; every one: `passed_over.csv`):"
        )
        body = [(f["path"], f["reason"]) for f in shown]
        lines += [title, "", markdown_table(["File", "Reason"], body, right=2), ""]
    for model, n in inp.truncated.items():
        if n:
            lines += [
                f"Documents longer than the {model} model reads (it used their start): {n:,}.",
                "",
            ]
    if not inp.rejects:
        return lines + ["No rows rejected.", ""]
    rows = sorted(inp.rejects.items(), key=lambda kv: (-kv[1], kv[0]))
    body = [(reason, f"{count:,}") for reason, count in rows]
    body.append(("**total**", f"{sum(inp.rejects.values()):,}"))
    lines += [markdown_table(["Reason", "Count"], body), ""]
    worst = sorted(
        (r for r in inp.shards if r["rejected"] or r["renamed"]),
        key=lambda r: (-r["rejected"], -r["renamed"], r["shard"]),
    )
    if worst:
        shown = worst[:SHARD_ROWS]
        title = f"Shards with rejects ({len(shown)} of {len(worst)})"
        body = [
            (
                r["shard"],
                f"{r['read']:,}",
                f"{r['accepted']:,}",
                f"{r['rejected']:,}",
                f"{r['renamed']:,}",
            )
            for r in shown
        ]
        lines += [
            title,
            "",
            markdown_table(["Shard", "Read", "Accepted", "Rejected", "Renamed"], body),
            "",
        ]
    return lines


def _count(n: int | str) -> str:
    return f"{n:,}" if isinstance(n, int) else n


def shards_csv(inp: ReportInputs) -> str:
    """The per-shard row accounting as CSV (header: shard,read,accepted,rejected,renamed,
    and skipped_rows when a shard was skipped: empty for the shards read, the rows or
    ``unknown`` for the skipped ones)."""
    columns = ["shard", "read", "accepted", "rejected", "renamed"]
    # Only when needed, so that readers of the five columns keep working on clean runs.
    if any(r.get("skipped_rows") is not None for r in inp.shards):
        columns.append("skipped_rows")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(inp.shards)
    return buf.getvalue()


def passed_over_csv(inp: ReportInputs) -> str:
    """The files under corpus.input that are not shards as CSV (header: path,reason)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["path", "reason"])
    writer.writeheader()
    writer.writerows(inp.passed_over)
    return buf.getvalue()


def report_markdown(inp: ReportInputs, images: dict[str, str] | None = None) -> str:
    """Render the report as Markdown.

    Sections in order: Budget (opening with ``budget_warning`` when there is one),
    Settings, Domains, Scores (quality, diversity), Count distribution, Clusters,
    Cross-domain cluster overlap, Rows read, accepted and rejected (with the shards
    skipped and the files passed over). ``images`` maps a plot name from ``PLOTS``
    (e.g. ``"budget"``) to a file name relative to the report; each is embedded in its
    section. Names outside ``PLOTS`` go to a final "Other figures" section rather than
    being dropped.
    """
    images = dict(images or {})
    method = inp.settings.get("method")
    title = f"# Mixture report: {method}" if method else "# Mixture report"
    lines = [title, ""]
    lines += _budget_section(inp, images)
    lines += ["## Settings", ""]
    if inp.settings:
        settings = [(k, _setting(v)) for k, v in inp.settings.items()]
        lines += [markdown_table(["Setting", "Value"], settings, right=2), ""]
    else:
        lines += ["none recorded", ""]
    lines += _domain_section(inp, images)
    order = _domains(inp)
    lines += ["## Scores", "", "Raw scores before normalisation; n may be a bounded sample.", ""]
    lines += _score_section("Quality q(x)", "quality", inp.quality_by_domain, order, images)
    lines += _score_section("Diversity d(x)", "diversity", inp.diversity_by_domain, order, images)
    lines += _counts_section(inp, images)
    lines += _cluster_section(inp)
    lines += _overlap_section(inp, images)
    lines += _rows_section(inp)
    extra = [name for name in images if name not in PLOTS]
    if extra:
        lines += ["## Other figures", ""]
        for name in extra:
            lines += image_lines(images, name, name)
    return "\n".join(lines).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------
# Plots


def _budget_plot(inp: ReportInputs) -> Figure:
    fig = new_figure(9.0, 4.2)
    ax_abs, ax_dev = fig.subplots(1, 2, width_ratios=[1.4, 1])
    sigma = max(float(inp.sigma_tokens), 0.0)
    values = [inp.target_tokens, inp.realised_tokens]
    bars = ax_abs.bar(
        ["Target T_tgt", "Realised Σ n·len"],
        values,
        color=[_BEFORE_COLOR, _AFTER_COLOR],
        width=0.6,
    )
    # σ belongs to the realised draw only; the target is exact.
    if sigma > 0:
        ax_abs.errorbar([1], [inp.realised_tokens], yerr=[sigma], color="black", capsize=8)
    # Labels inside the bars, where the σ whisker on top cannot cover them.
    ax_abs.bar_label(bars, labels=[f"{v:,}" for v in values], label_type="center", color="white")
    ax_abs.yaxis.set_major_formatter(EngFormatter(sep=" "))
    ax_abs.set_ylabel("tokens")
    ax_abs.set_title("Token budget (error bar: ±1 σ rounding spread)")
    ax_abs.margins(y=0.12)

    # On the absolute scale σ is usually invisible, so the deviation gets its own axis.
    dev = inp.realised_tokens - inp.target_tokens
    if sigma > 0:
        for k, alpha in ((2, 0.12), (1, 0.25)):
            ax_dev.axhspan(-k * sigma, k * sigma, color=_AFTER_COLOR, alpha=alpha, lw=0)
            ax_dev.text(0.95, k * sigma, f"+{k} σ ", ha="right", va="bottom", fontsize=8)
            ax_dev.text(0.95, -k * sigma, f"−{k} σ ", ha="right", va="top", fontsize=8)
    ax_dev.axhline(0, color="black", lw=1)
    ax_dev.plot([0], [dev], "o", color="#d62728", ms=9, zorder=3)
    span = max(3 * sigma, 1.5 * abs(dev), 2.0)
    ax_dev.set_ylim(-span, span)
    ax_dev.set_xlim(-1, 1)
    ax_dev.set_xticks([])
    # Token deviations are whole numbers; without this a tiny span gets milli-token ticks.
    ax_dev.yaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax_dev.yaxis.set_major_formatter(EngFormatter(sep=" "))
    ax_dev.set_ylabel("realised − T_tgt (tokens)")
    if sigma > 0:
        title = f"Deviation {dev:+,} tokens, {dev / sigma:+.2f} σ\n(bands: ±1 σ, ±2 σ)"
    else:
        title = f"Deviation {dev:+,} tokens\n(σ = 0: rounding is exact)"
    ax_dev.set_title(title)
    return fig


def _shares_plot(inp: ReportInputs) -> Figure:
    domains = _domains(inp)
    fig = new_figure(min(max(6.0, 1.0 * len(domains) + 2.5), 16.0), 4.5)
    ax = fig.subplots()
    if not domains:
        no_data_panel(ax, "Token share per domain", "domains")
        return fig
    x = np.arange(len(domains))
    w = 0.4
    before = _shares(inp.tokens_before, domains)
    after = _shares(inp.tokens_after, domains)
    b1 = ax.bar(x - w / 2, before, w, label="before (source)", color=_BEFORE_COLOR)
    b2 = ax.bar(x + w / 2, after, w, label="after (mixture)", color=_AFTER_COLOR)
    # Value labels help only while there is room for them.
    if len(domains) <= 12:
        for bars in (b1, b2):
            ax.bar_label(bars, labels=[f"{v:.1f}" for v in bars.datavalues], padding=2, fontsize=8)
    label_ticks(ax, domains, x)
    ax.set_ylabel("token share (%)")
    ax.set_xlabel("domain")
    ax.set_ylim(0, max(max(before), max(after), 1.0) * 1.15)
    ax.set_title("Token share per domain: source vs mixture")
    ax.legend(frameon=False)
    return fig


def _draw_box(ax: Axes, x: float, values: np.ndarray, width: float = 0.6) -> None:
    """One Tukey box at ``x``: p25–p75 box, median line, 1.5 IQR whiskers, fliers, mean ◆.

    Drawn by hand because ``Axes.boxplot``/``bxp`` iterate over all rcParams, which makes
    matplotlib resolve its default backend by importing pyplot: a global side effect
    this module promises not to have.
    """
    (st,) = cbook.boxplot_stats(values, whis=1.5)
    half = width / 2
    ax.add_patch(
        Rectangle(
            (x - half, st["q1"]),
            width,
            st["q3"] - st["q1"],
            facecolor="#cfe2f3",
            edgecolor="#1f4e79",
            zorder=2,
        )
    )
    ax.vlines([x, x], [st["whislo"], st["q3"]], [st["q1"], st["whishi"]], color="black", lw=1)
    ax.hlines([st["whislo"], st["whishi"]], x - half / 2, x + half / 2, color="black", lw=1)
    ax.hlines(st["med"], x - half, x + half, color="#1f4e79", lw=1.5, zorder=3)
    if len(st["fliers"]):
        ax.plot(np.full(len(st["fliers"]), x), st["fliers"], ".", color="black", ms=3, alpha=0.4)
    ax.plot([x], [st["mean"]], "D", color="#d62728", ms=6, zorder=4)


def _box_plot(
    values: dict[str, np.ndarray], order: Sequence[str], title: str, ylabel: str
) -> Figure:
    names = _ordered(values, order)
    fig = new_figure(min(max(6.0, 1.25 * len(names) + 2.0), 16.0), 4.5)
    ax = fig.subplots()
    data = [_finite(values[d]) for d in names]
    # Boxes only for domains with data; empty ones keep their slot and say so.
    filled = [i for i, v in enumerate(data) if v.size]
    if not filled:
        no_data_panel(ax, title, "scores")
        return fig
    for i in filled:
        _draw_box(ax, i, data[i])
    for i, v in enumerate(data):
        if not v.size:
            ax.text(i, 0.5, "no data", ha="center", va="center", transform=ax.get_xaxis_transform())
    label_ticks(
        ax, [f"{d}\n(n={v.size:,})" for d, v in zip(names, data, strict=True)], range(len(names))
    )
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_xlabel("domain (n = values summarised)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} (box: p25–p75, line: median, ◆: mean)")
    return fig


def _counts_plot(inp: ReportInputs) -> Figure:
    fig = new_figure(7.0, 4.2)
    ax = fig.subplots()
    hist = sorted((int(n), int(k)) for n, k in inp.count_histogram.items() if k > 0)
    if not hist:
        no_data_panel(ax, "Distribution of per-document counts n(x)", "counts recorded")
        return fig
    ns, docs = zip(*hist, strict=True)
    ax.bar(ns, docs, width=0.8, color=_AFTER_COLOR)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # n = 0 typically dwarfs the repeats; a log axis keeps the tail visible.
    wide = max(docs) / min(docs) > 100
    if wide:
        ax.set_yscale("log")
    ax.set_xlabel("copies n(x) of a document in the mixture")
    ax.set_ylabel("documents" + (" (log scale)" if wide else ""))
    ax.set_title("Distribution of per-document counts n(x)")
    return fig


def _overlap_plot(inp: ReportInputs) -> Figure:
    names = inp.overlap_domains
    side = min(max(4.5, 0.7 * len(names) + 2.5), 16.0)
    fig = new_figure(side + 1.2, side)
    ax = fig.subplots()
    if not names:
        no_data_panel(ax, "Cross-domain cluster overlap", "overlap recorded")
        return fig
    pct = 100.0 * inp.overlap
    im = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    if len(names) <= 20:
        size = 9 if len(names) <= 8 else 7
        for (i, j), v in np.ndenumerate(pct):
            # Dark cells get white text so the number stays readable.
            color = "white" if v > 60 else "black"
            ax.text(j, i, f"{v:.0f}%", ha="center", va="center", color=color, fontsize=size)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    label_ticks(ax, names, range(len(names)))
    ax.set_xlabel("also containing domain j")
    ax.set_ylabel("clusters of domain i")
    ax.set_title("Cross-domain cluster overlap")
    fig.colorbar(im, ax=ax, label="% of domain i's clusters", shrink=0.8)
    return fig


def plot_files(inp: ReportInputs) -> dict[str, bytes]:
    """PNG bytes for every plot in ``PLOTS``, keyed ``<name>.png``, in report order.

    Plots with no data (e.g. no scores recorded) still render, with a "no ..." note, so
    the report's image links never dangle.
    """
    order = _domains(inp)
    figures = {
        "budget": _budget_plot(inp),
        "domain_shares": _shares_plot(inp),
        "quality": _box_plot(inp.quality_by_domain, order, "Quality q(x)", "raw quality q(x)"),
        "diversity": _box_plot(
            inp.diversity_by_domain, order, "Diversity d(x)", "raw diversity d(x)"
        ),
        "counts": _counts_plot(inp),
        "overlap": _overlap_plot(inp),
    }
    return {f"{name}.png": png_bytes(figures[name]) for name in PLOTS}


# ---------------------------------------------------------------------------------------
# Writing


def write_report(inp: ReportInputs, out_dir: str, storage_options: dict | None = None) -> list[str]:
    """Write the PNGs and ``report.md`` (embedding them) into ``out_dir``.

    ``out_dir`` is any fsspec URL or local path (``/tmp/x``, ``s3://bucket/run``);
    ``storage_options`` go to the filesystem. Returns the written paths as
    ``<out_dir>/<file>``, PNGs first and ``report.md`` last: the report is written after
    its images so a reader never finds it with missing pictures.
    """
    fs, root = fsspec.core.url_to_fs(out_dir, **(storage_options or {}))
    # Object stores have no directories; only a local target needs one created.
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(root, exist_ok=True)
    base = out_dir.rstrip("/")
    written = []
    pngs = plot_files(inp)
    for name, data in pngs.items():
        fs.pipe_file(posixpath.join(root, name), data)
        written.append(f"{base}/{name}")
    images = {name.removesuffix(".png"): name for name in pngs}
    if inp.shards:
        fs.pipe_file(posixpath.join(root, "shards.csv"), shards_csv(inp).encode("utf-8"))
        written.append(f"{base}/shards.csv")
    if inp.passed_over:
        data = passed_over_csv(inp).encode("utf-8")
        fs.pipe_file(posixpath.join(root, "passed_over.csv"), data)
        written.append(f"{base}/passed_over.csv")
    text = report_markdown(inp, images)
    fs.pipe_file(posixpath.join(root, "report.md"), text.encode("utf-8"))
    written.append(f"{base}/report.md")
    return written


def write_files(out_dir: str, files: dict[str, bytes], storage_options: dict | None = None) -> None:
    """Write ``files`` ({name: bytes}) into ``out_dir`` (a local path or any fsspec URL) in
    the given order: put a Markdown report last, so a reader never finds it with
    missing pictures."""
    fs, root = fsspec.core.url_to_fs(out_dir, **(storage_options or {}))
    # Object stores have no directories; only a local target needs one created.
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(root, exist_ok=True)
    for name, data in files.items():
        fs.pipe_file(posixpath.join(root, name), data)


__all__ = [
    "BUDGET_TOLERANCE",
    "PLOTS",
    "ReportInputs",
    "budget_warning",
    "passed_over_line",
    "plot_files",
    "report_markdown",
    "run_warnings",
    "skipped_shards_line",
    "table_rows",
    "write_files",
    "write_report",
]
