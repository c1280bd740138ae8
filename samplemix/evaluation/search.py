"""Mixture-parameter search: a regressor θ → proxy loss picks θ (method.md §2.6, RegMix style).

The caller picks a space (``search_space``), draws K parameter sets (``draw_parameters``;
K = ``default_draws`` unless told), evaluates each by training a proxy model (method.md §4)
or by the seedless n-gram instrument (one of ``INSTRUMENTS``), and passes θ and losses to
``search``: it fits LightGBM on all but the last ``validation`` draws and measures it on
those (MAE, the MAE of a constant predictor beside it, Spearman ρ), refits on all draws,
predicts ``candidates`` fresh draws, and averages the ``top`` best predicted θ. The chosen
θ goes into the run configuration through ``SearchSpace.mixing_update``.

Engine rule, as in report.py: no Prefect, no torch, no pyplot global state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import lightgbm as lgb
import numpy as np

from samplemix.evaluation.paired import spearman
from samplemix.mixing.quadmix import PARAM_FIELDS, QuadMixParams, sample_parameters
from samplemix.reporting.formatting import markdown_table, new_figure, no_data_panel, png_bytes

# Candidates come from a child SeedSequence of `seed` (spawn key below). Its entropy is
# padded to 4 words before the key is appended, so no plain integer seed below 2**128
# (what `draw_parameters` gets for the evaluated draws) yields the same stream.
_CANDIDATE_SPAWN_KEY = (1,)

# K is often 16-64: leaves of 2 draws and 1-draw bins let the trees split at all; small
# trees, many rounds and a modest rate keep the fit smooth. Single-threaded and
# deterministic so that the same inputs give the same θ.
_LGB_PARAMS = {
    "objective": "regression",
    "learning_rate": 0.05,
    "num_leaves": 7,
    "min_data_in_leaf": 2,
    "min_data_in_bin": 1,
    "min_sum_hessian_in_leaf": 0.0,
    "deterministic": True,
    "force_row_wise": True,
    "num_threads": 1,
    "verbose": -1,
}
_ROUNDS = 300
# LightGBM keeps labels as float32 (~6e-8 relative rounding), so a regressor that learned
# nothing, predicting the training mean, can come out ahead of the float64 mean by ~1e-7
# of the losses' size: a lead below this share of the largest training loss is a tie.
_TIE = 1e-6


class SearchSpace(Protocol):
    """What a search varies: θ, a JSON-able dict, and its numeric features for the regressor.

    ``method`` names the mixing method θ configures (one of ``SPACES``). Contracts:
    ``draw_features(rng, k)`` equals ``np.stack([features(draw(rng)) for _ in range(k)])``
    and advances ``rng`` as those k draws do; ``theta(features(t)) == t`` for a drawn ``t``;
    ``features``, ``average`` and ``mixing_update`` raise ValueError for a malformed θ."""

    method: ClassVar[str]

    def draw(self, rng: np.random.Generator) -> dict:
        """One θ; the same ``rng`` state gives the same θ."""
        ...

    def features(self, theta: dict) -> np.ndarray:
        """float64 (n_features,), in ``feature_names`` order."""
        ...

    def draw_features(self, rng: np.random.Generator, k: int) -> np.ndarray:
        """float64 (k, n_features): the features of k draws, vectorised."""
        ...

    def theta(self, row: np.ndarray) -> dict:
        """The θ whose ``features`` are ``row``."""
        ...

    def feature_names(self) -> list[str]:
        """One name per feature column."""
        ...

    def average(self, thetas: Sequence[dict]) -> dict:
        """The field-wise mean θ of a non-empty list (ValueError when empty)."""
        ...

    def mixing_update(self, theta: dict) -> dict:
        """What to merge, deeply, into the config's ``mixing`` section so that
        ``samplemix run`` uses θ."""
        ...

    def theta_table(self, theta: dict) -> str:
        """θ as a Markdown table."""
        ...

    def inline(self, theta: dict) -> str:
        """θ in a few words for a report line, or "" when it does not fit on one."""
        ...

    def plots(
        self, result: SearchResult, thetas: Sequence[dict], losses: Sequence[float]
    ) -> dict[str, bytes]:
        """The method's own plots of a search (PNG bytes keyed by file name); may be empty."""
        ...


