"""Prefect tasks: each runs one engine stage on one shard (or one reduce)."""

from tasks.context_reuse import reuse_task_context
from tasks.events import route_events_by_api

# On a Dask worker these run as its first task is unpickled (or as the worker starts,
# with the preload tasks.workers), before any task sends an event.
reuse_task_context()
route_events_by_api()
