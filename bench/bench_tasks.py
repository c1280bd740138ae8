"""What one Prefect task costs on Dask workers, with Prefect as shipped and with
samplemix's reuse of the per-task context (tasks/context_reuse.py).

A flow submits ``--tasks`` tasks that do nothing to a local cluster of 2 single-
threaded workers; the time from the first submit to the last result, over the tasks,
times the workers, is what a task costs a worker. The reuse is installed process-wide
when ``tasks`` is imported, so each variant runs in a fresh child process (one per
variant per round, in alternating order); the children start their own Prefect server
and cluster, and one warm-up flow, which are not timed.

    python -m bench.bench_tasks [--tasks 96] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

WORKERS = 2


def noop(i: int) -> int:
    return i


def child(reuse: bool, n: int) -> dict:
    """In a fresh process: per-task seconds (submit loop, and submit to last result)."""
    import importlib

    from dask.distributed import Client, LocalCluster
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_dask import DaskTaskRunner

    if reuse:
        importlib.import_module("tasks")  # the flow process's side
    work = task(noop, name="noop", cache_policy=NO_CACHE)

    @flow
    def many(n: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        futures = [work.submit(i) for i in range(n)]
        t1 = time.perf_counter()
        assert [f.result() for f in futures] == list(range(n))
        return t1 - t0, time.perf_counter() - t0

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with (
            temporary_settings({PREFECT_API_URL: server.api_url}),
            LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True) as cluster,
        ):
            runner = DaskTaskRunner(address=cluster.scheduler_address)
            if reuse:
                with Client(cluster) as client:
                    client.run(importlib.import_module, "tasks")  # the workers' side
            many.with_options(task_runner=runner)(8)  # imports, connections
            submit, total = many.with_options(task_runner=runner)(n)
    finally:
        server.stop()
    return {"submit": submit / n, "worker": total * WORKERS / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", choices=["plain", "reuse"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "reuse", args.tasks)))
        return
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_LOGGING_LEVEL"] = "WARNING"
    got: dict[str, list[dict]] = {"plain": [], "reuse": []}
    for r in range(args.rounds):
        for variant in ("plain", "reuse")[:: 1 if r % 2 == 0 else -1]:
            cmd = [sys.executable, "-m", "bench.bench_tasks", "--child", variant]
            out = subprocess.run(
                [*cmd, "--tasks", str(args.tasks)],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            got[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def ms(variant: str, what: str) -> float:
        return 1000 * float(np.median([g[what] for g in got[variant]]))

    rows = [
        ("tasks per flow, rounds, workers", f"{args.tasks}, {args.rounds}, {WORKERS} x 1 thread"),
    ]
    for what, label in (("worker", "worker time per task"), ("submit", "flow's submit per task")):
        plain, reuse = ms("plain", what), ms("reuse", what)
        rows.append((f"{label}, Prefect as shipped, ms (median)", f"{plain:.0f}"))
        rows.append((f"{label}, with the reuse, ms (median)", f"{reuse:.0f}"))
        rows.append((f"{label}: as shipped / reuse", f"{plain / reuse:.2f}"))
    # Imported here, not at the top: it imports ``tasks``, which the plain children must not.
    from bench.bench_pipeline import print_table

    print_table(rows, len(os.sched_getaffinity(0)))


if __name__ == "__main__":
    main()
