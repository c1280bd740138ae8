"""Tests for samplemix.evaluation.search: the θ → loss regressor and the choice of θ.

Proxy training is replaced by known objectives of θ with a planted optimum, plus seeded
noise, so the tolerances below follow from the noise and the objective's shape.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from scipy import stats

from samplemix.config import Config
from samplemix.evaluation.search import (
    SPACES,
    SearchSpace,
    default_draws,
    default_validation,
    draw_parameters,
    search,
    search_markdown,
    search_plots,
    search_space,
)
from samplemix.mixing.quadmix import QuadMixParams

SAMPLEMIX = search_space("samplemix")
DOMAINS = ("books", "code", "web")
QUADMIX = search_space("quadmix", DOMAINS, n_criteria=2)
# The quadmix objective's optimum: ω/0.1 = 0.7 and α[0] = 0.4 in every domain.
PLANTED = np.array([0.7, 0.4])


def _alpha_loss(thetas: list[dict], seed: int, noise: float = 5e-4) -> list[float]:
    rng = np.random.default_rng(seed)
    return [(t["alpha"] - 0.3) ** 2 + rng.normal(0.0, noise) for t in thetas]


def _planted_sq_dist(theta: dict) -> float:
    """Squared distance of (ω/0.1, α[0]) per domain to PLANTED, summed over domains."""
    z = [[e["omega"] / 0.1, e["alpha"][0]] for e in theta["domains"].values()]
    return float(((np.array(z) - PLANTED) ** 2).sum())


def _quadmix_losses(thetas: list[dict], seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return [_planted_sq_dist(t) + rng.normal(0.0, 0.01) for t in thetas]


def test_samplemix_search_recovers_planted_alpha() -> None:
    thetas = draw_parameters(SAMPLEMIX, 300, seed=1)
    result = search(
        SAMPLEMIX, thetas, _alpha_loss(thetas, 2), validation=50, candidates=20_000, seed=3
    )
    # Losses at α and 0.3 differ by (α − 0.3)²; the regressor cannot rank α whose losses
    # differ by less than ~4σ = 2e-3 (σ = 5e-4), i.e. |α − 0.3| < √2e-3 ≈ 0.045 < 0.05.
    assert abs(result.theta["alpha"] - 0.3) < 0.05
    assert result.n_train == 250 and result.n_validation == 50
    assert len(result.top) == 10
    preds = [p for _, p in result.top]
    assert preds == sorted(preds)
    # θ = mean of the top candidates.
    assert result.theta["alpha"] == pytest.approx(np.mean([t["alpha"] for t, _ in result.top]))
    assert set(result.importance) == {"alpha"}


def test_quadmix_search_moves_towards_planted_optimum() -> None:
    thetas = draw_parameters(QUADMIX, 400, seed=0)
    losses = _quadmix_losses(thetas, seed=100)
    result = search(QUADMIX, thetas, losses, validation=50, candidates=20_000, seed=0)
    chosen = _planted_sq_dist(result.theta)
    # A random draw lies ~0.65 (3·(1/12 + 0.2²) for ω plus ~0.08 per α[0]) from the
    # optimum in squared distance. The objective is additive in 6 of the 18 features, which
    # 400 draws pin down well: the chosen θ must be > 10× closer than the average draw...
    assert chosen < 0.1 * np.mean([_planted_sq_dist(t) for t in thetas])
    # ...and better, on the noise-free objective, than every evaluated draw: averaging the
    # best of 20,000 predicted candidates searches a 50× denser set than the 400 evaluated.
    assert chosen < _planted_sq_dist(result.best_observed[0])
    # The prediction there is off by about the regressor's typical error (its MAE), biased
    # upwards at the minimum by the shrinkage of boosted trees: allow 2 MAE.
    assert result.predicted_loss <= result.best_observed[1] + 2 * result.mae
    assert result.best_observed[1] == min(losses)
    gains = result.importance
    assert len(gains) == 3 * (2 + 4)
    # The planted coordinates carry the signal, so they top the gain ranking.
    top6 = sorted(gains, key=gains.get, reverse=True)[:6]
    assert {n.split("@")[0] for n in top6} <= {"omega", "alpha[0]", "alpha[1]"}


def test_mae_matches_validation_pairs_and_none_without_validation() -> None:
    thetas = draw_parameters(SAMPLEMIX, 40, seed=4)
    losses = _alpha_loss(thetas, 5, noise=0.01)
    result = search(SAMPLEMIX, thetas, losses, validation=12, candidates=1000, seed=0)
    assert len(result.validation) == 12
    assert [o for o, _ in result.validation] == pytest.approx(losses[-12:])
    assert result.mae == pytest.approx(np.mean([abs(o - p) for o, p in result.validation]))
    none = search(SAMPLEMIX, thetas, losses, validation=0, candidates=1000, seed=0)
    assert none.mae is None and none.validation == [] and none.n_train == 40


def test_constant_predictor_and_spearman_are_measured_on_the_validation_draws() -> None:
    thetas = draw_parameters(SAMPLEMIX, 80, seed=4)
    losses = _alpha_loss(thetas, 5, noise=0.002)
    result = search(SAMPLEMIX, thetas, losses, validation=20, candidates=1000, seed=0)
    observed, predicted = np.array(result.validation).T
    np.testing.assert_array_equal(observed, losses[-20:])
    # The constant predictor says the training draws' mean loss for every held-out draw.
    mean = np.mean(losses[:60])
    assert result.constant_mae == pytest.approx(np.mean(np.abs(observed - mean)), rel=1e-12)
    assert result.spearman == pytest.approx(stats.spearmanr(observed, predicted).statistic)
    # (α − 0.3)² spans ~0.5 over the draws against noise 0.002: 60 draws learn the
    # parabola, so the fit beats the mean by far and ranks the held-out draws nearly right.
    assert result.predicts and result.mae < 0.5 * result.constant_mae
    assert result.spearman > 0.8
    text = search_markdown(result, SAMPLEMIX)
    assert f"{result.constant_mae:.4g}" in text and f"{result.spearman:.3g}" in text
    assert "The regressor beats the constant predictor" in text


def test_a_fit_on_two_draws_predicts_nothing_and_says_so() -> None:
    # With 2 training draws no leaf of ≥ 2 draws can split: LightGBM predicts their mean,
    # exactly the constant predictor (up to its float32 labels), which is no lead.
    thetas = draw_parameters(SAMPLEMIX, 5, seed=0)
    losses = [1.0, 1.3, 1.1, 1.7, 1.2]
    result = search(SAMPLEMIX, thetas, losses, validation=3, candidates=100, seed=0)
    assert [p for _, p in result.validation] == pytest.approx([1.15] * 3)
    assert result.constant_mae == pytest.approx(np.mean(np.abs(np.array(losses[2:]) - 1.15)))
    assert result.predicts is False
    assert math.isnan(result.spearman)  # constant predictions have no ranks
    text = search_markdown(result, SAMPLEMIX)
    assert "the fit predicts nothing; add draws or use a smaller space" in text
    assert (
        "Spearman ρ between predicted and observed losses on the 3 held-out draws: undefined"
        in text
    )
    # Fewer than 3 held-out draws: no ρ; none held out: nothing measured.
    two = search(SAMPLEMIX, thetas, losses, validation=2, candidates=100, seed=0)
    assert math.isnan(two.spearman) and two.constant_mae is not None
    none = search(SAMPLEMIX, thetas, losses, validation=0, candidates=100, seed=0)
    assert (none.constant_mae, none.spearman, none.predicts) == (None, None, None)
    assert "not measured" in search_markdown(none, SAMPLEMIX)


@pytest.mark.parametrize(
    ("space", "draws"),
    [
        (SAMPLEMIX, 16),  # one feature: the floor
        (search_space("quadmix", ("x",)), 20),  # 1 domain × (1 + 4)
        (QUADMIX, 72),  # 3 domains × (2 + 4)
        (search_space("quadmix", [f"d{i}" for i in range(5)]), 100),
    ],
)
def test_default_draws_grow_with_the_parameter_count(space: SearchSpace, draws: int) -> None:
    assert default_draws(space) == draws == max(16, 4 * len(space.feature_names()))


@pytest.mark.parametrize(
    ("draws", "validation"), [(100, 25), (72, 18), (16, 4), (6, 4), (5, 3), (3, 1), (2, 0)]
)
def test_default_validation_is_a_quarter_at_least_4_leaving_2_to_train(
    draws: int, validation: int
) -> None:
    assert default_validation(draws) == validation
    thetas = draw_parameters(SAMPLEMIX, draws, seed=0)
    result = search(SAMPLEMIX, thetas, _alpha_loss(thetas, 0), validation=validation, candidates=10)
    assert result.n_validation == validation


def test_search_is_deterministic() -> None:
    thetas = draw_parameters(QUADMIX, 48, seed=7)
    losses = _quadmix_losses(thetas, seed=8)
    a, b = (search(QUADMIX, thetas, losses, validation=8, candidates=2000, seed=5) for _ in "ab")
    assert a.theta == b.theta
    assert (a.predicted_loss, a.mae, a.top, a.importance) == (
        b.predicted_loss,
        b.mae,
        b.top,
        b.importance,
    )


@pytest.mark.parametrize("space", [SAMPLEMIX, QUADMIX], ids=SPACES)
def test_draw_parameters_prefix_and_seed(space: SearchSpace) -> None:
    assert draw_parameters(space, 12, seed=3)[:5] == draw_parameters(space, 5, seed=3)
    assert draw_parameters(space, 5, seed=3) != draw_parameters(space, 5, seed=4)
    assert draw_parameters(space, 0, seed=3) == []


@pytest.mark.parametrize(
    "space", [SAMPLEMIX, QUADMIX, search_space("quadmix", ("x",))], ids=[*SPACES, "quadmix-1"]
)
def test_vectorised_candidates_equal_draws(space: SearchSpace) -> None:
    # search scores candidates as a feature block; it must be the θ that draw() gives.
    r1, r2 = np.random.default_rng(9), np.random.default_rng(9)
    block = space.draw_features(r1, 200)
    thetas = [space.draw(r2) for _ in range(200)]
    np.testing.assert_array_equal(block, np.stack([space.features(t) for t in thetas]))
    assert [space.theta(row) for row in block] == thetas
    assert r1.random() == r2.random()  # both streams advanced alike


def test_quadmix_draws_follow_algorithm_1_and_average_stays_on_simplex() -> None:
    thetas = draw_parameters(QUADMIX, 300, seed=11)
    for t in thetas:
        assert list(t["domains"]) == list(DOMAINS)
        for e in t["domains"].values():
            assert len(e["alpha"]) == 2 and min(e["alpha"]) >= 0
            assert sum(e["alpha"]) == pytest.approx(1.0, abs=1e-12)
            assert 0 < e["lam"] <= 1000 and 0 < e["omega"] <= 0.1
            assert 0 < e["eta"] <= 1 and 0 < e["eps"] <= 0.001
    mean = QUADMIX.average(thetas)
    for d, e in mean["domains"].items():
        assert sum(e["alpha"]) == pytest.approx(1.0, abs=1e-12)
        for f in ("lam", "omega", "eta", "eps"):
            assert e[f] == pytest.approx(np.mean([t["domains"][d][f] for t in thetas]))
        np.testing.assert_allclose(
            e["alpha"], np.mean([t["domains"][d]["alpha"] for t in thetas], axis=0)
        )
    names = QUADMIX.feature_names()
    assert names[:6] == [
        f"{n}@books" for n in ("alpha[0]", "alpha[1]", "lam", "omega", "eta", "eps")
    ]
    assert QUADMIX.features(thetas[0]).shape == (len(names),)


def test_samplemix_mixing_update_validates() -> None:
    update = SAMPLEMIX.mixing_update({"alpha": 0.37})
    cfg = Config.model_validate({"corpus": {"input": "x"}, "mixing": update})
    assert cfg.mixing.method == "samplemix" and cfg.mixing.alpha == 0.37


def test_quadmix_mixing_update_validates_and_reaches_the_pipeline(tmp_path) -> None:
    from samplemix.pipeline.keys import quadmix_params

    theta = draw_parameters(QUADMIX, 1, seed=2)[0]
    update = QUADMIX.mixing_update(theta)
    quality = [{"scorer": "heuristic", "name": "q1"}, {"scorer": "heuristic", "name": "q2"}]
    expected = QuadMixParams.from_dict(theta)
    # Inline mapping, and the same θ written to a YAML file (what a search run saves).
    path = tmp_path / "theta.yaml"
    path.write_text(yaml.safe_dump(update["quadmix"]["params"]), encoding="utf-8")
    for params in (update["quadmix"]["params"], str(path)):
        mixing = {**update, "quadmix": {"params": params}}
        cfg = Config.model_validate(
            {"corpus": {"input": "x"}, "quality": quality, "mixing": mixing}
        )
        assert cfg.mixing.method == "quadmix"
        got = quadmix_params(cfg, list(DOMAINS))
        assert got.domains == expected.domains
        for f in ("alpha", "lam", "omega", "eta", "eps"):
            np.testing.assert_array_equal(getattr(got, f), getattr(expected, f))


def test_search_space_names_its_method_and_rejects_bad_settings() -> None:
    assert (SAMPLEMIX.method, QUADMIX.method) == SPACES
    with pytest.raises(ValueError, match="one of"):
        search_space("regmix")
    with pytest.raises(ValueError, match="domains"):
        search_space("quadmix")
    with pytest.raises(ValueError, match="n_criteria"):
        search_space("quadmix", ("a",), n_criteria=0)
    with pytest.raises(ValueError, match="distinct"):
        search_space("quadmix", ("a", "a"))


def test_search_input_errors_name_the_problem() -> None:
    thetas = draw_parameters(SAMPLEMIX, 10, seed=0)
    losses = _alpha_loss(thetas, 0)
    with pytest.raises(ValueError, match="10 θ but 9 losses"):
        search(SAMPLEMIX, thetas, losses[:9], validation=2)
    with pytest.raises(ValueError, match="loss 4 is nan"):
        search(SAMPLEMIX, thetas, [*losses[:4], float("nan"), *losses[5:]], validation=2)
    with pytest.raises(ValueError, match="at least 2 training draws"):
        search(SAMPLEMIX, thetas, losses, validation=9)
    with pytest.raises(ValueError, match="top"):
        search(SAMPLEMIX, thetas, losses, validation=2, top=0)
    with pytest.raises(ValueError, match="top"):
        search(SAMPLEMIX, thetas, losses, validation=2, candidates=5, top=6)
    with pytest.raises(ValueError, match="seed"):
        search(SAMPLEMIX, thetas, losses, validation=2, seed=-1)
    with pytest.raises(ValueError, match=r"θ 0: .*'alpha' in \[0, 1\]"):
        search(SAMPLEMIX, [{"alpha": 1.5}, *thetas[1:]], losses, validation=2)

    q = draw_parameters(QUADMIX, 10, seed=0)
    other = draw_parameters(search_space("quadmix", ("books", "code", "news"), 2), 1, seed=0)
    with pytest.raises(ValueError, match=r"θ 3: .*wrong domains: missing \['web'\]"):
        search(QUADMIX, [*q[:3], *other, *q[4:]], losses, validation=2)
    one_criterion = draw_parameters(search_space("quadmix", DOMAINS, 1), 1, seed=0)
    with pytest.raises(ValueError, match="1 quality criteria"):
        search(QUADMIX, [*one_criterion, *q[1:]], losses, validation=2)


def test_plots_and_markdown() -> None:
    thetas = draw_parameters(SAMPLEMIX, 40, seed=1)
    losses = _alpha_loss(thetas, 1, noise=0.01)
    result = search(SAMPLEMIX, thetas, losses, validation=10, candidates=1000, seed=0)
    plots = search_plots(result, thetas, losses, SAMPLEMIX)
    assert set(plots) == {"search_validation.png", "search_alpha.png"}
    assert all(png.startswith(b"\x89PNG") for png in plots.values())
    text = search_markdown(result, SAMPLEMIX)
    assert f"{result.mae:.4g}" in text and f"{result.theta['alpha']:.4g}" in text

    q = draw_parameters(QUADMIX, 24, seed=1)
    q_losses = _quadmix_losses(q, seed=1)
    q_result = search(QUADMIX, q, q_losses, validation=0, candidates=500, seed=0)
    q_plots = search_plots(q_result, q, q_losses, QUADMIX)
    assert set(q_plots) == {"search_validation.png"}  # a "no validation draws" panel
    assert q_plots["search_validation.png"].startswith(b"\x89PNG")
    q_text = search_markdown(q_result, QUADMIX)
    assert "not measured" in q_text
    assert f"{q_result.theta['domains']['web']['lam']:.4g}" in q_text
