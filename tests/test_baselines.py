"""Tests for samplemix.mixing.baselines (method.md §3).

Expected numbers are worked out by hand in the comments; the sampling tests run the
proportions through the real budget stage (mixing.budget_scale, expected_counts,
realised_counts) and bound the error by the rounding variance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from samplemix.mixing.baselines import (
    bigram_counts,
    ce_proportions,
    conditional_entropy,
    domain_weights,
    fixed_proportions,
    temperature_proportions,
    vanilla_proportions,
)
from samplemix.mixing.weights import (
    budget_scale,
    expected_counts,
    realised_counts,
    rounding_variance,
)

TOKENS = {"web": 600, "code": 300, "books": 100}


def test_vanilla_is_the_natural_share() -> None:
    assert vanilla_proportions(TOKENS) == pytest.approx({"web": 0.6, "code": 0.3, "books": 0.1})


def test_temperature() -> None:
    assert temperature_proportions(TOKENS, 1.0) == pytest.approx(vanilla_proportions(TOKENS))
    # τ = 2 on shares [0.64, 0.36]: √ → [0.8, 0.6], normalised → [4/7, 3/7].
    got = temperature_proportions({"a": 64, "b": 36}, 2.0)
    assert got == pytest.approx({"a": 4 / 7, "b": 3 / 7})
    # τ → ∞: uniform over the domains with tokens; a domain with none stays at 0.
    got = temperature_proportions({**TOKENS, "empty": 0}, 1e6)
    assert got["empty"] == 0.0
    assert [got[d] for d in TOKENS] == pytest.approx([1 / 3] * 3, abs=1e-5)
    # τ → 0: all on the largest domain, without overflow.
    assert temperature_proportions(TOKENS, 1e-3) == pytest.approx({"web": 1, "code": 0, "books": 0})
    with pytest.raises(ValueError, match="tau must be > 0"):
        temperature_proportions(TOKENS, 0.0)


def test_fixed_proportions() -> None:
    got = fixed_proportions({"code": 6, "web": 2, "books": 0}, ["web", "code", "books"])
    assert got == {"web": 0.25, "code": 0.75, "books": 0.0}
    assert list(got) == ["web", "code", "books"]  # corpus order
    with pytest.raises(ValueError, match="corpus domain 'books' has no fixed proportion"):
        fixed_proportions({"web": 1, "code": 1}, ["web", "code", "books"])
    allowed = fixed_proportions({"web": 1, "code": 3}, ["web", "code", "books"], allow_missing=True)
    assert allowed == {"web": 0.25, "code": 0.75, "books": 0.0}
    with pytest.raises(ValueError, match="domain 'wiki', which is not in the corpus"):
        fixed_proportions({"web": 1, "wiki": 1}, ["web"])
    with pytest.raises(ValueError, match="proportion of domain 'web' must be finite and ≥ 0"):
        fixed_proportions({"web": -1, "code": 2}, ["web", "code"])
    with pytest.raises(ValueError, match="sum to 0"):
        fixed_proportions({"web": 0}, ["web"])


def test_bigrams_stay_inside_documents_and_merge_by_addition() -> None:
    docs = [[0, 1], [0, 2, 2]]
    counts = bigram_counts(docs)
    # (1, 0) would only appear if the two documents were concatenated.
    assert counts == {(0, 1): 1, (0, 2): 1, (2, 2): 1}
    assert bigram_counts(docs[:1]) + bigram_counts(docs[1:]) == counts
    assert bigram_counts([np.array([5, 6]), [7]]) == {(5, 6): 1}


def test_conditional_entropy_known_values() -> None:
    # Deterministic successor: every token has one possible next token → H = 0.
    assert conditional_entropy(bigram_counts([[1, 2, 3, 4, 1, 2, 3, 4]])) == pytest.approx(0.0)
    # After 0 comes 1 or 2 equally often → H = ln 2.
    h = conditional_entropy(bigram_counts([[0, 1], [0, 2], [0, 1], [0, 2]]))
    assert h == pytest.approx(math.log(2), rel=1e-12)
    # Bigrams (0,1)×2, (0,2)×1, (1,0)×3, C = 6: prev 0 carries 3/6 of the mass with
    # H(2/3, 1/3) = 0.636514168, prev 1 is deterministic → H = 0.5·0.636514168 = 0.318257084.
    h = conditional_entropy({(0, 1): 2, (0, 2): 1, (1, 0): 3})
    assert h == pytest.approx(0.318257084, rel=1e-8)
    with pytest.raises(ValueError, match="no bigrams"):
        conditional_entropy(bigram_counts([[1], []]))


def test_ce_proportions_softmax() -> None:
    # exp(0), exp(ln 2), exp(ln 3) = 1, 2, 3 → 1/6, 2/6, 3/6.
    got = ce_proportions({"a": 0.0, "b": math.log(2), "c": math.log(3)})
    assert got == pytest.approx({"a": 1 / 6, "b": 2 / 6, "c": 3 / 6})
    # Shift-invariant and stable far from 0 (exp(1000) alone would overflow).
    got = ce_proportions({"a": 1000.0, "b": 1000.0 + math.log(3)})
    assert got == pytest.approx({"a": 0.25, "b": 0.75})


def test_domain_weights_by_hand() -> None:
    # p = {web: 0.5, code: 0.5, books: 0}, T = {web: 100, code: 50, books: 40}
    # → w = 0.5/100 = 0.005 for web, 0.5/50 = 0.01 for code, 0 for books.
    dom = np.array(["web", "code", "web", "books"])
    p = {"web": 0.5, "code": 0.5, "books": 0.0}
    w = domain_weights(dom, p, {"web": 100, "code": 50, "books": 40})
    np.testing.assert_allclose(w, [0.005, 0.01, 0.005, 0.0])
    with pytest.raises(ValueError, match="domain 'books' has no proportion"):
        domain_weights(dom, {"web": 1.0, "code": 1.0}, {"web": 100, "code": 50, "books": 40})
    with pytest.raises(ValueError, match="domain 'code' has proportion 0.5 but 0 tokens"):
        domain_weights(dom, p, {"web": 100, "code": 0, "books": 40})


def synthetic_corpus(n: int = 20_000) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Four domains of unequal size and document length (lognormal lengths)."""
    rng = np.random.default_rng(7)
    dom = rng.choice(["web", "code", "books", "wiki"], size=n, p=[0.55, 0.25, 0.05, 0.15])
    scale = {"web": 300, "code": 800, "books": 5000, "wiki": 600}
    mean_len = np.array([scale[d] for d in dom.tolist()])
    n_tok = np.maximum(1, rng.lognormal(np.log(mean_len), 0.8)).astype(np.int64)
    return dom, n_tok, [f"doc-{i}" for i in range(n)]


