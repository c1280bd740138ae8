"""The embedding probe: the logistic regression scikit-learn fits, and a run's
embedding-probe scorer reads exactly the probe and embeddings it committed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import tiny_config, write_tiny_corpus

from samplemix.scoring.probe import Probe, fit_probe


def test_fit_is_scikit_learns_logistic_regression() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    pos = rng.normal(0.3, 1.0, (200, 8))
    neg = rng.normal(-0.3, 1.0, (300, 8))
    probe = fit_probe(pos, neg)
    x = np.concatenate([pos, neg])
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    sk = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(probe.weights, sk.coef_[0], atol=1e-4)
    assert probe.bias == pytest.approx(sk.intercept_[0], abs=1e-4)
    np.testing.assert_allclose(probe.score(x), sk.predict_proba(x)[:, 1], atol=1e-4)


def test_fit_is_deterministic_and_checks_its_inputs() -> None:
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(1, 1, (50, 4)), rng.normal(-1, 1, (50, 4))
    a, b = fit_probe(pos, neg), fit_probe(pos, neg)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != Probe(a.weights + 1e-9, a.bias).fingerprint()
    with pytest.raises(ValueError, match="positives and negatives"):
        fit_probe(pos[:0], neg)
    with pytest.raises(ValueError, match="widths differ"):
        fit_probe(pos, neg[:, :3])


def test_a_run_scores_each_document_with_the_probe_it_fitted(tmp_path: Path) -> None:
    from samplemix.io.corpus import discover_shards
    from samplemix.pipeline import keys
    from samplemix.pipeline.walk import run_in_process

    corpus = write_tiny_corpus(tmp_path / "corpus")
    scorer = {"scorer": "embedding-probe", "reference": ["books", "reference"]}
    cfg = tiny_config(corpus, tmp_path / "out", quality=[scorer])
    first = run_in_process(cfg)
    assert first["computed"]["probe"] == 1 and first["computed"]["quality"] == 6
    store = keys.store_for(cfg)
    shards = discover_shards(cfg.corpus)
    embed = [keys.embed_key(s, cfg) for s in shards]
    tokens = [keys.tokens_key(s, cfg) for s in shards]
    arrays = store.get_arrays(keys.probe_key(tokens, embed, cfg.quality[0]), "probe.npz")
    probe = Probe(arrays["weights"], float(arrays["bias"]))
    # Every document's q is the probe's probability of its stored embedding.
    plan = pq.read_table(sorted((tmp_path / "out" / "plan").glob("*.parquet"))).to_pydict()
    for shard, emb in zip(shards, embed, strict=True):
        rows = [i for i, s in enumerate(plan["shard"]) if s == shard.shard_id]
        got = np.array(plan["quality"])[rows]
        expected = probe.score(store.get_array(emb, "embeddings.npy"))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert set(run_in_process(cfg)["computed"].values()) == {0}
