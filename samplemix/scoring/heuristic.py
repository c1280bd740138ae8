"""Heuristic quality scorers, no model: ten Gopher/C4 rules, soft-passed or graded.

``heuristic`` (``HeuristicScorer``):

Rule-based text statistics after Gopher (Rae et al. 2021, appendix A) and the C4
cleaning rules. Each rule turns one statistic into a *soft pass* value in [0, 1]:
1 inside its bound, falling linearly over a margin outside it to 0 at the value in
the "zero at" column, and 0 beyond. The score is the **unweighted mean of the ten
pass values**, so it lies in [0, 1]; a document failing one rule outright loses
0.1. Words are whitespace-separated tokens; lines are the non-blank lines,
stripped.

========================  =============================================  ===========  ==========
rule                      statistic                                      pass = 1     zero at
========================  =============================================  ===========  ==========
``word_count``            number of words                                50..100,000  0; 200,000
``mean_word_length``      mean characters per word                       3..10        1; 12
``symbol_ratio``          (``#`` chars + ``...`` + ``…``) per word       <= 0.1       0.2
``ellipsis_lines``        share of lines ending in ``...`` or ``…``      <= 0.3       0.6
``bullet_lines``          share of lines starting with a bullet          <= 0.9       1.0
                          (``•●○◦▪‣·*-–``)
``alpha_words``           share of words containing a letter             >= 0.8       0.4
``stop_words``            occurrences of the, be, to, of, and, that,     >= 2         0
                          have, with (case-insensitive)
``duplicate_lines``       share of lines that repeat an earlier line     <= 0.3       0.6
``uppercase``             uppercase letters / letters (0 if none)        <= 0.25      0.5
``digit_punct``           non-letters (digits, punctuation, symbols)     <= 0.25      0.5
                          / non-space characters
========================  =============================================  ===========  ==========

Only the first 100,000 characters are analysed, so a 1 MB document costs the
same as a 100 kB one; its word count is extrapolated from that prefix (prefix
words x total length / prefix length). Empty or whitespace-only text scores 0.

``graded-heuristic`` (``GradedHeuristicScorer``): ``heuristic`` gives each rule a *soft
pass* that is 1 anywhere inside the accepted range, so every document that passes all
ten rules scores exactly 1.0 and is not ordered at all. This scorer uses the same ten
statistics (``text_statistics``) and the same bounds (``RULES``), but grades each rule
by the **signed margin** of its statistic to the nearest bound of its accepted range,
positive inside and negative outside, in units of the rule's scale:

    z = min((x - lo) / s_lo, (hi - x) / s_hi)        (an infinite bound drops out)
    g = sigmoid(z) = 1 / (1 + exp(-z))               in (0, 1)

so ``g`` is 0.5 on the bound, keeps rising the further ``x`` sits inside the range
(up to the point farthest from both bounds), and keeps falling outside it. ``g >= 0.5``
exactly where the old rule passes (its soft pass is 1).

Scales. For the share and ratio rules ``s`` is half the old rule's fall-off width on
that side (``Bound.below`` / ``Bound.above``), so the old "zero at" value maps to
``sigmoid(-2) ~ 0.12`` and a statistic that far *inside* the bound to ``sigmoid(2) ~
0.88``. The two count rules are graded on a log scale, ``x -> log(1 + x)``, with one
unit per doubling (``s = log 2``): the difference between 60 and 120 words matters as
much as that between 600 and 1,200.

    ====================  ==========================  ===========  ==========  ==============  =====
    rule                  statistic                   accepted     scale s     g = 0.12 at     max g
    ====================  ==========================  ===========  ==========  ==============  =====
    ``word_count``        words                       50..100,000  log 2 on    11.75; 400,003  0.996
                                                                   log(1 + x)
    ``mean_word_length``  characters per word         3..10        1           1; 12           0.971
    ``symbol_ratio``      ``#``/``...``/``…`` / word  <= 0.1       0.05        0.2             0.881
    ``ellipsis_lines``    share ending ``...``        <= 0.3       0.15        0.6             0.881
    ``bullet_lines``      share of bullet lines       <= 0.9       0.05        1.0             ~1
    ``alpha_words``       share with a letter         >= 0.8       0.2         0.4             0.731
    ``stop_words``        stop-word count             >= 2         log 2 on    (0.17 at 0)     -> 1
                                                                   log(1 + x)
    ``duplicate_lines``   share of repeats            <= 0.3       0.15        0.6             0.881
    ``uppercase``         upper / letters             <= 0.25      0.125       0.5             0.881
    ``digit_punct``       non-letters / non-space     <= 0.25      0.125       0.5             0.881
    ====================  ==========================  ===========  ==========  ==============  =====

Statistics are those of the table above. "max g" is the value at the best
attainable statistic (the centre of a two-sided range on its scale, 0 or 1 for a share):
``word_count`` peaks at about 2,257 words, and ``stop_words`` approaches 1 as the count
grows. ``stop_words`` can't go below 0: its floor is ``g = sigmoid(log(1/3) / log 2) ~
0.17`` at no stop word. As most maxima are well below 1, no rule saturates the score.
The unused scale of a one-sided rule's infinite side plays no part.

Combination: the score is the **geometric mean** of the ten graded values,
``exp(mean_i log g_i)``, in (0, 1). Chosen over the arithmetic mean because

* it keeps the rules' *and* semantics (Gopher drops a document that fails any rule):
  ``log sigmoid(z) ~ z`` for negative ``z``, so each unit a rule sits outside its range
  costs the same factor ``e^(-1/10)`` however well the other rules do, and a document
  failing one rule badly cannot be rescued by others, whereas an arithmetic mean caps
  one rule's loss at 0.1;
* inside the ranges ``log sigmoid(z) ~ -exp(-z)``, so the rules that sit closest to a
  bound dominate the ordering of passing documents, while rules far inside all of
  them contribute little (but still strictly: nothing is clipped there).

``z`` is clipped below at -700 (``g >= sigmoid(-700) ~ 1e-304``) so that absurd
statistics (e.g. a single 100,000-character "word") give a tiny positive score, never 0
or a NaN; no realistic statistic reaches the clip. Empty or whitespace-only text scores
0, below every non-blank document. As for ``heuristic``, only the first
``MAX_CHARS`` characters are analysed and the word count is extrapolated from them.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import numpy as np

# ---- the rules, and the soft-pass scorer (``heuristic``) --------------------------------

MAX_CHARS = 100_000
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "◦", "▪", "‣", "·", "*", "-", "–")
ELLIPSES = ("...", "…")
_LETTER = re.compile(r"[^\W\d_]")
_STRIP = "\"'()[]{}<>.,;:!?`“”‘’«»"


class Bound(NamedTuple):
    """Pass = 1 on [lo, hi]; linear to 0 at lo - below and at hi + above."""

    lo: float
    hi: float
    below: float = 1.0
    above: float = 1.0


RULES: dict[str, Bound] = {
    "word_count": Bound(50, 100_000, below=50, above=100_000),
    "mean_word_length": Bound(3, 10, below=2, above=2),
    "symbol_ratio": Bound(-math.inf, 0.1, above=0.1),
    "ellipsis_lines": Bound(-math.inf, 0.3, above=0.3),
    "bullet_lines": Bound(-math.inf, 0.9, above=0.1),
    "alpha_words": Bound(0.8, math.inf, below=0.4),
    "stop_words": Bound(2, math.inf, below=2),
    "duplicate_lines": Bound(-math.inf, 0.3, above=0.3),
    "uppercase": Bound(-math.inf, 0.25, above=0.25),
    "digit_punct": Bound(-math.inf, 0.25, above=0.25),
}


def soft_pass(value: float, bound: Bound) -> float:
    """1 inside ``bound``, decaying linearly to 0 over its margin outside; in [0, 1]."""
    if value < bound.lo:
        return max(0.0, 1.0 - (bound.lo - value) / bound.below)
    if value > bound.hi:
        return max(0.0, 1.0 - (value - bound.hi) / bound.above)
    return 1.0


def _share(count: int, total: int) -> float:
    return count / total if total else 0.0


def text_statistics(text: str) -> dict[str, float]:
    """The statistic of every rule in ``RULES`` for a non-blank ``text``.

    Analyses the first ``MAX_CHARS`` characters; the word count is extrapolated.
    """
    prefix = text[:MAX_CHARS]
    words = prefix.split()
    lines = [s for s in (line.strip() for line in prefix.splitlines()) if s]
    n_words, n_lines = len(words), len(lines)
    word_chars = sum(map(len, words))  # = non-whitespace characters
    letters = sum(map(str.isalpha, prefix))  # 5x faster than a regex findall
    return {
        "word_count": n_words * len(text) / len(prefix),
        "mean_word_length": _share(word_chars, n_words),
        "symbol_ratio": _share(prefix.count("#") + sum(prefix.count(e) for e in ELLIPSES), n_words),
        "ellipsis_lines": _share(sum(s.endswith(ELLIPSES) for s in lines), n_lines),
        "bullet_lines": _share(sum(s.startswith(BULLETS) for s in lines), n_lines),
        "alpha_words": _share(sum(map(bool, map(_LETTER.search, words))), n_words),
        "stop_words": sum(map(STOP_WORDS.__contains__, [w.strip(_STRIP).lower() for w in words])),
        "duplicate_lines": _share(n_lines - len(set(lines)), n_lines),
        "uppercase": _share(sum(map(str.isupper, prefix)), letters),
        "digit_punct": _share(word_chars - letters, word_chars),
    }


def rule_scores(text: str) -> dict[str, float]:
    """The soft pass value in [0, 1] of every rule; all 0 for blank text."""
    if not text.strip():
        return dict.fromkeys(RULES, 0.0)
    stats = text_statistics(text)
    return {name: soft_pass(stats[name], bound) for name, bound in RULES.items()}


def heuristic_score(text: str) -> float:
    """Mean of the rules' pass values, in [0, 1]; 0 for blank text."""
    passes = rule_scores(text).values()
    return sum(passes) / len(passes)


