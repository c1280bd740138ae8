"""The ``mix`` flow: the stage graph (pipeline/graph.py) walked on Dask, and its report
published as Prefect artifacts.

Per-shard stages fan out as Dask tasks; reduces run between them on small summaries.
Here: the executor that starts and waits on a stage's tasks (progress, a failed task's
name in the flow's message, no silent wait without workers). No maths here.
"""

from __future__ import annotations

import contextlib
import posixpath
import queue
import time
from collections.abc import Callable

import dask
from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import PrefectFuture
from prefect_dask import DaskTaskRunner

from flows.runtime import (
    await_recorded,
    check_inputs,
    prefect_api,
    share_threads,
    task_runner,
    with_block_credentials,
)
from samplemix.config import ComputeConfig, Config
from samplemix.io.store import Output, Store
from samplemix.mixing import methods
from samplemix.pipeline import walk
from samplemix.pipeline.graph import Call, Stage
from tasks.stages import stage_task


class NoWorkerError(RuntimeError):
    """The Dask cluster had no worker able to run a stage's tasks for
    ``compute.no_worker_timeout_s``; the message names the stage, the scheduler and
    what to do."""


def run_name(cfg: Config | None = None) -> str:
    """``mix-<corpus folder>-<method>-<budget>``, from ``cfg`` or else the running
    flow's ``config`` parameter (Prefect calls this with no argument)."""
    from prefect.runtime import flow_run

    if cfg is None:
        cfg = flow_run.parameters["config"]
    corpus = posixpath.basename(cfg.corpus.input.rstrip("/*")) or "corpus"
    m = cfg.mixing
    budget = f"{m.budget:,}tok" if m.budget else f"x{m.budget_ratio or 1.0:g}"
    return f"mix-{corpus}-{methods.method_of(cfg).label(m)}-{budget}"


#: Per task run of a stage, in call order: its future once submitted, a function that
#: submits it while it waits its turn, or its results served from the store.
Launched = list[PrefectFuture | Callable[[], PrefectFuture] | list[dict]]

#: Task runs a stage keeps submitted at once, at least (twice the cluster's worker threads
#: when that is more): a submitted run holds its pickled calls and Prefect context in the
#: Dask scheduler, which a local cluster runs in the flow's process, until its result is
#: in; a 10^6-document stage submitted whole grew the flow with the corpus.
IN_FLIGHT = 256

#: Task runs per stage that ``compute.shards_per_task`` (when unset) stays under: a
#: Prefect server records every run, and 10^9 documents are ~10^6 shards.
TASK_RUNS_PER_STAGE = 2000


