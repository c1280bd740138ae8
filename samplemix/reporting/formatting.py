"""Numbers, tables and figures as the report modules write them: Markdown cells and tables,
CSV cells, JSON values, and matplotlib figures drawn headless to PNG.

Report statistics can be NaN (the mean of an empty selection, say) and a report must
still render, so each function states what it makes of a non-finite value.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110


def percent(value: float) -> str:
    """A finite ``value``, already in percent, with one decimal: ``12.3%``. A positive
    value that would round to ``0.0%`` shows as ``<0.1%``, so that a small share does not
    read as none. (``percent_of_share`` takes a share that may be NaN.)"""
    if 0 < value < 0.05:
        return "<0.1%"
    return f"{value:.1f}%"


def percent_of_share(share: float) -> str:
    """A share in [0, 1] as ``percent(100 · share)``; NaN or ±inf shows –."""
    return percent(100.0 * share) if math.isfinite(share) else "–"


def significant(value: float) -> str:
    """``value`` to four significant digits (scores live on very different scales:
    0..9, ~1e-3, −perplexity); NaN or ±inf shows –."""
    return f"{value:.4g}" if math.isfinite(value) else "–"


def csv_float(value: float | None) -> str:
    """A CSV cell: the exact float (its repr), or empty for None, NaN or ±inf."""
    return repr(float(value)) if value is not None and math.isfinite(value) else ""


def json_float(value: float) -> float | None:
    """A JSON value: ``value`` as a float, or None (null) for NaN or ±inf, which JSON
    cannot hold."""
    return float(value) if math.isfinite(value) else None


__all__ = ["csv_float", "json_float", "percent", "percent_of_share", "significant"]


def _cell(value: object) -> str:
    """A Markdown table cell: pipes escaped and newlines flattened so the row stays one row."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]], right: int = 1) -> str:
    """A pipe table; columns from index ``right`` on are right-aligned (numbers)."""
    align = ["---" if i < right else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def image_lines(images: dict[str, str], name: str, alt: str) -> list[str]:
    return [f"![{alt}]({images[name]})", ""] if name in images else []


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    # An explicit Agg canvas: rendering works headless and leaves pyplot's backend alone.
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def label_ticks(ax: Axes, names: Sequence[str], positions: Sequence[float]) -> None:
    """Domain tick labels, slanted when the longest line would not fit its slot."""
    ax.set_xticks(list(positions))
    # About 11 characters of 10 pt text per inch; axes take roughly 85% of the width.
    slot_chars = 11 * 0.85 * ax.figure.get_figwidth() / max(len(names), 1)
    longest = max((len(line) for n in names for line in n.split("\n")), default=0)
    if longest > slot_chars:
        # Slanted multi-line labels drift apart; one line per slanted label stays aligned.
        flat = [n.replace("\n", " ") for n in names]
        ax.set_xticklabels(flat, rotation=30, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticklabels(names)


def no_data_panel(ax: Axes, title: str, what: str) -> None:
    """An empty panel that keeps its title, so a missing input is visible, not a blank."""
    ax.set_title(title)
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
