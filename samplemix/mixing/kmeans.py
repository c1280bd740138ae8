"""Spherical k-means with FAISS: fit on a bounded sample, assign every document.

The fit reads at most ``kmeans.max_sample`` embeddings (``fit_sample_rows``), whatever
the corpus's size; the assignments go shard by shard.

Both run on the GPUs FAISS sees (faiss-gpu installed, CUDA present), else on CPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import faiss
import numpy as np

from samplemix.mixing.weights import doc_uniforms

MAX_AUTO_K = 4096
DOCS_PER_CLUSTER = 200


def gpus() -> int:
    """CUDA devices FAISS can use in this process: 0 with faiss-cpu or without CUDA."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def auto_k(n_docs: int, max_k: int = MAX_AUTO_K) -> int:
    """Default cluster count: round(n_docs / 200), between 2 and ``max_k``.

    Why 200 documents per cluster: d(x) = comp · sep of x's cluster (method.md §1.2),
    and comp is a mean over the cluster's members, so a cluster needs members in the
    hundreds for it to be more than one document's noise. Clusters come out uneven (on
    the shared corpus at K = 42: the tenth percentile holds 53 documents, the median
    196), so a mean of 200 keeps nine clusters in ten above ~50; fewer, larger clusters
    only coarsen d, which has one value per cluster.

    Why at most 4,096 (``MAX_AUTO_K``; the caller lowers ``max_k`` to keep a capped fit
    sample's points per centroid, ``kmeans.max_sample / max_points_per_centroid``): the
    fit reads points per centroid · K embeddings and computes K distances for each, the
    assignments N · K, the separation K × K. At 4,096 the fit takes minutes on a CPU
    whatever N; beyond ~819,000 documents clusters grow past method.md's few thousand
    (~244,000 documents each at 10^9), a coarser d at a bounded cost.
    """
    return max(2, min(max_k, MAX_AUTO_K, round(n_docs / DOCS_PER_CLUSTER)))


def fit_sample_rows(
    shard_ids: Iterable[list[str]], size: int, n_docs: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Which documents the k-means fit reads: the ``size`` (or, rarely, a few fewer) of
    the ``n_docs`` whose uniforms of (``seed``, "kmeans", id) are smallest, in the order
    of those uniforms, so that the sample and its order (FAISS's seeded initialisation
    draws from it) do not depend on how the corpus is sharded.

    ``shard_ids``: each shard's document ids in row order, read one shard at a time.
    Returns per shard (rows, slots), int64 (m,) each: the shard's rows ``rows``
    (ascending) are the sample's rows ``slots``. Memory: about ``size`` candidates.
    """
    # Candidates: uniforms below a rate that yields at least ``size`` documents but for
    # odds under ~1e-4 (4 binomial sigmas and 8 documents over); the ``size`` smallest of
    # them are the sample.
    rate = min(1.0, (size + 4 * math.sqrt(size) + 8) / max(n_docs, 1))
    rows, u = [], []
    for ids in shard_ids:
        shard_u = doc_uniforms(ids, seed, "kmeans")
        rows.append(np.flatnonzero(shard_u < rate))
        u.append(shard_u[rows[-1]])
    if not rows:
        return []
    candidates = np.concatenate(u)
    slot = np.full(len(candidates), -1, np.int64)
    picked = np.argsort(candidates, kind="stable")[:size]
    slot[picked] = np.arange(len(picked))
    slots = np.split(slot, np.cumsum([len(r) for r in rows])[:-1])
    return [(r[s >= 0], s[s >= 0]) for r, s in zip(rows, slots, strict=True)]


#: Rows FAISS decodes from float16 to float32 at a time while it fits: 8 MiB of float32
#: at 256 dimensions (32,768 rows held 24 MiB more at the same speed: FAISS searches
#: 4,096 queries at a time either way).
DECODE_ROWS = 8_192


def fit_centroids(sample: np.ndarray, k: int, niter: int, seed: int, nredo: int = 1) -> np.ndarray:
    """Fit ``k`` centroids on ``sample`` (n, dim) L2-normalised rows, held as float16,
    keeping the best of ``nredo`` seeded random initialisations.

    Returns float32 (k, dim) unit-norm centroids. Raises ValueError when the sample
    has fewer rows than ``k``.
    """
    n, dim = sample.shape
    if n < k:
        raise ValueError(
            f"kmeans.k = {k} clusters but only {n} documents to fit on; lower kmeans.k"
        )
    # The sample is the fit's memory (262,144 x 384 float32 = 384 MiB at the cap): FAISS
    # fits on float16 codes, decoding DECODE_ROWS at a time, which halves it; unit
    # vectors lose ~5e-4 of each coordinate's value, far below the centroids' spread.
    codes = np.ascontiguousarray(sample, dtype=np.float16)
    params = faiss.ClusteringParameters()
    params.niter, params.nredo, params.seed, params.verbose = niter, nredo, seed, False
    # Spherical: cosine k-means of unit vectors. max_points_per_centroid = n: FAISS keeps
    # every point of the sample, which is bounded already.
    params.spherical, params.max_points_per_centroid = True, n
    clustering = faiss.Clustering(dim, k, params)
    clustering.decode_block_size = DECODE_ROWS
    codec = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16)
    index = faiss.IndexFlatIP(dim)
    if gpus():  # the assignments, the fit's cost, on the GPUs FAISS sees
        index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
    clustering.train_encoded(codes.view(np.uint8), codec, index)
    centroids = faiss.vector_to_array(clustering.centroids).reshape(k, dim).astype(np.float32)
    return centroids / np.linalg.norm(centroids, axis=1, keepdims=True).clip(min=1e-12)


def assign(embeddings: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by cosine for each row of ``embeddings`` (n, dim).

    Returns (cluster int32 (n,), distance float32 (n,) = 1 − cos(e, μ) in [0, 2]).
    """
    if len(embeddings) == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    if gpus():
        index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
    sims, ids = index.search(np.ascontiguousarray(embeddings, dtype=np.float32), 1)
    # float32 inner products of unit vectors can land a few ulps outside [−1, 1].
    return ids[:, 0].astype(np.int32), np.clip(1.0 - sims[:, 0], 0.0, 2.0).astype(np.float32)


@functools.cache
def _gpu_resources():  # noqa: ANN202 - faiss.StandardGpuResources
    """One FAISS GPU context per process (each allocates scratch memory on the device)."""
    return faiss.StandardGpuResources()
