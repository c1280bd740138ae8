"""Weights and counts (method.md §1.3).

w(x) = α·d̂(x) + (1 − α)·q̂(x) + ε, with min–max normalisation over the corpus.
Expected count c(x) = min(s·w(x), max_repeats) where the scale s makes
Σ c(x)·len(x) = T_tgt. Realised count n(x) = ⌊c⌋ + Bernoulli(c − ⌊c⌋), the draw
made from a uniform that depends only on (seed, document id, salt), so counts do
not depend on sharding, worker count or order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import numpy as np


class BudgetError(ValueError):
    """The token budget cannot be met under the configured limits."""


def doc_uniforms(ids: Iterable[str], seed: int, salt: str) -> np.ndarray:
    """One uniform in [0, 1) per id, a pure function of (seed, salt, id): float64 (n,)."""
    prefix = f"{seed}\x1f{salt}\x1f".encode()
    raw = b"".join(hashlib.blake2b(prefix + i.encode(), digest_size=8).digest() for i in ids)
    # 53 random bits map exactly onto the float64 grid in [0, 1).
    return (np.frombuffer(raw, dtype="<u8") >> np.uint64(11)) * (1.0 / (1 << 53))


def heldout_mask(ids: Iterable[str], fraction: float, seed: int) -> np.ndarray:
    """True for the documents held out for evaluation: a uniform of (seed, id) below
    ``fraction``, so about ``fraction`` of every domain, whatever the sharding. bool (n,)."""
    u = doc_uniforms(ids, seed, "heldout")
    return u < fraction


def minmax(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(x − lo) / (hi − lo) in [0, 1]. A constant signal (hi == lo) carries no
    ranking, so every document gets 1: it then neither favours nor removes anyone."""
    if hi <= lo:
        return np.ones_like(x, dtype=np.float64)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def sample_weights(
    q: np.ndarray,
    d: np.ndarray,
    q_range: tuple[float, float],
    d_range: tuple[float, float],
    alpha: float,
    epsilon: float = 0.0,
) -> np.ndarray:
    """w(x) = α·d̂ + (1 − α)·q̂ + ε with corpus-wide min–max ranges: float64 (n,) ≥ 0."""
    return alpha * minmax(d, *d_range) + (1 - alpha) * minmax(q, *q_range) + epsilon


def budget_scale(
    parts: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    target: float,
    max_repeats: int | None,
) -> float:
    """The scale s with Σ min(s·w, max_repeats)·len = ``target``.

    ``parts()`` yields (w, len) arrays shard by shard and may be called several times
    (the capped case bisects, streaming over shards; memory stays one shard).
    Raises BudgetError when no s meets the target.
    """
    wl = 0.0
    reachable = 0.0  # tokens of documents with w > 0
    for w, n_tok in parts():
        wl += float(np.dot(w, n_tok))
        reachable += float(n_tok[w > 0].sum())
    if wl <= 0:
        raise BudgetError(
            "every document has weight 0 (all quality and diversity at their minimum); "
            "set mixing.epsilon > 0"
        )
    s = target / wl
    if max_repeats is None:
        return s
    if target > max_repeats * reachable:
        raise BudgetError(
            f"budget {target:,.0f} tokens exceeds what mixing.max_repeats = {max_repeats} allows: "
            f"{max_repeats} × {reachable:,.0f} tokens of documents with weight > 0 = "
            f"{max_repeats * reachable:,.0f}; lower the budget, raise mixing.max_repeats, or set "
            "mixing.epsilon > 0 to make every document reachable"
        )

    def filled(scale: float) -> float:
        return sum(float(np.dot(np.minimum(scale * w, max_repeats), n)) for w, n in parts())

    lo, hi = s, s
    while filled(hi) < target:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if filled(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return hi


def expected_counts(w: np.ndarray, scale: float, max_repeats: int | None) -> np.ndarray:
    """c(x) = min(s·w(x), max_repeats): float64 (n,)."""
    c = scale * w
    return c if max_repeats is None else np.minimum(c, max_repeats)


def realised_counts(c: np.ndarray, ids: list[str], seed: int) -> np.ndarray:
    """n(x) = ⌊c⌋ + [u(x) < c − ⌊c⌋] with u(x) = doc_uniforms(id, seed): int64 (n,)."""
    floor = np.floor(c)
    return (floor + (doc_uniforms(ids, seed, "count") < c - floor)).astype(np.int64)


def rounding_variance(c: np.ndarray, n_tok: np.ndarray) -> float:
    """Σ f(1−f)·len², f = c − ⌊c⌋: the variance of Σ n·len under floor + Bernoulli."""
    f = c - np.floor(c)
    return float(np.sum(f * (1 - f) * n_tok.astype(np.float64) ** 2))
