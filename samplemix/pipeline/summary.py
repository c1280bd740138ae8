"""A mix run's totals: the report's inputs and the per-shard accounting, from stage summaries."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from samplemix.io.corpus import PassedOver
from samplemix.io.store import Key, Output
from samplemix.mixing import methods
from samplemix.pipeline import keys
from samplemix.pipeline.keys import source_tokens
from samplemix.pipeline.stages import SPREAD_DOCS

if TYPE_CHECKING:
    from samplemix.pipeline.walk import Walk
    from samplemix.reporting.run_report import ReportInputs


def shard_accounting(shards: list[str], tokens: list[dict], ids: dict) -> list[dict]:
    """Per shard: rows read, accepted (planned) and rejected, with read = accepted +
    rejected (a shard where they disagree lost rows, which raises), renamed, and
    skipped_rows: None for a shard that was read; for one skipped whole
    (``corpus.on_bad_shard: skip``, read 0) its rows, or "unknown" when the file
    cannot tell (``run_tokens``)."""
    rows = []
    for shard, t in zip(shards, tokens, strict=True):
        dropped = ids["dropped"].get(shard, 0)
        skipped = t["skipped_rows"] if t["skipped_rows"] is not None else "unknown"
        row = {
            "shard": shard,
            "read": t["read"],
            "accepted": t["docs"] - dropped,
            "rejected": sum(t["rejects"].values()) + dropped,
            "renamed": ids["renamed"].get(shard, 0),
            "skipped_rows": skipped if t["skipped"] else None,
        }
        if row["read"] != row["accepted"] + row["rejected"]:
            raise RuntimeError(f"shard {shard}: rows read != accepted + rejected: {row}")
        rows.append(row)
    return rows


def report_inputs(
    shards: list[str],
    tokens: list[dict],
    ids: dict,
    truncated: dict[str, int],
    counts: list[dict],
    clusters: dict,
    target: int,
    settings: dict,
    passed_over: list[PassedOver] | None = None,
):  # noqa: ANN201 - ReportInputs, imported lazily (matplotlib is slow to import)
    """Combine the stage summaries (per shard in ``shards`` order: tokens, counts;
    the ids and clusters reduces) into the report's inputs. ``truncated``: documents
    each model read a prefix of, {"quality": n, "embed": n}; ``passed_over``: the
    files discovery did not take as shards (``corpus.discover``)."""
    from samplemix.reporting.run_report import ReportInputs

    rejects: Counter = Counter()
    for t in tokens:
        rejects.update(t["rejects"])
    dropped = sum(ids["dropped"].values())
    if dropped:
        rejects["duplicate_id"] += dropped
    docs_before: Counter = Counter()
    tokens_before: Counter = Counter()
    for c in counts:
        for d, v in c["domains"].items():
            docs_before[d] += v["docs_in"]
            tokens_before[d] += v["tokens_in"]
    docs_after: Counter = Counter({d: 0 for d in docs_before})
    tokens_after: Counter = Counter({d: 0 for d in docs_before})
    q: dict[str, list] = {d: [] for d in docs_before}
    dv: dict[str, list] = {d: [] for d in docs_before}
    hist: Counter = Counter()
    for c in counts:
        for d, v in c["domains"].items():
            docs_after[d] += v["copies"]
            tokens_after[d] += v["tokens"]
            q[d] += v["quality"]
            dv[d] += v["diversity"]
        hist.update({int(k): v for k, v in c["histogram"].items()})
    # Stable: among equal variances the earlier shard's documents come first.
    spread = sorted((d for c in counts for d in c["spread"]), key=lambda d: -d["variance"])
    return ReportInputs(
        target_tokens=target,
        source_tokens=source_tokens(tokens, ids),
        expected_tokens=sum(c["expected_tokens"] for c in counts),
        realised_tokens=sum(c["realised_tokens"] for c in counts),
        sigma_tokens=math.sqrt(max(sum(c["variance"] for c in counts), 0.0)),
        docs_before=dict(sorted(docs_before.items())),
        docs_after=dict(sorted(docs_after.items())),
        tokens_before=dict(sorted(tokens_before.items())),
        tokens_after=dict(sorted(tokens_after.items())),
        quality_by_domain={d: np.array(v) for d, v in sorted(q.items())},
        diversity_by_domain={d: np.array(v) for d, v in sorted(dv.items())},
        count_histogram=dict(sorted(hist.items())),
        overlap_domains=clusters["overlap_domains"],
        overlap=np.array(clusters["overlap"]),
        cluster_sizes=np.array(clusters["cluster_sizes"]),
        rejects=dict(sorted(rejects.items())),
        settings=settings,
        shards=shard_accounting(shards, tokens, ids),
        truncated=truncated,
        passed_over=[{"path": f.path, "reason": f.reason} for f in passed_over or []],
        spread=spread[:SPREAD_DOCS],
    )


def report_settings(w: Walk) -> dict:
    """What the report lists under Settings: the method's own, then the common ones."""
    cfg = w.cfg
    method = methods.method_of(cfg)
    reduce = w.summary(method.reduces[-1]) if method.reduces else None
    m = cfg.mixing
    return (
        {"method": m.method}
        | method.settings(cfg, reduce)
        | {
            "embed model": cfg.embed.model,
            "K": w.summary("kmeans")["k"],
            "seed": m.seed,
            "budget": f"{target_tokens(w):,} tokens",
            "max_repeats": m.max_repeats,
            "diversity": f"{cfg.diversity.form}/{cfg.diversity.separation}",
        }
    )


