"""The mix flow end to end: real Prefect server, real Dask LocalCluster, real MiniLM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import tiny_config, write_tiny_corpus

from flows.mix import run_mix
from samplemix.mixing.weights import BudgetError


def read_dir(path: Path):  # noqa: ANN201 - a pyarrow Table
    return pq.read_table(sorted(path.glob("*.parquet")))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, cluster: dict) -> dict:
    root = tmp_path_factory.mktemp("flow")
    corpus = write_tiny_corpus(root / "corpus")
    cfg = tiny_config(corpus, root / "out", **cluster)
    summary = run_mix(cfg)
    return {"cfg": cfg, "root": root, "corpus": corpus, "summary": summary, "cluster": cluster}


def test_mixture_meets_budget_and_matches_plan(first_run: dict) -> None:
    s, out = first_run["summary"], Path(first_run["cfg"].output.path)
    plan = read_dir(out / "plan")
    assert plan.num_rows == s["documents"] == 48
    tokens = plan.column("tokens").to_numpy()
    c = plan.column("expected_count").to_numpy()
    n = plan.column("count").to_numpy()
    # Σ c·len is the target up to float rounding; T_tgt = round(0.8 · T_src).
    assert s["target_tokens"] == round(0.8 * tokens.sum())
    assert abs(float(np.dot(c, tokens)) - s["target_tokens"]) < 1e-6 * s["target_tokens"]
    # Realised counts are the floor or the floor + 1 of c, and add up as reported.
    assert np.all((n == np.floor(c)) | (n == np.floor(c) + 1))
    assert int(np.dot(n, tokens)) == s["realised_tokens"]
    sigma = np.sqrt(np.sum((c % 1) * (1 - c % 1) * tokens.astype(float) ** 2))
    assert s["sigma_tokens"] == pytest.approx(sigma)
    # The mixture holds each document exactly n(x) times.
    mixture = read_dir(out / "mixture")
    assert mixture.num_rows == n.sum() == s["mixture_rows"]
    copies = dict(zip(*pc.value_counts(mixture.column("id")).flatten(), strict=True))
    expected = {i: k for i, k in zip(plan.column("id").to_pylist(), n.tolist(), strict=True) if k}
    assert {str(k): v.as_py() for k, v in copies.items()} == expected


def test_report_written(first_run: dict) -> None:
    report = Path(first_run["cfg"].output.path) / "report"
    md = (report / "report.md").read_text()
    assert f"{first_run['summary']['target_tokens']:,}" in md
    for png in ("budget", "domain_shares", "quality", "diversity", "counts", "overlap"):
        assert (report / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_reuses_everything_and_is_byte_identical(first_run: dict) -> None:
    out = Path(first_run["cfg"].output.path)
    before = [p.read_bytes() for p in sorted((out / "mixture").glob("*.parquet"))]
    again = run_mix(first_run["cfg"])
    assert set(again["computed"].values()) == {0}
    after = [p.read_bytes() for p in sorted((out / "mixture").glob("*.parquet"))]
    assert before == after


def test_counts_do_not_depend_on_sharding_or_workers(first_run: dict) -> None:
    root = first_run["root"]
    corpus = write_tiny_corpus(root / "corpus-4", shards_per_domain=4)
    cfg = tiny_config(corpus, root / "out-4", **{"compute.n_workers": 1})
    run_mix(cfg)

    def counts(out: Path) -> dict:
        plan = read_dir(out / "plan")
        return dict(
            zip(plan.column("id").to_pylist(), plan.column("count").to_pylist(), strict=True)
        )

    assert counts(root / "out-4") == counts(Path(first_run["cfg"].output.path))


def test_budget_beyond_max_repeats_is_a_clear_error(first_run: dict) -> None:
    cfg = tiny_config(
        first_run["corpus"],
        first_run["root"] / "out-cap",
        **{"mixing.budget_ratio": 3.0, "mixing.max_repeats": 2, "mixing.epsilon": 0.1},
        **first_run["cluster"],
    )
    with pytest.raises(BudgetError, match="max_repeats"):
        run_mix(cfg)


def test_report_published_as_prefect_artifacts(first_run: dict) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        md = client.read_latest_artifacts()  # newest artifact per key
    by_key = {a.key: a for a in md}
    assert f"{first_run['summary']['target_tokens']:,}" in by_key["mixture-report"].data
    assert "books" in str(by_key["mixture-domains"].data)


def test_corpus_with_no_usable_rows_is_a_clear_error(first_run: dict) -> None:
    import pyarrow as pa

    from samplemix.io.corpus import CorpusError

    corpus = first_run["root"] / "empty-corpus" / "web"
    corpus.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["", "   ", None]}), corpus / "part-000.parquet")
    cfg = tiny_config(corpus.parent, first_run["root"] / "out-empty", **first_run["cluster"])
    with pytest.raises(CorpusError, match="no usable documents.*3 rows rejected"):
        run_mix(cfg)


def test_local_workers_keep_glibcs_adaptive_malloc(cluster: dict) -> None:
    """Dask's default MALLOC_TRIM_THRESHOLD_ makes torch page-fault on every activation
    (MiniLM 15-25% slower); the local cluster's workers must not inherit it."""
    import os

    from distributed import Client

    with Client(cluster["compute.scheduler_address"]) as client:
        env = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        threads = client.run(lambda: __import__("torch").get_num_threads())
    assert len(env) == 2 and set(env.values()) == {None}
    assert set(threads.values()) == {cluster["compute.torch_threads"]}
