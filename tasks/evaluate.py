"""Prefect tasks around the proxy-evaluation stages (samplemix/evaluate.py).

Like tasks/stages.py: runs named ``stage/what``, committed artifacts served from the
store in a ``Cached`` state, transient I/O retried. No maths here.
"""

from __future__ import annotations

import pyarrow as pa
from prefect import task
from prefect.states import State

from samplemix import evaluate as ev
from samplemix.config import Config, ProxyConfig
from samplemix.corpus import Shard
from samplemix.store import Key, Store
from tasks.stages import _OPTS, _from_store


@task(name="proxytok", task_run_name="proxytok/{cfg.evaluate.tokenizer}", **_OPTS)
def tokenizer(
    plan: pa.Table, shards: dict[str, Shard], cfg: Config, store: Store, key: Key
) -> dict | State:
    return _from_store(store, key, lambda: ev.run_tokenizer(plan, shards, cfg, store, key))


@task(name="evalsets", task_run_name="evalsets/heldout", **_OPTS)
def evalsets(
    plan: pa.Table, shards: dict[str, Shard], tok: Key, cfg: Config, store: Store, key: Key
) -> dict | State:
    return _from_store(store, key, lambda: ev.run_evalsets(plan, shards, tok, cfg, store, key))


@task(name="proxy", task_run_name="proxy/{variant}/seed-{proxy.seed}", **_OPTS)
def proxy(
    variant: str,
    output: str,
    tok: Key,
    sets: Key,
    proxy: ProxyConfig,
    cfg: Config,
    store: Store,
    key: Key,
) -> dict | State:
    return _from_store(store, key, lambda: ev.run_proxy(output, tok, sets, proxy, cfg, store, key))
