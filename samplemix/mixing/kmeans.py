"""Spherical k-means with FAISS: fit on a bounded sample, assign every document.

Both run on the GPUs FAISS sees (faiss-gpu installed, CUDA present), else on CPU.
"""

from __future__ import annotations

import functools

import faiss
import numpy as np

MAX_AUTO_K = 4096


def gpus() -> int:
    """CUDA devices FAISS can use in this process: 0 with faiss-cpu or without CUDA."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def auto_k(n_docs: int) -> int:
    """Default cluster count: about 200 documents per cluster, between 2 and 4,096.

    method.md asks for clusters of a few hundred to a few thousand documents; 200
    keeps small corpora from collapsing into a handful of all-domain clusters, and the
    cap bounds the fit (at most max_points_per_centroid · 4,096 sampled embeddings)
    and the K×K separation matrix on large corpora."""
    return min(MAX_AUTO_K, max(2, round(n_docs / 200)))


def fit_centroids(sample: np.ndarray, k: int, niter: int, seed: int, nredo: int = 1) -> np.ndarray:
    """Fit ``k`` centroids on ``sample`` (n, dim) L2-normalised float32 rows, keeping
    the best of ``nredo`` seeded random initialisations.

    Returns float32 (k, dim) unit-norm centroids. Raises ValueError when the sample
    has fewer rows than ``k``.
    """
    n, dim = sample.shape
    if n < k:
        raise ValueError(
            f"kmeans.k = {k} clusters but only {n} documents to fit on; lower kmeans.k"
        )
    # Spherical: cosine k-means of unit vectors. max_points_per_centroid = n: FAISS keeps
    # every point of the sample, which is bounded already. On the GPUs FAISS sees.
    options = {"niter": niter, "nredo": nredo, "seed": seed, "verbose": False}
    km = faiss.Kmeans(dim, k, spherical=True, max_points_per_centroid=n, gpu=gpus() > 0, **options)
    km.train(np.ascontiguousarray(sample, dtype=np.float32))
    centroids = km.centroids.astype(np.float32)
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
