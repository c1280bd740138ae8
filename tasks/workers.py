"""Dask worker preload (``distributed.worker.preload: [tasks.workers]``): a worker that
the scheduler dropped while it was alive restarts under its nanny and rejoins.

The scheduler forgets a live worker when its restart after worker-ttl without heartbeats
(its event loop held by GIL-bound work) did not answer in time, or when a comm to it
broke. The worker then shuts down (``Scheduler was unaware of this worker; shutting
down``, or the scheduler's ``close``), and Dask's Worker.close also closes its nanny by
default, so the nanny never restarts it: the cluster loses the worker for good, and a
run whose cluster lost every worker this way waited forever. Here the worker closes
alone; its nanny sees its process exit and starts a new one, which registers again.

A worker the scheduler retires on purpose (``retire_workers``, adaptive scale-down) is
``closing_gracefully`` by then and still takes its nanny with it.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("distributed.worker")

# Worker.close reasons (distributed 2026.8) for "the scheduler dropped this worker": its
# heartbeat was answered "missing", the scheduler told it to close, or the comm to the
# scheduler broke (the scheduler removes a worker whose comm broke; a worker whose
# scheduler is gone waits to reconnect). A scheduler that shuts down says
# "scheduler-close", and its workers still end with their nannies.
DROPPED = frozenset(
    {
        "worker-heartbeat-missing",
        "scheduler-remove-worker",
        "worker-handle-scheduler-connection-broken",
    }
)


def dask_setup(worker: Any) -> None:  # noqa: ANN401 - a distributed.Worker
    """Dask's preload hook: route ``worker``'s close for a DROPPED reason past its nanny.
    The heartbeat calls ``worker.close``; the scheduler's ``close`` message arrives
    through the stream handler, bound when the worker was built, so both are replaced."""
    from distributed.core import Status

    close = worker.close

    async def close_and_rejoin(
        timeout: float = 30,
        executor_wait: bool = True,
        nanny: bool = True,
        reason: str = "worker-close",
    ) -> str | None:
        # A worker already closing (or retiring: closing_gracefully) keeps its course.
        if nanny and reason in DROPPED and worker.status in (Status.running, Status.paused):
            # Info, not a warning: a cluster that shuts down breaks the comm too, and its
            # nannies, closing themselves, then restart nothing.
            logger.info("Closing for %s without the nanny, which restarts this worker", reason)
            nanny = False  # the nanny restarts a worker process that ends on its own
        return await close(timeout=timeout, executor_wait=executor_wait, nanny=nanny, reason=reason)

    worker.close = close_and_rejoin
    worker.stream_handlers["close"] = close_and_rejoin
