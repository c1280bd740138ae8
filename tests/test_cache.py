"""Resumable runs with the corpus, the store and the output on S3 (moto's standalone
server on 127.0.0.1, through the real s3fs): cold run, warm rerun, a scorer swap, an
α change, added shards. Each step is planned (``samplemix plan``) before it runs,
and both what the plan says and what the run computed are checked."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import EXAMPLES, save_tiny_classifier, write_tiny_corpus
from s3 import KEY, REGION, SECRET, MotoServer
from typer.testing import CliRunner

from flows.mix import run_mix
from samplemix.cli import app
from samplemix.config import Config, config_to_yaml, load_config
from samplemix.pipeline import keys
from samplemix.pipeline.plan import plan_rows, plan_steps

pytestmark = pytest.mark.slow
# Planted credentials (moto accepts any): nothing a run writes may contain them.
PLANTED_KEY, PLANTED_SECRET = "AKIAPLANTED7F3A9C2E", "planted-secret-91c2d7e4b5a6"
STAGES = ("tokens", "ids", "quality", "embed", "kmeans", "assign", "clusters", "weights")


def s3_config(moto: MotoServer, **overrides: object) -> Config:
    base = {
        "corpus.input": "s3://mix/corpus",
        "output.path": "s3://mix/out",
        "storage.endpoint_url": moto.endpoint,
        "storage.region": REGION,
        "storage.key": PLANTED_KEY,
        "storage.secret": PLANTED_SECRET,
        "storage.retries": 2,
        "embed.max_length": 32,
        "kmeans.k": 3,
        "mixing.budget_ratio": 0.8,
        "compute.n_workers": 2,
    }
    return load_config(None, {**base, **overrides})


def fs(moto: MotoServer) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True, **moto.storage_options())


def planned(cfg: Config) -> dict[str, list[tuple[int, str, str]]]:
    """``samplemix plan`` as {stage: [(tasks, status, reason), ...]}."""
    steps = plan_steps(cfg, keys.store_for(cfg), keys.output_for(cfg))
    out: dict[str, list[tuple[int, str, str]]] = {}
    for stage, n, status, why in plan_rows(steps):
        out.setdefault(stage, []).append((n, status, why))
    return out


def mixture_bytes(moto: MotoServer) -> list[bytes]:
    s3 = fs(moto)
    return [s3.cat_file(p) for p in sorted(s3.glob("mix/out/mixture/*.parquet"))]


@pytest.fixture(scope="module")
def history(moto: MotoServer, tmp_path_factory: pytest.TempPathFactory, cluster: dict) -> dict:
    """Runs the steps in order and records each plan and run summary."""
    root = tmp_path_factory.mktemp("cache")
    fs(moto).put(str(write_tiny_corpus(root / "corpus")) + "/", "mix/corpus/", recursive=True)
    h: dict = {"root": root}
    cold = s3_config(moto, **cluster)
    h["plan_cold"] = planned(cold)
    h["cold"] = run_mix(cold)
    h["mixture_cold"] = mixture_bytes(moto)

    h["plan_warm"] = planned(cold)
    h["warm"] = run_mix(cold)
    h["mixture_warm"] = mixture_bytes(moto)
    h["warm_states"], h["warm_parameters"] = latest_flow_run()

    save_tiny_classifier(root / "scorer", num_labels=1)
    scorer = s3_config(
        moto,
        **cluster,
        **{"quality.scorer": "hf-classifier", "quality.model": str(root / "scorer")},
    )
    h["plan_scorer"] = planned(scorer)
    h["scorer"] = run_mix(scorer)

    alpha = scorer.model_copy(deep=True)
    alpha.mixing.alpha = 0.5
    h["plan_alpha"] = planned(alpha)
    budget = alpha.model_copy(deep=True)
    budget.mixing.budget_ratio = 0.6
    h["plan_budget"] = planned(budget)
    h["alpha"] = run_mix(alpha)

    # One more shard of 8 documents: 8 / 56 new, under the 0.2 refit threshold.
    extra = pq.read_table(EXAMPLES / "books" / "part-000.parquet").slice(16, 8)
    pq.write_table(extra, root / "extra.parquet")
    fs(moto).put(str(root / "extra.parquet"), "mix/corpus/books/part-002.parquet")
    h["plan_added"] = planned(alpha)
    h["added"] = run_mix(alpha)
    h["plan_after_added"] = planned(alpha)
    refit = alpha.model_copy(deep=True)
    refit.kmeans.refit_new_share = 0.1
    h["plan_added_refit"] = planned(refit)
    # The scorer retrained into the same folder: same files, same sizes, new weights.
    save_tiny_classifier(root / "scorer", num_labels=1, seed=1)
    h["plan_retrained"] = planned(alpha)
    save_tiny_classifier(root / "scorer", num_labels=1, seed=0)  # and put back
    h["plan_restored"] = planned(alpha)
    h["configs"] = {"cold": cold, "alpha": alpha}
    return h


def latest_flow_run() -> tuple[list[str], str]:
    """The state names of the newest flow run's task runs, and its parameters as the
    server stores them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])), limit=200
        )
    return [r.state_name for r in runs], str(run.parameters)