def domain_totals(dom: np.ndarray, values: np.ndarray) -> dict[str, float]:
    return {d: float(values[dom == d].sum()) for d in np.unique(dom).tolist()}


def test_vanilla_at_t_src_draws_every_document_once() -> None:
    dom, n_tok, ids = synthetic_corpus()
    totals = domain_totals(dom, n_tok)
    w = domain_weights(dom, vanilla_proportions(totals), totals)
    # w = (T_m/T_src)/T_m = 1/T_src for every document: c = T_src·w = 1, exactly once each.
    s = budget_scale(lambda: iter([(w, n_tok)]), float(n_tok.sum()), None)
    c = expected_counts(w, s, None)
    np.testing.assert_allclose(c, 1.0, rtol=1e-12)
    assert np.all(realised_counts(c, ids, seed=0) == 1)


@pytest.mark.parametrize(
    ("proportions", "budget_fraction"),
    [
        (lambda t: vanilla_proportions(t), 0.6),  # uniform 0.6 draws per document
        (lambda t: temperature_proportions(t, 3.0), 1.0),  # books up-, web down-sampled
        (lambda t: fixed_proportions({"web": 1, "code": 1, "books": 1, "wiki": 1}, t), 1.3),
    ],
)
def test_realised_domain_tokens_match_proportions(proportions, budget_fraction: float) -> None:
    dom, n_tok, ids = synthetic_corpus()
    totals = domain_totals(dom, n_tok)
    p = proportions(totals)
    target = budget_fraction * float(n_tok.sum())
    w = domain_weights(dom, p, totals)
    s = budget_scale(lambda: iter([(w, n_tok)]), target, None)
    c = expected_counts(w, s, None)
    n = realised_counts(c, ids, seed=1)
    realised = domain_totals(dom, n * n_tok)
    for d in totals:
        # E[tokens of d] = p_d·T_tgt; the floor + Bernoulli rounding has variance
        # Σ_{x∈d} f(1−f)·len², so 5 standard errors bound a correct draw.
        sd = math.sqrt(rounding_variance(c[dom == d], n_tok[dom == d]))
        assert sd > 0
        assert abs(realised[d] - p[d] * target) <= 5 * sd, d
