"""Where a run runs: the Prefect API it reports to (the one ``PREFECT_API_URL`` names, or
a temporary local server that lives for the run), the Dask cluster its tasks run on, and
the checks made before either starts. Shared by the mix, compare and evaluate flows and
the CLI; the flows themselves live beside it."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from uuid import UUID

import dask
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
from prefect_dask import DaskTaskRunner
from pydantic import SecretStr

from samplemix.config import Config, ConfigError
from samplemix.io.corpus import discover_shards
from samplemix.pipeline import keys

# Dask's nannies give each worker MALLOC_TRIM_THRESHOLD_=65536. Setting any glibc malloc
# threshold freezes its mmap threshold at 128 KiB, so every activation tensor is mapped
# and unmapped again (page faults on each allocation): MiniLM embedded 15-25% slower on
# one thread, and two 1-thread workers ran slower than one process with two threads
# (BENCHMARKS.md). Workers started from this process keep glibc's adaptive default;
# infra/dask.yaml does the same for the `dask worker` processes of infra/.
dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})

# Worker loss, survived where Dask can. Set here for the clusters this process starts
# (their scheduler and nannies read it; nannies pass it on to their workers); infra/dask.yaml
# holds the same for the `dask scheduler` and `dask worker` processes of infra/.
WORKER_CONFIG = {
    # The scheduler restarts (through its nanny) a worker it has not heard from for this
    # long, rerunning its task. A worker whose one thread holds the GIL (model loading,
    # a long C call) cannot heartbeat until it lets go, and a task restarted more often
    # than allowed-failures (3) fails the run with KilledWorker: too short a TTL turns
    # slow work into a failed run, too long only delays replacing a hung worker. Dask's
    # default is 5 minutes.
    "distributed.scheduler.worker-ttl": "10 minutes",
    # Dask's comm timeouts stay at their defaults (30 s): a stalled worker's kernel still
    # acknowledges TCP, so a stall alone never breaks a comm, and a longer connect timeout
    # would make a wrong compute.scheduler_address take longer to fail.
    # A worker that the scheduler dropped while it lived restarts and rejoins instead of
    # taking its nanny down with it (tasks/workers.py).
    "distributed.worker.preload": ["tasks.workers"],
    # Dask's developer logs keep this many entries each; among them every BatchedSend keeps
    # its last N batches sent, whole: the scheduler's stream to each worker thus holds the
    # compute-task messages (run_spec: the task's calls, Store and serialized Prefect
    # context, ~150 KB of objects each) of its last N batches after the tasks are gone, and
    # the client's stream its last N update-graph messages. At Dask's 1000 a local cluster's
    # scheduler (in the flow's process) grew ~0.15 MB per finished task run up to
    # ~1000 batches per worker (+300 MB with 2 workers; N x workers x 150 KB in all).
    # 10 costs the transition log and the scheduler's event topics their history.
    "distributed.admin.low-level-log-length": 10,
}
dask.config.set(WORKER_CONFIG)


# ---- the Prefect API ----------------------------------------------------------------------

# Prefect gives its temporary server 20 s to answer. A first start migrates a fresh
# SQLite database, and on a loaded 2-core machine that took longer (54 test errors in one
# suite run); 120 s fits a busy machine and costs nothing on an idle one.
STARTUP_TIMEOUT_VAR = "SAMPLEMIX_SERVER_START_TIMEOUT_S"
DEFAULT_STARTUP_TIMEOUT_S = 120.0
START_ATTEMPTS = 2


class ServerStartError(RuntimeError):
    """The temporary Prefect server did not answer in time (message: what to do)."""


def startup_timeout_s() -> float:
    """Seconds each start of the temporary server may take: ``$STARTUP_TIMEOUT_VAR``
    when set, else ``DEFAULT_STARTUP_TIMEOUT_S``. (Prefect's own setting takes whole
    seconds and is ignored here.)"""
    value = os.environ.get(STARTUP_TIMEOUT_VAR, "").strip()
    if not value:
        return DEFAULT_STARTUP_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        raise ServerStartError(
            f"{STARTUP_TIMEOUT_VAR}={value!r} is not a number of seconds; set it to e.g. 300"
        ) from None
    if seconds <= 0:
        raise ServerStartError(f"{STARTUP_TIMEOUT_VAR}={value!r} must be > 0 seconds")
    return seconds


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (Prefect starts its server
    on another one if it is taken by the time the server binds it)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_temporary_server():  # noqa: ANN201 - prefect's SubprocessASGIServer
    """A started temporary Prefect server. Each of ``START_ATTEMPTS`` tries waits up to
    ``startup_timeout_s()``; a try that times out has its process stopped before the
    next. Raises ServerStartError, in one line that says what to do, when none answers."""
    from prefect.server.api.server import SubprocessASGIServer

    timeout = startup_timeout_s()
    for _ in range(START_ATTEMPTS):
        # A port of our own: Prefect keeps one server object per port, and with none
        # given it would hand back a server this process already runs.
        server = SubprocessASGIServer(port=free_port())
        try:
            server.start(timeout=timeout)  # type: ignore[arg-type] - a float works
            return server
        except Exception:  # noqa: BLE001 - a timeout, or the health check's HTTP error
            server.stop()  # Prefect leaves the timed-out process running otherwise
    raise ServerStartError(
        f"the temporary Prefect server did not answer within {timeout:g} s "
        f"({START_ATTEMPTS} tries; a busy machine starts it slowly): set "
        f"{STARTUP_TIMEOUT_VAR} higher (e.g. {4 * timeout:g}), or start one with "
        "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api"
    )


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Yield the Prefect API URL, starting a temporary local server when none is set.

    Prefect's own ephemeral mode would start one more server inside every Dask worker
    process, and their task runs would never reach the flow's database; one server
    whose URL the workers inherit through the environment keeps a run in one place.
    """
    url = get_current_settings().api.url
    if url:
        yield url
        return
    server = start_temporary_server()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # send queued logs while the server still listens
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