def test_cold_plan_computes_everything(history: dict) -> None:
    p = history["plan_cold"]
    for stage in ("tokens", "quality", "embed"):
        assert p[stage] == [(6, "compute", "new shard")]
    assert p["kmeans"] == [(1, "compute", "no earlier result")]
    assert p["assign"] == [(6, "compute", "new shard")]
    for stage in ("weights", "budget", "counts", "materialise"):
        assert all(status == "compute" for _, status, _ in p[stage])
    assert history["cold"]["computed"] == {
        "tokens": 6,
        "ids": 1,
        "quality": 6,
        "embed": 6,
        "kmeans": 1,
        "assign": 6,
        "clusters": 1,
        "weights": 6,
        "budget": 1,
        "counts": 6,
        "materialise": history["cold"]["mixture_parts"],
        "publish-plan": 6,
        "publish-rejects": 1,
    }


def test_warm_rerun_does_no_work_and_shows_cached_runs(history: dict) -> None:
    for stage, rows in history["plan_warm"].items():
        assert [status for _, status, _ in rows] == ["cached"], stage
    warm = history["warm"]
    assert set(warm["computed"].values()) == {0}
    assert warm["realised_tokens"] == history["cold"]["realised_tokens"]
    assert history["mixture_warm"] == history["mixture_cold"]
    # Every task run of the warm run ended Cached, as the Prefect UI shows it.
    states = history["warm_states"]
    assert len(states) == sum(warm["cached"].values()) and set(states) == {"Cached"}
    # The credentials in the config reach the workers, not the Prefect database.
    assert PLANTED_SECRET not in history["warm_parameters"]
    assert PLANTED_KEY not in history["warm_parameters"]
    assert moto_endpoint(history) in history["warm_parameters"]


def moto_endpoint(history: dict) -> str:
    return history["configs"]["cold"].storage.endpoint_url


def test_scorer_swap_recomputes_exactly_quality_weights_counts_output(history: dict) -> None:
    p = history["plan_scorer"]
    assert p["quality"] == [(6, "compute", "config changed: quality.model, quality.scorer")]
    for stage in ("tokens", "embed", "kmeans", "assign", "clusters"):
        assert [status for _, status, _ in p[stage]] == ["cached"], stage
    assert p["weights"] == [(6, "compute", "after quality")]
    computed = history["scorer"]["computed"]
    assert {s: computed[s] for s in STAGES} == {
        "tokens": 0,
        "ids": 0,
        "quality": 6,
        "embed": 0,
        "kmeans": 0,
        "assign": 0,
        "clusters": 0,
        "weights": 6,
    }
    assert computed["budget"] == 1 and computed["counts"] == 6
    assert computed["materialise"] == history["scorer"]["mixture_parts"]


def test_alpha_and_budget_changes_recompute_only_the_mixing(history: dict) -> None:
    p = history["plan_alpha"]
    for stage in ("tokens", "quality", "embed", "kmeans", "assign", "clusters"):
        assert [status for _, status, _ in p[stage]] == ["cached"], stage
    assert p["weights"] == [(6, "compute", "config changed: mixing.alpha")]
    assert p["budget"] == [(1, "compute", "upstream changed: weights (6 of 6 shards)")]
    assert p["counts"] == [(6, "compute", "upstream changed: budget, weights")]
    computed = history["alpha"]["computed"]
    assert {s: computed[s] for s in STAGES} == dict.fromkeys(STAGES, 0) | {"weights": 6}

    b = history["plan_budget"]
    assert [status for _, status, _ in b["weights"]] == ["compute"]  # α changed there too
    assert b["budget"][0][1] == "compute"


