"""One Prefect task for every stage: a run named ``stage/label`` computes one call.

The task serves a committed artifact from the store instead of recomputing it (the run
then ends in a ``Cached`` state, as the UI shows it), retries I/O failures, and returns
the stage's summary with ``key``, ``cached`` and ``seconds`` added (walk.call_result).
No maths here.
"""

from __future__ import annotations

from functools import cache

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from samplemix.evaluation.stages import EVALUATION
from samplemix.io.store import Key, Store, transient
from samplemix.pipeline.graph import GRAPH, MATERIALISE, Call
from samplemix.pipeline.walk import call_result

STAGES = {s.name: s for s in (*GRAPH, MATERIALISE, *EVALUATION)}


def _retryable(task: object, task_run: object, state: State) -> bool:
    """Retry transient I/O failures only (the store retries its own already): a bad
    config, corpus or budget fails the same way again."""
    try:
        return transient(state.result(raise_on_failure=False))
    except Exception:  # noqa: BLE001 - an unreadable state: keep the retry policy
        return True


def step(
    stage: str, label: str, args: tuple, store: Store, key: Key, cached: dict | None = None
) -> dict | State:
    """Call ``label`` of ``stage``: ``cached`` (its committed summary) or the store's
    in a Cached state, else computed."""
    result = call_result(STAGES[stage], Call(key, label, args), store, cached)
    return Completed(data=result, name="Cached") if result["cached"] else result


@cache
def stage_task(stage: str) -> Task:
    """The task that runs ``stage``'s calls, named after it: the Prefect UI groups task
    runs by the task's name, and Dask names its tasks (keys, dashboard) after the
    function's, so each stage gets a function of its own name."""

    def run(
        stage: str, label: str, args: tuple, store: Store, key: Key, cached: dict | None = None
    ) -> dict | State:
        return step(stage, label, args, store, key, cached)

    run.__name__ = run.__qualname__ = stage
    return task(
        run,
        name=stage,
        task_run_name="{stage}/{label}",
        cache_policy=NO_CACHE,
        retries=2,
        retry_delay_seconds=[2, 10],
        retry_condition_fn=_retryable,
    )
