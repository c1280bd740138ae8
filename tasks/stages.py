"""Prefect tasks around the engine's stages.

Each task names its run ``stage/shard``, serves a committed artifact from the store
instead of recomputing it (the run then ends in a ``Cached`` state, as the UI shows
it), retries I/O failures, and returns the stage's summary with ``key`` and
``cached`` added. No maths here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from samplemix import stages
from samplemix.config import Config, QualityConfig
from samplemix.corpus import Shard
from samplemix.models import set_torch_threads
from samplemix.store import Key, Output, Store, transient


def _retryable(task: object, task_run: object, state: State) -> bool:
    """Retry transient I/O failures only (the store retries its own already): a bad
    config, corpus or budget fails the same way again."""
    try:
        return transient(state.result(raise_on_failure=False))
    except Exception:  # noqa: BLE001 - an unreadable state: keep the retry policy
        return True


_OPTS = {
    "cache_policy": NO_CACHE,
    "retries": 2,
    "retry_delay_seconds": [2, 10],
    "retry_condition_fn": _retryable,
}


def _from_store(store: Store, key: Key, compute: Callable[[], dict]) -> dict | State:
    """The stored summary in a Cached state, or ``compute()``'s with its wall seconds."""
    hit = store.summary(key)
    if hit is not None:
        return Completed(data={**hit, "key": key, "cached": True, "seconds": 0.0}, name="Cached")
    t0 = time.perf_counter()
    summary = compute()
    return {**summary, "key": key, "cached": False, "seconds": time.perf_counter() - t0}


@task(name="tokens", task_run_name="tokens/{shard.shard_id}", **_OPTS)
def tokens(shard: Shard, cfg: Config, store: Store, key: Key) -> dict | State:
    return _from_store(store, key, lambda: stages.run_tokens(shard, cfg, store, key))


@task(name="ids", task_run_name="ids/duplicates", **_OPTS)
def ids(tokens: list[Key], cfg: Config, store: Store, key: Key) -> dict | State:
    return _from_store(store, key, lambda: stages.run_ids(tokens, cfg, store, key))


@task(name="bigrams", task_run_name="bigrams/{shard.shard_id}", **_OPTS)
def bigrams(shard: Shard, tok: Key, cfg: Config, store: Store, key: Key) -> dict | State:
    return _from_store(store, key, lambda: stages.run_bigrams(shard, tok, cfg, store, key))


@task(name="domains", task_run_name="domains/stats", **_OPTS)
def domains(
    tokens: list[Key], ids: Key, bigrams: list[Key] | None, store: Store, key: Key
) -> dict | State:
    return _from_store(store, key, lambda: stages.run_domains(tokens, ids, bigrams, store, key))


@task(name="ranks", task_run_name="ranks/quadmix", **_OPTS)
def ranks(
    tokens: list[Key],
    ids: Key,
    quality: list[list[Key]],
    domain_docs: dict[str, int],
    cfg: Config,
    store: Store,
    key: Key,
) -> dict | State:
    return _from_store(
        store,
        key,
        lambda: stages.run_ranks(tokens, ids, quality, domain_docs, cfg, store, key),
    )


@task(name="quality", task_run_name="quality/{scorer.label}/{shard.shard_id}", **_OPTS)
def quality(
    shard: Shard, scorer: QualityConfig, cfg: Config, store: Store, key: Key
) -> dict | State:
    set_torch_threads(cfg.compute.torch_threads)
    return _from_store(store, key, lambda: stages.run_quality(shard, scorer, cfg, store, key))


@task(name="embed", task_run_name="embed/{shard.shard_id}", **_OPTS)
def embed(shard: Shard, cfg: Config, store: Store, key: Key) -> dict | State:
    set_torch_threads(cfg.compute.torch_threads)
    return _from_store(store, key, lambda: stages.run_embed(shard, cfg, store, key))


@task(name="kmeans", task_run_name="kmeans/fit", **_OPTS)
def kmeans(
    parts: list[tuple[Key, Key]], n_docs: int, cfg: Config, store: Store, key: Key
) -> dict | State:
    return _from_store(store, key, lambda: stages.run_kmeans(parts, n_docs, cfg, store, key))


@task(name="assign", task_run_name="assign/{shard.shard_id}", **_OPTS)
def assign(shard: Shard, tok: Key, emb: Key, km: Key, store: Store, key: Key) -> dict | State:
    return _from_store(store, key, lambda: stages.run_assign(tok, emb, km, store, key))


@task(name="clusters", task_run_name="clusters/stats", **_OPTS)
def clusters(assign_keys: list[Key], km: Key, cfg: Config, store: Store, key: Key) -> dict | State:
    return _from_store(store, key, lambda: stages.run_clusters(assign_keys, km, cfg, store, key))


@task(name="weights", task_run_name="weights/{shard.shard_id}", **_OPTS)
def weights(
    shard: Shard,
    keys: dict[str, Key],
    q_range: list[float],
    d_range: list[float],
    method: Key | dict | None,
    cfg: Config,
    store: Store,
    key: Key,
) -> dict | State:
    return _from_store(
        store,
        key,
        lambda: stages.run_weights(
            keys["tokens"],
            keys["ids"],
            keys["quality"],
            keys["assign"],
            keys["clusters"],
            q_range,
            d_range,
            method,
            cfg,
            store,
            key,
        ),
    )


@task(name="budget", task_run_name="budget/scale", **_OPTS)
def budget(
    parts: list[tuple[Key, Key]], target: int, cfg: Config, store: Store, key: Key
) -> dict | State:
    return _from_store(store, key, lambda: stages.run_budget(parts, target, cfg, store, key))


@task(name="counts", task_run_name="counts/{shard.shard_id}", **_OPTS)
def counts(
    shard: Shard, keys: dict[str, Key], plan: dict, cfg: Config, store: Store, key: Key
) -> dict | State:
    return _from_store(
        store,
        key,
        lambda: stages.run_counts(
            shard,
            keys["tokens"],
            keys["ids"],
            keys["quality"][0],
            keys["assign"],
            keys["weights"],
            plan,
            cfg,
            store,
            key,
        ),
    )


@task(name="materialise", task_run_name="materialise/part-{bucket:05d}", **_OPTS)
def materialise(
    bucket: int, counts_keys: list[Key], store: Store, out: Output, published: int | None
) -> dict | State:
    """Write mixture part ``bucket``; Cached when the output already holds it from the
    same counts (``published``: its rows, as the output's manifest records them)."""
    if published is not None:
        return Completed(data={"rows": published, "cached": True, "seconds": 0.0}, name="Cached")
    t0 = time.perf_counter()
    rows = stages.run_gather(bucket, counts_keys, store, out)
    return {**rows, "cached": False, "seconds": time.perf_counter() - t0}