@dataclass(frozen=True)
class SampleMixSpace:
    """θ = {"alpha": a}, a ~ U(0, 1): the SampleMix weight w = α·d̂ + (1−α)·q̂."""

    method: ClassVar[str] = "samplemix"

    def draw(self, rng: np.random.Generator) -> dict:
        return {"alpha": float(rng.random())}

    def features(self, theta: dict) -> np.ndarray:
        return np.array([self._alpha(theta)])

    def draw_features(self, rng: np.random.Generator, k: int) -> np.ndarray:
        return rng.random(k)[:, None]

    def theta(self, row: np.ndarray) -> dict:
        return {"alpha": float(row[0])}

    def feature_names(self) -> list[str]:
        return ["alpha"]

    def average(self, thetas: Sequence[dict]) -> dict:
        if not thetas:
            raise ValueError("cannot average an empty list of θ")
        return {"alpha": float(np.mean([self._alpha(t) for t in thetas]))}

    def mixing_update(self, theta: dict) -> dict:
        return {"method": "samplemix", "alpha": self._alpha(theta)}

    def theta_table(self, theta: dict) -> str:
        return markdown_table(["Parameter", "Value"], [["alpha", f"{theta['alpha']:.4g}"]])

    def inline(self, theta: dict) -> str:
        return f"alpha = {theta['alpha']:.4g}"

    def plots(
        self, result: SearchResult, thetas: Sequence[dict], losses: Sequence[float]
    ) -> dict[str, bytes]:
        """``search_alpha.png``: loss vs α, the fitted curve when ``result.model`` is set,
        the chosen α marked."""
        fig = new_figure(6.5, 4.2)
        ax = fig.subplots()
        ax.scatter(
            [self._alpha(t) for t in thetas], losses, s=14, color="#9aa5b1", label="evaluated draw"
        )
        if result.model is not None:
            grid = np.linspace(0.0, 1.0, 201)
            ax.plot(grid, result.model.predict(grid[:, None]), color="#1f77b4", label="regressor")
        chosen = result.theta["alpha"]
        ax.axvline(chosen, color="#d62728", ls="--", lw=1, label=f"chosen α = {chosen:.3g}")
        ax.set_xlabel("α (0 = quality only, 1 = diversity only)")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("Loss vs α")
        ax.legend(frameon=False)
        return {"search_alpha.png": png_bytes(fig)}

    @staticmethod
    def _alpha(theta: dict) -> float:
        """θ's α; ValueError unless it is a number in [0, 1]."""
        a = theta.get("alpha") if isinstance(theta, dict) else None
        if isinstance(a, bool) or not isinstance(a, int | float) or not 0 <= a <= 1:
            raise ValueError(f"samplemix θ needs 'alpha' in [0, 1], got {theta!r}")
        return float(a)


