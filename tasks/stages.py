"""One Prefect task for every stage: a run named ``stage/label`` computes one call, or a
group of consecutive per-shard calls (``label`` then names the first and how many more).

The task serves a committed artifact from the store instead of recomputing it (the run
then ends in a ``Cached`` state, as the UI shows it), retries I/O failures, and returns
each call's summary with ``cached`` and ``seconds`` added (walk.call_result).
No maths here.
"""

from __future__ import annotations

from functools import cache

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from samplemix.evaluation.stages import EVALUATION
from samplemix.io.store import Store, transient
from samplemix.pipeline.graph import GRAPH, OUTPUT_STAGES, Call
from samplemix.pipeline.walk import call_result

STAGES = {s.name: s for s in (*GRAPH, *OUTPUT_STAGES, *EVALUATION)}


def _retryable(task: object, task_run: object, state: State) -> bool:
    """Retry transient I/O failures only (the store retries its own already): a bad
    config, corpus or budget fails the same way again."""
    try:
        return transient(state.result(raise_on_failure=False))
    except Exception:  # noqa: BLE001 - an unreadable state: keep the retry policy
        return True


def steps(
    stage: str, label: str, calls: list[Call], store: Store, cached: list[dict | None] | None = None
) -> list[dict] | State:
    """Compute ``calls`` of ``stage`` in order (one task run may hold several shards'
    calls: ``compute.shards_per_task``), each served from ``cached`` (its committed
    summary) or the store when it is there. Returns their results, in a Cached state
    when every one was. A call's failure names it (``stage/label: ...``) when the run
    holds several, so the flow's message still names the shard."""
    results = []
    for call, hit in zip(calls, cached or [None] * len(calls), strict=True):
        try:
            results.append(call_result(STAGES[stage], call, store, hit))
        except Exception as e:
            if len(calls) > 1 and len(e.args) == 1 and isinstance(e.args[0], str):
                e.args = (f"{stage}/{call.label}: {e.args[0]}",)
            raise
    return Completed(data=results, name="Cached") if all(r["cached"] for r in results) else results


@cache
def stage_task(stage: str) -> Task:
    """The task that runs ``stage``'s calls, named after it: the Prefect UI groups task
    runs by the task's name, and Dask names its tasks (keys, dashboard) after the
    function's, so each stage gets a function of its own name."""

    def run(
        stage: str,
        label: str,
        calls: list[Call],
        store: Store,
        cached: list[dict | None] | None = None,
    ) -> list[dict] | State:
        return steps(stage, label, calls, store, cached)

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
