"""A run never waits forever for Dask workers: every worker of an external cluster
killed or stopped mid-run ends the run with one line that names the stage and the fix;
workers that the scheduler drops while they live come back and the run completes.
Real processes throughout: a `dask scheduler` and `dask worker` processes, a Dask
LocalCluster, `samplemix run`, a Prefect server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for, write_tiny_corpus
from distributed import Client

from flows.runtime import WORKER_CONFIG, local_cluster

REPO = Path(__file__).resolve().parents[1]
START_S = 180  # a process start on a busy 2-core machine (workers import torch)
RUN_S = 300  # a tiny run, or its failure, once its workers are gone


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a cluster process: no Prefect API of its own (as in infra/,
    where only the flow's process names one), quiet, one thread per library."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    return env | {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}


class ExternalCluster:
    """A `dask scheduler` process and ``n`` `dask worker` processes (each a nanny and its
    worker, in a process group of its own), started as a deployment starts them."""

    def __init__(self, folder: Path, n: int, scheduler_env: dict[str, str] | None = None):
        self.folder = folder
        self.procs: list[subprocess.Popen] = []
        info = folder / "scheduler.json"
        log = (folder / "scheduler.log").open("wb")
        self.procs.append(self._start(["scheduler", "--port", "0"], scheduler_env or {}, log))
        wait_for(info.exists, "the dask scheduler wrote its address", START_S)
        wait_for(lambda: "address" in info.read_text(), "scheduler file complete", 10)
        self.address: str = json.loads(info.read_text())["address"]
        self.workers = [
            self._start(
                ["worker", "--nthreads", "1", "--name", f"w{i}"],
                {},
                (folder / f"worker-{i}.log").open("wb"),
            )
            for i in range(n)
        ]
        self.procs += self.workers
        with Client(self.address, timeout=START_S) as client:
            client.wait_for_workers(n, timeout=START_S)

    def _start(self, args: list[str], env: dict[str, str], log) -> subprocess.Popen:  # noqa: ANN001
        scheduler_file = ["--scheduler-file", str(self.folder / "scheduler.json")]
        return subprocess.Popen(
            [sys.executable, "-m", "dask", *args, *scheduler_file, "--no-dashboard"],
            cwd=REPO,
            env=worker_env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def signal_workers(self, sig: int) -> None:
        """``sig`` to every worker's process group (its nanny and worker process)."""
        for proc in self.workers:
            os.killpg(proc.pid, sig)

    def close(self) -> None:
        """Continue and kill every process this cluster started."""
        for proc in self.procs:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
            proc.wait(timeout=30)