@dataclass(frozen=True)
class QuadMixSpace:
    """θ = QuadMixParams.to_dict() for ``domains`` (distinct, stored as str) and
    ``n_criteria`` ≥ 1 quality criteria, drawn by quadmix.sample_parameters (Algorithm 1).
    Features are domain-major: a domain's N + 4 numbers are adjacent."""

    method: ClassVar[str] = "quadmix"
    domains: tuple[str, ...]
    n_criteria: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", tuple(str(d) for d in self.domains))
        if not self.domains:
            raise ValueError("a quadmix search needs the corpus's domains (none given)")
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains must be distinct, got {list(self.domains)}")
        if self.n_criteria < 1:
            raise ValueError(f"n_criteria must be ≥ 1, got {self.n_criteria}")

    def draw(self, rng: np.random.Generator) -> dict:
        return sample_parameters(self.n_criteria, self.domains, rng).to_dict()

    def features(self, theta: dict) -> np.ndarray:
        p = self._params(theta)
        fields = [p.alpha, *(getattr(p, f)[None, :] for f in PARAM_FIELDS)]
        return np.concatenate(fields, axis=0).T.reshape(-1)

    def draw_features(self, rng: np.random.Generator, k: int) -> np.ndarray:
        """Skips the dict round trip (~0.25 ms per θ, 25 s for the paper's 100,000
        candidates). Generator.random fills sequentially, so one block in
        sample_parameters' order (a, b, λ, ω, η, ε; each 1 − U) is the same stream."""
        n, m = self.n_criteria, len(self.domains)
        u = 1.0 - rng.random((k, n + n * m + 4 * m))
        ab = u[:, :n, None] * u[:, n : n + n * m].reshape(k, n, m)
        lam, omega, eta, eps = np.moveaxis(u[:, n + n * m :].reshape(k, 4, m), 1, 0)
        scaled = np.stack([1e3 * lam, 0.1 * omega, eta, eps / 1e3], axis=1)
        cols = np.concatenate([ab / ab.sum(axis=1, keepdims=True), scaled], axis=1)
        return cols.transpose(0, 2, 1).reshape(k, -1)

    def theta(self, row: np.ndarray) -> dict:
        n = self.n_criteria
        cols = np.asarray(row, dtype=np.float64).reshape(len(self.domains), n + 4).T
        fields = {f: cols[n + i] for i, f in enumerate(PARAM_FIELDS)}
        return QuadMixParams(alpha=cols[:n], **fields, domains=self.domains).to_dict()

    def feature_names(self) -> list[str]:
        return [f"{name}@{d}" for d in self.domains for name in self._columns()]

    def average(self, thetas: Sequence[dict]) -> dict:
        """Every α column is a mean of simplex points, so it stays on the simplex; it is
        renormalised only against rounding."""
        if not thetas:
            raise ValueError("cannot average an empty list of θ")
        ps = [self._params(t) for t in thetas]
        alpha = np.mean([p.alpha for p in ps], axis=0)
        mean = QuadMixParams(
            alpha=alpha / alpha.sum(axis=0),
            **{f: np.mean([getattr(p, f) for p in ps], axis=0) for f in PARAM_FIELDS},
            domains=self.domains,
        )
        return mean.to_dict()

    def mixing_update(self, theta: dict) -> dict:
        """``quadmix`` holds only ``params``, not the section's other keys."""
        return {"method": "quadmix", "quadmix": {"params": self._params(theta).to_dict()}}

    def theta_table(self, theta: dict) -> str:
        rows = []
        for d in self.domains:
            e = theta["domains"][d]
            rows.append(
                [d, *(f"{a:.4g}" for a in e["alpha"]), *(f"{e[f]:.4g}" for f in PARAM_FIELDS)]
            )
        return markdown_table(["Domain", *self._columns()], rows)

    def inline(self, theta: dict) -> str:
        return ""

    def plots(
        self, result: SearchResult, thetas: Sequence[dict], losses: Sequence[float]
    ) -> dict[str, bytes]:
        return {}

    def _columns(self) -> list[str]:
        """A domain's parameter names: the N α weights, then PARAM_FIELDS."""
        return [f"alpha[{n}]" for n in range(self.n_criteria)] + list(PARAM_FIELDS)

    def _params(self, theta: dict) -> QuadMixParams:
        """θ as validated QuaDMix parameters in ``domains`` column order."""
        given = dict(theta.get("domains") or {}) if isinstance(theta, dict) else {}
        if set(given) != set(self.domains):
            missing = [d for d in self.domains if d not in given]
            extra = [d for d in given if d not in self.domains]
            raise ValueError(
                f"θ is for the wrong domains: missing {missing}, unexpected {extra} "
                f"(the search is over {list(self.domains)})"
            )
        params = QuadMixParams.from_dict({"domains": {d: given[d] for d in self.domains}})
        if params.alpha.shape[0] != self.n_criteria:
            raise ValueError(
                f"θ has {params.alpha.shape[0]} quality criteria, the search has {self.n_criteria}"
            )
        return params


SPACES = (SampleMixSpace.method, QuadMixSpace.method)


def search_space(method: str, domains: Sequence[str] = (), n_criteria: int = 1) -> SearchSpace:
    """The search space of ``method`` (one of ``SPACES``). ``domains`` (the corpus's) and
    ``n_criteria`` (its number of quality criteria) matter only to quadmix, which needs
    distinct domains and n_criteria ≥ 1; ValueError otherwise or for an unknown method."""
    if method == SampleMixSpace.method:
        return SampleMixSpace()
    if method == QuadMixSpace.method:
        return QuadMixSpace(tuple(domains), n_criteria)
    raise ValueError(f"search method must be one of {SPACES}, got {method!r}")


