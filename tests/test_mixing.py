"""Tests for samplemix.mixing.weights: weights, the budget scale, expected and realised counts.

Every expected number is worked out by hand in the comments (method.md §1.3):
w = α·d̂ + (1 − α)·q̂ + ε, c = s·w with s = T_tgt / Σ w·len, n = ⌊c⌋ + Bernoulli(c − ⌊c⌋).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from samplemix.mixing.weights import (
    BudgetError,
    budget_scale,
    doc_uniforms,
    expected_counts,
    minmax,
    realised_counts,
    rounding_variance,
    sample_weights,
)


def one_part(w: np.ndarray, n_tok: np.ndarray):
    return lambda: iter([(w, n_tok)])


# Four documents. q over the corpus ranges 2..8, d ranges 0.1..0.5.
Q = np.array([2.0, 5.0, 8.0, 6.5])
D = np.array([0.1, 0.3, 0.2, 0.5])
LEN = np.array([100, 200, 50, 40], dtype=np.int64)


def test_hand_computed_weights_and_counts() -> None:
    w = sample_weights(Q, D, (2.0, 8.0), (0.1, 0.5), alpha=0.8)
    # q̂ = (q − 2)/6   = [0, 0.5, 1, 0.75]
    # d̂ = (d − 0.1)/0.4 = [0, 0.5, 0.25, 1]
    # w = 0.8·d̂ + 0.2·q̂ = [0, 0.4 + 0.1, 0.2 + 0.2, 0.8 + 0.15] = [0, 0.5, 0.4, 0.95]
    np.testing.assert_allclose(w, [0.0, 0.5, 0.4, 0.95], rtol=0, atol=1e-12)
    # Σ w·len = 0·100 + 0.5·200 + 0.4·50 + 0.95·40 = 0 + 100 + 20 + 38 = 158
    # T = 316 → s = 316 / 158 = 2
    s = budget_scale(one_part(w, LEN), 316, None)
    assert s == pytest.approx(2.0, rel=1e-12)
    c = expected_counts(w, s, None)
    # c = 2·w = [0, 1.0, 0.8, 1.9]
    np.testing.assert_allclose(c, [0.0, 1.0, 0.8, 1.9], rtol=1e-12, atol=1e-12)
    # Σ c·len = 0 + 200 + 40 + 76 = 316
    assert float(np.dot(c, LEN)) == pytest.approx(316, rel=1e-12)


def test_epsilon_keeps_every_document_reachable() -> None:
    w = sample_weights(Q, D, (2.0, 8.0), (0.1, 0.5), alpha=0.8, epsilon=0.05)
    # w = [0, 0.5, 0.4, 0.95] + 0.05 = [0.05, 0.55, 0.45, 1.0]
    np.testing.assert_allclose(w, [0.05, 0.55, 0.45, 1.0], rtol=0, atol=1e-12)
    # Σ w·len = 5 + 110 + 22.5 + 40 = 177.5; T = 355 → s = 2; c = [0.1, 1.1, 0.9, 2.0]
    s = budget_scale(one_part(w, LEN), 355, None)
    np.testing.assert_allclose(expected_counts(w, s, None), [0.1, 1.1, 0.9, 2.0], rtol=1e-12)


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        (0.0, [0.0, 0.5, 1.0, 0.75]),  # quality only: w = q̂
        (1.0, [0.0, 0.5, 0.25, 1.0]),  # diversity only: w = d̂
        (0.5, [0.0, 0.5, 0.625, 0.875]),  # (d̂ + q̂)/2
    ],
)
def test_alpha_endpoints(alpha: float, expected: list[float]) -> None:
    w = sample_weights(Q, D, (2.0, 8.0), (0.1, 0.5), alpha=alpha)
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-12)


def test_minmax_uses_the_given_range_and_clips() -> None:
    # The range is corpus-wide, not this shard's: 3 in range 2..6 → 0.25.
    np.testing.assert_allclose(minmax(np.array([3.0, 6.0]), 2.0, 6.0), [0.25, 1.0])
    np.testing.assert_allclose(minmax(np.array([1.0, 7.0]), 2.0, 6.0), [0.0, 1.0])


def test_constant_signal_is_all_ones() -> None:
    # Documented choice: hi == lo carries no ranking, every document gets 1.
    out = minmax(np.array([3.0, 3.0, 3.0]), 3.0, 3.0)
    assert out.dtype == np.float64
    assert out.tolist() == [1.0, 1.0, 1.0]


def test_uniform_weights_at_source_budget_take_every_document_once() -> None:
    rng = np.random.default_rng(1)
    n_tok = rng.integers(1, 5000, size=300)
    q = np.full(300, 4.0)
    d = np.full(300, 0.2)
    w = sample_weights(q, d, (4.0, 4.0), (0.2, 0.2), alpha=0.8)
    t_src = int(n_tok.sum())
    s = budget_scale(one_part(w, n_tok), t_src, None)
    c = expected_counts(w, s, None)
    np.testing.assert_allclose(c, 1.0, rtol=1e-12)
    ids = [f"doc-{i}" for i in range(300)]
    for seed in range(5):
        n = realised_counts(c, ids, seed)
        assert n.dtype == np.int64
        assert n.tolist() == [1] * 300
        assert int(np.dot(n, n_tok)) == t_src


# --- doc_uniforms -----------------------------------------------------------------------

IDS = [f"shard-{i % 13}/row-{i}" for i in range(20_000)]


def test_doc_uniforms_deterministic_and_keyed() -> None:
    a = doc_uniforms(IDS[:1000], 7, "count")
    assert a.dtype == np.float64 and a.shape == (1000,)
    np.testing.assert_array_equal(a, doc_uniforms(IDS[:1000], 7, "count"))
    # Another seed or salt gives unrelated draws.
    for other in (doc_uniforms(IDS[:1000], 8, "count"), doc_uniforms(IDS[:1000], 7, "report")):
        assert np.mean(a == other) < 0.01
        assert abs(np.corrcoef(a, other)[0, 1]) < 0.15
    # The seed and salt are separated: (1, "2x") and (12, "x") must not collide.
    assert not np.array_equal(doc_uniforms(IDS[:50], 1, "2x"), doc_uniforms(IDS[:50], 12, "x"))


def test_doc_uniforms_are_uniform_on_unit_interval() -> None:
    u = doc_uniforms(IDS, 0, "count")
    assert u.min() >= 0.0 and u.max() < 1.0
    # Kolmogorov–Smirnov against U(0, 1); a loose bound so only a real defect fails.
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    # 20 bins of expected 1000 each (sd ≈ 31): ±150 is a ~5 sd bound.
    counts = np.bincount((u * 20).astype(int), minlength=20)
    assert np.all(np.abs(counts - 1000) < 150)


def test_doc_uniforms_do_not_depend_on_order_or_batching() -> None:
    ids = IDS[:2000]
    whole = dict(zip(ids, doc_uniforms(ids, 3, "count").tolist(), strict=True))
    rng = np.random.default_rng(0)
    shuffled = [ids[i] for i in rng.permutation(len(ids))]
    per_id = {}
    for chunk in np.array_split(np.arange(len(shuffled)), 5):
        batch = [shuffled[i] for i in chunk]
        per_id.update(zip(batch, doc_uniforms(batch, 3, "count").tolist(), strict=True))
    assert per_id == whole
    # One id alone gives the same value as inside a batch.
    assert doc_uniforms([ids[123]], 3, "count")[0] == whole[ids[123]]
    assert doc_uniforms([], 3, "count").shape == (0,)


# --- realised_counts ----------------------------------------------------------------------


def unequal_corpus(n: int = 200) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    n_tok = np.round(10 ** rng.uniform(1, 4, size=n)).astype(np.int64)  # 10 .. 10,000 tokens
    c = rng.uniform(0, 3.5, size=n)
    c[:10] = np.floor(c[:10])  # some integer counts (no rounding at all)
    return [f"doc-{i}" for i in range(n)], c, n_tok


def test_realised_counts_are_floor_or_floor_plus_one() -> None:
    ids, c, _ = unequal_corpus()
    for seed in range(20):
        n = realised_counts(c, ids, seed)
        lo = np.floor(c).astype(np.int64)
        assert np.all((n == lo) | (n == lo + 1))
        # Integer counts are realised exactly.
        assert np.array_equal(n[:10], lo[:10])


def test_realised_counts_do_not_depend_on_sharding() -> None:
    ids, c, _ = unequal_corpus()
    whole = realised_counts(c, ids, 5)
    for n_chunks in (1, 3, 7):
        parts = [
            realised_counts(c[idx], [ids[i] for i in idx], 5)
            for idx in np.array_split(np.arange(len(ids)), n_chunks)
        ]
        assert np.array_equal(np.concatenate(parts), whole)
    # A different seed changes some draws.
    assert not np.array_equal(realised_counts(c, ids, 6), whole)


def test_realised_tokens_unbiased_with_predicted_spread() -> None:
    ids, c, n_tok = unequal_corpus()
    target = float(np.dot(c, n_tok))
    sigma = np.sqrt(rounding_variance(c, n_tok))
    totals = np.array([np.dot(realised_counts(c, ids, seed), n_tok) for seed in range(400)])
    # Mean within 4 standard errors of T; empirical std within 15% of σ.
    assert abs(totals.mean() - target) < 4 * sigma / np.sqrt(len(totals))
    assert totals.std(ddof=1) == pytest.approx(sigma, rel=0.15)


def test_rounding_variance_by_hand() -> None:
    c = np.array([0.0, 1.0, 0.8, 1.9, 2.5])
    n_tok = np.array([100, 200, 50, 40, 10])
    # f = [0, 0, 0.8, 0.9, 0.5]; f(1 − f) = [0, 0, 0.16, 0.09, 0.25]
    # · len² = 0.16·2500 + 0.09·1600 + 0.25·100 = 400 + 144 + 25 = 569
    assert rounding_variance(c, n_tok) == pytest.approx(569.0, rel=1e-12)


# --- max_repeats ----------------------------------------------------------------------------


def test_capped_scale_by_hand() -> None:
    w = np.array([1.0, 2.0, 4.0])
    n_tok = np.array([10, 10, 10])
    # Uncapped s = 45 / 70. With cap 2: guess doc 3 capped (s ≥ 0.5), docs 1–2 not (s ≤ 1):
    # 10·(s + 2s + 2) = 45 → s = 2.5/3 = 5/6 ∈ [0.5, 1] ✓; c = [5/6, 5/3, 2].
    s = budget_scale(one_part(w, n_tok), 45, 2)
    assert s == pytest.approx(5 / 6, rel=1e-9)
    c = expected_counts(w, s, 2)
    np.testing.assert_allclose(c, [5 / 6, 5 / 3, 2.0], rtol=1e-9)
    assert float(np.dot(c, n_tok)) == pytest.approx(45, rel=1e-9)
    # The budget every document at the cap can carry: 2·30 = 60, still reachable.
    s = budget_scale(one_part(w, n_tok), 60, 2)
    c = expected_counts(w, s, 2)
    np.testing.assert_allclose(c, [2.0, 2.0, 2.0], rtol=1e-12)
    assert float(np.dot(c, n_tok)) == pytest.approx(60, rel=1e-12)
    # A cap that never binds leaves the uncapped scale unchanged.
    assert budget_scale(one_part(w, n_tok), 45, 100) == pytest.approx(45 / 70, rel=1e-9)


def test_capped_scale_streams_over_parts() -> None:
    rng = np.random.default_rng(3)
    chunks = []
    for size in (50, 1, 120, 80):
        w = rng.uniform(0, 1, size) ** 4  # very unequal weights
        w[rng.uniform(size=size) < 0.1] = 0.0
        chunks.append((w, rng.integers(5, 3000, size)))
    calls = 0

    def parts():
        nonlocal calls
        calls += 1
        yield from chunks  # a fresh generator on every call

    w_all = np.concatenate([w for w, _ in chunks])
    len_all = np.concatenate([n for _, n in chunks])
    cap = 3
    reachable = float(len_all[w_all > 0].sum())
    target = 0.8 * cap * reachable  # forces many documents to the cap
    s = budget_scale(parts, target, cap)
    assert calls > 1  # bisection re-reads the shards
    filled = float(np.dot(np.minimum(s * w_all, cap), len_all))
    assert filled == pytest.approx(target, rel=1e-9)
    c = expected_counts(w_all, s, cap)
    assert np.all(c <= cap)
    assert np.sum(c == cap) > 10  # some documents sit at the cap ...
    assert np.sum((c > 0) & (c < cap)) > 10  # ... the rest are scaled
    # The same scale as computed from one concatenated part.
    assert budget_scale(one_part(w_all, len_all), target, cap) == pytest.approx(s, rel=1e-9)


def test_budget_beyond_cap_raises() -> None:
    w = np.array([0.0, 1.0, 3.0])
    n_tok = np.array([1000, 10, 20])
    # Reachable tokens (w > 0) = 30; cap 2 allows 60 even though the corpus holds 1030.
    with pytest.raises(BudgetError, match=r"mixing\.max_repeats"):
        budget_scale(one_part(w, n_tok), 61, 2)
    budget_scale(one_part(w, n_tok), 59, 2)  # just below: fine


def test_all_zero_weights_raise() -> None:
    w = np.zeros(4)
    with pytest.raises(BudgetError, match=r"mixing\.epsilon"):
        budget_scale(one_part(w, LEN), 100, None)
    with pytest.raises(BudgetError, match=r"mixing\.epsilon"):
        budget_scale(one_part(w, LEN), 100, 4)
