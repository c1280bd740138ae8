"""Domain-wise baselines (method.md §3): vanilla, fixed, temperature and CE proportions.

Each baseline picks domain proportions p_m (fractions of the token budget) and
samples uniformly inside each domain. ``domain_weights`` turns p into the
per-document sampling weight w(x) = p_m / T_m that the budget stage consumes, so a
baseline fills T_tgt with the same floor + Bernoulli rounding as SampleMix.

Proportions are dicts keyed by domain name, in the order of the input mapping.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def _check_nonnegative(values: Mapping[str, float], what: str) -> None:
    for d, v in values.items():
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{what} of domain {d!r} must be finite and ≥ 0, got {v}")
    if not sum(values.values()) > 0:
        raise ValueError(f"{what} sum to 0 over {list(values)}; at least one must be > 0")


def vanilla_proportions(domain_tokens: Mapping[str, int]) -> dict[str, float]:
    """Natural token shares p_m = T_m / Σ_j T_j (``domain_tokens``: tokens per domain, ≥ 0)."""
    _check_nonnegative(domain_tokens, "tokens")
    total = sum(domain_tokens.values())
    return {d: t / total for d, t in domain_tokens.items()}


def temperature_proportions(domain_tokens: Mapping[str, int], tau: float) -> dict[str, float]:
    """p_m ∝ (T_m / Σ_j T_j)^(1/τ), τ > 0: τ = 1 is vanilla, τ → ∞ uniform over the
    domains with tokens, τ → 0 all on the largest. Domains with 0 tokens get 0."""
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    shares = vanilla_proportions(domain_tokens)
    scaled = {d: math.log(s) / tau for d, s in shares.items() if s > 0}
    # Subtracting the largest exponent keeps exp() in range for tiny τ.
    top = max(scaled.values())
    raw = {d: math.exp(scaled[d] - top) if d in scaled else 0.0 for d in shares}
    total = sum(raw.values())
    return {d: r / total for d, r in raw.items()}


def fixed_proportions(
    given: Mapping[str, float], domains: Iterable[str], allow_missing: bool = False
) -> dict[str, float]:
    """User-given proportions (e.g. a DoReMi or RegMix result) normalised to sum to 1,
    keyed by the corpus ``domains`` in their order.

    A ``given`` domain absent from the corpus is an error (likely a typo). A corpus
    domain absent from ``given`` is an error too, unless ``allow_missing``: then it
    gets 0 and is left out of the mixture.
    """
    corpus = list(domains)
    _check_nonnegative(given, "proportion")
    unknown = [d for d in given if d not in corpus]
    if unknown:
        raise ValueError(
            f"fixed proportion for domain {unknown[0]!r}, which is not in the corpus "
            f"(domains: {corpus}); remove it or fix its name"
        )
    missing = [d for d in corpus if d not in given]
    if missing and not allow_missing:
        raise ValueError(
            f"corpus domain {missing[0]!r} has no fixed proportion; give it one "
            "(0 leaves it out) or allow missing domains"
        )
    total = sum(given.values())
    return {d: given.get(d, 0.0) / total for d in corpus}


def bigram_counts(token_ids: Iterable[Sequence[int]]) -> Counter[tuple[int, int]]:
    """Counts of (previous, next) token pairs within each document of ``token_ids``
    (one token-id sequence per document); no pair spans two documents.

    Partials from shards merge by addition (``a + b`` or ``a.update(b)``). Memory grows
    with the distinct bigrams, so count on a bounded document sample per domain.
    """
    counts: Counter[tuple[int, int]] = Counter()
    for doc in token_ids:
        ids = np.asarray(doc).tolist()  # plain ints: hashable, compact, picklable
        counts.update(zip(ids[:-1], ids[1:], strict=True))
    return counts


def conditional_entropy(counts: Mapping[tuple[int, int], int]) -> float:
    """H(next | prev) in nats from bigram ``counts``:
    −Σ_{a,b} p(a,b)·ln p(b|a), p(a,b) = c(a,b)/C, p(b|a) = c(a,b)/c(a,·)."""
    pairs = [(a, c) for (a, _), c in counts.items() if c > 0]
    if not pairs:
        raise ValueError("no bigrams: every document has fewer than 2 tokens")
    prev = np.array([a for a, _ in pairs], dtype=np.int64)
    c = np.array([c for _, c in pairs], dtype=np.float64)
    _, prev_index = np.unique(prev, return_inverse=True)
    prev_total = np.bincount(prev_index, weights=c)
    return float(np.sum(c * (np.log(prev_total[prev_index]) - np.log(c))) / c.sum())


def ce_proportions(entropies: Mapping[str, float]) -> dict[str, float]:
    """BiMix CE proportions r_m = exp(H_m) / Σ_j exp(H_j), a softmax of the per-domain
    conditional entropies (nats)."""
    for d, h in entropies.items():
        if not math.isfinite(h):
            raise ValueError(f"entropy of domain {d!r} must be finite, got {h}")
    # Subtracting the largest entropy keeps exp() in range.
    top = max(entropies.values())
    raw = {d: math.exp(h - top) for d, h in entropies.items()}
    total = sum(raw.values())
    return {d: r / total for d, r in raw.items()}


def domain_weights(
    domains: np.ndarray | Sequence[str],
    proportions: Mapping[str, float],
    domain_tokens: Mapping[str, int],
) -> np.ndarray:
    """Per-document weight w(x) = p_m / T_m for documents with domain names ``domains``
    (str (n,)): float64 (n,) ≥ 0, uniform within a domain.

    Over a domain Σ w·len = p_m, so the budget scale s = T_tgt / Σ_m p_m gives domain m
    an expected p_m / Σ p · T_tgt tokens (``proportions`` need not sum to 1). A
    ``max_repeats`` cap that binds in a domain moves its excess to the others. A domain
    with p_m = 0 gets 0; one missing from ``proportions``, or with p_m > 0 and
    T_m = 0 in ``domain_tokens`` (corpus-wide tokens per domain), raises ValueError.
    """
    names, inverse = np.unique(np.asarray(domains).astype(str), return_inverse=True)
    per_name = np.zeros(names.size)
    for j, d in enumerate(names.tolist()):
        if d not in proportions:
            raise ValueError(f"domain {d!r} has no proportion (have {list(proportions)})")
        p = proportions[d]
        if p == 0:
            continue
        t = domain_tokens.get(d, 0)
        if t <= 0:
            raise ValueError(f"domain {d!r} has proportion {p} but {t} tokens to draw from")
        per_name[j] = p / t
    return per_name[inverse.reshape(-1)]
