"""Paired comparison of evaluation arms that share seeds (issue 27, method.md §4).

Every arm of an evaluation trains its proxies with the same seeds, and a seed fixes the
initial weights and the window order: most of the seed-to-seed spread is shared by all
arms (one seed is worst in every arm). Comparing arms by their per-seed *differences*
removes that shared part, so a paired comparison resolves far smaller differences than
one that compares the arms' means and stds.

For arm A against baseline B over the n seeds both ran, with d_s = loss_A(s) − loss_B(s)
(nats/token; negative: A is better):

- ``mean`` = mean of d_s, ``se`` = std(d, ddof=1) / √n;
- ``ci`` = mean ± t_{0.975, n−1} · se, the two-sided 95% t interval;
- ``resolved``: the interval excludes 0, i.e. |mean| > t_{0.975, n−1} · se;
- ``mdd``, the minimum detectable difference: the true difference that a paired t test at
  5% (two-sided) detects with 80% power at this spread and n,
  (t_{0.975, n−1} + t_{0.80, n−1}) · se. With 3 seeds that is 5.36 · se.

A seedless instrument (the n-gram model) has no seeds to pair; ``bootstrap_paired``
resamples the evaluation documents instead, the same documents for both arms.

Pure arithmetic; no torch, no Prefect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

#: Two-sided level of the confidence interval and of ``resolved``.
ALPHA = 0.05
#: Power at which ``mdd`` is stated.
POWER = 0.80


@dataclass(frozen=True)
class Paired:
    """Arm minus baseline over the seeds both ran; losses in nats/token.

    With fewer than 2 shared seeds ``se``, ``ci`` and ``mdd`` are NaN and ``resolved``
    is False: one difference has no spread to judge it by."""

    arm: str
    baseline: str
    seeds: tuple[int, ...]
    diffs: tuple[float, ...]  # per seed, in ``seeds`` order
    mean: float
    se: float
    ci: tuple[float, float]
    mdd: float
    resolved: bool

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def t(self) -> float:
        """mean / se: how many paired standard errors the difference is (±inf when every
        seed differs by the same nonzero amount, NaN when the arms are identical)."""
        if self.n < 2:
            return math.nan
        if self.se == 0:
            return math.copysign(math.inf, self.mean) if self.mean else math.nan
        return self.mean / self.se


def critical_t(n: int) -> tuple[float, float]:
    """(t_{1−ALPHA/2, n−1}, t_{POWER, n−1}) for n ≥ 2 paired differences."""
    df = n - 1
    return float(stats.t.ppf(1 - ALPHA / 2, df)), float(stats.t.ppf(POWER, df))


def paired(
    arm: str, arm_losses: Mapping[int, float], baseline: str, base_losses: Mapping[int, float]
) -> Paired:
    """``arm`` against ``baseline`` from {seed: loss} of each, over the seeds both have
    (sorted). Non-finite losses (a diverged proxy) make every statistic NaN."""
    seeds = tuple(sorted(set(arm_losses) & set(base_losses)))
    d = np.array([arm_losses[s] - base_losses[s] for s in seeds], dtype=float)
    mean = float(d.mean()) if d.size else math.nan
    if d.size < 2 or not np.isfinite(d).all():
        nan = math.nan
        return Paired(arm, baseline, seeds, tuple(d.tolist()), mean, nan, (nan, nan), nan, False)
    se = float(d.std(ddof=1) / math.sqrt(d.size))
    t_level, t_power = critical_t(d.size)
    half = t_level * se
    return Paired(
        arm=arm,
        baseline=baseline,
        seeds=seeds,
        diffs=tuple(d.tolist()),
        mean=mean,
        se=se,
        ci=(mean - half, mean + half),
        mdd=(t_level + t_power) * se,
        resolved=abs(mean) > half,
    )


#: Set losses of one arm: {set name: (summed NLL per document, tokens per document)}.
DocLosses = Mapping[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class DocBootstrap:
    """Arm minus baseline of a seedless instrument, resampling evaluation documents.

    ``mean``: the objective's difference (nats/token) on the evaluation sets as they are;
    ``se``: the std of the difference over ``draws`` paired resamples (the same
    documents drawn for both arms, within each set); ``ci``: their 2.5 and 97.5
    percentiles; ``resolved``: the CI excludes 0; ``mdd``: (z_0.975 + z_0.80) · se."""

    arm: str
    baseline: str
    docs: int
    mean: float
    se: float
    ci: tuple[float, float]
    mdd: float
    resolved: bool


def _objective(nll: Sequence[np.ndarray], tokens: Sequence[np.ndarray]) -> np.ndarray:
    # Mean over sets of each set's NLL per token; rows are bootstrap draws.
    return np.mean(
        [n.sum(axis=-1) / t.sum(axis=-1) for n, t in zip(nll, tokens, strict=True)], axis=0
    )


def bootstrap_paired(
    arm: str,
    arm_docs: DocLosses,
    baseline: str,
    base_docs: DocLosses,
    draws: int = 2000,
    seed: int = 0,
) -> DocBootstrap:
    """``arm`` against ``baseline`` on the sets both scored, the objective being the mean
    over sets of NLL per token. Raises ValueError when the sets' documents differ (not the
    same evaluation documents, so not paired)."""
    names = sorted(set(arm_docs) & set(base_docs))
    rng = np.random.default_rng(seed)
    diffs, points, n_docs = [], [], 0
    for name in names:
        (a, ta), (b, tb) = arm_docs[name], base_docs[name]
        if not np.array_equal(ta, tb):
            raise ValueError(f"evaluation set {name!r} differs between {arm} and {baseline}")
        pick = rng.integers(0, len(ta), size=(draws, len(ta)))
        diffs.append((a[pick] - b[pick], ta[pick]))
        points.append((a - b, ta))
        n_docs += len(ta)
    mean = float(_objective([d for d, _ in points], [t for _, t in points]))
    boot = _objective([d for d, _ in diffs], [t for _, t in diffs])
    se = float(boot.std(ddof=1))
    lo, hi = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    z = float(stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(POWER))
    return DocBootstrap(arm, baseline, n_docs, mean, se, (lo, hi), z * se, lo > 0 or hi < 0)


def spearman(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Spearman's ρ between two scorings of the same arms (over the arms both have, ties
    averaged); NaN with fewer than 3 arms or when either scoring is constant."""
    names = sorted(set(a) & set(b))
    x = np.array([a[n] for n in names], dtype=float)
    y = np.array([b[n] for n in names], dtype=float)
    if len(names) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0 or not np.isfinite([x, y]).all():
        return math.nan
    return float(stats.spearmanr(x, y).statistic)