def run_cli(corpus: Path, out: Path, log: Path, *settings: str) -> subprocess.Popen:
    """`samplemix run` of the tiny corpus (stdout and stderr to ``log``), reporting to
    this session's Prefect server."""
    args = ["--input", str(corpus), "--output", str(out), "--budget-ratio", "0.8"]
    for s in ("embed.max_length=32", "kmeans.k=3", "compute.torch_threads=1", *settings):
        args += ["--set", s]
    return subprocess.Popen(
        [sys.executable, "-m", "samplemix.cli", "run", *args],
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def computing(out: Path, run: subprocess.Popen, log: Path) -> bool:
    """Whether the run has committed its first artifact; fails if it ended first."""
    if run.poll() is not None:
        pytest.fail(
            f"the run ended (exit {run.returncode}) before any artifact:\n{log.read_text()}"
        )
    return any((out / "store" / "tokens").glob("*/_done.json"))


def ended(run: subprocess.Popen, log: Path, what: str) -> int:
    """The run's exit status, once it ends within RUN_S; else kill it and fail."""
    try:
        return run.wait(timeout=RUN_S)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    tail = log.read_text()[-3000:]
    pytest.fail(f"{what}: the run still waited after {RUN_S} s (a hang):\n{tail}")


@pytest.fixture
def external(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ExternalCluster]:
    """An external cluster of one worker whose scheduler removes a worker silent for 5 s
    (worker-ttl; 30 s more when the nanny does not answer its restart), so that a stopped
    worker is removed within a test's time. Production keeps WORKER_CONFIG's value."""
    folder = tmp_path / "cluster"
    folder.mkdir()
    ttl = {"DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "5s"}
    cluster = ExternalCluster(folder, 1, ttl)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_a_run_whose_workers_are_all_gone_fails_naming_stage_and_fix(
    tmp_path: Path, external: ExternalCluster, prefect_server: str, sig: int
) -> None:
    corpus = write_tiny_corpus(tmp_path / "corpus")
    out, log = tmp_path / "out", tmp_path / "run.log"
    run = run_cli(
        corpus,
        out,
        log,
        f"compute.scheduler_address={external.address}",
        "compute.no_worker_timeout_s=5",
    )
    wait_for(lambda: computing(out, run, log), "the run committed its first artifact", START_S)
    external.signal_workers(sig)

    assert ended(run, log, f"every worker got {sig.name}") != 0
    text = log.read_text()
    line = rf"(\w+): no Dask worker for 5 s \(scheduler {re.escape(external.address)}\); "
    line += r"start workers or raise compute\.no_worker_timeout_s"
    assert re.search(line, text), text[-3000:]


@pytest.mark.slow
def test_a_gpu_stage_on_a_cluster_without_gpu_workers_fails_naming_them(
    tmp_path: Path, cluster: dict
) -> None:
    """compute.gpus on a cluster whose workers advertise no GPU: the CPU stages run, and
    embed, which asks for GPU=1, ends the run instead of queueing forever."""
    corpus = write_tiny_corpus(tmp_path / "corpus")
    out, log = tmp_path / "out", tmp_path / "run.log"
    address = cluster["compute.scheduler_address"]
    settings = [f"compute.scheduler_address={address}", "compute.gpus=1"]
    run = run_cli(corpus, out, log, *settings, "compute.no_worker_timeout_s=3")

    assert ended(run, log, "no worker has the resource GPU=1") != 0
    text = log.read_text()
    line = r"embed: no Dask worker with the resource GPU=1 for 3 s \(scheduler "
    line += re.escape(address) + r"\); start GPU workers \(dask cuda worker --resources GPU=1\)"
    assert re.search(line, text), text[-3000:]
    assert any((out / "store" / "tokens").glob("*/_done.json"))  # the CPU stage ran


def drop_every_worker(client: Client) -> list[str]:
    """Make the scheduler forget each live worker, as it does after missed heartbeats
    or a broken comm: the first without telling it (its next heartbeat hears "missing":
    "Scheduler was unaware of this worker; shutting down"), the others told to close."""

    async def drop(dask_scheduler) -> list[str]:  # noqa: ANN001
        addresses = list(dask_scheduler.workers)
        for i, address in enumerate(addresses):
            await dask_scheduler.remove_worker(address, close=i > 0, stimulus_id="test-drop")
        return addresses

    return client.run_on_scheduler(drop)


@pytest.mark.slow
def test_workers_the_scheduler_drops_come_back_and_the_run_completes(
    tmp_path: Path, prefect_server: str
) -> None:
    from conftest import tiny_config

    corpus = write_tiny_corpus(tmp_path / "corpus")
    out, log = tmp_path / "out", tmp_path / "run.log"
    cls, kwargs = local_cluster(tiny_config(corpus, out))  # the flow's own local cluster
    with cls(**kwargs) as cluster, Client(cluster) as client:
        run = run_cli(
            corpus,
            out,
            log,
            f"compute.scheduler_address={cluster.scheduler_address}",
            "compute.no_worker_timeout_s=60",
        )
        wait_for(lambda: computing(out, run, log), "the run committed its first artifact", START_S)
        dropped = drop_every_worker(client)
        assert len(dropped) == 2

        assert ended(run, log, "the scheduler dropped every worker") == 0, log.read_text()[-3000:]

        def rejoined() -> bool:  # both nannies started new worker processes
            workers = client.scheduler_info()["workers"]
            return len(workers) == 2 and not set(workers) & set(dropped)

        # The run may finish on the first worker back; the second one's start (importing
        # torch) can take longer on a busy machine.
        wait_for(rejoined, "both dropped workers rejoined as new processes", START_S)


def test_the_image_gives_dask_worker_processes_the_flows_worker_settings() -> None:
    """infra/dask.yaml (the image's /etc/dask config for `dask scheduler` and `dask
    worker`) holds every setting that flows/runtime.py gives the clusters it starts."""
    import dask

    image = dask.config.collect(paths=[str(REPO / "infra" / "dask.yaml")], env={})
    for key, value in WORKER_CONFIG.items():
        assert dask.config.get(key, config=image) == value, key