# ---- the Dask cluster ---------------------------------------------------------------------


def task_runner(cfg: Config) -> DaskTaskRunner:
    """A runner on ``compute.scheduler_address``, else on a local cluster (see
    ``local_cluster``)."""
    if cfg.compute.scheduler_address:
        return DaskTaskRunner(address=cfg.compute.scheduler_address)
    cls, kwargs = local_cluster(cfg)
    return DaskTaskRunner(cluster_class=cls, cluster_kwargs=kwargs)


def local_cluster(cfg: Config) -> tuple[type, dict]:
    """The class and arguments of the local Dask cluster: single-threaded worker
    processes, one per core by default. With ``compute.gpus`` = G, G GPU workers (each
    sees one device through CUDA_VISIBLE_DEVICES and advertises the resource GPU=1)
    beside the CPU workers (cores − G by default), which see no GPU. Raises ConfigError
    when this machine has fewer CUDA devices than G."""
    from distributed import LocalCluster

    if not cfg.compute.gpus:
        return LocalCluster, {
            "n_workers": workers(cfg),
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": ":0",
        }
    import torch

    have = torch.cuda.device_count()
    if cfg.compute.gpus > have:
        raise ConfigError(
            f"compute.gpus = {cfg.compute.gpus} but torch sees {have} CUDA device(s) here; "
            "set compute.gpus to at most that (0 runs everything on CPU), or install a CUDA "
            "build of torch"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(have)]
    return gpu_cluster(workers(cfg), devices[: cfg.compute.gpus])


