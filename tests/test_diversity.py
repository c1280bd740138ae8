"""Tests for samplemix.mixing.diversity and samplemix.mixing.kmeans on clusters of known geometry.

Five unit centroids in R³ (cluster 3 holds no documents):
    μ0 = (1, 0, 0)          μ1 = (1/2, √3/2, 0)      μ2 = (0, 0, 1)
    μ3 = (0.6, 0, 0.8)      μ4 = (0, 0, −1)
Cosine distances 1 − cos(μi, μj) between the non-empty ones {0, 1, 2, 4}:
    d01 = 1 − 1/2 = 0.5, d02 = 1, d04 = 1, d12 = 1, d14 = 1, d24 = 1 − (−1) = 2.
The empty μ3 is close to μ0 (d = 0.4) and μ2 (d = 0.2): if it were not excluded,
both would get a smaller separation.

Documents are built at chosen cosine distances δ from their centroid:
    cluster 0: δ = 0.1, 0.2, 0.3   → comp0 = 0.6/3 = 0.2
    cluster 1: δ = 0.05, 0.15      → comp1 = 0.2/2 = 0.1
    cluster 2: δ = 0.4             → comp2 = 0.4
    cluster 4: δ = 0.25, 0.35      → comp4 = 0.6/2 = 0.3
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import numpy as np
import pytest

from samplemix.config import DiversityConfig
from samplemix.mixing.diversity import (
    ClusterPartials,
    cluster_partials,
    cluster_stats,
    diversity_values,
    merge_partials,
    overlap_matrix,
    separation,
)
from samplemix.mixing.kmeans import assign, auto_k, fit_centroids

S3 = np.sqrt(3) / 2
CENTROIDS = np.array(
    [[1, 0, 0], [0.5, S3, 0], [0, 0, 1], [0.6, 0, 0.8], [0, 0, -1]], dtype=np.float32
)
K = 5


def _at(cos: float, axis: np.ndarray, away: np.ndarray) -> np.ndarray:
    """The unit vector at cosine ``cos`` from ``axis``, rotated towards unit ``away`` ⊥ axis."""
    return cos * axis + np.sqrt(1 - cos**2) * away


E1, E2, E3 = np.eye(3)
MU1_PERP = np.array([-S3, 0.5, 0])  # ⊥ μ1, rotating away from μ0
DOCS = [
    # (cluster, δ, domain, embedding)
    (0, 0.1, "web", _at(0.9, E1, -E2)),
    (0, 0.2, "code", _at(0.8, E1, -E2)),
    (0, 0.3, "web", _at(0.7, E1, -E2)),
    (1, 0.05, "web", _at(0.95, CENTROIDS[1].astype(np.float64), MU1_PERP)),
    (1, 0.15, "arxiv", _at(0.85, CENTROIDS[1].astype(np.float64), MU1_PERP)),
    (2, 0.4, "arxiv", _at(0.6, E3, -E2)),
    (4, 0.25, "code", _at(0.75, -E3, -E2)),
    (4, 0.35, "code", _at(0.65, -E3, -E2)),
]
CLUSTER = np.array([c for c, *_ in DOCS], dtype=np.int32)
DELTA = np.array([d for _, d, *_ in DOCS])
DOMAIN = [dom for _, _, dom, _ in DOCS]
EMB = np.stack([e for *_, e in DOCS]).astype(np.float32)

COMP = np.array([0.2, 0.1, 0.4, 0.0, 0.3])
SEP = {
    # nearest: min over the non-empty others
    "nearest": [0.5, 0.5, 1.0, 0.0, 1.0],
    # mean: μ0 (0.5 + 1 + 1)/3, μ1 (0.5 + 1 + 1)/3, μ2 (1 + 1 + 2)/3, μ4 (1 + 1 + 2)/3
    "mean": [2.5 / 3, 2.5 / 3, 4 / 3, 0.0, 4 / 3],
    # the two nearest: μ0 (0.5 + 1)/2, μ1 (0.5 + 1)/2, μ2 (1 + 1)/2, μ4 (1 + 1)/2
    "mean_nearest2": [0.75, 0.75, 1.0, 0.0, 1.0],
}


def partials_of(idx: np.ndarray) -> ClusterPartials:
    cluster, dist = assign(EMB[idx], CENTROIDS)
    return cluster_partials(cluster, dist, [DOMAIN[i] for i in idx], K)


def all_partials() -> ClusterPartials:
    return partials_of(np.arange(len(DOCS)))


def test_documents_sit_where_designed() -> None:
    # The construction itself (a check on the test's geometry, and on assign).
    np.testing.assert_allclose(np.linalg.norm(CENTROIDS, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(EMB, axis=1), 1, atol=1e-6)
    cluster, dist = assign(EMB, CENTROIDS)
    assert cluster.tolist() == CLUSTER.tolist()
    np.testing.assert_allclose(dist, DELTA, atol=1e-6)


def test_partials_by_hand() -> None:
    p = all_partials()
    assert p.count.tolist() == [3, 2, 1, 0, 2]
    np.testing.assert_allclose(p.dist_sum, [0.6, 0.2, 0.4, 0.0, 0.6], atol=1e-6)
    np.testing.assert_allclose(p.dist_min[[0, 1, 2, 4]], [0.1, 0.05, 0.4, 0.25], atol=1e-6)
    np.testing.assert_allclose(p.dist_max[[0, 1, 2, 4]], [0.3, 0.15, 0.4, 0.35], atol=1e-6)
    assert p.dist_min[3] == np.inf and p.dist_max[3] == -np.inf
    assert sorted(p.by_domain) == ["arxiv", "code", "web"]
    assert p.by_domain["web"].tolist() == [2, 1, 0, 0, 0]
    assert p.by_domain["code"].tolist() == [1, 0, 0, 0, 2]
    assert p.by_domain["arxiv"].tolist() == [0, 1, 1, 0, 0]


@pytest.mark.parametrize(
    "split",
    [
        [[0, 1, 2, 3], [4, 5, 6, 7]],
        [[7, 0], [], [5, 3, 1], [6], [4, 2]],  # shuffled, with an empty shard
    ],
)
def test_merge_equals_all_at_once(split: list[list[int]]) -> None:
    whole = all_partials()
    merged = merge_partials([partials_of(np.array(s, dtype=np.int64)) for s in split])
    assert merged.count.tolist() == whole.count.tolist()
    np.testing.assert_allclose(merged.dist_sum, whole.dist_sum, rtol=1e-12)
    np.testing.assert_array_equal(merged.dist_min, whole.dist_min)
    np.testing.assert_array_equal(merged.dist_max, whole.dist_max)
    assert list(merged.by_domain) == list(whole.by_domain)
    for d in whole.by_domain:
        assert merged.by_domain[d].tolist() == whole.by_domain[d].tolist()


def test_merge_holds_one_shards_partials_at_a_time() -> None:
    """The clusters reduce merges every shard's partials: at 10^6 documents a list of
    them all held 270 MiB. At most the previous part is alive when the next is read."""
    alive, held = [0], []

    def gone() -> None:
        alive[0] -= 1

    def parts() -> Iterator[ClusterPartials]:
        for s in ([0, 1], [2, 3, 4], [5], [6, 7]):
            held.append(alive[0])  # parts read before this one and still referenced
            p = partials_of(np.array(s, dtype=np.int64))
            alive[0] += 1
            weakref.finalize(p, gone)
            yield p
            del p

    merged = merge_partials(parts())
    assert held == [0, 1, 1, 1]  # the merge's loop holds the last part it added, no more
    assert merged.count.tolist() == all_partials().count.tolist()


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (DiversityConfig(separation="nearest"), SEP["nearest"]),
        (DiversityConfig(separation="mean"), SEP["mean"]),
        (DiversityConfig(separation="mean_nearest", m=1), SEP["nearest"]),
        (DiversityConfig(separation="mean_nearest", m=2), SEP["mean_nearest2"]),
        # m beyond the 3 other non-empty clusters averages over all of them
        (DiversityConfig(separation="mean_nearest", m=10), SEP["mean"]),
    ],
)
def test_separation_by_hand(cfg: DiversityConfig, expected: list[float]) -> None:
    nonempty = np.array([True, True, True, False, True])
    np.testing.assert_allclose(separation(CENTROIDS, nonempty, cfg), expected, atol=1e-6)
    stats = cluster_stats(all_partials(), CENTROIDS, cfg)
    np.testing.assert_allclose(stats.separation, expected, atol=1e-6)
    np.testing.assert_allclose(stats.compactness, COMP, atol=1e-6)
    assert stats.count.tolist() == [3, 2, 1, 0, 2]


def test_empty_cluster_counts_once_it_has_documents() -> None:
    # The same centroids with every cluster non-empty: μ3 now pulls μ0 and μ2 closer.
    # nearest: μ0 min(0.5, 1, 0.4, 1) = 0.4; μ2 min(1, 1, 0.2, 2) = 0.2;
    # μ3 min(0.4, 1 − 0.3 = 0.7, 0.2, 1.8) = 0.2.
    sep = separation(CENTROIDS, np.ones(K, bool), DiversityConfig(separation="nearest"))
    np.testing.assert_allclose(sep, [0.4, 0.5, 0.2, 0.2, 1.0], atol=1e-6)


def test_lone_nonempty_cluster_has_zero_separation() -> None:
    nonempty = np.array([False, False, True, False, False])
    for how in ("nearest", "mean", "mean_nearest"):
        sep = separation(CENTROIDS, nonempty, DiversityConfig(separation=how))
        assert sep.tolist() == [0.0] * K


# d per document (nearest separation), by cluster:
#   product     comp·sep:    c0 0.2·0.5 = 0.1, c1 0.1·0.5 = 0.05, c2 0.4·1 = 0.4, c4 0.3·1 = 0.3
#   per_sample  δ·sep:       c0 [0.05, 0.1, 0.15], c1 [0.025, 0.075], c2 [0.4], c4 [0.25, 0.35]
#   additive λ = 0.25:  0.25·comp + 0.75·sep:
#                            c0 0.05 + 0.375 = 0.425, c1 0.025 + 0.375 = 0.4,
#                            c2 0.1 + 0.75 = 0.85,    c4 0.075 + 0.75 = 0.825
FORMS = [
    (
        DiversityConfig(form="product"),
        [0.1, 0.1, 0.1, 0.05, 0.05, 0.4, 0.3, 0.3],
    ),
    (
        DiversityConfig(form="per_sample"),
        [0.05, 0.1, 0.15, 0.025, 0.075, 0.4, 0.25, 0.35],
    ),
    (
        DiversityConfig(form="additive", lam=0.25),
        [0.425, 0.425, 0.425, 0.4, 0.4, 0.85, 0.825, 0.825],
    ),
    # mean separation, product: c0 0.2·2.5/3 = 1/6, c1 0.1·2.5/3 = 1/12, c2 0.4·4/3, c4 0.3·4/3
    (
        DiversityConfig(form="product", separation="mean"),
        [1 / 6, 1 / 6, 1 / 6, 1 / 12, 1 / 12, 1.6 / 3, 0.4, 0.4],
    ),
]


@pytest.mark.parametrize(("cfg", "expected"), FORMS)
def test_diversity_values_and_range_by_hand(cfg: DiversityConfig, expected: list[float]) -> None:
    stats = cluster_stats(all_partials(), CENTROIDS, cfg)
    cluster, dist = assign(EMB, CENTROIDS)
    d = diversity_values(cluster, dist, stats.compactness, stats.separation, cfg)
    assert d.dtype == np.float64
    np.testing.assert_allclose(d, expected, atol=1e-6)
    # The range in ClusterStats is the range over the documents.
    assert stats.d_min == pytest.approx(min(expected), abs=1e-6)
    assert stats.d_max == pytest.approx(max(expected), abs=1e-6)


def test_overlap_matrix_by_hand() -> None:
    # A in clusters {0, 1}, B in {1, 2}, C in {2}; given out of order.
    by_domain = {
        "C": np.array([0, 0, 4, 0]),
        "A": np.array([3, 1, 0, 0]),
        "B": np.array([0, 2, 5, 0]),
    }
    domains, m = overlap_matrix(by_domain)
    assert domains == ["A", "B", "C"]
    # A: of its 2 clusters, 1 has B, 0 have C. B: of 2, 1 has A, 1 has C. C: its 1 has B.
    np.testing.assert_allclose(m, [[1, 0.5, 0], [0.5, 1, 0.5], [0, 1, 1]])


def test_overlap_matrix_from_partials() -> None:
    domains, m = overlap_matrix(all_partials().by_domain)
    assert domains == ["arxiv", "code", "web"]
    # arxiv {1, 2}, code {0, 4}, web {0, 1}
    np.testing.assert_allclose(m, [[1, 0, 0.5], [0, 1, 0.5], [0.5, 0.5, 1]])


# --- k-means ------------------------------------------------------------------------------


def blobs(seed: int = 0, n_blobs: int = 4, per_blob: int = 100, dim: int = 16):
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n_blobs, dim))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    truth = np.repeat(np.arange(n_blobs), per_blob)
    x = dirs[truth] + 0.05 * rng.normal(size=(len(truth), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), truth


def test_kmeans_recovers_separated_blobs() -> None:
    # FAISS initialises from random points without restarts, so for some seeds two
    # centroids start in one blob and Lloyd's iterations cannot undo it; the pipeline's
    # default seed (0) starts well on this data.
    x, truth = blobs()
    centroids = fit_centroids(x, 4, niter=20, seed=0)
    assert centroids.shape == (4, 16) and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    cluster, dist = assign(x, centroids)
    assert cluster.dtype == np.int32 and dist.dtype == np.float32
    mapping = {t: set(cluster[truth == t].tolist()) for t in range(4)}
    assert all(len(v) == 1 for v in mapping.values())  # no blob is split
    assert len(set().union(*mapping.values())) == 4  # no two blobs share a cluster
    assert np.all((dist >= 0) & (dist <= 2))
    # Distances are 1 − cos to the assigned centroid, which is the most similar one.
    sims = x.astype(np.float64) @ centroids.T.astype(np.float64)
    np.testing.assert_allclose(dist, 1 - sims.max(axis=1), atol=1e-5)
    assert np.array_equal(cluster, sims.argmax(axis=1))


def test_assign_distance_range_at_the_extremes() -> None:
    # A point on its centroid is at 0 (float32 inner products may exceed 1 by an ulp);
    # the antipode of a lone centroid is at 2.
    x, _ = blobs(seed=1, n_blobs=8, per_blob=8)
    _, dist = assign(x, x)
    assert np.all((dist >= 0) & (dist <= 2))
    np.testing.assert_allclose(dist, 0, atol=1e-6)
    _, dist = assign(-x[:5], x[:1])
    assert np.all((dist >= 0) & (dist <= 2))
    np.testing.assert_allclose(dist[0], 2, atol=1e-6)


def test_kmeans_too_few_points() -> None:
    x, _ = blobs(n_blobs=1, per_blob=3)
    with pytest.raises(ValueError, match=r"kmeans\.k"):
        fit_centroids(x, 4, niter=5, seed=0)


def test_assign_no_rows() -> None:
    cluster, dist = assign(np.zeros((0, 3), np.float32), CENTROIDS)
    assert cluster.shape == (0,) and dist.shape == (0,)
    assert cluster.dtype == np.int32 and dist.dtype == np.float32
    p = cluster_partials(cluster, dist, [], K)
    assert p.count.tolist() == [0] * K and p.by_domain == {}


def test_duplicate_centroids_have_zero_not_negative_separation() -> None:
    # Two copies of each of 200 random float32 unit vectors in R³⁸⁴: every cluster's
    # nearest other centroid is its twin, at distance exactly 0 (never a few ulps below).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sep = separation(np.concatenate([x, x]), np.ones(400, bool), DiversityConfig())
    assert np.all(sep >= 0)
    np.testing.assert_allclose(sep, 0, atol=1e-6)


def test_auto_k_targets_200_docs_per_cluster_within_bounds() -> None:
    assert [auto_k(n) for n in (1, 10, 1_400, 8_400, 10**9)] == [2, 2, 7, 42, 4096]


@pytest.mark.parametrize("how", ["nearest", "mean", "mean_nearest"])
def test_separation_in_blocks_of_rows_matches_each_cluster_by_hand(how: str) -> None:
    """K = 600 spans three blocks of SEPARATION_ROWS; each cluster's separation is
    computed here from its own row of distances, one cluster at a time."""
    rng = np.random.default_rng(3)
    c = rng.normal(size=(600, 16)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    nonempty = rng.random(600) > 0.2
    cfg = DiversityConfig(separation=how, m=4)
    expected = np.zeros(600)
    for k in np.flatnonzero(nonempty):
        others = [j for j in np.flatnonzero(nonempty) if j != k]
        d = np.sort([1.0 - float(np.dot(c[k].astype(np.float64), c[j])) for j in others])
        expected[k] = {"nearest": d[0], "mean": d.mean(), "mean_nearest": d[:4].mean()}[how]
    np.testing.assert_allclose(separation(c, nonempty, cfg), expected, rtol=1e-12, atol=1e-12)