def test_added_shard_computes_its_stages_and_keeps_the_centroids(history: dict) -> None:
    p = history["plan_added"]
    for stage in ("tokens", "quality", "embed"):
        assert p[stage] == [(1, "compute", "new shard"), (6, "cached", "unchanged")]
    # Whether the centroids stay depends on the new shard's document count: read by the run.
    assert p["kmeans"] == [(1, "compute", "reuse or refit: decided once the new shards are read")]
    assert p["assign"] == [(7, "compute", "after kmeans")]
    ((n, status, why),) = history["plan_after_added"]["kmeans"]
    assert status == "cached" and "kept the fit over 6 of 7 shards (14.3% new" in why
    ((_, status, why),) = history["plan_added_refit"]["kmeans"]
    assert status == "compute" and "refit: 14.3% new documents > refit_new_share 0.1" in why
    computed = history["added"]["computed"]
    assert {s: computed[s] for s in STAGES} == {
        "tokens": 1,
        "ids": 1,
        "quality": 1,
        "embed": 1,
        "kmeans": 0,
        "assign": 1,
        "clusters": 1,
        "weights": 7,
    }
    assert history["added"]["documents"] == 56


def test_retrained_scorer_in_the_same_folder_recomputes_its_scores(history: dict) -> None:
    p = history["plan_retrained"]
    assert p["quality"] == [(7, "compute", "model weights changed")]
    for stage in ("tokens", "embed", "kmeans", "assign", "clusters"):
        assert [status for _, status, _ in p[stage]] == ["cached"], stage
    # The old weights' bytes back in place: their stored scores serve again.
    restored = history["plan_restored"]
    assert {status for rows in restored.values() for _, status, _ in rows} == {"cached"}


def test_cli_plan_status_and_gc(history: dict, moto: MotoServer) -> None:
    root: Path = history["root"]
    runner = CliRunner()
    latest = history["configs"]["alpha"]
    # config_to_yaml masks secrets, so the file carries everything but the credentials,
    # which come from the environment as users are told to do.
    path = root / "latest.yaml"
    path.write_text(config_to_yaml(latest).replace("'**********'", "null"))
    env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    res = runner.invoke(app, ["plan", str(path)], env=env)
    assert res.exit_code == 0, res.output
    assert "0 of 55 tasks to compute, 55 from the store" in res.output

    res = runner.invoke(app, ["status", "s3://mix/out", "--config", str(path)], env=env)
    assert res.exit_code == 0, res.output
    assert "files:" in res.output and "all present" in res.output

    # Only the latest config is kept: the heuristic and classifier runs' weights, budgets
    # and counts, the heuristic quality scores and the 6-shard ids and clusters go.
    res = runner.invoke(app, ["gc", str(path), "--min-age-hours", "0"], env=env)
    assert res.exit_code == 0, res.output
    listed = [
        line.split()[2].split("/")[0]
        for line in res.output.splitlines()
        if line.startswith("would remove")
    ]
    assert sorted(set(listed)) == ["budget", "clusters", "counts", "ids", "quality", "weights"]
    assert listed.count("quality") == 6  # the heuristic scores of the first six shards
    res = runner.invoke(app, ["gc", str(path), "--min-age-hours", "0", "--delete"], env=env)
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["plan", str(path)], env=env)
    assert "0 of 55 tasks to compute" in res.output  # gc kept all the config needs
    p = planned(history["configs"]["cold"])  # the heuristic scores are gone now
    assert p["quality"] == [(7, "compute", "config changed: quality.model, quality.scorer")]


def test_no_run_output_holds_the_credentials(history: dict, moto: MotoServer) -> None:
    """Every object the runs wrote (store, mixture, plan, report, manifests), every log
    line and artifact on the Prefect server, and the config printout."""
    from prefect.client.orchestration import get_client

    s3 = fs(moto)
    written = [s3.cat_file(p) for p in s3.find("mix/out")]
    assert len(written) > 100
    with get_client(sync_client=True) as client:
        logs = [log.message for log in client.read_logs(limit=200)]
        artifacts = [str(a.data) for a in client.read_artifacts(limit=200)]
        flow_runs = [str(r.parameters) for r in client.read_flow_runs(limit=200)]
    printout = config_to_yaml(history["configs"]["alpha"])
    for secret in (PLANTED_KEY, PLANTED_SECRET):
        assert not any(secret.encode() in blob for blob in written)
        assert not any(secret in text for text in logs + artifacts + flow_runs + [printout])
    assert "**********" in printout
