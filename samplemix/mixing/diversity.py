"""Cluster statistics and the diversity score d(x) (method.md §1.2).

Per shard, ``cluster_partials`` sums what the global statistics need; partials
from all shards are merged with ``merge_partials`` (memory O(K·domains), never
O(documents)); ``cluster_stats`` turns them into compactness and separation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from samplemix.config import DiversityConfig


@dataclass
class ClusterPartials:
    """Sums over one or more shards. Arrays have shape (K,)."""

    count: np.ndarray  # int64: documents per cluster
    dist_sum: np.ndarray  # float64: Σ (1 − cos(e_x, μ_k))
    dist_min: np.ndarray  # float64: +inf where empty
    dist_max: np.ndarray  # float64: −inf where empty
    by_domain: dict[str, np.ndarray]  # domain -> int64 documents per cluster


def cluster_partials(
    cluster: np.ndarray, dist: np.ndarray, domains: list[str] | np.ndarray, k: int
) -> ClusterPartials:
    dist = dist.astype(np.float64)
    dmin = np.full(k, np.inf)
    dmax = np.full(k, -np.inf)
    np.minimum.at(dmin, cluster, dist)
    np.maximum.at(dmax, cluster, dist)
    domains = np.asarray(domains)
    by_domain = {
        str(d): np.bincount(cluster[domains == d], minlength=k).astype(np.int64)
        for d in np.unique(domains)
    }
    return ClusterPartials(
        np.bincount(cluster, minlength=k).astype(np.int64),
        np.bincount(cluster, weights=dist, minlength=k),
        dmin,
        dmax,
        by_domain,
    )


def merge_partials(parts: Iterable[ClusterPartials]) -> ClusterPartials:
    """All ``parts`` summed into one, taken one at a time: memory O(K·domains) whatever
    the number of parts (a list of 1,667 shards' partials at K = 4,096 held 270 MiB).
    ``parts`` must not be empty."""
    total: ClusterPartials | None = None
    for p in parts:
        if total is None:
            total = ClusterPartials(
                p.count.copy(),
                p.dist_sum.copy(),
                p.dist_min.copy(),
                p.dist_max.copy(),
                {d: c.copy() for d, c in p.by_domain.items()},
            )
            continue
        total.count += p.count
        total.dist_sum += p.dist_sum
        np.minimum(total.dist_min, p.dist_min, out=total.dist_min)
        np.maximum(total.dist_max, p.dist_max, out=total.dist_max)
        for d, c in p.by_domain.items():
            if d in total.by_domain:
                total.by_domain[d] += c
            else:
                total.by_domain[d] = c.copy()
    if total is None:
        raise ValueError("no cluster partials to merge")
    total.by_domain = dict(sorted(total.by_domain.items()))
    return total


@dataclass
class ClusterStats:
    """Per-cluster compactness and separation (K,), and the range of d over documents."""

    count: np.ndarray
    compactness: np.ndarray  # mean 1 − cos(e_x, μ_k); 0 for empty clusters
    separation: np.ndarray  # distance to other non-empty centroids; 0 for empty clusters
    d_min: float
    d_max: float


#: Rows of the K × K centroid distances held at once (8 MiB of float64 at K = 4,096;
#: the whole matrix, 128 MiB, and its sorted copy made the clusters reduce's peak).
SEPARATION_ROWS = 256


def separation(centroids: np.ndarray, nonempty: np.ndarray, cfg: DiversityConfig) -> np.ndarray:
    """Separation of each cluster from the other non-empty clusters, shape (K,).

    'nearest': min_j (1 − cos(μ_k, μ_j)); 'mean': mean over all j ≠ k;
    'mean_nearest': mean over the ``cfg.m`` nearest. A lone non-empty cluster gets 0.
    Computed ``SEPARATION_ROWS`` clusters at a time.
    """
    k = len(centroids)
    others = int(nonempty.sum()) - 1
    sep = np.zeros(k)
    if others < 1:
        return sep
    c = centroids.astype(np.float64)
    for a in range(0, k, SEPARATION_ROWS):
        b = min(a + SEPARATION_ROWS, k)
        # Clipped: float32 unit vectors can have inner products a few ulps above 1.
        dist = np.clip(1.0 - c[a:b] @ c.T, 0, 2)
        dist[:, ~nonempty] = np.nan
        dist[np.arange(b - a), np.arange(a, b)] = np.nan
        if cfg.separation == "mean":
            sep[a:b] = np.nanmean(dist, axis=1)
            continue
        rows = np.sort(dist, axis=1)  # NaNs sort last
        sep[a:b] = (
            rows[:, 0]
            if cfg.separation == "nearest"
            else rows[:, : min(cfg.m, others)].mean(axis=1)
        )
    return np.where(nonempty, sep, 0.0)


def diversity_values(
    cluster: np.ndarray, dist: np.ndarray, comp: np.ndarray, sep: np.ndarray, cfg: DiversityConfig
) -> np.ndarray:
    """d(x) for documents in ``cluster`` with distances ``dist`` to their centroid.

    'product': comp_k · sep_k; 'per_sample': (1 − cos(e_x, μ_k)) · sep_k;
    'additive': λ·comp_k + (1 − λ)·sep_k. float64, shape (n,).
    """
    if cfg.form == "product":
        return comp[cluster] * sep[cluster]
    if cfg.form == "per_sample":
        return dist.astype(np.float64) * sep[cluster]
    return cfg.lam * comp[cluster] + (1 - cfg.lam) * sep[cluster]


def cluster_stats(p: ClusterPartials, centroids: np.ndarray, cfg: DiversityConfig) -> ClusterStats:
    nonempty = p.count > 0
    comp = np.where(nonempty, p.dist_sum / np.maximum(p.count, 1), 0.0)
    sep = separation(centroids, nonempty, cfg)
    if cfg.form == "per_sample":
        # d is increasing in the distance, so its range comes from each cluster's extremes.
        # (indexed first: empty clusters hold ±inf · 0, which warns as NaN)
        lo = (p.dist_min[nonempty] * sep[nonempty]).min()
        hi = (p.dist_max[nonempty] * sep[nonempty]).max()
    else:
        values = diversity_values(np.flatnonzero(nonempty), np.zeros(0), comp, sep, cfg)
        lo, hi = values.min(), values.max()
    return ClusterStats(p.count, comp, sep, float(lo), float(hi))


def overlap_matrix(by_domain: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Share of domain i's clusters that also contain domain j: (D, D), diagonal 1.

    A cluster "contains" a domain when at least one of its documents is from it.
    """
    domains = sorted(by_domain)
    present = np.stack([by_domain[d] > 0 for d in domains]).astype(np.float64)  # (D, K)
    both = present @ present.T
    own = np.diag(both).copy()
    return domains, both / np.maximum(own, 1)[:, None]
