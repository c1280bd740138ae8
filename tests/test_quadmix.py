"""Tests for samplemix.mixing.quadmix (method.md §2).

Expected numbers are worked out by hand in the comments. Conventions under test:
percentiles are mid-ranks, p(v) = (W(better) + ½·W(tied)) / W, 0 = best;
S(r̄) = (2/(1 + exp(−λ(ω − r̄))))^η + ε for r̄ ≤ ω, else ε.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import yaml

from samplemix.mixing.quadmix import (
    PercentileMap,
    QuadMixParams,
    document_qbar,
    document_values,
    fit_rank_maps,
    merged_quality,
    rank_percentile_map,
    sample_parameters,
    sampling_value,
)


def test_percentile_map_mid_ranks_interpolates_and_clamps() -> None:
    # Smaller = better. Sample [3, 1, 2, 2], W = 4:
    # p(1) = (0 + ½·1)/4 = 0.125; p(2) = (1 + ½·2)/4 = 0.5; p(3) = (3 + ½·1)/4 = 0.875.
    m = rank_percentile_map(np.array([3.0, 1.0, 2.0, 2.0]))
    np.testing.assert_allclose(m(np.array([1.0, 2.0, 3.0])), [0.125, 0.5, 0.875])
    # 1.5 is halfway between 1 and 2: (0.125 + 0.5)/2 = 0.3125. Outside the sample: 0 / 1.
    np.testing.assert_allclose(m(np.array([1.5, 0.0, 4.0])), [0.3125, 0.0, 1.0])


def test_percentile_map_flip_for_higher_is_better() -> None:
    # Higher = better: 3 is best. p(3) = 0.125, p(2) = 0.5, p(1) = 0.875;
    # 5 beats the whole sample → 0, −1 loses to it → 1.
    m = rank_percentile_map(np.array([3.0, 1.0, 2.0, 2.0]), higher_is_better=True)
    np.testing.assert_allclose(m(np.array([3.0, 2.0, 1.0, 5.0, -1.0])), [0.125, 0.5, 0.875, 0, 1])


def test_token_weighted_in_domain_ranks_by_hand() -> None:
    # Domain a: q̄ = [0.2, 0.5, 0.5, 0.9], tokens [100, 50, 150, 200], W = 500.
    #   r̄(0.2) = (0 + ½·100)/500 = 0.1
    #   r̄(0.5) = (100 + ½·200)/500 = 0.4   (the two tied docs share it)
    #   r̄(0.9) = (300 + ½·200)/500 = 0.8
    # Domain b: q̄ = [0.3, 0.1], tokens [10, 30], W = 40.
    #   r̄(0.1) = (0 + 15)/40 = 0.375;  r̄(0.3) = (30 + 5)/40 = 0.875
    qbar = np.array([0.2, 0.5, 0.3, 0.5, 0.9, 0.1])
    dom = np.array(["a", "a", "b", "a", "a", "b"])
    tok = np.array([100, 50, 10, 150, 200, 30])
    maps = fit_rank_maps(qbar, dom, tok)
    assert sorted(maps) == ["a", "b"]
    np.testing.assert_allclose(maps["a"](qbar[dom == "a"]), [0.1, 0.4, 0.4, 0.8])
    np.testing.assert_allclose(maps["b"](qbar[dom == "b"]), [0.875, 0.375])


def test_map_on_whole_corpus_is_exact() -> None:
    # Independent brute force of the definition on a corpus with many ties.
    rng = np.random.default_rng(3)
    q = rng.integers(0, 8, size=60).astype(float)
    tok = rng.integers(1, 500, size=60)
    got = rank_percentile_map(q, tok)(q)
    for i in range(q.size):
        want = (tok[q < q[i]].sum() + 0.5 * tok[q == q[i]].sum()) / tok.sum()
        assert got[i] == pytest.approx(want, abs=1e-12)


def test_merged_quality_gathers_alpha_by_domain() -> None:
    # alpha (N=2, M=2): domain 0 → [0.25, 0.75], domain 1 → [1, 0].
    # doc 0, domain 0: 0.2·0.25 + 0.6·0.75 = 0.05 + 0.45 = 0.5
    # doc 1, domain 1: 0.4·1 + 0.9·0 = 0.4
    # doc 2, domain 0: 1.0·0.25 + 0.0·0.75 = 0.25
    sigmas = np.array([[0.2, 0.6], [0.4, 0.9], [1.0, 0.0]])
    alpha = np.array([[0.25, 1.0], [0.75, 0.0]])
    got = merged_quality(sigmas, np.array([0, 1, 0]), alpha)
    np.testing.assert_allclose(got, [0.5, 0.4, 0.25], atol=1e-15)


def test_sampling_value_by_hand() -> None:
    # λ = 10, ω = 0.5, η = 2, ε = 0.001.
    # r̄ = 0:    exp(−5) = 0.006737947; 2/1.006737947 = 1.986614298; ² = 3.946636370; + ε
    # r̄ = 0.25: exp(−2.5) = 0.082084999; 2/1.082084999 = 1.848283640; ² = 3.416152414; + ε
    # r̄ = ω:    (2/2)² + ε = 1.001;   r̄ > ω: ε
    r = np.array([0.0, 0.25, 0.5, 0.7, 1.0])
    got = sampling_value(r, 10.0, 0.5, 2.0, 0.001)
    np.testing.assert_allclose(got, [3.947636370, 3.417152414, 1.001, 0.001, 0.001], rtol=1e-9)


def test_sampling_value_per_document_parameters() -> None:
    # Doc 0 with η = 0: 1 + ε whenever r̄ ≤ ω. Doc 1 with ω = 0.1 and r̄ = 0.2: ε only.
    got = sampling_value(
        np.array([0.05, 0.2]),
        lam=np.array([500.0, 500.0]),
        omega=np.array([0.1, 0.1]),
        eta=np.array([0.0, 1.0]),
        eps=np.array([0.002, 0.0005]),
    )
    np.testing.assert_allclose(got, [1.002, 0.0005])


def test_sampling_value_safe_and_monotone_for_large_lambda() -> None:
    r = np.linspace(0.0, 1.0, 1001)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        s = sampling_value(r, 1e3, 0.1, 1.0, 1e-4)
    assert np.all(np.isfinite(s))
    assert np.all(np.diff(s) <= 0)
    # Deep inside the kept region the sigmoid saturates: 2^1 + ε.
    assert s[0] == pytest.approx(2.0001, rel=1e-12)


def test_sample_parameters_ranges_and_simplex() -> None:
    rng = np.random.default_rng(0)
    draws = [sample_parameters(3, ["a", "b", "c"], rng) for _ in range(300)]
    lam = np.concatenate([p.lam for p in draws])
    omega = np.concatenate([p.omega for p in draws])
    eta = np.concatenate([p.eta for p in draws])
    eps = np.concatenate([p.eps for p in draws])
    assert lam.min() > 0 and lam.max() <= 1e3
    assert omega.min() > 0 and omega.max() <= 0.1
    assert eta.min() >= 0 and eta.max() <= 1
    assert eps.min() >= 0 and eps.max() <= 1e-3
    # 900 uniform draws each: the ranges are actually covered, not a corner of them.
    assert lam.max() > 900 and omega.max() > 0.09 and eta.max() > 0.9 and eps.max() > 9e-4
    for p in draws:
        assert p.alpha.shape == (3, 3)
        assert np.all(p.alpha >= 0)
        np.testing.assert_allclose(p.alpha.sum(axis=0), 1.0, atol=1e-12)


def test_sample_parameters_share_the_global_criterion_weights() -> None:
    # α_{n,m}/b_{n,m} = a_n / Σ_i a_i·b_{i,m}, so (α_0/b_0)/(α_1/b_1) = a_0/a_1 in every
    # domain: one a shared by all domains. a and b are replayed from the same seed.
    seed = 11
    p = sample_parameters(2, ["x", "y", "z"], np.random.default_rng(seed))
    replay = np.random.default_rng(seed)
    a = 1.0 - replay.random(2)
    b = 1.0 - replay.random((2, 3))
    ratio = (p.alpha[0] / b[0]) / (p.alpha[1] / b[1])
    np.testing.assert_allclose(ratio, a[0] / a[1], rtol=1e-12)


def test_sample_parameters_reproducible() -> None:
    one = sample_parameters(2, ["a", "b"], np.random.default_rng(42)).to_dict()
    two = sample_parameters(2, ["a", "b"], np.random.default_rng(42)).to_dict()
    other = sample_parameters(2, ["a", "b"], np.random.default_rng(43)).to_dict()
    assert one == two
    assert one != other


def test_params_round_trip_through_json_and_yaml() -> None:
    p = sample_parameters(3, ["web", "code"], np.random.default_rng(5))
    d = p.to_dict()
    assert list(d["domains"]) == ["web", "code"]
    # yaml.safe_dump sorts the domains; parameters are keyed by name, so order is free.
    for back in (json.loads(json.dumps(d)), yaml.safe_load(yaml.safe_dump(d))):
        assert QuadMixParams.from_dict(back).to_dict() == d


def valid_dict() -> dict:
    return {
        "domains": {
            "web": {"alpha": [0.5, 0.5], "lam": 10.0, "omega": 0.05, "eta": 0.5, "eps": 1e-4},
            "code": {"alpha": [1.0, 0.0], "lam": 100.0, "omega": 0.1, "eta": 1.0, "eps": 0.0},
        }
    }


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("alpha", [0.5, 0.4], "alpha of domain 'code' must sum to 1"),
        ("alpha", [1.5, -0.5], "alpha of domain 'code' must be finite and ≥ 0"),
        ("lam", 0.0, "lam of domain 'code' must be > 0"),
        ("omega", 0.0, "omega of domain 'code' must be in (0, 1]"),
        ("omega", 1.5, "omega of domain 'code' must be in (0, 1]"),
        ("eta", -0.1, "eta of domain 'code' must be ≥ 0"),
        ("eps", -1e-3, "eps of domain 'code' must be ≥ 0"),
        ("eps", float("nan"), "eps of domain 'code' must be ≥ 0"),
    ],
)
def test_validation_names_the_field_and_domain(field: str, value, message: str) -> None:
    d = valid_dict()
    d["domains"]["code"][field] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        QuadMixParams.from_dict(d)


def test_from_dict_missing_field_and_mismatched_criteria() -> None:
    d = valid_dict()
    del d["domains"]["web"]["omega"]
    with pytest.raises(ValueError, match="domain 'web' lack 'omega'"):
        QuadMixParams.from_dict(d)
    d = valid_dict()
    d["domains"]["web"]["alpha"] = [1.0]
    with pytest.raises(ValueError, match="one entry per criterion"):
        QuadMixParams.from_dict(d)


def test_domain_without_parameters_is_named() -> None:
    p = QuadMixParams.from_dict(valid_dict())
    np.testing.assert_array_equal(p.domain_index(["code", "web", "code"]), [1, 0, 1])
    with pytest.raises(ValueError, match="domain 'books' has no QuaDMix parameters"):
        p.domain_index(["web", "books"])


# One criterion (higher = better), two domains.
Q = np.array([[4.0], [3.0], [2.0], [1.0], [5.0], [0.0]])
DOM = np.array(["a", "a", "a", "a", "b", "b"])
TOK = np.array([10, 10, 10, 10, 30, 10])
PARAMS = QuadMixParams(
    alpha=np.array([[1.0, 1.0]]),
    lam=[10.0, 4.0],
    omega=[0.5, 0.4],
    eta=[1.0, 2.0],
    eps=[0.01, 0.001],
    domains=["a", "b"],
)


def sigma_maps(q: np.ndarray) -> list[PercentileMap]:
    """The σ maps as the ranks stage builds them: one document-weighted
    ``rank_percentile_map`` per criterion, higher = better."""
    return [rank_percentile_map(q[:, n], higher_is_better=True) for n in range(q.shape[1])]


def test_document_values_by_hand() -> None:
    # σ over the 6 docs, best first 5, 4, 3, 2, 1, 0: σ = (k + ½)/6 for k = 0..5.
    # Domain a: q̄ = σ = [1.5, 2.5, 3.5, 4.5]/6, equal tokens → r̄ = [0.125, 0.375, 0.625, 0.875].
    # Domain b: q̄ = [0.5/6, 5.5/6], tokens [30, 10] → r̄ = [15/40, 35/40] = [0.375, 0.875].
    # a (λ=10, ω=0.5, η=1, ε=0.01): r̄ 0.125 → 2/(1+e^−3.75) + ε = 1.964045260;
    #                               r̄ 0.375 → 2/(1+e^−1.25) + ε = 1.564599722; others ε.
    # b (λ=4, ω=0.4, η=2, ε=0.001): r̄ 0.375 → (2/(1+e^−0.1))² + ε = 1.04995837² + ε
    #                               = 1.103412589; r̄ 0.875 → ε.
    sigma = sigma_maps(Q)
    qbar = document_qbar(Q, DOM, sigma, PARAMS)
    np.testing.assert_allclose(qbar, (np.array([1, 2, 3, 4, 0, 5]) + 0.5) / 6)
    ranks = fit_rank_maps(qbar, DOM, TOK)
    got = document_values(Q, DOM, sigma, ranks, PARAMS)
    np.testing.assert_allclose(
        got, [1.964045260, 1.564599722, 0.01, 0.01, 1.103412589, 0.001], rtol=1e-9
    )
    # Shard by shard (any split, any order) gives the same values.
    parts = [document_values(Q[s], DOM[s], sigma, ranks, PARAMS) for s in ([4, 0, 2], [5, 1, 3])]
    np.testing.assert_array_equal(np.concatenate(parts)[np.argsort([4, 0, 2, 5, 1, 3])], got)
    empty = document_values(Q[:0], DOM[:0], sigma, ranks, PARAMS)
    assert empty.shape == (0,)


def test_document_values_domain_missing_from_rank_maps() -> None:
    sigma = sigma_maps(Q)
    ranks = fit_rank_maps(np.array([0.1, 0.2]), np.array(["a", "a"]), np.array([1, 1]))
    with pytest.raises(ValueError, match="domain 'b' has no q̄ → r̄ map"):
        document_values(Q, DOM, sigma, ranks, PARAMS)
