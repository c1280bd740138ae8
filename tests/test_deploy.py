"""deployments/prefect.yaml end to end: `prefect deploy` against a real Prefect server,
a process worker, two runs of the `mix` deployment on the tiny corpus, and what the
API then holds (states, run names, task runs, artifacts, logs, schedules).

The deployments are deployed from a copy of the file whose deployment and work-pool
names carry a random suffix (nothing else changes), so that a developer whose
PREFECT_API_URL points at a real server neither overwrites its `samplemix/mix` nor
has its workers pick up these runs. They are paused once deployed (their schedules
stay as the file sets them, but create no runs during the test) and deleted at the end.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import write_tiny_corpus

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
# One shard per domain: fewer task runs keep this test short; test_flow covers more shards.
SHARDS = [f"{d}/part-000.parquet" for d in ("books", "code", "reference")]
# The deployment's config leaves quality to its default, the graded heuristic.
PER_SHARD = (
    "tokens",
    "quality/graded-heuristic",
    "embed",
    "assign",
    "weights",
    "counts",
    "publish-plan",  # the plan's part of each shard, copied into the output
)
REDUCES = ("ids/duplicates", "kmeans/fit", "clusters/stats", "budget/scale", "publish-rejects/all")
MIX_NAME = "mix-corpus-samplemix-a0.8-x0.8"  # corpus folder, method and α, budget ratio


def client():  # noqa: ANN201 - a SyncPrefectClient
    from prefect import get_client

    return get_client(sync_client=True)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> Iterator[dict]:
    """The file's deployments on the test server, a process worker polling their pool,
    and a tiny config to run them with."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName
    from prefect.workers.process import ProcessWorker

    root = tmp_path_factory.mktemp("deploy")
    corpus = write_tiny_corpus(root / "corpus", docs_per_domain=12, shards_per_domain=1)
    config = root / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "corpus": {"input": str(corpus)},
                "output": {"path": str(root / "out")},
                "embed": {"max_length": 32},
                "kmeans": {"k": 3},
                "mixing": {"budget_ratio": 0.8},
                "compute": {"n_workers": 1},
            }
        )
    )
    suffix = uuid.uuid4().hex[:8]
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    pool = f"{spec['deployments'][0]['work_pool']['name']}-{suffix}"
    ours = WorkPoolFilter(name=WorkPoolFilterName(any_=[pool]))
    for d in spec["deployments"]:
        d["name"] = f"{d['name']}-{suffix}"
        d["work_pool"] = {**d["work_pool"], "name": pool}
    copy = root / "prefect.yaml"
    copy.write_text(yaml.safe_dump(spec, sort_keys=False))

    with client() as c:
        c.create_work_pool(
            WorkPoolCreate(
                name=pool,
                type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
            )
        )
    # The flow runs inherit the worker's environment; INFO so their progress lines
    # reach the API as a deployed run's would.
    env = {**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO"}
    worker_log = root / "worker.log"
    with worker_log.open("w") as log:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", pool],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deploy = subprocess.run(
            [PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", str(copy)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        # prefect deploy skips a file it cannot validate with a warning, not an error.
        assert "Skipping" not in deploy.stdout, deploy.stdout
        # Paused, no schedule creates runs (the nightly one could fall due during the
        # test and hand the worker the example corpus); runs asked for still start.
        with client() as c:
            for d in c.read_deployments(work_pool_filter=ours):
                c.pause_deployment(d.id)
        yield {
            "suffix": suffix,
            "pool": pool,
            "config": config,
            "out": root / "out",
            "worker_log": worker_log,
        }
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:  # a worker stuck in its shutdown
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        with client() as c:
            for d in c.read_deployments(work_pool_filter=ours):
                c.delete_deployment(d.id)
            c.delete_work_pool(pool)


def run(deployed: dict, name: str = "mix") -> dict:
    """Run deployment ``name`` with the tiny config; return its run, its one `mix`
    subflow run and that subflow's task runs."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.deployments import run_deployment

    parent = run_deployment(
        f"samplemix/{name}-{deployed['suffix']}",
        parameters={"config_path": str(deployed["config"]), "overrides": {}},
        timeout=300,
        poll_interval=1,
    )
    assert parent.state.is_completed(), (
        f"{parent.state.name}: {parent.state.message}\n"
        + deployed["worker_log"].read_text()[-4000:]
    )
    with client() as c:
        children = c.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])
            )
        )
        assert len(children) == 1
        tasks = c.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [children[0].id]}), limit=200
        )
    return {"parent": parent, "child": children[0], "tasks": tasks}


@pytest.fixture(scope="module")
def first(deployed: dict) -> dict:
    return run(deployed)


@pytest.fixture(scope="module")
def second(deployed: dict, first: dict) -> dict:
    return run(deployed)


def artifacts(flow_run_id: object) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with client() as c:
        return c.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def test_deployments_and_schedules_read_back_through_the_api(deployed: dict) -> None:
    from samplemix.config import load_config

    suffix = deployed["suffix"]
    with client() as c:
        nightly = c.read_deployment_by_name(f"samplemix/mix-{suffix}")
        incremental = c.read_deployment_by_name(f"samplemix/mix-incremental-{suffix}")
        evaluate = c.read_deployment_by_name(f"samplemix-evaluate/evaluate-{suffix}")
    [sched] = nightly.schedules
    nightly_schedule = (sched.schedule.cron, sched.schedule.timezone, sched.active)
    assert nightly_schedule == ("0 2 * * *", "UTC", True)
    [sched] = incremental.schedules
    assert sched.schedule.interval.total_seconds() == 3600 and not sched.active
    assert incremental.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert incremental.global_concurrency_limit.limit == 1
    assert not evaluate.schedules  # on demand: it trains proxy LMs
    assert evaluate.entrypoint == "flows/deploy.py:evaluate_deployment"
    assert {"methods", "alphas"} <= set(evaluate.parameter_openapi_schema["properties"])
    evaluated = load_config(
        ROOT / evaluate.parameters["config_path"], evaluate.parameters["overrides"]
    )
    assert evaluated.evaluate.heldout_fraction > 0  # flows/evaluate.py requires held-out docs
    for d in (nightly, incremental):
        assert d.entrypoint == "flows/deploy.py:mix_deployment"
        assert d.work_pool_name == deployed["pool"]
        # Runs start in the folder `prefect deploy` ran in: the repository root.
        [pull] = d.pull_steps
        assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == str(ROOT)
        # The default parameters make a valid config from that folder.
        params = d.parameters
        cfg = load_config(ROOT / params["config_path"], params["overrides"])
        assert cfg.output.path == params["overrides"]["output.path"]
        # The UI's run form describes both parameters (from the flow's docstring).
        props = d.parameter_openapi_schema["properties"]
        assert "--set" in props["overrides"]["description"]
        assert "repository root" in props["config_path"]["description"]


def test_deployment_run_completes_with_named_runs_artifacts_and_progress(
    deployed: dict, first: dict
) -> None:
    from samplemix.reporting.run_report import PLOTS

    assert first["parent"].name == f"mix-{deployed['suffix']}: {MIX_NAME}"
    child = first["child"]
    assert (child.name, child.state_name) == (MIX_NAME, "Completed")

    expected = {f"{stage}/{shard}" for stage in PER_SHARD for shard in SHARDS}
    expected |= {*REDUCES, "materialise/part-00000"}
    assert {t.name for t in first["tasks"]} == expected
    assert len(first["tasks"]) == len(expected)
    assert {t.state_name for t in first["tasks"]} == {"Completed"}

    summary = json.loads((deployed["out"] / "_manifest.json").read_text())["summary"]
    by_key = {a.key: a for a in artifacts(child.id) if a.key}
    report = by_key["mixture-report"].data
    assert f"| Target T_tgt | {summary['target_tokens']:,} |" in report
    assert f"| Realised Σ n·len | {summary['realised_tokens']:,} |" in report
    for section in ("## Domains", "Largest clusters:", "## Rows read, accepted and rejected"):
        assert section in report
    images = report.split("](data:image/png;base64,")[1:]
    assert len(images) == len(PLOTS)
    for image in images:
        assert base64.b64decode(image.split(")", 1)[0])[:8] == b"\x89PNG\r\n\x1a\n"
    # The API returns a table artifact's rows as a JSON string.
    domains = {r["domain"]: r for r in json.loads(by_key["mixture-domains"].data)}
    assert set(domains) == {"books", "code", "reference", "total"}
    assert domains["total"]["tokens_after"] == summary["realised_tokens"]
    shards = json.loads(by_key["mixture-shards"].data)
    assert sorted(r["shard"] for r in shards) == SHARDS
    assert sum(r["accepted"] for r in shards) == summary["documents"] == 36

    progress = {
        a.description.split(":")[0]: a.data for a in artifacts(child.id) if a.type == "progress"
    }
    assert set(progress) == {s.split("/")[0] for s in PER_SHARD}
    assert set(progress.values()) == {100.0}

    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    lines: list[str] = []
    with client() as c:
        while page := c.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[child.id])), limit=200, offset=len(lines)
        ):
            lines += [log.message for log in page]
    assert "embed: waiting for 3 tasks on Dask, 0 from the store" in lines
    assert any(line.startswith("embed: 3/3 computed (100%") for line in lines)


def test_rerun_of_the_deployment_serves_every_task_from_the_store(
    deployed: dict, first: dict, second: dict
) -> None:
    assert second["child"].name == MIX_NAME
    assert len(second["tasks"]) == len(first["tasks"])
    assert {t.state_name for t in second["tasks"]} == {"Cached"}
    assert {t.state_type.value for t in second["tasks"]} == {"COMPLETED"}
    # Nothing on Dask, so no progress bars; the report comes back with its plots,
    # read from the output the first run wrote.
    kinds = {a.type for a in artifacts(second["child"].id)}
    assert kinds == {"markdown", "table"}
    report = next(a for a in artifacts(second["child"].id) if a.key == "mixture-report")
    assert report.data.count("](data:image/png;base64,") == 6


def test_a_failed_shard_fails_the_run_with_stage_shard_and_cause(prefect_server: str) -> None:
    from prefect import flow, task

    from flows.mix import _collect

    @task(task_run_name="embed/{shard}")
    def embed(shard: str) -> dict:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    @task(task_run_name="tokens/{shard}")
    def tokens(shard: str) -> list[dict]:
        return [{"cached": False}]

    @flow
    def stage() -> list[dict]:
        return _collect([tokens.submit("a.parquet"), embed.submit("books/part-007.parquet")], "x")

    state = stage(return_state=True)
    assert state.is_failed()
    assert state.message == (
        "Flow run encountered an exception: RuntimeError: embed/books/part-007.parquet: "
        "CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    with pytest.raises(RuntimeError):  # the type is kept: callers catch by type
        state.result()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"overrides": {"mixing.alpha": 7}}, "corpus.input: is required"),
        ({"config_path": "no/such.yaml"}, "deploy from the repository root"),
        ({"overrides": {"storage.secret": "s3cr3t"}}, "credentials do not belong"),
    ],
)
def test_bad_parameters_fail_the_run_naming_the_field(
    prefect_server: str, params: dict, message: str
) -> None:
    from flows.deploy import mix_deployment

    state = mix_deployment(**params, return_state=True)
    assert state.is_failed()
    assert "ConfigError" in state.message and message in state.message
    with client() as c:
        assert c.read_flow_run(state.state_details.flow_run_id).name == "samplemix: invalid config"
