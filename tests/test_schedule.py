"""Scheduled runs of deployments/prefect.yaml fire: a real `prefect server start`, the
deployments deployed as docs/deploy.md says, the server's scheduler service creating the
`mix` deployment's runs, and a real process worker running one of them to the mixture a
direct `run_mix` of the same config builds.

tests/test_deploy.py reads the schedules back but pauses them; nothing there waits for
the scheduler to act. This test does, because the scheduler can fail while the API and
`prefect deploy` work: under SQLAlchemy 2.1 Prefect 3.8.8's scheduler service raised
"Can't evaluate bulk DML statement" on every loop and the nightly schedule never made a
run.

The server, its SQLite database and PREFECT_HOME are the test's own (a temporary
folder, a free port), so the deployments keep their real names. The file is deployed
from a copy in which `mix` runs every INTERVAL_S seconds on a tiny corpus with tiny
settings (the overrides of conftest's `tiny_config`); nothing else changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from uuid import UUID

import psutil
import pytest
import yaml
from conftest import tiny_settings, write_tiny_corpus

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
# Short, so that the first scheduled run falls due soon after the deploy; long enough
# that the runs' spacing is well above the scheduler's and worker's timing noise.
INTERVAL_S = 20
# Bounds of the waits. A fresh server migrates its database first, which took over a
# minute on a loaded 2-core machine (flows/runtime.py); a tiny run takes about a minute.
SERVER_START_S = 180.0
SCHEDULER_S = 90.0  # the scheduler loops every 2 s here (the default is 60 s)
RUN_S = 600.0
CLI_S = 180.0
# Summary fields that name where a run wrote, or how long its tasks took.
WHERE_AND_HOW_LONG = ("output", "store", "task_seconds")

T = TypeVar("T")

pytestmark = pytest.mark.slow


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def errors(path: Path) -> list[str]:
    """The distinct exception lines of a log (``sqlalchemy.exc.InvalidRequestError: …``):
    a service failing on every loop fills the log's end with one traceback."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return list(dict.fromkeys(re.findall(r"^[\w.]+(?:Error|Exception): .*$", text, re.M)))


def wait_for(what: str, check: Callable[[], T | None], timeout: float, log: Path) -> T:
    """``check()``'s first truthy value, polled each second for up to ``timeout`` s;
    fails naming ``what`` it waited for, with the errors and the end of ``log``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            seen = "\n".join(errors(log)) or "(none)"
            pytest.fail(
                f"waited {timeout:g} s for {what}\nerrors in {log.name}:\n{seen}\n"
                f"end of {log.name}:\n{tail(log)}"
            )
        time.sleep(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    """``args`` in a process group of its own, so that teardown can stop it with
    everything it started."""
    with log.open("w") as out:
        return subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM ``proc``'s process group and every descendant (a flow run or a Dask
    worker may have left the group), SIGKILL whatever is left after 30 s."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _, alive = psutil.wait_procs(family, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def cli(args: list[str], env: dict) -> str:
    """A Prefect CLI command run from the repository root, as docs/deploy.md runs it."""
    done = subprocess.run(
        [PREFECT, "--no-prompt", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_S,
    )
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`prefect server start` on a free port with its own PREFECT_HOME and database;
    yields the API URL, the environment that points the CLI at it, and its log."""
    from prefect.client.orchestration import SyncPrefectClient

    root = tmp_path_factory.mktemp("schedule")
    home = root / "prefect-home"
    home.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",  # not needed, and it copies its files at start
        # The scheduler's loop is 60 s by default: a short one keeps the wait short.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_SERVER_LOGGING_LEVEL": "INFO",  # the scheduler's errors and insert counts
        # The flow run inherits the worker's environment; INFO as a deployed run logs.
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    log = root / "server.log"
    proc = start(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], log, env, root
    )

    def healthy() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"prefect server start exited ({proc.returncode}):\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    try:
        wait_for(f"{url}/health to answer", healthy, SERVER_START_S, log)
        with SyncPrefectClient(url) as client:
            yield {"url": url, "env": env, "log": log, "root": root, "client": client}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def deployed(server: dict) -> dict:
    """deployments/prefect.yaml deployed as docs/deploy.md says, from a copy in which
    `mix` runs every INTERVAL_S s on a tiny corpus with tiny settings."""
    root, client = server["root"], server["client"]
    corpus = write_tiny_corpus(root / "corpus", docs_per_domain=12, shards_per_domain=1)
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    [mix] = [d for d in spec["deployments"] if d["name"] == "mix"]
    mix["schedules"] = [{"interval": INTERVAL_S, "timezone": "UTC", "active": True}]
    overrides = tiny_settings(corpus, root / "out")
    mix["parameters"]["overrides"] = overrides
    copy = root / "prefect.yaml"
    copy.write_text(yaml.safe_dump(spec, sort_keys=False))
    pool = mix["work_pool"]["name"]

    env = server["env"]
    cli(["work-pool", "create", pool, "--type", "process"], env)
    deploy = cli(["deploy", "--all", "--prefect-file", str(copy)], env)
    # prefect deploy skips a deployment it cannot validate with a warning, not an error.
    assert "Skipping" not in deploy, deploy

    deployment = client.read_deployment_by_name("samplemix/mix")
    [schedule] = deployment.schedules
    return {"deployment": deployment, "schedule": schedule, "pool": pool, "overrides": overrides}


