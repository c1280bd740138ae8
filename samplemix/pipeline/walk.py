"""Walking the stage graph: one walk for the Prefect flow, ``samplemix plan`` and the
in-process runner, each of which hands it an ``Executor``.

``walk`` goes through ``GRAPH`` in order. For each stage the run has, a runner's
executor first has the stage's inputs finished, then the stage's ``calls`` give its
tasks and keys; the store says which are committed already, and the executor starts
the rest (Dask, or right here) or, for the plan, only records them. Stages whose calls
need nothing unfinished start together (tokens, embeddings and quality scores).

``build`` is a whole run on top of a walk: the mixture's parts, the plan and rejects,
the report files and the run summary; ``run`` adds the checks and the output's lease;
``run_in_process`` is that with no Prefect and no Dask (notebooks, tests, benchmarks).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from samplemix.config import Config
from samplemix.io.corpus import Shard, discover, passed_over_lines
from samplemix.io.store import Key, Output, Store
from samplemix.pipeline import keys, summary
from samplemix.pipeline.graph import (
    GRAPH,
    GRAPH_BY_NAME,
    MATERIALISE,
    PUBLISH_PLAN,
    PUBLISH_REJECTS,
    Call,
    Stage,
    Unknown,
)
from samplemix.scoring.models import model_fingerprint

Log = logging.Logger | logging.LoggerAdapter


class Executor(Protocol):
    """Runs (or, for the plan, records) a stage's calls.

    ``runs``: False for the plan, which computes nothing and reads only the store.
    ``submit`` starts the calls (``cached[i]``: call i's committed summary, or None)
    and returns a handle; ``collect`` waits on it and returns one result per call (a
    summary with ``key``, ``cached`` and ``seconds``; the plan returns None for a call
    not in the store); ``unknown`` records a stage whose calls cannot be known yet."""

    runs: bool

    def submit(self, stage: Stage, calls: list[Call], cached: list[dict | None]) -> Any: ...

    def collect(self, stage: Stage, handle: Any) -> list[dict | None]: ...

    def unknown(self, stage: Stage, shards: list[str | None], reason: str) -> None: ...


def call_result(stage: Stage, call: Call, store: Store, cached: dict | None = None) -> dict:
    """Call ``call`` of ``stage``: its summary with ``cached`` (served from the store:
    ``cached`` given, or committed meanwhile by another run) and ``seconds`` (wall time
    computing it, 0 when cached). Not the key, which the executor adds: a worker's
    result would bring a copy of it, and a reduce's key lists every shard's."""
    hit = cached if cached is not None else store.summary(call.key)
    if hit is not None:
        return {**hit, "cached": True, "seconds": 0.0}
    t0 = time.perf_counter()
    result = stage.run(*call.args, store, call.key)
    return {**result, "cached": False, "seconds": time.perf_counter() - t0}


class Walk:
    """What a walk knows so far: per stage its calls and, once collected, its results;
    ``blocked``: the stage whose result the plan could not know (then every later stage
    is "after" it), else None."""

    def __init__(
        self, cfg: Config, store: Store, shards: list[Shard], executor: Executor, log: Log
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.shards = shards
        self.executor = executor
        self.log = log
        self.calls: dict[str, list[Call]] = {}
        self.handles: dict[str, Any] = {}
        self.results: dict[str, list[dict]] = {}
        self.blocked: str | None = None
        # The calls' keys, listed once per stage: per-shard calls read them by index, so
        # building the list per shard would cost O(shards²) a stage.
        self._keys: dict[str, list[Key]] = {}
        self._quality_by_shard: list[list[Key]] | None = None

    def keys(self, stage: str) -> list[Key]:
        """The keys of ``stage``'s calls, in call order (do not modify the list)."""
        if stage not in self._keys:
            self._keys[stage] = [c.key for c in self.calls[stage]]
        return self._keys[stage]

    def quality_keys(self) -> list[list[Key]]:
        """Per shard, its quality keys, one per scorer (the calls go scorer by scorer)."""
        if self._quality_by_shard is None:
            flat, n = self.keys("quality"), len(self.shards)
            self._quality_by_shard = [flat[i::n] for i in range(n)]
        return self._quality_by_shard

    def summaries(self, stage: str, partial: bool = False) -> list[dict]:
        """``stage``'s results, in call order, once finished. Where a result is not known
        (the plan, before it is computed), raises Unknown, or with ``partial`` has None."""
        if stage in self.results:
            return self.results[stage]
        got = self.executor.collect(GRAPH_BY_NAME[stage], self.handles[stage])
        if None in got:
            if partial:
                return got  # type: ignore[return-value]
            raise Unknown(stage)
        self.results[stage] = got  # type: ignore[assignment]
        # The handle holds the stage's futures, and Dask keeps a task's result on its
        # worker while a future refers to it: let both go once the results are here.
        del self.handles[stage]
        done = GRAPH_BY_NAME[stage].done
        if done is not None and self.executor.runs:
            done(self)
        return self.results[stage]

    def summary(self, stage: str) -> dict:
        """The one result of the reduce ``stage``."""
        return self.summaries(stage)[0]


def walk(cfg: Config, store: Store, shards: list[Shard], executor: Executor, log: Log) -> Walk:
    """Every stage of ``GRAPH`` that a run of ``cfg`` has, in order, handed to
    ``executor``; with a runner, returns once every stage has finished. After a stage
    whose calls cannot be known (the plan only), every later stage is "after" it."""
    w = Walk(cfg, store, shards, executor, log)
    for stage in GRAPH:
        if not stage.applies(cfg):
            continue
        items: list[str | None] = [s.shard_id for s in shards] if stage.per_shard else [None]
        if w.blocked is not None:
            executor.unknown(stage, items, f"after {w.blocked}")
            continue
        try:
            if executor.runs:
                for name in stage.inputs:
                    if GRAPH_BY_NAME[name].applies(cfg):
                        w.summaries(name)
            calls = stage.calls(w)
        except Unknown as u:
            w.blocked = u.stage
            executor.unknown(stage, items, u.reason or f"after {u.stage}")
            continue
        w.calls[stage.name] = calls
        done = store.summaries([c.key for c in calls])
        w.handles[stage.name] = executor.submit(stage, calls, [done.get(c.key) for c in calls])
    if executor.runs:
        for name in list(w.handles):
            w.summaries(name)
    return w


@dataclass(frozen=True)
class Built:
    """A finished run: its summary (as sealed into the output's manifest), the report's
    inputs, the output, and whether this run wrote the output (else it was current)."""

    summary: dict
    report: Any  # reporting.run_report.ReportInputs (matplotlib is imported late)
    out: Output
    fresh: bool


def _write_output(w: Walk, out: Output, out_key: Key, fresh: bool) -> dict[str, list[dict]]:
    """Per output stage (``OUTPUT_STAGES``), its calls' results: the mixture's parts,
    each written from the pieces of every counts artifact with copies, the plan shard by
    shard and the rejects, all started together. When the output is current (not
    ``fresh``) every call is served as cached, the parts' rows from its manifest."""
    budget = w.summary("budget")
    buckets, slices = budget["buckets"], budget["slices"]
    holders = [
        k for k, c in zip(w.keys("counts"), w.summaries("counts"), strict=True) if c["pieces"]
    ]
    parts = [
        Call(out_key, f"part-{b:05d}", (b, holders, buckets, slices, out)) for b in range(buckets)
    ]
    rows = None if fresh else out.manifest()["summary"]["part_rows"]  # type: ignore[index]
    counts = enumerate(zip(w.shards, w.keys("counts"), strict=True))
    rejects = (w.keys("tokens"), w.keys("ids")[0], out)
    calls = {
        MATERIALISE: parts,
        PUBLISH_PLAN: [Call(out_key, s.shard_id, (i, k, out)) for i, (s, k) in counts],
        PUBLISH_REJECTS: [Call(out_key, "all", rejects)],
    }
    # A current output's files are all there: every call is served (cached), none runs.
    cached = {stage: [None if fresh else {}] * len(c) for stage, c in calls.items()}
    if rows is not None:
        cached[MATERIALISE] = [{"rows": n} for n in rows]
    handles = {stage: w.executor.submit(stage, c, cached[stage]) for stage, c in calls.items()}
    return {s.name: w.executor.collect(s, h) for s, h in handles.items()}  # type: ignore[misc]


def build(cfg: Config, store: Store, out: Output, executor: Executor, log: Log) -> Built:
    """Walk the graph for ``cfg`` with ``executor`` and publish the output: the mixture,
    the per-document plan, the rejects and the report files (when the output is not
    current already), then seal it with the run summary."""
    found = discover(cfg.corpus, cfg.storage.fsspec_options(cfg.corpus.input))
    log.info("%d shards under %s; store %s", len(found.shards), cfg.corpus.input, store.root)
    for line in passed_over_lines(found.passed_over):
        log.warning(line)
    w = walk(cfg, store, found.shards, executor, log)
    out_key = keys.output_key(w.keys("counts"), w.keys("budget")[0])
    fresh = not out.current(out_key)
    if fresh:
        out.clear()
    written = _write_output(w, out, out_key, fresh)
    inputs = summary.run_report_inputs(w, found.passed_over)
    from samplemix.reporting import run_report  # matplotlib: imported once the report is due

    if fresh:
        run_report.write_report(inputs, f"{out.url}/report", out.fs.storage_options)
    warnings = run_report.run_warnings(inputs)
    for line in warnings:
        log.warning(line)
    totals = summary.run_summary(w, inputs, written, warnings, out, out_key)
    out.seal(out_key, totals)
    log.info(
        "mixture: %d rows in %d parts; %d of %d target tokens (σ = %.0f)",
        totals["mixture_rows"],
        totals["mixture_parts"],
        totals["realised_tokens"],
        totals["target_tokens"],
        totals["sigma_tokens"],
    )
    return Built(totals, inputs, out, fresh)


def run(cfg: Config, executor: Callable[[Config, Store], Executor], log: Log) -> Built:
    """A whole mix run: hub models pinned to their commits for the run, store and
    output checked, then ``build`` while this run holds the output's lease."""
    cfg = keys.pinned_config(cfg)  # one commit per hub model for the whole run
    model_fingerprint.cache_clear()  # a model replaced since the last run must show
    store, out = keys.store_for(cfg), keys.output_for(cfg)
    store.check()
    out.check()  # a missing or refused output fails now, not after the compute
    with out.lease(cfg.output.lease_wait_s, log.info, log.warning):
        return build(cfg, store, out, executor(cfg, store), log)


class InProcess:
    """An executor that computes every call at once, in this process, in order."""

    runs = True

    def __init__(self, cfg: Config, store: Store) -> None:
        self.store = store

    def submit(self, stage: Stage, calls: list[Call], cached: list[dict | None]) -> list[dict]:
        return [
            {**call_result(stage, c, self.store, hit), "key": c.key}
            for c, hit in zip(calls, cached, strict=True)
        ]

    def collect(self, stage: Stage, handle: list[dict]) -> list[dict]:
        return handle

    def unknown(self, stage: Stage, shards: list[str | None], reason: str) -> None:
        raise AssertionError(f"{stage.name}: {reason}")  # a runner knows every result


def run_in_process(cfg: Config, log: Log | None = None) -> dict:
    """The mix run of ``cfg`` in this process, no Prefect, no Dask: the same artifacts,
    keys and output bytes as the flow. Returns the run summary."""
    return run(cfg, InProcess, log or logging.getLogger("samplemix")).summary
