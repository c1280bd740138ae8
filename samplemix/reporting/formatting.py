"""Numbers as the report modules write them: Markdown cells, CSV cells and JSON values.

Report statistics can be NaN (the mean of an empty selection, say) and a report must
still render, so each function states what it makes of a non-finite value.
"""

from __future__ import annotations

import math


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
