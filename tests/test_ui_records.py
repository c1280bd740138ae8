"""Every task run of every run is recorded on that run's own Prefect server, also when
the runs share an external Dask cluster whose workers outlive them and each run reports
to a different server (the first one gone by the second run)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import tiny_config, write_tiny_corpus
from prefect import flow, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    LogFilter,
    LogFilterFlowRunId,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL, temporary_settings
from test_hang import ExternalCluster, wait_for

from flows.mix import run_mix
from flows.runtime import await_recorded, start_temporary_server


@pytest.fixture
def external(tmp_path: Path) -> Iterator[ExternalCluster]:
    """One `dask scheduler` and one `dask worker` process: every Dask task of both runs
    runs in the same long-lived worker process."""
    folder = tmp_path / "cluster"
    folder.mkdir()
    cluster = ExternalCluster(folder, 1)
    try:
        yield cluster
    finally:
        cluster.close()


def recorded(flow_run_id: object) -> int:
    """Task runs of ``flow_run_id`` in a final state on the current API."""
    final = TaskRunFilterState(
        type=TaskRunFilterStateType(any_=[StateType.COMPLETED, StateType.FAILED])
    )
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(state=final),
            limit=200,  # the server's maximum page; a tiny run has about 50
        )
    return len(runs)


def run_on_new_server(cfg) -> tuple[dict, int, list[str]]:  # noqa: ANN001
    """Run ``cfg`` reporting to a new temporary Prefect server; return the summary, its
    recorded task runs (waiting up to 30 s more for them) and the log lines of the flow
    run. The server is stopped before returning."""
    server = start_temporary_server()
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            summary = run_mix(cfg)
            with get_client(sync_client=True) as client:
                # Temporary servers share one database: the run is found by its name,
                # which holds the corpus folder's, unique to the test, and α.
                corpus = Path(cfg.corpus.input).name
                alpha = f"-a{cfg.mixing.alpha:g}-"
                named = FlowRunFilter(name=FlowRunFilterName(like_=corpus))
                (flow_run,) = [
                    r for r in client.read_flow_runs(flow_run_filter=named) if alpha in r.name
                ]
            runs = sum(summary["computed"].values()) + sum(summary["cached"].values())
            deadline = time.monotonic() + 30
            while (n := recorded(flow_run.id)) < runs and time.monotonic() < deadline:
                time.sleep(0.5)
            APILogHandler().flush()  # the run's log lines, the warning of missing ones included
            with get_client(sync_client=True) as client:
                logs = client.read_logs(
                    LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id]))
                )
            return summary, n, [log.message for log in logs]
    finally:
        server.stop()


@pytest.mark.slow
def test_every_task_run_of_two_runs_on_one_cluster_is_on_its_own_server(
    tmp_path: Path, external: ExternalCluster
) -> None:
    """Before tasks/events.py the worker sent the second run's events to the first,
    stopped server: the second recorded 0 of its 41 task runs."""
    # A corpus folder of its own names the runs apart from any other on the database.
    corpus = write_tiny_corpus(tmp_path / f"records-{uuid.uuid4().hex[:12]}")
    on_cluster = {
        "compute.scheduler_address": external.address,
        "compute.torch_threads": 1,
        "output.store": str(tmp_path / "store"),
    }
    # The first run computes everything in the worker; the second, with another α,
    # serves the scores, embeddings and clusters from the store in this process and
    # computes weights, budget, counts and the mixture in the same worker.
    first = tiny_config(corpus, tmp_path / "first", **on_cluster)
    second = tiny_config(corpus, tmp_path / "second", **on_cluster, **{"mixing.alpha": 0.5})
    for cfg in (first, second):
        summary, n, logs = run_on_new_server(cfg)
        runs = sum(summary["computed"].values()) + sum(summary["cached"].values())
        assert n == runs, f"the server recorded {n} of the run's {runs} task runs"
        assert not [line for line in logs if "UI incomplete" in line]
    assert summary["computed"]["weights"] and summary["cached"]["embed"]  # both paths ran


def test_missing_records_are_one_warning_in_the_runs_log(prefect_server: str) -> None:
    """A flow run with fewer recorded task runs than the run had says so, once."""

    @flow
    def empty() -> None:
        return None

    state = empty(return_state=True)
    flow_run_id = state.state_details.flow_run_id
    assert await_recorded(flow_run_id, 3, timeout=1.0) == 0
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    warnings = [log for log in logs if "UI incomplete" in log.message]
    assert len(warnings) == 1 and warnings[0].level == 30, [log.message for log in logs]
    assert "recorded 0 of 3 task runs" in warnings[0].message


def test_each_api_url_gets_its_own_events_worker(
    prefect_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect's one EventsWorker per process becomes one per API URL, each sending to
    its URL; beyond APIS_KEPT URLs the least recently used is drained and replaced."""
    from prefect.events.worker import EventsWorker

    import tasks.events

    assert tasks.events.route_events_by_api()  # installed by importing tasks; idempotent
    other = prefect_server.replace("127.0.0.1", "localhost")  # the same server, another URL

    def worker(url: str) -> EventsWorker:
        with temporary_settings({PREFECT_API_URL: url}):
            return EventsWorker.instance()

    first, second = worker(prefect_server), worker(other)
    assert first is not second and worker(prefect_server) is first
    assert dict(first.client_options) == {"api_url": prefect_server}
    assert dict(second.client_options) == {"api_url": other}
    monkeypatch.setattr(tasks.events, "APIS_KEPT", 1)
    assert worker(other) is second  # keeps one URL's worker: the first one is drained
    wait_for(lambda: worker(prefect_server) is not first, "the first worker replaced", 30)