#: How a draw's loss is measured: "proxy" trains ``evaluate.seeds`` proxy LMs per draw (the
#: mean of their objectives); "ngram" fits the seedless Kneser–Ney instrument of order
#: ``evaluate.ngram_order`` on the proxy's training tokens (its objective; ~0.2 s for 200k
#: tokens, so a draw costs little more than its mix). "proxy" is the default: it measures
#: what the search is for, a trained LM's loss, whereas how well the n-gram ranks mixtures
#: as proxies do depends on the data (``samplemix evaluate`` reports the two instruments'
#: Spearman ρ); use "ngram" where the draws a space needs are too many to train proxies on.
INSTRUMENTS = ("proxy", "ngram")

#: Draws per searched parameter (feature) that ``default_draws`` asks for.
DRAWS_PER_FEATURE = 4


def default_draws(space: SearchSpace) -> int:
    """max(16, DRAWS_PER_FEATURE × the space's number of features): 16 for samplemix's α,
    4·M·(N + 4) for quadmix over M domains and N quality criteria (100 for 5 domains, 1
    criterion).

    Why 4 per feature: ``default_validation`` holds a quarter out, which leaves 3F
    training draws for F features, 3× the F + 1 that even a linear model in F features
    needs to be determined at all, and holds out F draws (≥ 4) to measure the fit's MAE
    and ρ on. It is a floor, not a target: RegMix used ~30 draws per feature (512 for 17)
    and QuaDMix ~16 (3,000 for 182), which ``evaluate.seeds`` proxies per draw cannot
    afford on a small machine (100 draws for 5 domains are already 300 proxies at 3
    seeds); the n-gram instrument can, so pass more draws with it. The search report's
    constant-predictor MAE and Spearman ρ say whether the draws sufficed."""
    return max(16, DRAWS_PER_FEATURE * len(space.feature_names()))