def runs_of(client: SyncPrefectClient, deployment_id: UUID, *state_types: str) -> list:
    """The deployment's flow runs (in ``state_types`` when given)."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    states = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(state_types)))
    )
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=states if state_types else None,
    )


def scheduler_runs(server: dict, deployed: dict) -> list:
    """The `mix` runs the server's scheduler service created, once there are two at
    least (to see their spacing; it inserts min_runs = 3 in one go)."""

    def two_or_more() -> list:
        runs = runs_of(server["client"], deployed["deployment"].id)
        return runs if len(runs) >= 2 else []

    return wait_for(
        "the server's scheduler service to create scheduled runs of samplemix/mix "
        f"(interval {INTERVAL_S} s)",
        two_or_more,
        SCHEDULER_S,
        server["log"],
    )


def test_the_scheduler_creates_the_deployments_runs(server: dict, deployed: dict) -> None:
    deployment, schedule = deployed["deployment"], deployed["schedule"]
    assert schedule.active and schedule.schedule.interval == timedelta(seconds=INTERVAL_S)
    runs = scheduler_runs(server, deployed)
    for run in runs:
        # Made by the server from the schedule, not asked for by anyone.
        assert run.auto_scheduled, run
        assert (run.created_by.type, run.created_by.id) == ("SCHEDULE", schedule.id), run
        assert run.state_type.value == "SCHEDULED", run
        assert run.parameters == deployment.parameters
        assert "auto-scheduled" in run.tags
    # One run per interval of the schedule.
    times = sorted(run.expected_start_time for run in runs)
    assert {(b - a).total_seconds() for a, b in pairwise(times)} == {INTERVAL_S}
    # mix-incremental's schedule is inactive in the file: the scheduler leaves it alone.
    incremental = server["client"].read_deployment_by_name("samplemix/mix-incremental")
    assert not incremental.schedules[0].active
    assert not runs_of(server["client"], incremental.id)


def test_a_worker_runs_a_scheduled_run_to_the_expected_mixture(
    server: dict, deployed: dict, prefect_server: str, tmp_path: Path
) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.mix import run_mix
    from samplemix.config import load_config

    client = server["client"]
    first = min(run.expected_start_time for run in scheduler_runs(server, deployed))
    # The worker polls once and takes the runs due within its prefetch window (10 s):
    # start it when the first run is that close, so that the poll finds it.
    wait_for(
        f"the first scheduled run's start time, {first:%H:%M:%S} UTC, to come near",
        lambda: datetime.now(timezone.utc) >= first - timedelta(seconds=5),
        INTERVAL_S + 30,
        server["log"],
    )
    worker_log = server["root"] / "worker.log"
    # --run-once: one poll, then wait for what it submitted; --limit 1: one run of the
    # ones due, so the test knows what to wait for.
    worker = start(
        [PREFECT, "worker", "start", "--pool", deployed["pool"], "--run-once", "--limit", "1"],
        worker_log,
        server["env"],
        server["root"],
    )
    try:
        wait_for(
            "`prefect worker start --run-once` to run a scheduled run and exit",
            lambda: worker.poll() is not None,
            RUN_S,
            worker_log,
        )
    finally:
        stop(worker)
    assert worker.returncode == 0, tail(worker_log)

    finished = runs_of(client, deployed["deployment"].id, "COMPLETED", "FAILED", "CRASHED")
    assert len(finished) == 1, f"the worker finished {len(finished)} runs\n{tail(worker_log)}"
    [done] = finished
    assert done.state_type.value == "COMPLETED", f"{done.state.message}\n{tail(worker_log)}"
    # The run the worker finished is one the scheduler made.
    assert done.auto_scheduled and done.created_by.type == "SCHEDULE", done
    [child] = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[done.id])
        )
    )
    assert (child.name, child.state_type.value) == ("mix-corpus-samplemix-a0.8-x0.8", "COMPLETED")

    # The expectation, independently: the same config (the deployment's config_path
    # read from the repository root, its overrides, another output) mixed directly on
    # the session's server, everything computed afresh (the output's own store).
    out = Path(deployed["overrides"]["output.path"])
    expected_out = tmp_path / "expected"
    cfg = load_config(
        ROOT / deployed["deployment"].parameters["config_path"],
        {**deployed["overrides"], "output.path": str(expected_out)},
    )
    expected = run_mix(cfg)
    summary = json.loads((out / "_manifest.json").read_text())["summary"]
    assert {k: v for k, v in summary.items() if k not in WHERE_AND_HOW_LONG} == {
        k: v for k, v in expected.items() if k not in WHERE_AND_HOW_LONG
    }
    for part in ("plan", "mixture"):
        got = {p.name: p.read_bytes() for p in sorted((out / part).glob("*.parquet"))}
        want = {p.name: p.read_bytes() for p in sorted((expected_out / part).glob("*.parquet"))}
        assert got and got == want, part