def task_groups(n: int, shards_per_task: int | None) -> list[range]:
    """Consecutive groups of ``n`` calls, ``shards_per_task`` each (the last may hold
    fewer); unset, as few per group as keep the groups ≤ ``TASK_RUNS_PER_STAGE``."""
    size = shards_per_task or max(1, -(-n // TASK_RUNS_PER_STAGE))
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _group_label(calls: list[Call]) -> str:
    return calls[0].label if len(calls) == 1 else f"{calls[0].label} +{len(calls) - 1}"


class DaskExecutor:
    """The flow's executor (pipeline/walk.py): a stage's calls as Prefect tasks on the
    flow's task runner (Dask), consecutive calls grouped into one task run each
    (``task_groups``); committed ones are served right here as Cached runs."""

    runs = True

    def __init__(self, cfg: Config, store: Store) -> None:
        self.cfg, self.store = cfg, store

    def submit(
        self, stage: Stage, calls: list[Call], cached: list[dict | None]
    ) -> tuple[Launched, bool, list[Call]]:
        """Start the groups of calls not in the store on Dask (a call that ``stage.gpu``
        says needs a GPU asks for the resource GPU=1, so only GPU workers run it), then
        serve the committed ones, in groups too. Returns the launched groups, in call
        order, whether any asked for a GPU, and the calls."""
        task = stage_task(stage.name)
        for c in calls:
            if c.note:
                get_run_logger().info("%s: %s", stage.name, c.note)
        gpus = [stage.gpu(self.cfg, c.args) for c in calls]
        todo = [i for i, hit in enumerate(cached) if hit is None]
        done = [i for i, hit in enumerate(cached) if hit is not None]
        per_task = self.cfg.compute.shards_per_task
        out: dict[int, Callable[[], PrefectFuture] | list[dict]] = {}
        for group in task_groups(len(todo), per_task):
            mine = [calls[todo[i]] for i in group]
            gpu = any(gpus[todo[i]] for i in group)

            def launch(mine: list[Call] = mine, gpu: bool = gpu) -> PrefectFuture:
                with dask.annotate(resources={"GPU": 1}) if gpu else contextlib.nullcontext():
                    return task.submit(stage.name, _group_label(mine), mine, self.store)

            out[todo[group[0]]] = launch
        for group in task_groups(len(done), per_task):
            mine = [calls[done[i]] for i in group]
            hits = [cached[done[i]] for i in group]
            args = (stage.name, _group_label(mine), mine, self.store, hits)
            out[done[group[0]]] = task(*args, return_state=True).result()
        launched: Launched = [out[i] for i in sorted(out)]
        _start(launched, in_flight())  # the rest as these finish (_collect)
        return launched, any(gpus), calls

    def collect(self, stage: Stage, handle: tuple[Launched, bool, list[Call]]) -> list[dict]:
        launched, gpu, calls = handle
        results = _collect(launched, stage.name, gpu, self.cfg.compute)
        for r, c in zip(results, calls, strict=True):
            r["key"] = c.key  # the walk's own, not a copy (call_result)
        return results

    def unknown(self, stage: Stage, shards: list[str | None], reason: str) -> None:
        raise AssertionError(f"{stage.name}: {reason}")  # a run knows every result


def run_calls(stage: Stage, calls: list[Call], cfg: Config, store: Store) -> list[dict]:
    """``stage``'s calls on the flow's task runner, in order; committed ones are served
    from the store (for flows that make their own calls, as evaluate does)."""
    done = store.summaries([c.key for c in calls])
    executor = DaskExecutor(cfg, store)
    return executor.collect(stage, executor.submit(stage, calls, [done.get(c.key) for c in calls]))


POLL_S = 2.0  # a wait with no task finishing asks the scheduler for its workers this often


class _WorkerWatch:
    """Ends a stage's wait once the running flow's Dask cluster has had no worker able
    to run the stage's tasks (with ``gpu``: none with the resource GPU=1) for
    ``timeout`` seconds, counted from the first check that found none. Dask itself
    waits for workers forever. Outside a Dask task runner it checks nothing."""

    def __init__(self, stage: str, gpu: bool, timeout: float) -> None:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        runner = ctx.task_runner if ctx is not None else None
        self.client = runner.client if isinstance(runner, DaskTaskRunner) else None
        self.stage, self.gpu, self.timeout = stage, gpu, timeout
        self.since: float | None = None

    def check(self) -> None:
        """Raise NoWorkerError when no able worker has been seen for ``timeout`` s."""
        if self.client is None:
            return
        workers = self.client.scheduler_info()["workers"].values()
        now = time.monotonic()
        if any(not self.gpu or w.get("resources", {}).get("GPU", 0) >= 1 for w in workers):
            if self.since is not None:
                get_run_logger().info(
                    "%s: Dask workers again after %.0f s", self.stage, now - self.since
                )
            self.since = None
            return
        if self.since is None:
            self.since = now
            get_run_logger().warning(
                "%s: the Dask cluster has no %s; waiting up to %g s for one "
                "(compute.no_worker_timeout_s)",
                self.stage,
                "worker with the resource GPU=1" if self.gpu else "worker",
                self.timeout,
            )
        elif now - self.since >= self.timeout:
            address = self.client.scheduler.address
            if self.gpu:
                raise NoWorkerError(
                    f"{self.stage}: no Dask worker with the resource GPU=1 for "
                    f"{self.timeout:g} s (scheduler {address}); start GPU workers (dask cuda "
                    "worker --resources GPU=1) or raise compute.no_worker_timeout_s"
                )
            raise NoWorkerError(
                f"{self.stage}: no Dask worker for {self.timeout:g} s (scheduler {address}); "
                "start workers or raise compute.no_worker_timeout_s"
            )


def in_flight() -> int:
    """Task runs a stage keeps submitted: ``IN_FLIGHT``, or twice the worker threads of
    the running flow's Dask cluster when that is more."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    runner = ctx.task_runner if ctx is not None else None
    if not isinstance(runner, DaskTaskRunner):
        return IN_FLIGHT
    workers = runner.client.scheduler_info()["workers"].values()
    return max(IN_FLIGHT, 2 * sum(w.get("nthreads", 1) for w in workers))


def _start(launched: Launched, n: int, since: int = 0) -> list[int]:
    """Submit the first ``n`` task runs of ``launched`` still waiting their turn, looking
    from position ``since`` on (each slot then holds its future); returns their positions."""
    started = []
    for i in range(since, len(launched)):
        if len(started) == n:
            break
        slot = launched[i]
        if callable(slot) and not isinstance(slot, PrefectFuture):
            launched[i] = slot()
            started.append(i)
    return started


def _result(fut: PrefectFuture, watch: _WorkerWatch) -> list[dict]:
    """``fut``'s result. A finished task's result that lived on a worker that died since
    is rescheduled by Dask and gathered again, which waits for a worker: meanwhile
    ``watch`` checks the workers, so that this wait ends too."""
    while True:
        try:
            return fut.result(timeout=POLL_S)
        except TimeoutError as e:
            # Prefect's words for its own timeout; a task's TimeoutError is the task's.
            if not str(e).startswith(f"Task run {fut.task_run_id} did not complete within"):
                raise
            watch.check()


def _collect(
    launched: Launched, stage: str, gpu: bool = False, compute: ComputeConfig | None = None
) -> list[dict]:
    """Every call's result in submission order (``launched``: per task run, a future or
    its served results, each run a list of calls' results). While Dask computes, a
    progress artifact and log lines say how many of the stage's task runs are done. A
    failed task fails the flow with its exception, whose message then starts with the
    task run's name (``embed/books/part-000.parquet: ...``), so the flow run's message
    names the stage, the shard and the cause. A cluster with no worker able to run the tasks
    (``gpu``: they ask for GPU=1) for ``compute.no_worker_timeout_s`` (``compute``: the
    run's settings; by default ComputeConfig's) fails the flow with NoWorkerError."""
    if not launched:
        return []
    log = get_run_logger()
    groups: list[list[dict]] = [r if isinstance(r, list) else [] for r in launched]
    n = sum(not isinstance(r, list) for r in launched)
    if n:
        log.info("%s: waiting for %d tasks on Dask, %d from the store", stage, n, len(launched) - n)
        # A progress bar for the per-shard stages; a single reduce task is 0 % then 100 %.
        artifact = (
            create_progress_artifact(0.0, description=f"{stage}: {n} tasks on Dask")
            if n > 1
            else None
        )
        every = max(1, n // 20)  # about 20 progress lines per stage, however many shards
        t0 = shown = time.monotonic()
        timeout = (compute or ComputeConfig()).no_worker_timeout_s
        watch = _WorkerWatch(stage, gpu, timeout)
        finished: queue.SimpleQueue[PrefectFuture] = queue.SimpleQueue()
        slots: dict[int, int] = {}  # id(future) -> its position in launched
        # Runs start in call order, so none waits before the last one started: each
        # refill looks on from there (from the start, a stage's refills took O(runs²)).
        waiting_from = 0

        def track(positions: list[int]) -> None:
            nonlocal waiting_from
            for i in positions:
                slots[id(launched[i])] = i
                launched[i].add_done_callback(finished.put)  # at once if it is done
                waiting_from = i + 1

        track([i for i, r in enumerate(launched) if isinstance(r, PrefectFuture)])
        for done in range(1, n + 1):
            while True:
                try:
                    fut = finished.get(timeout=POLL_S)
                    break
                except queue.Empty:
                    watch.check()
            i = slots.pop(id(fut))
            launched[i] = []  # let the future, and the result Dask keeps for it, go
            track(_start(launched, 1, waiting_from))  # the next task run in its place
            try:
                groups[i] = _result(fut, watch)
            except Exception as e:
                from prefect import get_client

                # The server records task runs from events, a moment after they end, and
                # holds a generated name until the event of the final state brings the
                # run's own; a run whose worker died before it started has none.
                where, deadline = f"a task of stage {stage}", time.monotonic() + 10
                with get_client(sync_client=True) as client:
                    while time.monotonic() < deadline:
                        with contextlib.suppress(Exception):  # not recorded yet
                            run = client.read_task_run(fut.task_run_id)
                            if run.state is not None and run.state.is_final():
                                where = run.name
                                break
                        time.sleep(0.2)
                log.error("%s failed: %s: %s", where, type(e).__name__, e)
                # Keep the type (callers catch BudgetError, CorpusError, ...) and put the
                # task run's name into the message, which becomes the flow run's message;
                # a run of several calls has named the failed call's shard already (steps).
                if len(e.args) == 1 and isinstance(e.args[0], str) and str(e) == e.args[0]:
                    if not e.args[0].startswith((where, f"{stage}/")):
                        e.args = (f"{where}: {e.args[0]}",)
                raise
            # An update is an API call (~40 ms): at most one a second, and the last.
            if artifact is not None and (done == n or time.monotonic() - shown >= 1.0):
                update_progress_artifact(artifact, 100.0 * done / n)
                shown = time.monotonic()
            if done % every == 0 or done == n:
                log.info(
                    "%s: %d/%d computed (%.0f%%, %.0f s)",
                    stage,
                    done,
                    n,
                    100.0 * done / n,
                    time.monotonic() - t0,
                )
    results = [r for group in groups for r in group]
    log.info(
        "%s: %d computed, %d from the store",
        stage,
        sum(not r["cached"] for r in results),
        sum(r["cached"] for r in results),
    )
    return results


@flow(name="mix", flow_run_name=run_name)
def mix(config: Config) -> dict:
    """Build the mixture for ``config`` (pipeline/walk.py walks the stage graph on Dask)
    and publish its report as Prefect artifacts. Returns the run summary (budget
    figures, the files written, and per stage how many tasks computed vs came from the
    store)."""
    built = walk.run(config, DaskExecutor, get_run_logger())
    _publish_report(built.report, built.out)
    return built.summary


def _publish_report(inputs, out: Output) -> None:  # noqa: ANN001
    """Publish the report (its files written by the run) as Prefect artifacts:
    ``mixture-report`` (Markdown, the plots embedded as PNG data URLs read back from the
    output, so the UI shows exactly the published figures),
    ``mixture-domains`` (shares before/after) and ``mixture-shards`` (rows read,
    accepted, rejected per shard)."""
    import base64

    import fsspec

    from samplemix.reporting import run_report as report

    folder = f"{out.url}/report"
    fs, root = fsspec.core.url_to_fs(folder, **out.fs.storage_options)
    images: dict[str, str] = {}
    size = 0
    for name in report.PLOTS:
        with contextlib.suppress(FileNotFoundError):  # an output from before a plot existed
            data = fs.cat_file(f"{root}/{name}.png")
            size += len(data)
            images[name] = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    # The artifact lives in the Prefect database, once per run: above a few MB the
    # figures stay in the report folder only (the footer says where).
    if size > 4_000_000:
        images = {}
    text = report.report_markdown(inputs, images)
    text += (
        f"\n---\nFiles: `{folder}/report.md` (this report), the figures beside it, "
        f"`{folder}/shards.csv`; the mixture under `{out.url}/mixture`, the per-document "
        f"plan under `{out.url}/plan`, rejected rows in `{out.url}/rejects`.\n"
    )
    create_markdown_artifact(text, key="mixture-report", description="SampleMix mixture report")
    create_table_artifact(
        report.table_rows(inputs), key="mixture-domains", description="Domain shares before/after"
    )
    if inputs.shards:
        rows, what = shard_table(inputs.shards)
        create_table_artifact(
            rows,
            key="mixture-shards",
            description=f"Rows read, accepted, rejected and renamed (duplicate ids) {what}",
        )


#: Rows of the ``mixture-shards`` artifact at most: an artifact lives in the Prefect
#: database, and a corpus of 10^9 documents has ~10^6 shards (shards.csv lists them all).
SHARD_TABLE_ROWS = 1000


def shard_table(shards: list[dict]) -> tuple[list[dict], str]:
    """The per-shard accounting rows the UI's table shows, in shard order: every shard
    up to ``SHARD_TABLE_ROWS``, else those with the most rejected and renamed rows; and
    the words that say which."""
    if len(shards) <= SHARD_TABLE_ROWS:
        return shards, "per shard"
    worst = sorted(
        range(len(shards)), key=lambda i: -(shards[i]["rejected"] + shards[i]["renamed"])
    )
    rows = [shards[i] for i in sorted(worst[:SHARD_TABLE_ROWS])]
    return rows, (
        f"in the {SHARD_TABLE_ROWS:,} of {len(shards):,} shards with the most rejected and "
        "renamed rows (every shard: report/shards.csv)"
    )


def run_mix(cfg: Config) -> dict:
    """Run the flow with the task runner ``cfg.compute`` asks for; torch threads per
    worker default to the cores shared out among the local workers."""
    cfg = share_threads(cfg)
    check_inputs(cfg)
    with prefect_api():
        cfg = with_block_credentials(cfg)
        state = mix.with_options(task_runner=task_runner(cfg))(cfg, return_state=True)
        summary = state.result()
        per_task = cfg.compute.shards_per_task
        runs = sum(
            len(task_groups(n, per_task))
            for counts in (summary["computed"], summary["cached"])
            for n in counts.values()
        )
        await_recorded(state.state_details.flow_run_id, runs)
        return summary
