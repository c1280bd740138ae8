"""The pipeline's stages, each one shard (map) or one reduce, with their store I/O.

Every ``*_key`` function names exactly what determines a stage's artifact (see
design.md, "Cache keys"); every ``run_*`` function computes the artifact, writes it
to the store, commits it, and returns its summary (small and JSON-able). The
orchestrator (flows/, or a notebook) decides what to run; nothing here looks at
the cache.

Artifacts per shard are aligned with the shard's accepted documents in file order.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from samplemix import diversity as div
from samplemix import kmeans, materialise, mixing
from samplemix.config import Config
from samplemix.corpus import DOCS_SCHEMA, REJECTS_SCHEMA, CorpusError, Shard, ShardDocs, read_shard
from samplemix.embed import embed_texts
from samplemix.models import model_fingerprint, resolve_device, resolve_dtype
from samplemix.quality import make_scorer
from samplemix.store import Store, artifact_key
from samplemix.tokens import token_counts

# Bump a stage's version when its logic changes: its artifacts and all downstream recompute.
VERSIONS = {
    "tokens": "1",
    "quality": "1",
    "embed": "1",
    "kmeans": "1",
    "assign": "1",
    "clusters": "1",
    "weights": "1",
    "budget": "1",
    "counts": "1",
}
REPORT_SAMPLE = 500  # raw q and d values kept per shard and domain for the report's plots


def tokenizer_name(cfg: Config) -> str:
    return cfg.tokens.tokenizer or cfg.embed.model


def _corpus_part(shard: Shard, cfg: Config) -> dict:
    c = cfg.corpus
    return {
        "shard": shard.shard_id,
        "folder_domain": shard.domain,
        "fingerprint": shard.fingerprint,
        "columns": [c.text_column, c.id_column, c.domain_column],
        "on_bad_shard": c.on_bad_shard,
    }


# ---- keys -------------------------------------------------------------------------------


def tokens_key(shard: Shard, cfg: Config) -> str:
    name = tokenizer_name(cfg)
    return artifact_key(
        "tokens",
        VERSIONS["tokens"],
        corpus=_corpus_part(shard, cfg),
        tokenizer=name,
        weights=model_fingerprint(name),
    )


def quality_key(shard: Shard, cfg: Config) -> str:
    q = cfg.quality.model_dump(exclude={"batch_tokens", "device"})
    fp = model_fingerprint(q["model"]) if q["model"] else None
    return artifact_key(
        "quality", VERSIONS["quality"], corpus=_corpus_part(shard, cfg), quality=q, weights=fp
    )


def embed_key(shard: Shard, cfg: Config) -> str:
    e = cfg.embed.model_dump(exclude={"batch_tokens", "device"})
    # The precision actually used, so fp32 CPU and bf16 GPU embeddings never share a key.
    e["dtype"] = str(resolve_dtype(cfg.embed.dtype, resolve_device(cfg.embed.device)))
    return artifact_key(
        "embed",
        VERSIONS["embed"],
        corpus=_corpus_part(shard, cfg),
        embed=e,
        weights=model_fingerprint(cfg.embed.model),
    )


def kmeans_key(embed_keys: list[str], cfg: Config) -> str:
    return artifact_key(
        "kmeans", VERSIONS["kmeans"], embed=embed_keys, kmeans=cfg.kmeans.model_dump()
    )


def assign_key(embed: str, kmeans_: str) -> str:
    return artifact_key("assign", VERSIONS["assign"], embed=embed, kmeans=kmeans_)


def clusters_key(assign_keys: list[str], cfg: Config) -> str:
    return artifact_key(
        "clusters", VERSIONS["clusters"], assign=assign_keys, diversity=cfg.diversity.model_dump()
    )


def weights_key(
    tokens: str, quality: str, assign: str, clusters: str, q_range: list[float], cfg: Config
) -> str:
    m = cfg.mixing
    return artifact_key(
        "weights",
        VERSIONS["weights"],
        tokens=tokens,
        quality=quality,
        assign=assign,
        clusters=clusters,
        q_range=q_range,
        alpha=m.alpha,
        epsilon=m.epsilon,
    )


def budget_key(weights_keys: list[str], target: int, cfg: Config) -> str:
    return artifact_key(
        "budget",
        VERSIONS["budget"],
        weights=weights_keys,
        target=target,
        max_repeats=cfg.mixing.max_repeats,
        rows_per_shard=cfg.output.rows_per_shard,
    )


def counts_key(weights: str, budget: str, cfg: Config) -> str:
    return artifact_key(
        "counts", VERSIONS["counts"], weights=weights, budget=budget, seed=cfg.mixing.seed
    )


# ---- per-shard map stages ---------------------------------------------------------------


def read_docs(shard: Shard, cfg: Config) -> ShardDocs:
    """The shard's documents; an unreadable shard under ``on_bad_shard: skip`` reads as
    no documents and one reject row (row −1, reason ``unreadable_shard``)."""
    try:
        return read_shard(shard, cfg.corpus)
    except CorpusError as e:
        if cfg.corpus.on_bad_shard == "error":
            raise
        rejects = pa.table(
            {
                "shard": [shard.shard_id],
                "row": [-1],
                "reason": ["unreadable_shard"],
                "detail": [str(e)],
            },
            schema=REJECTS_SCHEMA,
        )
        return ShardDocs(DOCS_SCHEMA.empty_table(), rejects)


def _texts(shard: Shard, cfg: Config) -> list[str]:
    return read_docs(shard, cfg).docs.column("text").to_pylist()


def run_tokens(shard: Shard, cfg: Config, store: Store, key: str) -> dict:
    """Index the shard (row, id, domain, tokens) and record its rejects.

    Summary: docs, tokens, rejects {reason: count}, domain_docs, domain_tokens.
    """
    sd = read_docs(shard, cfg)
    texts = sd.docs.column("text").to_pylist()
    n_tok = token_counts(texts, tokenizer_name(cfg))
    index = sd.docs.drop_columns(["text"]).append_column("tokens", pa.array(n_tok))
    store.put_table("tokens", key, "index.parquet", index)
    store.put_table("tokens", key, "rejects.parquet", sd.rejects)
    domains = index.column("domain").to_pylist()
    domain_tokens: Counter[str] = Counter()
    for d, t in zip(domains, n_tok.tolist(), strict=True):
        domain_tokens[d] += t
    return store.commit(
        "tokens",
        key,
        {
            "docs": len(texts),
            "tokens": int(n_tok.sum()),
            "rejects": dict(Counter(sd.rejects.column("reason").to_pylist())),
            "domain_docs": dict(Counter(domains)),
            "domain_tokens": dict(domain_tokens),
        },
    )


def run_quality(shard: Shard, cfg: Config, store: Store, key: str) -> dict:
    """q(x) for every accepted document. Summary: min, max (None when empty)."""
    q = make_scorer(cfg.quality).score(_texts(shard, cfg)).astype(np.float64)
    if not np.isfinite(q).all():
        row = int(np.flatnonzero(~np.isfinite(q))[0])
        raise ValueError(
            f"quality scorer {cfg.quality.scorer!r} returned {q[row]} for document {row} "
            f"(accepted-document order) of shard {shard.path}; scores must be finite"
        )
    store.put_array("quality", key, "quality.npy", q)
    empty = len(q) == 0
    return store.commit(
        "quality",
        key,
        {
            "min": None if empty else float(q.min()),
            "max": None if empty else float(q.max()),
        },
    )


def run_embed(shard: Shard, cfg: Config, store: Store, key: str) -> dict:
    """L2-normalised embeddings, float32 (n, dim). Summary: docs, dim."""
    e = embed_texts(_texts(shard, cfg), cfg.embed)
    store.put_array("embed", key, "embeddings.npy", e)
    return store.commit("embed", key, {"docs": int(e.shape[0]), "dim": int(e.shape[1])})


# ---- k-means and diversity -------------------------------------------------------------


def cluster_count(n_docs: int, cfg: Config) -> int:
    return kmeans.auto_k(n_docs) if cfg.kmeans.k == "auto" else int(cfg.kmeans.k)


def run_kmeans(
    parts: list[tuple[str, str]], n_docs: int, cfg: Config, store: Store, key: str
) -> dict:
    """Fit centroids on a sample of at most max_points_per_centroid·K embeddings.

    ``parts`` = (tokens key, embed key) per shard. A document is in the sample when
    its id's uniform is below the sampling rate, so the sample does not depend on
    how the corpus is sharded. Summary: k, sample.
    """
    k = cluster_count(n_docs, cfg)
    if n_docs < k:
        raise ValueError(
            f"{n_docs} documents cannot form kmeans.k = {k} clusters; k-means needs at "
            "least 2 documents and kmeans.k <= the number of documents"
        )
    rate = min(1.0, cfg.kmeans.max_points_per_centroid * k / max(n_docs, 1))
    keys, chunks = [], []
    for tok, emb in parts:
        ids = store.get_table("tokens", tok, "index.parquet", columns=["id"]).column("id")
        u = mixing.doc_uniforms(ids.to_pylist(), cfg.kmeans.seed, "kmeans")
        take = u < rate
        if take.any():
            keys.append(u[take])
            chunks.append(np.asarray(store.get_array("embed", emb, "embeddings.npy")[take]))
    if not chunks:
        raise ValueError("no embeddings to fit k-means on")
    # Ordered by the ids' uniforms, the sample (and so FAISS's seeded initialisation)
    # is the same however the corpus is sharded.
    sample = np.concatenate(chunks)[np.argsort(np.concatenate(keys), kind="stable")]
    centroids = kmeans.fit_centroids(sample, k, cfg.kmeans.niter, cfg.kmeans.seed, cfg.kmeans.nredo)
    store.put_array("kmeans", key, "centroids.npy", centroids)
    return store.commit("kmeans", key, {"k": k, "sample": int(len(sample))})


def run_assign(tok: str, emb: str, km: str, store: Store, key: str) -> dict:
    """Nearest centroid and cosine distance per document; per-cluster partial sums."""
    centroids = store.get_array("kmeans", km, "centroids.npy")
    cluster, dist = kmeans.assign(store.get_array("embed", emb, "embeddings.npy"), centroids)
    domains = store.get_table("tokens", tok, "index.parquet", columns=["domain"])
    p = div.cluster_partials(
        cluster, dist, domains.column("domain").to_numpy(zero_copy_only=False), len(centroids)
    )
    store.put_table(
        "assign", key, "assign.parquet", pa.table({"cluster": cluster, "distance": dist})
    )
    store.put_arrays(
        "assign",
        key,
        "partials.npz",
        count=p.count,
        dist_sum=p.dist_sum,
        dist_min=p.dist_min,
        dist_max=p.dist_max,
        **{f"domain:{d}": c for d, c in p.by_domain.items()},
    )
    return store.commit("assign", key, {"docs": int(len(cluster))})


def load_partials(store: Store, assign: str) -> div.ClusterPartials:
    a = store.get_arrays("assign", assign, "partials.npz")
    by_domain = {k.split(":", 1)[1]: v for k, v in a.items() if k.startswith("domain:")}
    return div.ClusterPartials(a["count"], a["dist_sum"], a["dist_min"], a["dist_max"], by_domain)


def run_clusters(assign_keys: list[str], km: str, cfg: Config, store: Store, key: str) -> dict:
    """Compactness, separation and the cross-domain overlap from all shards' partials.

    Summary: d_min, d_max, k, nonempty, overlap_domains, overlap (D×D list).
    """
    p = div.merge_partials([load_partials(store, a) for a in assign_keys])
    stats = div.cluster_stats(p, store.get_array("kmeans", km, "centroids.npy"), cfg.diversity)
    domains, overlap = div.overlap_matrix(p.by_domain)
    store.put_arrays(
        "clusters",
        key,
        "stats.npz",
        count=stats.count,
        compactness=stats.compactness,
        separation=stats.separation,
    )
    return store.commit(
        "clusters",
        key,
        {
            "d_min": stats.d_min,
            "d_max": stats.d_max,
            "k": int(len(stats.count)),
            "nonempty": int((stats.count > 0).sum()),
            "cluster_sizes": stats.count.tolist(),
            "overlap_domains": domains,
            "overlap": overlap.tolist(),
        },
    )


# ---- weights, budget, counts -----------------------------------------------------------


def run_weights(
    tok: str,
    qual: str,
    assign: str,
    clusters: str,
    q_range: list[float],
    d_range: list[float],
    cfg: Config,
    store: Store,
    key: str,
) -> dict:
    """d(x) and w(x) per document. Summary: wl = Σ w·len, w_sum = Σ w."""
    stats = store.get_arrays("clusters", clusters, "stats.npz")
    a = store.get_table("assign", assign, "assign.parquet")
    d = div.diversity_values(
        a.column("cluster").to_numpy(),
        a.column("distance").to_numpy(),
        stats["compactness"],
        stats["separation"],
        cfg.diversity,
    )
    q = store.get_array("quality", qual, "quality.npy")
    w = mixing.sample_weights(
        q, d, tuple(q_range), tuple(d_range), cfg.mixing.alpha, cfg.mixing.epsilon
    )
    n_tok = store.get_table("tokens", tok, "index.parquet", columns=["tokens"])
    n_tok = n_tok.column("tokens").to_numpy()
    store.put_arrays("weights", key, "weights.npz", diversity=d, weight=w)
    return store.commit(
        "weights",
        key,
        {
            "wl": float(np.dot(w, n_tok)),
            "w_sum": float(w.sum()),
        },
    )


def target_tokens(source_tokens: int, cfg: Config) -> int:
    """T_tgt: the configured budget, or budget_ratio (default 1.0) × T_src."""
    if cfg.mixing.budget is not None:
        return cfg.mixing.budget
    return round((cfg.mixing.budget_ratio or 1.0) * source_tokens)


def run_budget(
    parts: list[tuple[str, str]], target: int, cfg: Config, store: Store, key: str
) -> dict:
    """The scale s that fills ``target`` tokens, from (tokens key, weights key) per shard.

    Summary: scale, expected_rows = Σ c(x), buckets (output shards).
    """

    def wl() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for tok, wk in parts:
            w = store.get_arrays("weights", wk, "weights.npz")["weight"]
            n = store.get_table("tokens", tok, "index.parquet", columns=["tokens"])
            yield w, n.column("tokens").to_numpy()

    scale = mixing.budget_scale(wl, target, cfg.mixing.max_repeats)
    rows = sum(
        float(mixing.expected_counts(w, scale, cfg.mixing.max_repeats).sum()) for w, _ in wl()
    )
    buckets = materialise.bucket_count(rows, cfg.output.rows_per_shard)
    return store.commit("budget", key, {"scale": scale, "expected_rows": rows, "buckets": buckets})


def run_counts(
    shard: Shard,
    tok: str,
    qual: str,
    assign: str,
    weights: str,
    budget: dict,
    cfg: Config,
    store: Store,
    key: str,
) -> dict:
    """c(x) and n(x); the shard's plan and its copies scattered into output buckets.

    Summary: sums for the budget check (expected, realised, variance), per-domain
    copies and tokens selected, the histogram of n, and a bounded sample of raw q and
    d per domain for the report.
    """
    index = store.get_table("tokens", tok, "index.parquet")
    ids = index.column("id").to_pylist()
    n_tok = index.column("tokens").to_numpy()
    wz = store.get_arrays("weights", weights, "weights.npz")
    q = store.get_array("quality", qual, "quality.npy")
    c = mixing.expected_counts(wz["weight"], budget["scale"], cfg.mixing.max_repeats)
    n = mixing.realised_counts(c, ids, cfg.mixing.seed)
    cluster = store.get_table("assign", assign, "assign.parquet", columns=["cluster"])
    plan = pa.table(
        {
            "id": index.column("id"),
            "domain": index.column("domain"),
            "tokens": n_tok,
            "quality": q,
            "diversity": wz["diversity"],
            "weight": wz["weight"],
            "expected_count": c,
            "count": n,
            "cluster": cluster.column("cluster"),
            "shard": pa.array([shard.shard_id] * len(ids), pa.string()),
            "row": index.column("row"),
        }
    )
    store.put_table("counts", key, "plan.parquet", plan)
    buckets: list[int] = []
    if n.any():
        docs = read_docs(shard, cfg).docs
        mix_docs = pa.table(
            {
                "id": index.column("id"),
                "domain": index.column("domain"),
                "text": docs.column("text"),
                "quality": q,
                "diversity": wz["diversity"],
                "weight": wz["weight"],
            }
        )
        for b, part in materialise.scatter(mix_docs, n, budget["buckets"], cfg.mixing.seed).items():
            store.put_table("counts", key, f"bucket-{b:05d}.parquet", part)
            buckets.append(b)
    return store.commit("counts", key, {**_counts_summary(plan, ids, cfg), "buckets": buckets})


def _counts_summary(plan: pa.Table, ids: list[str], cfg: Config) -> dict:
    c = plan.column("expected_count").to_numpy()
    n = plan.column("count").to_numpy()
    n_tok = plan.column("tokens").to_numpy().astype(np.float64)
    domains = plan.column("domain").to_numpy(zero_copy_only=False)
    u = mixing.doc_uniforms(ids, cfg.mixing.seed, "report")
    per_domain = {}
    for d in np.unique(domains):
        m = domains == d
        keep = np.flatnonzero(m)[np.argsort(u[m])[:REPORT_SAMPLE]]
        per_domain[str(d)] = {
            "copies": int(n[m].sum()),
            "tokens": int((n[m] * n_tok[m]).sum()),
            "quality": plan.column("quality").to_numpy()[keep].tolist(),
            "diversity": plan.column("diversity").to_numpy()[keep].tolist(),
        }
    values, freq = np.unique(n, return_counts=True)
    return {
        "expected_tokens": float(np.dot(c, n_tok)),
        "realised_tokens": int(np.dot(n, n_tok)),
        "variance": mixing.rounding_variance(c, n_tok),
        "histogram": {str(v): int(f) for v, f in zip(values.tolist(), freq.tolist(), strict=True)},
        "domains": per_domain,
    }


def run_gather(bucket: int, counts_keys: list[str], store: Store, out: str) -> dict:
    """Write mixture shard ``bucket`` to ``out`` (a path or URL) from the counts
    artifacts that hold copies in that bucket. Summary: rows."""
    name = f"bucket-{bucket:05d}.parquet"
    table = materialise.gather([store.get_table("counts", ck, name) for ck in counts_keys])
    write_parquet(table, f"{out}/mixture/part-{bucket:05d}.parquet", store.storage_options)
    return {"rows": table.num_rows}


def write_parquet(table: pa.Table, url: str, storage_options: dict) -> None:
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def run_publish(counts_keys: list[str], tokens_keys: list[str], store: Store, out: str) -> dict:
    """Write the per-document plan (one part per source shard, in shard order) and all
    rejects to ``out``. Summary: plan_parts, rejects."""
    for i, ck in enumerate(counts_keys):
        write_parquet(
            store.get_table("counts", ck, "plan.parquet"),
            f"{out}/plan/part-{i:05d}.parquet",
            store.storage_options,
        )
    rejects = pa.concat_tables(
        [store.get_table("tokens", tk, "rejects.parquet") for tk in tokens_keys]
    ).cast(REJECTS_SCHEMA)
    write_parquet(rejects, f"{out}/rejects/rejects.parquet", store.storage_options)
    return {"plan_parts": len(counts_keys), "rejects": rejects.num_rows}


def report_inputs(
    tokens: list[dict], counts: list[dict], clusters: dict, target: int, settings: dict
):  # noqa: ANN201 - ReportInputs, imported lazily (matplotlib is slow to import)
    """Combine the stage summaries into the report's inputs."""
    from samplemix.report import ReportInputs

    docs_before: Counter = Counter()
    tokens_before: Counter = Counter()
    rejects: Counter = Counter()
    for t in tokens:
        docs_before.update(t["domain_docs"])
        tokens_before.update(t["domain_tokens"])
        rejects.update(t["rejects"])
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
    return ReportInputs(
        target_tokens=target,
        source_tokens=sum(t["tokens"] for t in tokens),
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
    )