def default_validation(draws: int) -> int:
    """max(4, draws // 4) draws held out to measure the fit, but never more than the
    draws − 2 that leave ``search`` 2 training draws (0 for draws ≤ 2)."""
    return max(0, min(max(4, draws // 4), draws - 2))


def draw_parameters(space: SearchSpace, k: int, seed: int) -> list[dict]:
    """k θ, a pure function of (space, k, seed); the first k of a larger draw equal a smaller
    draw. ``seed``: an int in [0, 2**128)."""
    if k < 0:
        raise ValueError(f"the number of draws must be ≥ 0, got {k}")
    rng = np.random.default_rng(seed)
    return [space.draw(rng) for _ in range(k)]


@dataclass
class SearchResult:
    theta: dict  # the chosen θ (average of the `top` best predicted candidates)
    predicted_loss: float  # the regressor's prediction at `theta`
    mae: float | None  # mean |pred − loss| on the validation draws (None when validation = 0)
    # The same for a constant predictor, the training draws' mean loss (None likewise).
    constant_mae: float | None
    # Spearman ρ between predicted and observed validation losses: None when validation = 0,
    # NaN with fewer than 3 validation draws or when either side is constant.
    spearman: float | None
    # mae < constant_mae beyond float32 rounding (see _TIE); None when validation = 0.
    predicts: bool | None
    n_train: int
    n_validation: int
    validation: list[tuple[float, float]]  # (observed, predicted) per validation draw
    best_observed: tuple[dict, float]  # the evaluated θ with the lowest observed loss, the loss
    top: list[tuple[dict, float]]  # the `top` candidates and their predicted losses, best first
    importance: dict[str, float]  # feature name -> LightGBM gain importance (final model)
    # The final regressor (all draws), for plots and further predictions on space.features.
    model: lgb.Booster | None = field(default=None, repr=False, compare=False)


def _fit(x: np.ndarray, y: np.ndarray, seed: int) -> lgb.Booster:
    # Features stay positional: LightGBM rejects names with JSON characters ("[", domains).
    data = lgb.Dataset(x, label=y, free_raw_data=False)
    return lgb.train({**_LGB_PARAMS, "seed": seed}, data, num_boost_round=_ROUNDS)


def search(
    space: SearchSpace,
    thetas: Sequence[dict],
    losses: Sequence[float],
    *,
    validation: int,
    candidates: int = 100_000,
    top: int = 10,
    seed: int = 0,
) -> SearchResult:
    """Fit LightGBM on all but the last `validation` draws and measure it on those (MAE, the
    MAE of the training draws' mean as a constant prediction, Spearman ρ); then refit on all
    draws and predict `candidates` fresh draws (draw_parameters with a seed derived from `seed`
    that cannot collide with the draws being evaluated), average the `top` best predicted θ.

    ``thetas``: K θ of ``space``; ``losses``: K finite floats, lower = better. Needs
    0 ≤ validation ≤ K − 2 (at least 2 training draws) and 1 ≤ top ≤ candidates.
    Same inputs → the same result.
    """
    k = len(thetas)
    if len(losses) != k:
        raise ValueError(f"got {k} θ but {len(losses)} losses; pass one loss per θ")
    y = np.asarray(losses, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(y))
    if bad.size:
        raise ValueError(f"loss {bad[0]} is {y[bad[0]]}; every loss must be finite")
    if validation < 0 or validation >= k - 1:
        raise ValueError(
            f"validation = {validation} leaves {k - validation} of {k} draws for training; "
            f"need 0 ≤ validation ≤ {k - 2} (at least 2 training draws)"
        )
    if seed < 0:
        raise ValueError(f"seed must be ≥ 0, got {seed}")
    if not 1 <= top <= candidates:
        raise ValueError(f"need 1 ≤ top ≤ candidates, got top = {top}, candidates = {candidates}")
    rows = []
    for i, t in enumerate(thetas):
        try:
            rows.append(space.features(t))
        except ValueError as e:
            raise ValueError(f"θ {i}: {e}") from None
    x = np.stack(rows)

    n_train = k - validation
    pairs: list[tuple[float, float]] = []
    mae = constant_mae = rho = predicts = None
    if validation:
        train, observed = y[:n_train], y[n_train:]
        held = _fit(x[:n_train], train, seed).predict(x[n_train:])
        pairs = [(float(o), float(p)) for o, p in zip(observed, held, strict=True)]
        mae = float(np.mean(np.abs(observed - held)))
        constant_mae = float(np.mean(np.abs(observed - train.mean())))
        rho = spearman(dict(enumerate(observed)), dict(enumerate(held)))
        predicts = mae < constant_mae - _TIE * float(np.abs(train).max())

    model = _fit(x, y, seed)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=_CANDIDATE_SPAWN_KEY))
    pool = space.draw_features(rng, candidates)
    pred = model.predict(pool)
    best = np.argsort(pred, kind="stable")[:top]
    chosen = [space.theta(pool[i]) for i in best]
    theta = space.average(chosen)
    gain = model.feature_importance(importance_type="gain")
    i_obs = int(np.argmin(y))
    return SearchResult(
        theta=theta,
        predicted_loss=float(model.predict(space.features(theta)[None, :])[0]),
        mae=mae,
        constant_mae=constant_mae,
        spearman=rho,
        predicts=predicts,
        n_train=n_train,
        n_validation=validation,
        validation=pairs,
        best_observed=(thetas[i_obs], float(y[i_obs])),
        top=[(t, float(pred[i])) for t, i in zip(chosen, best, strict=True)],
        importance={n: float(g) for n, g in zip(space.feature_names(), gain, strict=True)},
        model=model,
    )


def search_markdown(result: SearchResult, space: SearchSpace) -> str:
    """A short Markdown report: chosen θ, validation MAE beside the constant predictor's and
    Spearman ρ, a sentence on whether the regressor beats the constant predictor, draws
    used, best observed draw, and the features the final regressor gained most from."""
    best_theta, best_loss = result.best_observed
    where = space.inline(best_theta)
    best = f"{best_loss:.4g} at {where}" if where else f"{best_loss:.4g}"
    ranked = sorted(result.importance.items(), key=lambda kv: -kv[1])[:10]
    total = sum(result.importance.values()) or 1.0
    lines = [
        f"## Mixture-parameter search ({space.method})",
        "",
        f"Chosen θ: the mean of the {len(result.top)} best predicted candidates.",
        "",
        space.theta_table(result.theta),
        "",
        f"- Predicted loss at the chosen θ: {result.predicted_loss:.4g}",
        *_fit_lines(result),
        f"- Draws: {result.n_train} train, {result.n_validation} validation",
        f"- Best observed loss: {best}",
        "",
        _verdict(result),
        "",
        "Top features by LightGBM gain (final model):",
        "",
        markdown_table(["Feature", "Gain share"], [[n, f"{g / total:.1%}"] for n, g in ranked]),
    ]
    return "\n".join(lines) + "\n"


def _fit_lines(result: SearchResult) -> list[str]:
    """The report's bullets on the fit's validation: MAE, constant predictor, ρ."""
    if result.mae is None:
        return ["- Validation MAE: not measured (validation = 0)"]
    losses = [o for o, _ in result.validation]
    n = result.n_validation
    rho = (
        f"{result.spearman:.3g}"
        if np.isfinite(result.spearman)
        else "undefined (fewer than 3 held-out draws, or constant losses or predictions)"
    )
    return [
        f"- Validation MAE: {result.mae:.4g} on {n} held-out draws; the validation losses "
        f"span {np.ptp(losses):.4g}",
        f"- Constant-predictor MAE (the training draws' mean loss for every draw): "
        f"{result.constant_mae:.4g}",
        f"- Spearman ρ between predicted and observed losses on the {n} held-out draws: {rho}",
    ]


def _verdict(result: SearchResult) -> str:
    """One sentence: does the regressor predict the held-out draws better than their
    training mean does, and does it rank them?"""
    if result.predicts is None:
        return (
            "Whether the fit predicts anything is not measured: no draws were held out "
            "(validation = 0)."
        )
    if not result.predicts:
        return (
            f"The regressor does not beat the constant predictor (MAE {result.mae:.4g} vs "
            f"{result.constant_mae:.4g}): the fit predicts nothing; add draws or use a "
            "smaller space."
        )
    text = (
        f"The regressor beats the constant predictor (MAE {result.mae:.4g} vs "
        f"{result.constant_mae:.4g})"
    )
    # θ is the argmin of the predictions, so a fit that misranks draws misleads even when
    # its errors are small on average.
    if np.isfinite(result.spearman) and result.spearman <= 0:
        return (
            f"{text}, but ranks the held-out draws no better than chance "
            f"(ρ = {result.spearman:.3g}); add draws or use a smaller space."
        )
    return f"{text}."


def search_plots(
    result: SearchResult, thetas: Sequence[dict], losses: Sequence[float], space: SearchSpace
) -> dict[str, bytes]:
    """PNG bytes keyed by file name: ``search_validation.png`` always (a "no data" panel when
    validation = 0), then ``space.plots`` (samplemix: ``search_alpha.png``)."""
    fig = new_figure(5.5, 5.0)
    ax = fig.subplots()
    title = "Validation: observed vs predicted loss"
    if not result.validation:
        no_data_panel(ax, title, "validation draws")
    else:
        obs, pred = np.array(result.validation).T
        lo, hi = float(min(obs.min(), pred.min())), float(max(obs.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, label="y = x")
        ax.scatter(obs, pred, s=18, color="#1f77b4", label="validation draw")
        ax.set_xlabel("observed loss")
        ax.set_ylabel("predicted loss")
        ax.set_title(
            f"{title}\nMAE {result.mae:.4g} (constant {result.constant_mae:.4g}), "
            f"ρ {result.spearman:.2g}, over {len(obs)} draws"
        )
        ax.legend(frameon=False)
    return {"search_validation.png": png_bytes(fig), **space.plots(result, thetas, losses)}


__all__ = [
    "DRAWS_PER_FEATURE",
    "INSTRUMENTS",
    "SPACES",
    "QuadMixSpace",
    "SampleMixSpace",
    "SearchResult",
    "SearchSpace",
    "default_draws",
    "default_validation",
    "draw_parameters",
    "search",
    "search_markdown",
    "search_plots",
    "search_space",
]