class HeuristicScorer:
    """The rule-based scorer; pure Python, no model."""

    name = "heuristic"

    def score(self, texts: list[str]) -> np.ndarray:
        """float64 in [0, 1], shape ``(len(texts),)``."""
        return np.fromiter(map(heuristic_score, texts), dtype=np.float64, count=len(texts))

    def truncated(self, texts: list[str]) -> int:
        """Texts longer than MAX_CHARS characters (their statistics use the prefix)."""
        return sum(len(t) > MAX_CHARS for t in texts)


# ---- the graded scorer (``graded-heuristic``) ----------------------------------------------

LOG_RULES = frozenset({"word_count", "stop_words"})
"""Count rules graded on ``log(1 + x)`` with one unit of ``z`` per doubling."""

Z_MIN = -700.0
"""Lower clip of every rule's margin ``z``: keeps ``g`` and the score above 0."""


class GradedRule(NamedTuple):
    """A rule's accepted range ``[lo, hi]`` on the (possibly log) scale it is graded on,
    and the scale of its margin below ``lo`` and above ``hi``."""

    lo: float
    hi: float
    scale_lo: float
    scale_hi: float
    log: bool = False


def _log1p(x: float) -> float:
    return math.log1p(x) if math.isfinite(x) else x


def graded_rule(bound: Bound, log: bool = False) -> GradedRule:
    """The graded form of an old ``quality.Bound``: on the log scale ``log(1 + x)`` with
    a scale of ``log 2`` when ``log``, else the bound itself with half its fall-off
    widths as scales (so its zero points map to ``z = -2``)."""
    if log:
        return GradedRule(_log1p(bound.lo), _log1p(bound.hi), math.log(2), math.log(2), True)
    return GradedRule(bound.lo, bound.hi, bound.below / 2, bound.above / 2)


