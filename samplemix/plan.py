"""What a run of a config would compute, and why, read from the store without running.

``plan_steps`` walks the stage graph in the flow's order with the same key functions
(stages.py). A key is known when everything it hashes is known: per-shard keys from
the config and the shard files, downstream keys from the summaries of committed
upstream artifacts. When an upstream artifact must be computed first, the
downstream keys cannot be known yet; those steps are "compute" with the reason
"after <stage>". A step's reason compares its key's parts with those of the newest
artifact committed for the same shard and stage (the store's ``_latest`` pointers).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from samplemix import stages
from samplemix.config import Config
from samplemix.corpus import discover_shards
from samplemix.models import model_fingerprint
from samplemix.store import Key, Output, Store

STAGES = (*stages.STAGES, "materialise")
UPSTREAM = set(stages.STAGES) - {"counts"}  # the stages whose keys others' keys name


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


class _Walker:
    """Collects the steps of one stage at a time."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.steps: list[Step] = []

    def stage(self, keys: list[Key]) -> list[dict | None]:
        """Record the steps of ``keys``; return each one's summary, None when uncached."""
        done = self.store.summaries(keys)
        for k in keys:
            reason = "unchanged" if k in done else change_reason(self.store, k)
            self.steps.append(Step(k.stage, k.shard, k in done, reason, k))
        return [done.get(k) for k in keys]

    def unknown(self, stage: str, shards: list[str | None], after: str) -> None:
        self.steps += [Step(stage, s, False, f"after {after}") for s in shards]


def plan_steps(cfg: Config, store: Store, out: Output) -> list[Step]:
    """Every task a run of ``cfg`` would start, cached or to compute, with the reason."""
    model_fingerprint.cache_clear()  # a model replaced since the last call must show
    cfg = stages.pinned_config(cfg)
    shards = discover_shards(cfg.corpus, cfg.storage.fsspec_options(cfg.corpus.input))
    ids: list[str | None] = [s.shard_id for s in shards]
    w = _Walker(store)
    tok_keys = [stages.tokens_key(s, cfg) for s in shards]
    qual_keys = [[stages.quality_key(s, q, cfg) for q in cfg.quality] for s in shards]
    embed = [stages.embed_key(s, cfg) for s in shards]
    tok = w.stage(tok_keys)
    ids_key = stages.ids_key(tok_keys, cfg)
    dups = w.stage([ids_key])[0]
    qual = w.stage([k for per_shard in qual_keys for k in per_shard])
    w.stage(embed)

    docs = [None if t is None else t["docs"] for t in tok]
    km, why = stages.kmeans_to_use(store, embed, docs, cfg)
    if km is None:
        w.steps.append(Step("kmeans", None, False, why))
        for stage in ("assign", "clusters", "weights", "budget", "counts", "materialise"):
            per_shard = stage in ("assign", "weights", "counts")
            w.unknown(stage, ids if per_shard else [None], "kmeans")
        return w.steps
    w.stage([km])
    if why != "fit over all shards":
        last = w.steps[-1]
        w.steps[-1] = Step("kmeans", None, last.cached, f"{last.reason}; {why}", km)
    assign = [stages.assign_key(e, km) for e in embed]
    w.stage(assign)
    cl = stages.clusters_key(assign, cfg)
    w.stage([cl])

    if any(q is None for q in qual):
        w.unknown("weights", ids, "quality")
        for stage in ("budget", "counts", "materialise"):
            w.unknown(stage, ids if stage == "counts" else [None], "quality")
        return w.steps
    q_range = stages.quality_range(qual[:: len(cfg.quality)])  # type: ignore[arg-type]
    method = cfg.mixing.method
    method_key = None
    if method == "quadmix":
        if any(t is None for t in tok):
            for stage in ("ranks", "weights", "budget", "counts", "materialise"):
                per_shard = stage in ("weights", "counts")
                w.unknown(stage, ids if per_shard else [None], "tokens")
            return w.steps
        domain_docs: Counter[str] = Counter()
        for t in tok:
            domain_docs.update(t["domain_docs"])  # type: ignore[index]
        params = stages.quadmix_params(cfg, sorted(domain_docs)).to_dict()
        method_key = stages.ranks_key(tok_keys, ids_key, qual_keys, params, cfg)
        w.stage([method_key])
    elif method in stages.BASELINES:
        bigram_keys = None
        if method == "ce":
            bigram_keys = [stages.bigrams_key(k) for k in tok_keys]
            w.stage(bigram_keys)
        method_key = stages.domains_key(tok_keys, ids_key, bigram_keys)
        w.stage([method_key])
    weights = [
        stages.weights_key(t, ids_key, q, a, cl, q_range, cfg, method_key)
        for t, q, a in zip(tok_keys, qual_keys, assign, strict=True)
    ]
    w.stage(weights)
    if dups is None:  # computed after every shard's tokens
        w.unknown("budget", [None], "ids")
        w.unknown("counts", ids, "ids")
        w.unknown("materialise", [None], "ids")
        return w.steps
    target = stages.target_tokens(stages.source_tokens(tok, dups), cfg)  # type: ignore[arg-type]
    budget = stages.budget_key(weights, target, cfg)
    w.stage([budget])
    counts = [stages.counts_key(k, budget, cfg) for k in weights]
    w.stage(counts)
    output = stages.output_key(counts, budget)
    current = out.current(output)
    w.steps.append(
        Step(
            "materialise",
            None,
            current,
            "unchanged" if current else f"output at {out.url} is from another run or incomplete",
            output,
        )
    )
    return w.steps


def plan_rows(steps: list[Step]) -> list[tuple[str, int, str, str]]:
    """Steps grouped as (stage, tasks, "cached" | "compute", reason), in stage order."""
    groups: dict[tuple[str, str, str], int] = {}
    for s in steps:
        k = (s.stage, "cached" if s.cached else "compute", s.reason)
        groups[k] = groups.get(k, 0) + 1
    order = {name: i for i, name in enumerate(STAGES)}
    rows = [(st, n, status, why) for (st, status, why), n in groups.items()]
    return sorted(rows, key=lambda r: (order[r[0]], r[2] != "compute", r[3]))
