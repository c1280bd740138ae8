"""Tests for samplemix.scoring.heuristic: the graded (non-saturating) heuristic.

Documents that pass every rule of the old ``heuristic`` (all score exactly 1.0 there)
must still be ordered by how far inside the ranges they sit; failing a rule must cost;
every graded rule must be monotone in its statistic; scores must be finite on any text.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import JUNK_IDS, junk_texts

from samplemix.scoring.heuristic import (
    GRADED_RULES,
    MAX_CHARS,
    RULES,
    GradedHeuristicScorer,
    grade,
    graded_heuristic_score,
    graded_rule_scores,
    heuristic_score,
    rule_scores,
    soft_pass,
    text_statistics,
)

CLEAN = (
    "The river runs through the old town and past the mill that my grandfather built "
    "with his brothers. In spring the water rises, and the children watch the boats "
    "carry timber to the harbour. Most of the houses along the bank have small gardens "
    "where people grow beans, onions and flowers. On warm evenings the neighbours sit "
    "together, talk about the weather and share bread with anyone who passes by. It is "
    "a quiet place, but it has a long history that the town is proud of."
)

CONTENT = ("mill", "boat", "rain", "farm", "road", "wall", "barn", "pond", "corn", "hill")
STOP4 = ("that", "have", "with")  # four-letter stop words: swapping keeps word lengths


def sixty_words(stop: int, symbols: int, capitals: int) -> str:
    """60 four-character words on one line: ``stop`` stop words, ``symbols`` ``#xyz``
    tokens, the rest content words; the first ``capitals`` letters upper-cased.

    Every such text has the same word count (60), mean word length (4), alpha-word
    share (1) and line statistics (0), so only ``stop_words``, ``symbol_ratio``,
    ``digit_punct`` and ``uppercase`` differ between them.
    """
    words = [STOP4[i % 3] for i in range(stop)]
    words += ["#xyz"] * symbols
    words += [CONTENT[i % len(CONTENT)] for i in range(60 - len(words))]
    text = " ".join(words)
    out, left = [], capitals
    for ch in text:
        if left and ch.isalpha():
            out.append(ch.upper())
            left -= 1
        else:
            out.append(ch)
    return "".join(out)


# Far inside every range -> middling -> close to the stop-word, symbol and uppercase bounds.
FAR = sixty_words(stop=30, symbols=0, capitals=4)
MID = sixty_words(stop=10, symbols=3, capitals=25)
NEAR = sixty_words(stop=2, symbols=6, capitals=50)


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------- ordering of passing docs


def test_construction_passes_every_old_rule_and_varies_only_the_intended_statistics() -> None:
    stats = [text_statistics(t) for t in (FAR, MID, NEAR)]
    assert [heuristic_score(t) for t in (FAR, MID, NEAR)] == [1.0, 1.0, 1.0]
    assert [s["stop_words"] for s in stats] == [30, 10, 2]
    assert [s["symbol_ratio"] for s in stats] == pytest.approx([0, 0.05, 0.1])
    # Letters: 240 less the 3 in each "#xyz".
    assert [s["uppercase"] for s in stats] == pytest.approx([4 / 240, 25 / 237, 50 / 234])
    for name in ("word_count", "mean_word_length", "alpha_words", "bullet_lines"):
        assert stats[0][name] == stats[1][name] == stats[2][name]


def test_graded_score_strictly_orders_documents_the_old_heuristic_ties() -> None:
    far, mid, near = (graded_rule_scores(t) for t in (FAR, MID, NEAR))
    # Each rule is at least as good for FAR as for MID as for NEAR, strictly for four...
    for name in GRADED_RULES:
        assert far[name] >= mid[name] >= near[name], name
    for name in ("stop_words", "symbol_ratio", "digit_punct", "uppercase"):
        assert far[name] > mid[name] > near[name], name
    # ... so the combined scores are strictly ordered, where the old ones all tie at 1.
    scores = GradedHeuristicScorer().score([NEAR, FAR, MID])
    assert scores[1] > scores[2] > scores[0]
    assert np.all(scores > 0) and np.all(scores < 1)


def test_natural_prose_variants_are_ordered() -> None:
    """Stop words removed / a hashtag added: the old heuristic still gives 1.0."""
    fewer_stop = CLEAN.replace(" the ", " one ").replace(" and ", " but ")
    hashtag = fewer_stop + " #river #town #mill"
    assert heuristic_score(CLEAN) == heuristic_score(fewer_stop) == heuristic_score(hashtag)
    assert heuristic_score(hashtag) == 1.0
    assert (
        graded_heuristic_score(CLEAN)
        > graded_heuristic_score(fewer_stop)
        > graded_heuristic_score(hashtag)
    )


# ---------------------------------------------------------------- failing rules


@pytest.mark.parametrize(
    ("passing", "failing"),
    [
        (sixty_words(30, 0, 4), sixty_words(30, 0, 100)),  # uppercase 100/240 > 0.25
        (sixty_words(30, 6, 4), sixty_words(30, 9, 4)),  # symbol ratio 9/60 > 0.1
        (sixty_words(2, 0, 4), sixty_words(0, 0, 4)),  # < 2 stop words
        (CLEAN, " ".join(CLEAN.split()[:30])),  # 30 < 50 words
        (CLEAN, "\n".join([CLEAN] * 4)),  # 3 of 4 lines repeat
        (CLEAN, "\n".join(f"- {s}" for s in CLEAN.split(". "))),  # all lines bullets
    ],
    ids=["uppercase", "symbols", "stop-words", "short", "duplicates", "bullets"],
)
def test_failing_a_rule_scores_below_passing(passing: str, failing: str) -> None:
    assert heuristic_score(passing) == 1.0 and heuristic_score(failing) < 1.0
    assert graded_heuristic_score(failing) < graded_heuristic_score(passing)


@pytest.mark.parametrize("bad", junk_texts(CLEAN), ids=JUNK_IDS)
def test_clean_paragraph_beats_junk(bad: str) -> None:
    assert graded_heuristic_score(CLEAN) > graded_heuristic_score(bad) > 0.0


@pytest.mark.parametrize("text", [CLEAN, FAR, NEAR, CLEAN.upper(), "HELLO WORLD", "# ..."])
def test_graded_rule_is_above_half_exactly_where_the_old_rule_passes(text: str) -> None:
    old, new = rule_scores(text), graded_rule_scores(text)
    stats = text_statistics(text)
    for name in RULES:
        inside = RULES[name].lo <= stats[name] <= RULES[name].hi
        assert (old[name] == 1.0) == inside
        assert (new[name] >= 0.5) == inside, name


# ---------------------------------------------------------------- per-rule grading by hand

L2 = math.log(2)

# (rule, statistic, expected graded value), worked out from the module docstring's table.
BY_HAND = [
    # log(1 + x) with one unit per doubling: 50 words is the bound; 101 = 2 * 51 - 1.
    ("word_count", 0, sigmoid(math.log(1 / 51) / L2)),
    ("word_count", 24.5, sigmoid(-1)),
    ("word_count", 50, 0.5),
    ("word_count", 101, sigmoid(1)),
    ("word_count", 203, sigmoid(2)),
    ("word_count", 100_000, 0.5),
    ("word_count", 400_003, sigmoid(-2)),
    ("mean_word_length", 1, sigmoid(-2)),
    ("mean_word_length", 3, 0.5),
    ("mean_word_length", 4.5, sigmoid(1.5)),
    ("mean_word_length", 6.5, sigmoid(3.5)),
    ("mean_word_length", 9, sigmoid(1)),
    ("mean_word_length", 12, sigmoid(-2)),
    ("symbol_ratio", 0, sigmoid(2)),
    ("symbol_ratio", 0.05, sigmoid(1)),
    ("symbol_ratio", 0.1, 0.5),
    ("symbol_ratio", 0.2, sigmoid(-2)),
    ("ellipsis_lines", 0, sigmoid(2)),
    ("ellipsis_lines", 0.45, sigmoid(-1)),
    ("bullet_lines", 0.85, sigmoid(1)),
    ("bullet_lines", 1.0, sigmoid(-2)),
    ("alpha_words", 1.0, sigmoid(1)),
    ("alpha_words", 0.8, 0.5),
    ("alpha_words", 0.4, sigmoid(-2)),
    ("stop_words", 0, sigmoid(math.log(1 / 3) / L2)),
    ("stop_words", 2, 0.5),
    ("stop_words", 5, sigmoid(1)),
    ("stop_words", 11, sigmoid(2)),
    ("duplicate_lines", 0.15, sigmoid(1)),
    ("duplicate_lines", 0.6, sigmoid(-2)),
    ("uppercase", 0, sigmoid(2)),
    ("uppercase", 0.5, sigmoid(-2)),
    ("digit_punct", 0.125, sigmoid(1)),
    ("digit_punct", 0.375, sigmoid(-1)),
]


@pytest.mark.parametrize(("name", "value", "expected"), BY_HAND)
def test_graded_rule_by_hand(name: str, value: float, expected: float) -> None:
    assert grade(value, GRADED_RULES[name]) == pytest.approx(expected, rel=1e-12)


# The point farthest inside each range on the rule's scale (None: the range is open there).
PEAK = {
    "word_count": math.sqrt(51 * 100_001) - 1,
    "mean_word_length": 6.5,
    "alpha_words": None,
    "stop_words": None,
}


@pytest.mark.parametrize("name", list(GRADED_RULES))
def test_graded_rule_is_monotone_in_its_statistic(name: str) -> None:
    """Strictly increasing up to the peak, strictly decreasing after it (a share rule
    with an upper bound peaks at 0; with a lower bound it never stops rising)."""
    hi = {"word_count": 1e6, "mean_word_length": 40.0, "stop_words": 1e5}.get(name, 1.0)
    values = np.geomspace(1e-3, hi, 400) if name in ("word_count", "stop_words") else None
    if values is None:
        values = np.linspace(0.0, hi, 400)
    graded = np.array([grade(float(v), GRADED_RULES[name]) for v in values])
    peak = PEAK.get(name, 0.0)
    up = values <= peak if peak is not None else np.ones_like(values, dtype=bool)
    assert np.all(np.diff(graded[up]) > 0)
    assert np.all(np.diff(graded[~up]) < 0)
    assert np.all((graded > 0) & (graded < 1))


def test_graded_rules_match_the_old_bounds() -> None:
    """The graded table is built from RULES: same rules, same bounds."""
    assert list(GRADED_RULES) == list(RULES)
    for name, bound in RULES.items():
        for edge in (bound.lo, bound.hi):
            if math.isfinite(edge):
                assert grade(edge, GRADED_RULES[name]) == pytest.approx(0.5)
                assert soft_pass(edge, bound) == 1.0


# ---------------------------------------------------------------- edge cases and scorer


NON_ASCII = (
    "Der Fluss fließt durch die alte Stadt, und die Kinder schauen den Booten zu. " * 5
    + "河流穿过古老的小镇。Река течёт через старый город. 🌊🚣 e\u0301te\u0301 \ud800"
)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "\n\n\t \n",
        "\u3000\u00a0",
        CLEAN * (1_000_000 // len(CLEAN) + 1),  # > 1 MB
        "x" * 1_000_000,  # one 1 MB word
        "#" * 200_000,
        "... " * 300_000,
        " " * MAX_CHARS + CLEAN,  # blank analysed prefix, text after it
        NON_ASCII,
        "😀" * 1000,
        "\x00\x01\x02 \ufeff",
    ],
    ids=[
        "empty",
        "space",
        "whitespace",
        "unicode-space",
        "huge",
        "huge-word",
        "hashes",
        "ellipses",
        "blank-prefix",
        "non-ascii",
        "emoji",
        "control",
    ],
)
def test_scores_are_finite_on_any_text(text: str) -> None:
    score = graded_heuristic_score(text)
    rules = graded_rule_scores(text)
    assert math.isfinite(score) and 0.0 <= score < 1.0
    assert all(math.isfinite(v) and 0.0 <= v < 1.0 for v in rules.values())
    assert (score == 0.0) == (not text.strip())  # only blank text scores 0


def test_blank_scores_zero_below_everything() -> None:
    assert graded_rule_scores("") == dict.fromkeys(RULES, 0.0)
    assert graded_heuristic_score("  \n") == 0.0 < graded_heuristic_score("#" * 200_000)


def test_huge_document_uses_its_prefix() -> None:
    huge = CLEAN * (2_000_000 // len(CLEAN))
    rules, prefix = graded_rule_scores(huge), graded_rule_scores(huge[:MAX_CHARS])
    # Extrapolated to ~340k words: past the 100k bound, so below the 100k-char prefix's.
    assert rules.pop("word_count") < 0.5 < prefix.pop("word_count")
    assert rules == prefix


def test_scorer_shape_order_and_truncation() -> None:
    scorer = GradedHeuristicScorer()
    texts = [NEAR, "", CLEAN, "x" * (MAX_CHARS + 1), FAR, NON_ASCII, MID]
    scores = scorer.score(texts)
    assert scorer.name == "graded-heuristic"
    assert scores.dtype == np.float64 and scores.shape == (len(texts),)
    assert np.all(np.isfinite(scores))
    np.testing.assert_array_equal(scores, [graded_heuristic_score(t) for t in texts])
    assert scorer.score([]).shape == (0,)
    assert scorer.truncated(texts) == 1
    assert scorer.truncated(["x" * MAX_CHARS]) == 0