def target_tokens(w: Walk) -> int:
    """T_tgt of the walked run."""
    return keys.target_tokens(source_tokens(w.summaries("tokens"), w.summary("ids")), w.cfg)


def run_report_inputs(w: Walk, passed_over: list[PassedOver]):  # noqa: ANN201 - ReportInputs
    """The report's inputs from a finished walk's stage results."""
    labels = [q.label for q in w.cfg.quality]
    n = len(w.shards)
    quality = w.summaries("quality")
    truncated = {
        ("quality" if len(labels) == 1 else f"quality ({label})"): sum(
            r["truncated"] for r in quality[j * n : (j + 1) * n]
        )
        for j, label in enumerate(labels)
    }
    truncated["embedding"] = sum(r["truncated"] for r in w.summaries("embed"))
    return report_inputs(
        [s.shard_id for s in w.shards],
        w.summaries("tokens"),
        w.summary("ids"),
        truncated,
        w.summaries("counts"),
        w.summary("clusters"),
        target_tokens(w),
        report_settings(w),
        passed_over=passed_over,
    )


def run_summary(
    w: Walk,
    inputs: ReportInputs,
    written: dict[str, list[dict]],
    warnings: list[str],
    out: Output,
    key: Key,
) -> dict:
    """The run summary sealed into the output's manifest: budget figures, counts, the
    files written and, per stage (``written``: the output stages' results, by stage),
    tasks computed vs served from the store."""
    tok = w.summaries("tokens")
    mixture = written["materialise"]
    results = {name: w.summaries(name) for name in w.calls} | written
    artifacts = {str(c.key) for calls in w.calls.values() for c in calls}
    return {
        "target_tokens": inputs.target_tokens,
        "source_tokens": inputs.source_tokens,
        "expected_tokens": inputs.expected_tokens,
        "realised_tokens": inputs.realised_tokens,
        "sigma_tokens": inputs.sigma_tokens,
        "read": sum(r["read"] for r in tok),
        "documents": sum(r["docs"] for r in tok) - sum(w.summary("ids")["dropped"].values()),
        "rejects": sum(inputs.rejects.values()),
        "skipped_shards": sum(r["skipped"] for r in tok),
        "warnings": warnings,
        "clusters": w.summary("kmeans")["k"],
        "mixture_rows": sum(r["rows"] for r in mixture),
        "mixture_parts": len(mixture),
        "part_rows": [r["rows"] for r in mixture],
        "output": out.url,
        "store": w.store.root,
        "mixture_key": str(key),
        "computed": {s: sum(not r["cached"] for r in rs) for s, rs in results.items()},
        "cached": {s: sum(r["cached"] for r in rs) for s, rs in results.items()},
        # Wall seconds inside the tasks that computed, summed over tasks (worker time).
        "task_seconds": {s: round(sum(r["seconds"] for r in rs), 2) for s, rs in results.items()},
        "artifacts": sorted(artifacts),
    }