def gpu_cluster(cpu_workers: int, devices: list[str]) -> tuple[type, dict]:
    """A SpecCluster of ``cpu_workers`` CPU workers (CUDA_VISIBLE_DEVICES empty) and one
    worker per entry of ``devices`` (CUDA_VISIBLE_DEVICES = it, resource GPU=1), all
    single-threaded processes. One scheduler for both kinds: dask-cuda's LocalCUDACluster
    starts GPU workers only, so CPU stages would have to share the GPU workers' slots."""
    from distributed import Nanny, Scheduler, SpecCluster

    def worker(env: str, resources: dict[str, int]) -> dict:
        options = {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": env}, "resources": resources}
        return {"cls": Nanny, "options": options}

    spec = {f"cpu-{i}": worker("", {}) for i in range(cpu_workers)}
    spec |= {f"gpu-{d}": worker(d, {"GPU": 1}) for d in devices}
    return SpecCluster, {
        "workers": spec,
        "scheduler": {"cls": Scheduler, "options": {"dashboard_address": ":0"}},
    }


def workers(cfg: Config) -> int:
    """Local CPU workers: ``compute.n_workers``, else one per core not given to a GPU."""
    cores = len(os.sched_getaffinity(0))
    return cfg.compute.n_workers or max(1, cores - cfg.compute.gpus)


def share_threads(cfg: Config) -> Config:
    """``cfg`` with ``compute.torch_threads`` (when unset, on a local cluster) set to the
    cores shared out among the local workers."""
    if cfg.compute.torch_threads is not None or cfg.compute.scheduler_address:
        return cfg
    threads = max(1, len(os.sched_getaffinity(0)) // (workers(cfg) + cfg.compute.gpus))
    return cfg.model_copy(
        update={"compute": cfg.compute.model_copy(update={"torch_threads": threads})}
    )


@contextlib.contextmanager
def shared_cluster(cfg: Config) -> Iterator[Config]:
    """For commands that run many flows (compare, evaluate, search): one LocalCluster for
    all of them, so workers start, import torch and load models once. Yields ``cfg``
    pointed at it (threads shared out as ``share_threads`` does); a config that names a
    scheduler is yielded unchanged. Enter inside ``prefect_api`` so that the workers
    inherit the API URL."""
    if cfg.compute.scheduler_address:
        yield cfg
        return
    cfg = share_threads(cfg)
    cls, kwargs = local_cluster(cfg)
    with cls(**kwargs) as cluster:
        compute = cfg.compute.model_copy(update={"scheduler_address": cluster.scheduler_address})
        yield cfg.model_copy(update={"compute": compute})


# ---- before and after a run ---------------------------------------------------------------


def check_inputs(cfg: Config) -> None:
    """Fail before any server or cluster starts when the corpus has no shards or the
    store or output cannot be written (CorpusError, StoreError: one line, what to do).
    A config whose storage credentials come from a Prefect block is checked by the
    flow instead, once the block can be read."""
    if cfg.storage.aws_credentials_block:
        return
    discover_shards(cfg.corpus, cfg.storage.fsspec_options(cfg.corpus.input))
    keys.store_for(cfg).check()
    keys.output_for(cfg).check()


def with_block_credentials(cfg: Config) -> Config:
    """``cfg`` with the profile, region and endpoint of the Prefect AwsCredentials
    block ``storage.aws_credentials_block`` filled in where the config leaves them
    unset, and its key, secret and session token when the config sets no key.
    Needs a Prefect API (``prefect_api``)."""
    name = cfg.storage.aws_credentials_block
    if not name:
        return cfg
    try:
        from prefect_aws import AwsCredentials
    except ImportError:
        raise ConfigError(
            "storage.aws_credentials_block needs prefect-aws: pip install 'samplemix[aws]'"
        ) from None
    try:
        block = AwsCredentials.load(name)
    except ValueError as e:
        raise ConfigError(
            f"storage.aws_credentials_block {name!r} cannot be loaded ({e}); create it in the "
            f"Prefect UI (Blocks > AWS Credentials) or with AwsCredentials(...).save({name!r})"
        ) from None
    st = cfg.storage
    update: dict[str, object] = {
        "profile": st.profile or block.profile_name,
        "region": st.region or block.region_name,
        "endpoint_url": st.endpoint_url or block.aws_client_parameters.endpoint_url,
    }
    if st.key is None and block.aws_access_key_id:  # key, secret, token: one source
        update |= {
            "key": SecretStr(block.aws_access_key_id),
            "secret": block.aws_secret_access_key,
            "token": block.aws_session_token,
        }
    return cfg.model_copy(update={"storage": st.model_copy(update=update)})


def await_recorded(flow_run_id: UUID, runs: int, timeout: float = 30.0) -> int:
    """Wait until the server has recorded the final states of the flow run's ``runs``
    task runs, at most ``timeout`` s; return how many it recorded. The server records
    them from events, after the flow returns; stopping a temporary server sooner would
    lose them (and print its cancelled writes). Fewer than ``runs`` by the deadline is
    one warning in the flow run's log (the UI then lacks task runs, not the outputs)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.logging.loggers import flow_run_logger

    final = TaskRunFilter(
        state=TaskRunFilterState(
            type=TaskRunFilterStateType(any_=[StateType.COMPLETED, StateType.FAILED])
        )
    )
    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:

        def recorded() -> int:
            n, page = 0, 200
            while True:
                got = client.read_task_runs(
                    flow_run_filter=flow_runs, task_run_filter=final, limit=page, offset=n
                )
                n += len(got)
                if len(got) < page:
                    return n

        while (n := recorded()) < runs and time.monotonic() < deadline:
            time.sleep(0.2)
        if n < runs:
            flow_run_logger(client.read_flow_run(flow_run_id)).warning(
                "Prefect UI incomplete: the server at %s recorded %d of %d task runs of this "
                "run within %g s; the others' state events did not arrive. The outputs are "
                "complete; only the UI lacks those task runs",
                client.api_url,
                n,
                runs,
                timeout,
            )
    return n
