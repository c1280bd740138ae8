"""QuaDMix sampling values (method.md §2).

Convention, as in the QuaDMix paper: for every quality signal *smaller = better*.
Our scorers produce higher = better, so the flip is explicit: the σ maps are built
with ``rank_percentile_map(..., higher_is_better=True)`` and negate before ranking.

Per document x of domain m with raw quality criteria q_{n,x}:

1. σ_n(q_n) = global rank percentile of q_n in [0, 1], 0 = best (``rank_percentile_map``).
2. q̄ = Σ_n σ_n(q_n)·α_{n,m}                         (``merged_quality``).
3. r̄ = token-weighted rank percentile of q̄ within domain m, 0 = best (``fit_rank_maps``).
4. S(r̄) = (2/(1 + exp(−λ_m(ω_m − r̄))))^{η_m} + ε_m if r̄ ≤ ω_m, else ε_m
                                                      (``sampling_value``).

Corpus-wide statistics are the percentile maps, fitted once on a bounded sample
(exact when the sample is the whole corpus); everything else is a per-document
function applied shard by shard (``document_values``).

S is the paper's expected copy count. Here it is the per-document sampling weight
w(x); the budget stage rescales it so Σ c·len = T_tgt (scale 1 when T_tgt = Σ S·len
reproduces the paper's counts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Alpha columns are sums of floats (and may come from a hand-edited config file).
SIMPLEX_ATOL = 1e-6
PARAM_FIELDS = ("lam", "omega", "eta", "eps")


@dataclass(frozen=True)
class PercentileMap:
    """Monotone map from values to rank percentiles in [0, 1], 0 = best.

    ``xs``: float64 (k,) strictly increasing distinct sample values, in the
    smaller-is-better orientation (already negated when ``higher_is_better``).
    ``ps``: float64 (k,) non-decreasing percentile of each of ``xs``.
    Calling it on values of any shape interpolates linearly between adjacent ``xs``;
    values below ``xs[0]`` (better than the whole sample) give 0, above ``xs[-1]`` give 1.
    Values must be finite (NaN maps to NaN).
    """

    xs: np.ndarray
    ps: np.ndarray
    higher_is_better: bool = False

    def __call__(self, values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        if self.higher_is_better:
            v = -v
        return np.interp(v, self.xs, self.ps, left=0.0, right=1.0)


def rank_percentile_map(
    sample: np.ndarray,
    weights: np.ndarray | None = None,
    higher_is_better: bool = False,
) -> PercentileMap:
    """Mid-rank percentile map of ``sample`` (float (k,), finite), 0 = best.

    With W = Σ weights (default: 1 per value, i.e. document-weighted), a sample value v
    maps to

        p(v) = (W(strictly better than v) + ½·W(tied with v)) / W   ∈ (0, 1),

    "better" meaning smaller, or larger when ``higher_is_better``. Ties therefore share
    the mean of their positions' percentiles. Token-weighted ranks pass
    ``weights`` = token counts (int or float (k,), ≥ 0, sum > 0).

    The map is exact at every sample value, so on the sample itself (the whole corpus,
    when that is what was passed) it gives these percentiles exactly; between sample
    values it interpolates, outside it clamps to 0/1 (see PercentileMap).
    """
    v = np.asarray(sample, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"sample must be a non-empty 1-d array, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("sample has NaN or infinite values; drop or score those documents")
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != v.shape:
        raise ValueError(f"weights shape {w.shape} does not match sample shape {v.shape}")
    if np.any(w < 0) or not w.sum() > 0:
        raise ValueError("weights must be ≥ 0 with a positive sum")
    if higher_is_better:
        v = -v
    xs, inverse = np.unique(v, return_inverse=True)
    tied = np.bincount(inverse, weights=w, minlength=xs.size)
    better = np.cumsum(tied) - tied
    return PercentileMap(xs, (better + 0.5 * tied) / tied.sum(), higher_is_better)


def merged_quality(sigmas: np.ndarray, domain_index: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """q̄(x) = Σ_n sigmas[x, n]·alpha[n, domain_index[x]].

    ``sigmas``: float (n, N) per-criterion percentiles in [0, 1]; ``domain_index``:
    int (n,) column of ``alpha`` for each document; ``alpha``: float (N, M), columns on
    the simplex. Returns float64 (n,) in [0, 1], 0 = best.
    """
    per_doc_alpha = np.asarray(alpha, dtype=np.float64).T[domain_index]
    return np.sum(np.asarray(sigmas, dtype=np.float64) * per_doc_alpha, axis=1)


def fit_rank_maps(
    qbar: np.ndarray, domains: np.ndarray | Sequence[str], tokens: np.ndarray
) -> dict[str, PercentileMap]:
    """The in-domain q̄ → r̄ maps: per domain, a token-weighted mid-rank percentile map.

    r̄(x) = (tokens of documents of x's domain with smaller q̄ + ½·tokens of those with
    q̄ equal to x's, x included) / tokens of the domain; 0 = best.

    ``qbar``: float (k,), from ``document_qbar`` on the sample; ``domains``: str (k,);
    ``tokens``: int (k,) ≥ 0. Exact on the documents passed when they are the whole
    corpus. The paper estimates the map on a random subset of 10,000 documents and
    applies it to all; every domain that
    ``document_values`` will see must be in the sample, so sample per domain (e.g. up to
    10,000 documents each) when some domains are small.
    """
    doms = np.asarray(domains).astype(str)
    q = np.asarray(qbar, dtype=np.float64)
    t = np.asarray(tokens, dtype=np.float64)
    maps = {}
    for d in np.unique(doms).tolist():
        mask = doms == d
        if not t[mask].sum() > 0:
            raise ValueError(f"domain {d!r} has 0 tokens in the sample; its ranks are undefined")
        maps[d] = rank_percentile_map(q[mask], t[mask])
    return maps


def sampling_value(
    r: np.ndarray,
    lam: np.ndarray | float,
    omega: np.ndarray | float,
    eta: np.ndarray | float,
    eps: np.ndarray | float,
) -> np.ndarray:
    """S(r̄) = (2/(1 + exp(−λ(ω − r̄))))^η + ε where r̄ ≤ ω, else ε.

    ``r``: float (n,) in [0, 1]; parameters scalar or (n,) (gathered by domain), with
    λ > 0, η ≥ 0, ε ≥ 0. Returns float64 (n,): 1 + ε at r̄ = ω, rising towards 2^η + ε
    at the best documents. No overflow for any λ: the exponent is only evaluated where
    r̄ ≤ ω, i.e. where it is ≤ 0.
    """
    r = np.asarray(r, dtype=np.float64)
    gap = np.asarray(omega, dtype=np.float64) - r
    kept = gap >= 0
    z = np.asarray(lam, dtype=np.float64) * np.where(kept, gap, 0.0)
    s = np.where(kept, (2.0 / (1.0 + np.exp(-z))) ** eta, 0.0)
    return s + eps


@dataclass(frozen=True)
class QuadMixParams:
    """θ: per-domain merge weights and sampling parameters, (N + 4)·M numbers.

    ``alpha``: float64 (N, M), column m on the simplex (≥ 0, sums to 1); ``lam``,
    ``omega``, ``eta``, ``eps``: float64 (M,) with λ > 0, ω ∈ (0, 1], η ≥ 0, ε ≥ 0;
    ``domains``: the M domain names, column order. Validated on construction: a
    ValueError names the bad field and domain.
    """

    alpha: np.ndarray
    lam: np.ndarray
    omega: np.ndarray
    eta: np.ndarray
    eps: np.ndarray
    domains: tuple[str, ...]

    def __post_init__(self) -> None:
        # Frozen: normalise the inputs (lists from a config file) in place once.
        for name in ("alpha", *PARAM_FIELDS):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        object.__setattr__(self, "domains", tuple(str(d) for d in self.domains))
        m = len(self.domains)
        if len(set(self.domains)) != m:
            raise ValueError(f"domains must be distinct, got {list(self.domains)}")
        if self.alpha.ndim != 2 or self.alpha.shape[1] != m:
            raise ValueError(f"alpha must have shape (criteria, {m}), got {self.alpha.shape}")
        for name in PARAM_FIELDS:
            if getattr(self, name).shape != (m,):
                raise ValueError(f"{name} must have shape ({m},), got {getattr(self, name).shape}")
        for j, d in enumerate(self.domains):
            col = self.alpha[:, j]
            if not (np.all(np.isfinite(col)) and np.all(col >= 0)):
                raise ValueError(
                    f"alpha of domain {d!r} must be finite and ≥ 0, got {col.tolist()}"
                )
            if abs(col.sum() - 1.0) > SIMPLEX_ATOL:
                raise ValueError(f"alpha of domain {d!r} must sum to 1, got {col.sum():.6g}")
            checks = {
                "lam": (self.lam[j] > 0, "> 0"),
                "omega": (0 < self.omega[j] <= 1, "in (0, 1]"),
                "eta": (self.eta[j] >= 0, "≥ 0"),
                "eps": (self.eps[j] >= 0, "≥ 0"),
            }
            for name, (ok, rule) in checks.items():
                value = getattr(self, name)[j]
                if not (ok and np.isfinite(value)):
                    raise ValueError(f"{name} of domain {d!r} must be {rule}, got {value}")

    def domain_index(self, domains: np.ndarray | Sequence[str]) -> np.ndarray:
        """Column index (int64 (n,)) of each document's domain (str (n,)); a domain
        without parameters raises ValueError naming it."""
        names, inverse = np.unique(np.asarray(domains).astype(str), return_inverse=True)
        column = {d: j for j, d in enumerate(self.domains)}
        missing = [d for d in names.tolist() if d not in column]
        if missing:
            raise ValueError(
                f"domain {missing[0]!r} has no QuaDMix parameters (have {list(self.domains)}); "
                "add an entry for it to the parameters, or draw them with sample_parameters"
            )
        return np.array([column[d] for d in names.tolist()], dtype=np.int64)[inverse.reshape(-1)]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able form: {"domains": {name: {"alpha": [N floats], "lam": float,
        "omega": float, "eta": float, "eps": float}}}, in column order."""
        return {
            "domains": {
                d: {
                    "alpha": [float(a) for a in self.alpha[:, j]],
                    **{name: float(getattr(self, name)[j]) for name in PARAM_FIELDS},
                }
                for j, d in enumerate(self.domains)
            }
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuadMixParams:
        """Inverse of ``to_dict``; a missing field raises ValueError naming it and its domain."""
        if "domains" not in data or not data["domains"]:
            raise ValueError("QuaDMix parameters need a non-empty 'domains' mapping")
        per_domain = data["domains"]
        for d, entry in per_domain.items():
            for name in ("alpha", *PARAM_FIELDS):
                if name not in entry:
                    raise ValueError(f"QuaDMix parameters of domain {d!r} lack {name!r}")
        lengths = {len(e["alpha"]) for e in per_domain.values()}
        if len(lengths) != 1:
            raise ValueError(
                f"alpha must have one entry per criterion in every domain, got {lengths}"
            )
        return cls(
            alpha=np.array([e["alpha"] for e in per_domain.values()], dtype=np.float64).T,
            **{name: [e[name] for e in per_domain.values()] for name in PARAM_FIELDS},
            domains=tuple(per_domain),
        )


def sample_parameters(
    n_criteria: int, domains: Sequence[str], rng: np.random.Generator
) -> QuadMixParams:
    """Draw θ as the paper's Algorithm 1.

    a_n ~ U(0, 1) shared by all domains; b_{n,m} ~ U(0, 1);
    α_{n,m} = a_n·b_{n,m} / Σ_i a_i·b_{i,m}; λ = 10³·U, ω = 0.1·U, η = U, ε = U/1000,
    one draw per domain. Same ``rng`` state → same θ.
    """
    m = len(domains)

    def u(*shape: int) -> np.ndarray:
        # U(0, 1] rather than [0, 1): a 0 draw would give λ = 0 or ω = 0, which are invalid.
        return 1.0 - rng.random(shape)

    # Alg. 1 normalises a; the normalisation cancels in the ratio, so it is left out.
    ab = u(n_criteria)[:, None] * u(n_criteria, m)
    return QuadMixParams(
        alpha=ab / ab.sum(axis=0),
        lam=1e3 * u(m),
        omega=0.1 * u(m),
        eta=u(m),
        eps=u(m) / 1e3,
        domains=tuple(domains),
    )


def document_qbar(
    q: np.ndarray,
    domains: np.ndarray | Sequence[str],
    sigma_maps: Sequence[PercentileMap],
    params: QuadMixParams,
) -> np.ndarray:
    """q̄ for a batch of documents: raw criteria ``q`` float (n, N) through σ, merged with
    their domain's α. Returns float64 (n,) in [0, 1], 0 = best."""
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != len(sigma_maps) or q.shape[1] != params.alpha.shape[0]:
        raise ValueError(
            f"q has shape {q.shape}; expected (documents, {len(sigma_maps)}) to match the "
            f"σ maps and alpha's {params.alpha.shape[0]} criteria"
        )
    sigmas = np.column_stack([m(q[:, n]) for n, m in enumerate(sigma_maps)])
    return merged_quality(sigmas, params.domain_index(domains), params.alpha)


def document_values(
    q: np.ndarray,
    domains: np.ndarray | Sequence[str],
    sigma_maps: Sequence[PercentileMap],
    rank_maps: Mapping[str, PercentileMap],
    params: QuadMixParams,
) -> np.ndarray:
    """S(x) for one shard: ``q`` float (n, N) raw criteria, ``domains`` str (n,).

    ``sigma_maps``: one ``rank_percentile_map(..., higher_is_better=True)`` per
    criterion (column of ``q``); ``rank_maps`` from ``fit_rank_maps`` on the
    q̄ of a sample computed with the same ``sigma_maps`` and ``params``. Returns float64
    (n,) ≥ 0, the per-document sampling weight. Depends only on the document and the
    fitted maps, so shards can be processed independently and in any order.
    """
    doms = np.asarray(domains).astype(str)
    idx = params.domain_index(doms)
    qbar = document_qbar(q, doms, sigma_maps, params)
    r = np.empty_like(qbar)
    for d in np.unique(doms).tolist():
        if d not in rank_maps:
            raise ValueError(
                f"domain {d!r} has no q̄ → r̄ map: it was not in the sample the ranks were "
                "fitted on; fit_rank_maps on a sample that includes it"
            )
        mask = doms == d
        r[mask] = rank_maps[d](qbar[mask])
    return sampling_value(r, params.lam[idx], params.omega[idx], params.eta[idx], params.eps[idx])
