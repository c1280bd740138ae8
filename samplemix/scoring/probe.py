"""Embedding probe: how much a document's embedding looks like the reference set's.

A logistic regression on the run's own document embeddings (embed stage, MiniLM by
default): positives are documents of the reference domains (text a user calls good:
books, encyclopaedia, documentation), negatives a sample of the whole corpus, as DCLM
trains its fastText filter on good text against the crawl at large. The score is the
fitted probability of "reference", in (0, 1). It costs one dot product per document,
as the embeddings are computed for diversity anyway.

The fit minimises the summed log loss plus ``0.5 * l2 * |w|^2`` (the bias unpenalised;
scikit-learn's LogisticRegression with C = 1 / l2) by L-BFGS from zero: deterministic for
the same inputs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit


@dataclass(frozen=True)
class Probe:
    """``weights`` float64 (dim,) and ``bias``: P(reference | e) = sigmoid(e · w + b)."""

    weights: np.ndarray
    bias: float

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """P(reference) of each row of ``embeddings`` (n, dim): float64 (n,) in (0, 1)."""
        return expit(np.asarray(embeddings, dtype=np.float64) @ self.weights + self.bias)

    def fingerprint(self) -> str:
        """16 hex digits of the weights' and bias' bytes."""
        h = hashlib.sha256(np.ascontiguousarray(self.weights, dtype=np.float64).tobytes())
        h.update(np.float64(self.bias).tobytes())
        return h.hexdigest()[:16]


def fit_probe(positives: np.ndarray, negatives: np.ndarray, l2: float = 1.0) -> Probe:
    """The L2-regularised logistic regression of ``positives`` (n1, dim) against
    ``negatives`` (n0, dim). Raises ValueError when a side is empty or the widths differ."""
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError(
            f"a probe needs positives and negatives, got {len(positives)} and {len(negatives)}"
        )
    if positives.shape[1] != negatives.shape[1]:
        raise ValueError(f"widths differ: {positives.shape[1]} and {negatives.shape[1]}")
    x = np.concatenate([positives, negatives]).astype(np.float64)
    sign = np.r_[np.ones(len(positives)), -np.ones(len(negatives))]  # +1: reference

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:-1], theta[-1]
        margin = sign * (x @ w + b)
        slope = -sign * expit(-margin)  # d(log loss)/d(x·w + b) per document
        grad = np.r_[x.T @ slope + l2 * w, slope.sum()]
        return float(-log_expit(margin).sum() + 0.5 * l2 * (w @ w)), grad

    start = np.zeros(x.shape[1] + 1)
    options = {"maxiter": 1000, "gtol": 1e-7}
    fit = minimize(loss, start, jac=True, method="L-BFGS-B", options=options)
    return Probe(fit.x[:-1].copy(), float(fit.x[-1]))
