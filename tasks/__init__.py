"""Prefect tasks: each runs one engine stage on one shard (or one reduce)."""

from tasks.context_reuse import reuse_task_context

reuse_task_context()  # on a Dask worker this runs as its first task is unpickled
