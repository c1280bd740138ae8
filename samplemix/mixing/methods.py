"""The mixing methods, each declared once: SampleMix, QuaDMix and the domain-wise baselines.

A ``MixingMethod`` carries everything that differs between methods, so that the stage
graph, the plan, the report and the run name read it instead of branching on a name:

- ``reduces``: the corpus-wide stages it needs before the weights (pipeline/graph.py);
  the last one's artifact feeds its weights function;
- ``all_scorers``: whether its weights read every quality scorer (else the first);
- ``key_settings``: the mixing settings its weights depend on (a part of their key);
- ``weights``: w(x) for one shard's documents (``WeightInputs``);
- ``settings``: what the report lists under Settings; ``label``: its run-name label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from samplemix.io.store import Key, Store
from samplemix.mixing import baselines, quadmix
from samplemix.mixing import weights as mixing

if TYPE_CHECKING:
    from samplemix.config import Config, MixingConfig


@dataclass(frozen=True)
class WeightInputs:
    """One shard's documents as a weights function reads them (n documents).

    ``quality``: float64 (n, scorers): the raw q of the scorers the method reads;
    ``diversity``: float64 (n,) d(x); ``domains``: str (n,); ``q_range`` and
    ``d_range``: corpus-wide [min, max] of the first scorer's q and of d; ``reduce``:
    the summary of the method's last reduce with its ``key`` (None when it has none);
    ``store``: where that reduce's artifact lies."""

    quality: np.ndarray
    diversity: np.ndarray
    domains: np.ndarray
    q_range: list[float]
    d_range: list[float]
    reduce: dict | None
    store: Store


@dataclass(frozen=True)
class MixingMethod:
    """One mixing method; see the module docstring for the fields."""

    name: str
    reduces: tuple[str, ...]
    all_scorers: bool
    key_settings: Callable[[MixingConfig], dict]
    weights: Callable[[WeightInputs, Config], np.ndarray]
    settings: Callable[[Config, dict | None], dict]
    label: Callable[[MixingConfig], str]


# ---- SampleMix ---------------------------------------------------------------------------


def _samplemix_weights(x: WeightInputs, cfg: Config) -> np.ndarray:
    m = cfg.mixing
    q = x.quality[:, 0]
    return mixing.sample_weights(
        q, x.diversity, tuple(x.q_range), tuple(x.d_range), m.alpha, m.epsilon
    )


SAMPLEMIX = MixingMethod(
    name="samplemix",
    reduces=(),
    all_scorers=False,
    key_settings=lambda m: {"alpha": m.alpha, "epsilon": m.epsilon},
    weights=_samplemix_weights,
    settings=lambda cfg, _: {"alpha": cfg.mixing.alpha, "scorer": cfg.quality[0].label},
    label=lambda m: f"samplemix-a{m.alpha:g}",
)


# ---- QuaDMix -----------------------------------------------------------------------------


def load_ranks(
    store: Store, ranks: Key
) -> tuple[list[quadmix.PercentileMap], dict[str, quadmix.PercentileMap]]:
    """The σ maps (criterion order) and the r̄ maps (by domain) of a ranks artifact."""
    a = store.get_arrays(ranks, "maps.npz")
    sigma: dict[int, dict] = {}
    rank: dict[str, dict] = {}
    for name, values in a.items():
        kind, which, part = name.split(":")
        if kind == "sigma":
            sigma.setdefault(int(which), {})[part] = values
        else:
            rank.setdefault(which, {})[part] = values
    return (
        [quadmix.PercentileMap(sigma[n]["xs"], sigma[n]["ps"], True) for n in sorted(sigma)],
        {d: quadmix.PercentileMap(m["xs"], m["ps"]) for d, m in rank.items()},
    )


def _quadmix_weights(x: WeightInputs, cfg: Config) -> np.ndarray:
    assert x.reduce is not None  # the ranks summary
    sigma, ranks = load_ranks(x.store, x.reduce["key"])
    params = quadmix.QuadMixParams.from_dict(x.reduce["params"])
    return quadmix.document_values(x.quality, x.domains, sigma, ranks, params)


QUADMIX = MixingMethod(
    name="quadmix",
    reduces=("ranks",),
    all_scorers=True,
    key_settings=lambda m: {},
    weights=_quadmix_weights,
    settings=lambda cfg, _: {
        "criteria": ", ".join(q.label for q in cfg.quality),
        "rank sample": cfg.mixing.quadmix.rank_sample or "all (exact)",
    },
    label=lambda m: "quadmix",
)


# ---- domain-wise baselines ---------------------------------------------------------------


def _fixed(cfg: Config, domains: dict) -> dict[str, float]:
    try:
        return baselines.fixed_proportions(cfg.mixing.domain_weights or {}, list(domains["tokens"]))
    except ValueError as e:
        raise ValueError(f"mixing.domain_weights: {e}") from None


PROPORTIONS: dict[str, Callable[[Config, dict], dict[str, float]]] = {
    "vanilla": lambda cfg, domains: baselines.vanilla_proportions(domains["tokens"]),
    "fixed": _fixed,
    "temperature": lambda cfg, domains: baselines.temperature_proportions(
        domains["tokens"], cfg.mixing.temperature
    ),
    "ce": lambda cfg, domains: baselines.ce_proportions(domains["entropy"]),
}


def baseline_proportions(cfg: Config, domains: dict) -> dict[str, float]:
    """Token share per domain for the baseline ``cfg.mixing.method``, from the domains
    summary (tokens per domain; entropy per domain for CE)."""
    return PROPORTIONS[cfg.mixing.method](cfg, domains)


def _baseline_weights(x: WeightInputs, cfg: Config) -> np.ndarray:
    assert x.reduce is not None  # the domains summary
    shares = baseline_proportions(cfg, x.reduce)
    return baselines.domain_weights(x.domains, shares, x.reduce["tokens"])


def _baseline(
    name: str, reduces: tuple[str, ...], key_settings: Callable, shown: tuple[str, ...] = ()
) -> MixingMethod:
    """A domain-wise baseline: uniform in a domain, its share from ``PROPORTIONS[name]``.
    The report lists the shares and the ``shown`` ones of its key settings."""

    def settings(cfg: Config, domains: dict | None) -> dict:
        assert domains is not None
        shares = baseline_proportions(cfg, domains)
        listed = {"domain shares": ", ".join(f"{d} {p:.1%}" for d, p in shares.items())}
        return listed | {k: key_settings(cfg.mixing)[k] for k in shown}

    return MixingMethod(
        name, reduces, False, key_settings, _baseline_weights, settings, lambda m: name
    )


BASELINES = (
    _baseline("vanilla", ("domains",), lambda m: {}),
    _baseline("fixed", ("domains",), lambda m: {"domain_weights": m.domain_weights}),
    _baseline(
        "temperature", ("domains",), lambda m: {"temperature": m.temperature}, ("temperature",)
    ),
    _baseline("ce", ("bigrams", "domains"), lambda m: {}),
)

BY_NAME: dict[str, MixingMethod] = {m.name: m for m in (SAMPLEMIX, QUADMIX, *BASELINES)}
METHODS = tuple(BY_NAME)  # the names mixing.method accepts


def method_of(cfg: Config) -> MixingMethod:
    """The method ``cfg.mixing.method`` names."""
    return BY_NAME[cfg.mixing.method]


def key_part(cfg: Config) -> dict:
    """The mixing settings a method's weights depend on, beyond its reduce's key."""
    return {"method": cfg.mixing.method, **method_of(cfg).key_settings(cfg.mixing)}
