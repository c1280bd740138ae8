"""What a run of a config would compute, and why, read from the store without running.

``plan_steps`` walks the stage graph as a run does (pipeline/walk.py), with the
same calls and keys. A key is known when everything it hashes is known: per-shard keys from
the config and the shard files, downstream keys from the summaries of committed
upstream artifacts. When an upstream artifact must be computed first, the
downstream keys cannot be known yet; those steps are "compute" with the reason
"after <stage>". A step's reason compares its key's parts with those of the newest
artifact committed for the same shard and stage (the store's ``_latest`` pointers).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from samplemix.config import Config
from samplemix.io.corpus import discover_shards
from samplemix.io.store import Key, Output, Store
from samplemix.pipeline import keys
from samplemix.pipeline.graph import GRAPH, MATERIALISE, OUTPUT_STAGES, Call, Stage
from samplemix.pipeline.walk import walk
from samplemix.scoring.models import model_fingerprint

STAGES = (*keys.STAGES, *(s.name for s in OUTPUT_STAGES))
UPSTREAM = {s.name for s in GRAPH} - {"counts"}  # the stages whose keys others' keys name


@dataclass(frozen=True)
class Step:
    """One task of a run: ``shard`` is None for a reduce (and for materialise)."""

    stage: str
    shard: str | None
    cached: bool
    reason: str
    key: Key | None = None


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted paths at which two JSON-like values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(old.keys() | new.keys(), key=str):
            out += _diff(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if old == new else [path]


def change_reason(store: Store, key: Key) -> str:
    """Why ``key`` is not in the store, in the words of ``samplemix plan``."""
    if store.has_files(key):
        return "incomplete artifact (interrupted run): recompute"
    prev = store.latest(key.stage, key.shard)
    if prev is None:
        return "new shard" if key.shard is not None else "no earlier result"
    old = prev["parts"]
    new = json.loads(json.dumps(key.parts, default=str))
    paths = _diff(old, new)
    if not paths:
        return "artifact removed (gc): recompute"
    version, shard, upstream, fields, weights = None, False, [], [], False
    for top in dict.fromkeys(p.split(".")[0] for p in paths):
        o, n = old.get(top), new.get(top)
        if top == "version":
            version = f"stage logic changed (version {o} -> {n})"
        elif top == "corpus" and "corpus.fingerprint" in paths:
            shard = True
        elif top == "model_weights":
            weights = True
        elif top in UPSTREAM and not isinstance(n, dict):  # upstream ids, not a config section
            if isinstance(n, list) and isinstance(o, list):
                upstream.append(f"{top} ({len(set(n) - set(o))} of {len(n)} shards)")
            else:
                upstream.append(top)
        else:
            fields += [p for p in paths if p.split(".")[0] == top]
    reasons = [version] if version else []
    reasons += ["shard file changed"] if shard else []
    reasons += ["config changed: " + ", ".join(fields)] if fields else []
    reasons += ["model weights changed"] if weights and not fields else []
    reasons += ["upstream changed: " + ", ".join(upstream)] if upstream else []
    return "; ".join(reasons)


class _Recorder:
    """The plan's executor: records each call as a step, cached or to compute with the
    reason, and gives back the committed summaries (None where there is none)."""

    runs = False

    def __init__(self, store: Store) -> None:
        self.store = store
        self.steps: list[Step] = []

    def submit(self, stage: Stage, calls: list[Call], cached: list[dict | None]) -> list:
        for c, hit in zip(calls, cached, strict=True):
            reason = "unchanged" if hit is not None else change_reason(self.store, c.key)
            reason += f"; {c.note}" if c.note else ""
            self.steps.append(Step(stage.name, c.key.shard, hit is not None, reason, c.key))
        return cached

    def collect(self, stage: Stage, handle: list) -> list:
        return handle

    def unknown(self, stage: Stage, shards: list[str | None], reason: str) -> None:
        self.steps += [Step(stage.name, s, False, reason) for s in shards]


def plan_steps(cfg: Config, store: Store, out: Output) -> list[Step]:
    """Every task a run of ``cfg`` would start, cached or to compute, with the reason:
    the graph walked as a run walks it (pipeline/walk.py), computing nothing."""
    model_fingerprint.cache_clear()  # a model replaced since the last call must show
    cfg = keys.pinned_config(cfg)
    shards = discover_shards(cfg.corpus, cfg.storage.fsspec_options(cfg.corpus.input))
    recorder = _Recorder(store)
    w = walk(cfg, store, shards, recorder, logging.getLogger("samplemix.plan"))
    if w.blocked is not None:  # the counts are not known yet: nor is the output
        recorder.unknown(MATERIALISE, [None], f"after {w.blocked}")
        return recorder.steps
    output = keys.output_key(w.keys("counts"), w.keys("budget")[0])
    current = out.current(output)
    reason = "unchanged" if current else f"output at {out.url} is from another run or incomplete"
    for stage in OUTPUT_STAGES:  # one step per part is unknown here: one for them all
        items = [s.shard_id for s in shards] if stage.per_shard else [None]
        recorder.steps += [Step(stage.name, i, current, reason, output) for i in items]
    return recorder.steps


def plan_rows(steps: list[Step]) -> list[tuple[str, int, str, str]]:
    """Steps grouped as (stage, tasks, "cached" | "compute", reason), in stage order."""
    groups: dict[tuple[str, str, str], int] = {}
    for s in steps:
        k = (s.stage, "cached" if s.cached else "compute", s.reason)
        groups[k] = groups.get(k, 0) + 1
    order = {name: i for i, name in enumerate(STAGES)}
    rows = [(st, n, status, why) for (st, status, why), n in groups.items()]
    return sorted(rows, key=lambda r: (order[r[0]], r[2] != "compute", r[3]))