GRADED_RULES: dict[str, GradedRule] = {
    name: graded_rule(bound, name in LOG_RULES) for name, bound in RULES.items()
}
"""Every rule of ``RULES``, in its order, in graded form."""


def margin(value: float, rule: GradedRule) -> float:
    """Signed distance of ``value`` to the nearest bound of ``rule``'s range in units of
    that side's scale: > 0 inside, 0 on a bound, < 0 outside; clipped below at
    ``Z_MIN``. Nondecreasing below the range's centre, nonincreasing above it."""
    x = math.log1p(value) if rule.log else value
    z = min((x - rule.lo) / rule.scale_lo, (rule.hi - x) / rule.scale_hi)
    return max(z, Z_MIN)


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _log_sigmoid(z: float) -> float:
    """log(sigmoid(z)), accurate for large |z| (no underflow to log 0)."""
    if z >= 0:
        return -math.log1p(math.exp(-z))
    return z - math.log1p(math.exp(z))


def grade(value: float, rule: GradedRule) -> float:
    """``sigmoid(margin(value, rule))``, in (0, 1): 0.5 on a bound, above 0.5 exactly
    inside the range."""
    return _sigmoid(margin(value, rule))


def graded_rule_scores(text: str) -> dict[str, float]:
    """The graded value in (0, 1) of every rule, in ``RULES`` order; all 0 for blank
    text."""
    if not text.strip():
        return dict.fromkeys(GRADED_RULES, 0.0)
    stats = text_statistics(text)
    return {name: grade(stats[name], rule) for name, rule in GRADED_RULES.items()}


def graded_heuristic_score(text: str) -> float:
    """Geometric mean of the rules' graded values: in (0, 1) for non-blank text, 0 for
    blank text. Computed in log space, so it never underflows to 0."""
    if not text.strip():
        return 0.0
    stats = text_statistics(text)
    total = sum(_log_sigmoid(margin(stats[name], rule)) for name, rule in GRADED_RULES.items())
    return math.exp(total / len(GRADED_RULES))


class GradedHeuristicScorer:
    """The graded rule-based scorer; pure Python, no model."""

    name = "graded-heuristic"

    def score(self, texts: list[str]) -> np.ndarray:
        """float64 in [0, 1), shape ``(len(texts),)``, finite, in input order; higher =
        better."""
        return np.fromiter(map(graded_heuristic_score, texts), dtype=np.float64, count=len(texts))

    def truncated(self, texts: list[str]) -> int:
        """Texts longer than MAX_CHARS characters (their statistics use the prefix)."""
        return sum(len(t) > MAX_CHARS for t in texts)
