"""Tests for samplemix.reporting.formatting: the numbers every report writes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from samplemix.reporting.formatting import (
    csv_float,
    json_float,
    percent,
    percent_of_share,
    significant,
)


@pytest.mark.parametrize(
    ("value", "text"),
    [(12.345, "12.3%"), (0.0, "0.0%"), (0.04, "<0.1%"), (0.05, "0.1%"), (100.0, "100.0%")],
)
def test_percent_takes_a_value_already_in_percent(value: float, text: str) -> None:
    assert percent(value) == text


@pytest.mark.parametrize(
    ("share", "text"),
    [(0.5, "50.0%"), (0.0004, "<0.1%"), (0.0, "0.0%"), (math.nan, "–"), (math.inf, "–")],
)
def test_percent_of_share_scales_a_share_and_shows_a_dash_for_non_finite(
    share: float, text: str
) -> None:
    assert percent_of_share(share) == text


def test_significant_keeps_four_digits_on_any_scale() -> None:
    assert [significant(v) for v in (3.14159, 0.00123456, -1234.5, np.float64(7.0))] == [
        "3.142",
        "0.001235",
        "-1234",
        "7",
    ]
    assert significant(math.nan) == significant(-math.inf) == "–"


def test_csv_float_is_exact_or_empty() -> None:
    assert csv_float(0.1) == "0.1"
    assert float(csv_float(1 / 3)) == 1 / 3
    assert csv_float(np.float32(0.5)) == "0.5"
    assert [csv_float(v) for v in (None, math.nan, math.inf)] == ["", "", ""]


def test_json_float_is_a_float_or_none() -> None:
    value = json_float(np.float64(0.25))
    assert value == 0.25 and type(value) is float
    assert json_float(math.nan) is None and json_float(-math.inf) is None
