"""QuaDMix and the domain-wise baselines through the real flow, and `compare`.

One store serves every method; the expected values are derived from each plan's own
columns (tokens, quality) with the formulas of method.md written out here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import save_tiny_classifier, tiny_config, write_tiny_corpus

from flows.compare import run_compare, variants
from samplemix.config import QualityConfig

pytestmark = pytest.mark.slow
METHODS = ["samplemix", "quadmix", "vanilla", "temperature", "ce", "fixed"]
FIXED = {"books": 0.5, "code": 0.3, "reference": 0.2}


def config(root: Path, **extra: object):  # noqa: ANN201 - a Config
    overrides = {
        "mixing.quadmix.rank_sample": 0,  # exact ranks: derivable by hand below
        "mixing.domain_weights": FIXED,
        **extra,
    }
    return tiny_config(root / "corpus", root / "out", **overrides)


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory, cluster: dict) -> dict:
    root = tmp_path_factory.mktemp("methods")
    write_tiny_corpus(root / "corpus")
    cfg = config(root, **cluster)
    first = run_compare(cfg, METHODS, [])
    folder = root / "out" / "compare"
    written = {name: (folder / name).read_text() for name in ("compare.md", "compare.csv")}
    # Again, with two of the methods: everything, outputs included, is reused.
    second = run_compare(cfg, ["quadmix", "ce"], [])
    return {
        "root": root,
        "cfg": cfg,
        "first": first,
        "second": second,
        "written": written,
        "cluster": cluster,
    }


def plan(compared: dict, name: str) -> pa.Table:
    return pq.read_table(sorted((compared["root"] / "out" / name / "plan").glob("*.parquet")))


def domain_sums(t: pa.Table, column: str) -> dict[str, float]:
    """Σ column·tokens per domain."""
    d = t.column("domain").to_numpy(zero_copy_only=False)
    v = t.column(column).to_numpy() * t.column("tokens").to_numpy()
    return {str(m): float(v[d == m].sum()) for m in np.unique(d)}


def expected_shares(compared: dict, name: str, shares: dict[str, float]) -> None:
    """Σ c·len per domain = share·T_tgt, and the realised Σ n·len within 5σ of it."""
    t = plan(compared, name)
    target = compared["first"]["runs"][name]["target_tokens"]
    expected, realised = domain_sums(t, "expected_count"), domain_sums(t, "count")
    c, n_tok = t.column("expected_count").to_numpy(), t.column("tokens").to_numpy()
    f = c - np.floor(c)
    var = f * (1 - f) * n_tok.astype(float) ** 2
    d = t.column("domain").to_numpy(zero_copy_only=False)
    for m, share in shares.items():
        assert expected[m] == pytest.approx(share * target, rel=1e-9), m
        sigma = math.sqrt(var[d == m].sum())
        assert abs(realised[m] - share * target) <= 5 * sigma + 1, m


def natural(compared: dict) -> dict[str, float]:
    t = plan(compared, "vanilla")
    ones = pa.table(
        {"domain": t.column("domain"), "tokens": t.column("tokens"), "one": np.ones(t.num_rows)}
    )
    sums = domain_sums(ones, "one")
    return {m: v / sum(sums.values()) for m, v in sums.items()}


def test_vanilla_reproduces_the_natural_shares(compared: dict) -> None:
    expected_shares(compared, "vanilla", natural(compared))


def test_temperature_and_fixed_shares(compared: dict) -> None:
    nat = natural(compared)
    tempered = {m: s ** (1 / 2.0) for m, s in nat.items()}  # default temperature 2
    expected_shares(
        compared, "temperature", {m: v / sum(tempered.values()) for m, v in tempered.items()}
    )
    expected_shares(compared, "fixed", FIXED)


def test_ce_shares_are_the_softmax_of_domain_entropies(compared: dict) -> None:
    from samplemix.pipeline import keys

    store = keys.store_for(variants(compared["cfg"], ["ce"], [])["ce"])
    (entropy,) = [
        done["summary"]["entropy"]
        for _, done in store.manifests("domains")
        if done["summary"]["entropy"]
    ]
    assert set(entropy) == {"books", "code", "reference"} and all(h > 0 for h in entropy.values())
    z = {m: math.exp(h) for m, h in entropy.items()}
    expected_shares(compared, "ce", {m: v / sum(z.values()) for m, v in z.items()})


def test_quadmix_weights_are_S_of_the_token_weighted_in_domain_rank(compared: dict) -> None:
    """One criterion (the heuristic), equal α, default θ (λ 10, ω 0.5, η 1, ε 0.001):
    r̄(x) = (tokens of better documents of x's domain + ½ tokens of documents tied with
    x) / domain tokens, better = higher q; S = 2/(1 + exp(−λ(ω − r̄)))^η + ε if r̄ ≤ ω."""
    t = plan(compared, "quadmix").to_pydict()
    for m in set(t["domain"]):
        rows = [i for i, d in enumerate(t["domain"]) if d == m]
        total = sum(t["tokens"][i] for i in rows)
        for i in rows:
            q = t["quality"][i]
            better = sum(t["tokens"][j] for j in rows if t["quality"][j] > q)
            tied = sum(t["tokens"][j] for j in rows if t["quality"][j] == q)
            r = (better + tied / 2) / total
            s = (2 / (1 + math.exp(-10 * (0.5 - r)))) + 0.001 if r <= 0.5 else 0.001
            assert t["weight"][i] == pytest.approx(s, rel=1e-9), (m, i, r)


def test_comparison_report_names_every_method_and_domain(compared: dict) -> None:
    folder = compared["root"] / "out" / "compare"
    md = compared["written"]["compare.md"]
    for name in METHODS:
        assert name in md
    for m in ("books", "code", "reference"):
        assert m in md
    csv_rows = compared["written"]["compare.csv"].splitlines()
    assert [r.split(",")[0] for r in csv_rows[1:]] == METHODS
    assert len(list(folder.glob("*.png"))) == 3
    # Vanilla selects with the natural shares: the comparison reports them.
    share = compared["first"]["comparison"]["vanilla"]["domain_shares"]
    assert set(share) == {"books", "code", "reference"}


def test_second_compare_reuses_every_scoring_and_embedding_artifact(compared: dict) -> None:
    first, second = compared["first"]["runs"], compared["second"]["runs"]
    assert first["samplemix"]["computed"]["embed"] == 6  # the first variant computed them
    for name in METHODS[1:]:
        for stage in ("tokens", "quality", "embed", "kmeans", "assign", "clusters"):
            assert first[name]["computed"][stage] == 0, (name, stage)
    for name, run in second.items():
        assert set(run["computed"].values()) == {0}, name


def test_alpha_sweep_reuses_the_scores(compared: dict) -> None:
    """α = 0 is quality only: w = (q − q_min)/(q_max − q_min) over the corpus."""
    result = run_compare(compared["cfg"], [], [0.0, 1.0])
    assert list(result["runs"]) == ["samplemix-a0", "samplemix-a1"]
    for run in result["runs"].values():
        for stage in ("tokens", "quality", "embed", "kmeans", "assign", "clusters"):
            assert run["computed"][stage] == 0
    t = plan(compared, "samplemix-a0")
    q, w = t.column("quality").to_numpy(), t.column("weight").to_numpy()
    np.testing.assert_allclose(w, (q - q.min()) / (q.max() - q.min()), rtol=1e-12)
    d, w1 = (
        plan(compared, "samplemix-a1").column("diversity").to_numpy(),
        plan(compared, "samplemix-a1").column("weight").to_numpy(),
    )
    np.testing.assert_allclose(w1, (d - d.min()) / (d.max() - d.min()), rtol=1e-12)


def test_adding_a_scorer_computes_only_that_scorer(compared: dict, tmp_path: Path) -> None:
    save_tiny_classifier(tmp_path / "clf", num_labels=1)
    cfg = compared["cfg"]
    scorers = [
        QualityConfig(),
        QualityConfig(scorer="hf-classifier", model=str(tmp_path / "clf"), max_length=32),
    ]
    cfg = cfg.model_copy(update={"quality": scorers})
    result = run_compare(cfg, ["quadmix"], [])
    run = result["runs"]["quadmix"]
    assert run["computed"]["quality"] == 6  # the classifier on six shards; the heuristic reused
    assert run["computed"]["embed"] == 0 and run["computed"]["tokens"] == 0
    assert run["computed"]["ranks"] == 1 and run["computed"]["weights"] == 6


def test_variant_names_and_errors(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "c", tmp_path / "o")
    names = variants(cfg, ["vanilla", "samplemix"], [0.2, 0.8])
    assert list(names) == ["vanilla", "samplemix-a0.2", "samplemix-a0.8"]
    assert names["samplemix-a0.2"].mixing.alpha == 0.2
    assert {c.output.store for c in names.values()} == {f"{tmp_path / 'o'}/store"}
    with pytest.raises(Exception, match="'domix': not a method"):
        variants(cfg, ["domix"], [])


def test_domain_labels_from_a_classifier(compared: dict, tmp_path: Path) -> None:
    """corpus.domain_model: each document's domain is the classifier's top label,
    checked against the model run directly with transformers, one text at a time."""
    import torch
    from transformers import AutoTokenizer

    from flows.mix import run_mix

    model = save_tiny_classifier(tmp_path / "dom", num_labels=2, id2label={0: "alpha", 1: "beta"})
    cfg = tiny_config(
        compared["root"] / "corpus",
        tmp_path / "out",
        **{"corpus.domain_model": str(tmp_path / "dom"), "corpus.domain_max_length": 32},
        **{"mixing.method": "vanilla", "output.store": str(compared["root"] / "out" / "store")},
        **compared["cluster"],
    )
    run = run_mix(cfg)
    assert run["computed"]["embed"] == 0  # the domains change the index, not the embeddings
    t = pq.read_table(sorted((tmp_path / "out" / "plan").glob("*.parquet"))).to_pydict()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "dom")
    for shard, row, domain in zip(t["shard"], t["row"], t["domain"], strict=True):
        text = pq.read_table(compared["root"] / "corpus" / shard).column("text")[row].as_py()
        with torch.no_grad():
            logits = model(
                **tokenizer(text, truncation=True, max_length=32, return_tensors="pt")
            ).logits
        assert domain == ["alpha", "beta"][int(logits.argmax())]
    assert set(t["domain"]) <= {"alpha", "beta"}
