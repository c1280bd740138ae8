"""The mix pipeline's stage functions: each computes one shard (map) or one reduce.

Every ``run_*`` function computes its artifact, writes it to the store, commits it
and returns its summary (small and JSON-able); its key comes from pipeline/keys.py and
the graph (pipeline/graph.py) says when it runs. Nothing here looks at the cache.

Artifacts per shard are aligned with the shard's accepted documents in file order.
"""

from __future__ import annotations

import ctypes
from collections import Counter
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from samplemix.config import Config, QualityConfig
from samplemix.io import duplicate_ids as dup
from samplemix.io import mixture_shards as materialise
from samplemix.io.corpus import REJECTS_SCHEMA, Shard, count_rows, read_docs
from samplemix.io.store import Key, Output, Store
from samplemix.mixing import baselines, kmeans, methods, quadmix
from samplemix.mixing import diversity as div
from samplemix.mixing import weights as mixing
from samplemix.mixing.methods import WeightInputs
from samplemix.pipeline.keys import quadmix_params, tokenizer_name
from samplemix.scoring.embed import embed_texts, truncated_count
from samplemix.scoring.models import (
    resolve_device,
    resolve_dtype,
    set_torch_threads,
)
from samplemix.scoring.probe import Probe, fit_probe
from samplemix.scoring.quality import DomainClassifier, Scorer, make_scorer
from samplemix.scoring.reference import ReferenceModel, fit_reference
from samplemix.scoring.static_embed import is_static
from samplemix.scoring.tokens import token_counts, token_ids

# glibc's malloc_trim, None elsewhere (macOS, musl): see release_free_memory.
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)


def release_free_memory() -> None:
    """Hand back to the OS the memory that earlier tasks on this worker freed but the
    allocators kept (Arrow's pool, glibc's heap: ~145 MiB after a 10^4-document run in
    one process), so that a reduce that allocates hundreds of MiB peaks at its own need
    plus the libraries, not on top of every earlier shard's leftovers. Costs a few ms;
    called before the large allocations only (the per-shard tasks reuse that memory)."""
    pa.default_memory_pool().release_unused()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# Raw q and d values the report's plots draw on, per domain over the whole corpus (in
# expectation): each shard keeps a domain's documents at the rate report_rates gives, so
# the flow, which gathers them, holds the same few whatever the corpus's size.
REPORT_SAMPLE = 20_000


def report_rates(tokens: list[dict]) -> dict[str, float]:
    """Per domain, the share of its documents whose raw q and d the counts stage keeps
    for the report: min(1, REPORT_SAMPLE / documents of the domain), from the tokens
    stage's summaries (documents before duplicate ids are dropped). Rounded to 6
    significant digits, as they enter the counts' keys."""
    docs: Counter[str] = Counter()
    for t in tokens:
        docs.update(t["domain_docs"])
    return {d: float(f"{min(1.0, REPORT_SAMPLE / n):.6g}") for d, n in sorted(docs.items())}


# Documents kept with the largest rounding variance f(1−f)·len², per shard and then
# overall (the overall top ones are among the shards' top ones), so that the report can
# name the few that make a realised total miss its target.
SPREAD_DOCS = 10


def _texts(shard: Shard, cfg: Config) -> list[str]:
    return read_docs(shard, cfg).docs.column("text").to_pylist()


def run_tokens(shard: Shard, cfg: Config, store: Store, key: Key) -> dict:
    """Index the shard (row, id, domain, tokens, bytes: what a copy weighs in the
    mixture, ``mixture_shards.copy_bytes``), hash its ids (id_hashes.npy, for the ids
    reduce) and record its rejects.

    Summary: read (rows read = docs + rejected rows), docs, tokens, rejects
    {reason: count} of rejected rows, domain_docs, domain_tokens, skipped (the shard
    was skipped whole, ``read_docs``) and skipped_rows (a skipped shard's rows counted
    without reading them, ``corpus.count_rows``; None when it cannot tell, or not
    skipped).
    """
    sd = read_docs(shard, cfg)
    texts = sd.docs.column("text").to_pylist()
    n_tok = token_counts(texts, tokenizer_name(cfg))
    index = sd.docs.drop_columns(["text"]).append_column("tokens", pa.array(n_tok))
    if cfg.corpus.domain_model:
        labels = DomainClassifier(cfg.corpus.domain_model, cfg.corpus.domain_max_length)
        column = index.schema.get_field_index("domain")
        index = index.set_column(column, "domain", pa.array(labels.labels(texts), pa.string()))
    sized = index.select(["id", "domain"]).append_column("text", sd.docs.column("text"))
    index = index.append_column("bytes", materialise.copy_bytes(sized))
    store.put_table(key, "index.parquet", index)
    store.put_array(key, "id_hashes.npy", dup.id_hashes(index.column("id").to_pylist()))
    store.put_table(key, "rejects.parquet", sd.rejects)
    domains = index.column("domain").to_pylist()
    domain_tokens: Counter[str] = Counter()
    for d, t in zip(domains, n_tok.tolist(), strict=True):
        domain_tokens[d] += t
    # A skipped shard's record names the file, not a row: it is not a rejected row.
    rejects = {} if sd.skipped else dict(Counter(sd.rejects.column("reason").to_pylist()))
    skipped_rows = count_rows(shard, cfg.storage.fsspec_options(shard.path)) if sd.skipped else None
    return store.commit(
        key,
        {
            "read": sd.read,
            "docs": len(texts),
            "tokens": int(n_tok.sum()),
            "rejects": rejects,
            "domain_docs": dict(Counter(domains)),
            "domain_tokens": dict(domain_tokens),
            "skipped": sd.skipped,
            "skipped_rows": skipped_rows,
        },
    )


def run_ids(tokens: list[Key], n_docs: int, cfg: Config, store: Store, key: Key) -> dict:
    """Documents whose id another document has, resolved by ``corpus.duplicate_ids``
    (io/duplicate_ids.py), from every shard's id hashes (``tokens``, in shard order; ``n_docs`` in
    all), in passes that bound what it holds (``duplicate_ids.pass_count``).

    Writes duplicates.parquet (duplicate_ids.DUPLICATES_SCHEMA). Summary: dropped,
    renamed, dropped_tokens, each {shard: count} over the shards that have any.
    """

    release_free_memory()  # a pass holds up to duplicate_ids.PASS_BYTES

    def rows_of(i: int, positions: np.ndarray) -> tuple[list[str], np.ndarray]:
        t = store.get_table(tokens[i], "index.parquet", columns=["id", "row"])
        t = t.take(pa.array(positions))
        return t.column("id").to_pylist(), t.column("row").to_numpy()

    def hashes_of(i: int) -> np.ndarray:
        return store.get_array(tokens[i], "id_hashes.npy")

    shards = [str(k.shard) for k in tokens]
    table = dup.duplicates(shards, hashes_of, n_docs, rows_of, cfg.corpus.duplicate_ids)
    store.put_table(key, "duplicates.parquet", table)
    dropped: Counter[str] = Counter()
    renamed: Counter[str] = Counter()
    dropped_tokens: Counter[str] = Counter()
    shard_index = {name: i for i, name in enumerate(shards)}
    rows = table.to_pydict()
    drops: dict[str, list[int]] = {}
    for shard, position, action in zip(
        rows["shard"], rows["position"], rows["action"], strict=True
    ):
        if action == "drop":
            dropped[shard] += 1
            drops.setdefault(shard, []).append(position)
        else:
            renamed[shard] += 1
    for shard, positions in drops.items():
        index = store.get_table(tokens[shard_index[shard]], "index.parquet", columns=["tokens"])
        dropped_tokens[shard] = int(index.column("tokens").to_numpy()[positions].sum())
    return store.commit(
        key,
        {
            "dropped": dict(dropped),
            "renamed": dict(renamed),
            "dropped_tokens": {k: v for k, v in dropped_tokens.items() if v},
        },
    )


def shard_duplicates(store: Store, ids: Key, shard: str) -> tuple[np.ndarray, dict[int, str]]:
    """The positions of ``shard``'s dropped documents and {position: new id} of its
    renamed ones, from the ids artifact."""
    t = store.get_table(ids, "duplicates.parquet")
    t = t.filter(pc.equal(t.column("shard"), shard)).to_pydict()
    rows = list(zip(t["position"], t["action"], t["new_id"], strict=True))
    drop = np.array([p for p, a, _ in rows if a == "drop"], dtype=np.int64)
    return drop, {p: n for p, a, n in rows if a == "rename"}


def run_bigrams(shard: Shard, tok: Key, cfg: Config, store: Store, key: Key) -> dict:
    """Token bigram counts per domain (for the CE baseline; domains as the shard's index
    ``tok`` has them): bigrams.parquet with columns domain, prev, next, count.
    Summary: bigrams (rows)."""
    texts = read_docs(shard, cfg).docs.column("text").to_pylist()
    domains = store.get_table(tok, "index.parquet", columns=["domain"]).column("domain")
    counts: dict[str, Counter] = {}
    for d, ids in zip(domains.to_pylist(), token_ids(texts, tokenizer_name(cfg)), strict=True):
        counts.setdefault(d, Counter()).update(baselines.bigram_counts([ids]))
    rows = [(d, a, b, c) for d, cd in counts.items() for (a, b), c in cd.items()]
    table = pa.table(
        {
            "domain": pa.array([r[0] for r in rows], pa.string()),
            "prev": pa.array([r[1] for r in rows], pa.int64()),
            "next": pa.array([r[2] for r in rows], pa.int64()),
            "count": pa.array([r[3] for r in rows], pa.int64()),
        }
    )
    store.put_table(key, "bigrams.parquet", table)
    return store.commit(key, {"bigrams": table.num_rows})


def run_domains(
    tokens: list[Key], ids: Key, bigrams: list[Key] | None, store: Store, key: Key
) -> dict:
    """What the domain-wise baselines need: tokens per domain over the accepted
    documents (duplicates dropped excluded) and, given ``bigrams`` (CE), each domain's
    conditional entropy H(next | prev) in nats. Summary: tokens, entropy (dicts)."""
    domain_tokens: Counter[str] = Counter()
    for tok in tokens:
        index = store.get_table(tok, "index.parquet", columns=["domain", "tokens"])
        n_tok = index.column("tokens").to_numpy().copy()
        n_tok[shard_duplicates(store, ids, str(tok.shard))[0]] = 0
        for d, t in zip(index.column("domain").to_pylist(), n_tok.tolist(), strict=True):
            domain_tokens[d] += t
    entropy = {}
    if bigrams is not None:
        merged: dict[str, Counter] = {}
        for bk in bigrams:
            t = store.get_table(bk, "bigrams.parquet").to_pydict()
            for d, a, b, c in zip(t["domain"], t["prev"], t["next"], t["count"], strict=True):
                merged.setdefault(d, Counter())[(a, b)] += c
        entropy = {d: baselines.conditional_entropy(c) for d, c in sorted(merged.items())}
    return store.commit(key, {"tokens": dict(sorted(domain_tokens.items())), "entropy": entropy})


def _shard_sample(
    store: Store, tok: Key, ids: Key, rates: dict[str, float], seed: int
) -> tuple[np.ndarray, pa.Table]:
    """Positions of the shard's accepted documents in the QuaDMix rank sample (a
    document is in when its id's uniform is below its domain's rate), and its index."""
    index = store.get_table(tok, "index.parquet", columns=["id", "domain", "tokens"])
    u = mixing.doc_uniforms(index.column("id").to_pylist(), seed, "quadmix")
    rate = np.array([rates[d] for d in index.column("domain").to_pylist()])
    take = u < rate
    take[shard_duplicates(store, ids, str(tok.shard))[0]] = False
    return np.flatnonzero(take), index


def run_ranks(
    tokens: list[Key],
    ids: Key,
    quality: list[list[Key]],
    domain_docs: dict[str, int],
    cfg: Config,
    store: Store,
    key: Key,
) -> dict:
    """QuaDMix's fitted maps (method.md §2): σ_n per criterion (global rank percentile)
    and per domain the token-weighted q̄ → r̄ map, estimated on up to
    ``quadmix.rank_sample`` documents per domain (0: all, exact). ``quality[i]`` are
    shard i's keys, one per scorer; ``domain_docs`` the documents per domain.

    Writes maps.npz. Summary: params (θ as a mapping), sample {domain: documents}.
    """
    n_sample = cfg.mixing.quadmix.rank_sample
    rates = {
        d: 1.0 if n_sample == 0 else min(1.0, n_sample / max(n, 1)) for d, n in domain_docs.items()
    }
    qs, doms, toks = [], [], []
    for tok, qkeys in zip(tokens, quality, strict=True):
        take, index = _shard_sample(store, tok, ids, rates, cfg.mixing.seed)
        qs.append(np.column_stack([store.get_array(k, "quality.npy")[take] for k in qkeys]))
        doms += index.column("domain").take(pa.array(take)).to_pylist()
        toks.append(index.column("tokens").to_numpy()[take])
    sample_q, sample_tokens = np.concatenate(qs), np.concatenate(toks)
    domains = np.array(doms, dtype=object).astype(str)
    # Oversampled small domains must not pull the global percentiles: weight 1/rate.
    inverse_rate = 1.0 / np.array([rates[d] for d in doms])
    sigma = [
        quadmix.rank_percentile_map(sample_q[:, n], inverse_rate, higher_is_better=True)
        for n in range(sample_q.shape[1])
    ]
    params = quadmix_params(cfg, sorted(domain_docs))
    qbar = quadmix.document_qbar(sample_q, domains, sigma, params)
    ranks = quadmix.fit_rank_maps(qbar, domains, sample_tokens)
    arrays = {
        f"sigma:{n}:{part}": getattr(m, part) for n, m in enumerate(sigma) for part in ("xs", "ps")
    }
    arrays |= {
        f"rank:{d}:{part}": getattr(m, part) for d, m in ranks.items() for part in ("xs", "ps")
    }
    store.put_arrays(key, "maps.npz", **arrays)
    sample = Counter(doms)
    return store.commit(key, {"params": params.to_dict(), "sample": dict(sorted(sample.items()))})


REFERENCE_SAMPLE = 50_000  # documents per side of a fitted scorer, at most, however large N


def _reference_samples(
    tokens: list[Key], scorer_cfg: QualityConfig, store: Store
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per shard (``tokens``: their indexes), bool masks (positives, background) over its
    documents: the documents of the domains ``scorer_cfg.reference`` and of all domains,
    each side at most about ``REFERENCE_SAMPLE`` documents, drawn by a hash of their ids
    (the same however the corpus is sharded). Raises ValueError when no document is of
    the reference domains."""
    wanted = sorted(scorer_cfg.reference or [])
    domain_docs: Counter[str] = Counter()
    for tok in tokens:
        domain_docs.update(store.summary(tok)["domain_docs"])  # type: ignore[index]
    n_ref = sum(domain_docs[d] for d in wanted)
    if n_ref == 0:
        raise ValueError(
            f"quality.reference {wanted}: no document of these domains; the corpus has "
            f"{sorted(domain_docs)}"
        )
    ref_rate = min(1.0, REFERENCE_SAMPLE / n_ref)
    bg_rate = min(1.0, REFERENCE_SAMPLE / sum(domain_docs.values()))
    for tok in tokens:
        index = store.get_table(tok, "index.parquet", columns=["id", "domain"])
        u = mixing.doc_uniforms(index.column("id").to_pylist(), 0, "reference")
        in_ref = np.isin(index.column("domain").to_numpy(zero_copy_only=False), wanted)
        yield in_ref & (u < ref_rate), u < bg_rate


def run_reference(
    shards: list[Shard],
    tokens: list[Key],
    scorer_cfg: QualityConfig,
    cfg: Config,
    store: Store,
    key: Key,
) -> dict:
    """Fit the DSIR model of a reference scorer (scoring/reference.py) on the documents
    of the reference domains against the corpus (``_reference_samples``). Writes
    model.npz (log_ratio). Summary: reference_docs, background_docs, fingerprint,
    max_chars."""
    ref: list[str] = []
    background: list[str] = []
    for shard, (pos, bg) in zip(shards, _reference_samples(tokens, scorer_cfg, store), strict=True):
        texts = _texts(shard, cfg)
        ref += [t for t, keep in zip(texts, pos, strict=True) if keep]
        background += [t for t, keep in zip(texts, bg, strict=True) if keep]
    model = fit_reference(ref, background)
    store.put_arrays(key, "model.npz", log_ratio=model.log_ratio)
    summary = {"reference_docs": len(ref), "background_docs": len(background)}
    summary |= {"fingerprint": model.fingerprint(), "max_chars": model.max_chars}
    return store.commit(key, summary)


def run_probe(
    tokens: list[Key], embed: list[Key], scorer_cfg: QualityConfig, store: Store, key: Key
) -> dict:
    """Fit the embedding probe of a scorer (scoring/probe.py) on the embeddings of the
    reference domains' documents against the corpus's (``_reference_samples``). Writes
    probe.npz (weights, bias). Summary: positives, negatives, fingerprint."""
    pos: list[np.ndarray] = []
    neg: list[np.ndarray] = []
    samples = _reference_samples(tokens, scorer_cfg, store)
    for emb, (is_pos, is_bg) in zip(embed, samples, strict=True):
        e = store.get_array(emb, "embeddings.npy")
        pos.append(e[is_pos])
        neg.append(e[is_bg])
    probe = fit_probe(np.concatenate(pos), np.concatenate(neg))
    store.put_arrays(key, "probe.npz", weights=probe.weights, bias=np.float64(probe.bias))
    summary = {"positives": sum(map(len, pos)), "negatives": sum(map(len, neg))}
    return store.commit(key, summary | {"fingerprint": probe.fingerprint()})


class _EmbeddingScorer:
    """A probe read over the shard's embeddings: the texts only give the count."""

    name = "embedding-probe"

    def __init__(self, probe: Probe, embeddings: np.ndarray) -> None:
        self.probe, self.embeddings = probe, embeddings

    def score(self, texts: list[str]) -> np.ndarray:
        assert len(texts) == len(self.embeddings)  # both are the shard's accepted documents
        return self.probe.score(self.embeddings)

    def truncated(self, texts: list[str]) -> int:
        return 0  # the embedding's own truncation is counted by the embed stage


def _scorer(scorer_cfg: QualityConfig, fitted: tuple[Key, ...], store: Store) -> Scorer:
    """The scorer of ``scorer_cfg``; a fitted one's model as the run fitted it
    (``fitted``: the reference model; the probe and the shard's embeddings)."""
    if scorer_cfg.scorer == "reference":
        (model,) = fitted
        log_ratio = store.get_arrays(model, "model.npz")["log_ratio"]
        return ReferenceModel(log_ratio, max_chars=store.summary(model)["max_chars"])  # type: ignore[index]
    if scorer_cfg.scorer == "embedding-probe":
        model, embed = fitted
        a = store.get_arrays(model, "probe.npz")
        probe = Probe(a["weights"], float(a["bias"]))
        return _EmbeddingScorer(probe, store.get_array(embed, "embeddings.npy"))
    return make_scorer(scorer_cfg)


def run_quality(
    shard: Shard,
    scorer_cfg: QualityConfig,
    fitted: tuple[Key, ...],
    cfg: Config,
    store: Store,
    key: Key,
) -> dict:
    """q(x) for every accepted document; ``fitted``: what a fitted scorer reads (the
    reference model; the probe and this shard's embeddings), else (). Summary: min, max
    (None when empty), truncated (documents scored on a prefix)."""
    set_torch_threads(cfg.compute.torch_threads)
    texts = _texts(shard, cfg)
    scorer = _scorer(scorer_cfg, fitted, store)
    q = scorer.score(texts).astype(np.float64)
    if not np.isfinite(q).all():
        row = int(np.flatnonzero(~np.isfinite(q))[0])
        raise ValueError(
            f"quality scorer {scorer_cfg.label!r} returned {q[row]} for document {row} "
            f"(accepted-document order) of shard {shard.path}; scores must be finite"
        )
    store.put_array(key, "quality.npy", q)
    empty = len(q) == 0
    return store.commit(
        key,
        {
            "min": None if empty else float(q.min()),
            "max": None if empty else float(q.max()),
            "truncated": scorer.truncated(texts),
        },
    )


def run_embed(shard: Shard, cfg: Config, store: Store, key: Key) -> dict:
    """L2-normalised embeddings, float32 (n, dim). Summary: docs, dim, device, dtype,
    truncated (documents longer than embed.max_length tokens)."""
    set_torch_threads(cfg.compute.torch_threads)
    texts = _texts(shard, cfg)
    e = embed_texts(texts, cfg.embed)
    store.put_array(key, "embeddings.npy", e)
    if is_static(cfg.embed.model):  # a table lookup in numpy
        device, dtype = "cpu", "float32"
    else:
        resolved = resolve_device(cfg.embed.device)
        device = resolved.type
        dtype = str(resolve_dtype(cfg.embed.dtype, resolved)).removeprefix("torch.")
    return store.commit(
        key,
        {
            "docs": int(e.shape[0]),
            "dim": int(e.shape[1]),
            "device": device,
            "dtype": dtype,
            "truncated": truncated_count(texts, cfg.embed),
        },
    )


def cluster_count(n_docs: int, cfg: Config) -> int:
    """K: ``kmeans.k``, or for 'auto' ``kmeans.auto_k`` capped so that a full fit sample
    keeps ``max_points_per_centroid`` points per centroid."""
    km = cfg.kmeans
    if km.k != "auto":
        return int(km.k)
    return kmeans.auto_k(n_docs, max(2, km.max_sample // km.max_points_per_centroid))


def run_kmeans(
    parts: list[tuple[Key, Key]], n_docs: int, cfg: Config, store: Store, key: Key
) -> dict:
    """Fit K centroids on min(N, max_points_per_centroid · K, max_sample) embeddings.

    ``parts`` = (tokens key, embed key) per shard, ``n_docs`` their documents. The
    sample is drawn by a hash of the ids (``kmeans.fit_sample_rows``), so it does not
    depend on how the corpus is sharded, and only its rows of each shard's embeddings
    are read (``Store.get_rows``): the fit holds the sample, never the corpus. Writes
    centroids.npy, float32 (K, dim). Summary: k, sample (embeddings fitted on).
    """
    release_free_memory()  # the sample below is up to max_sample x dim float16
    km = cfg.kmeans
    k = cluster_count(n_docs, cfg)
    if n_docs < k:
        raise ValueError(
            f"{n_docs} documents cannot form kmeans.k = {k} clusters; k-means needs at "
            "least 2 documents and kmeans.k <= the number of documents"
        )
    size = min(n_docs, km.max_points_per_centroid * k, km.max_sample)
    shard_ids = (
        store.get_table(tok, "index.parquet", columns=["id"]).column("id").to_pylist()
        for tok, _ in parts
    )
    picks = kmeans.fit_sample_rows(shard_ids, size, n_docs, km.seed)
    sample: np.ndarray | None = None
    for (_, emb), (rows, slots) in zip(parts, picks, strict=True):
        if len(rows):
            vectors = store.get_rows(emb, "embeddings.npy", rows)
            if sample is None:
                # float16, as the fit holds it (kmeans.fit_centroids): half the memory.
                sample = np.empty((sum(len(r) for r, _ in picks), vectors.shape[1]), np.float16)
            sample[slots] = vectors
    if sample is None:
        raise ValueError("no embeddings to fit k-means on")
    centroids = kmeans.fit_centroids(sample, k, km.niter, km.seed, km.nredo)
    store.put_array(key, "centroids.npy", centroids)
    return store.commit(key, {"k": k, "sample": int(len(sample))})


def run_assign(tok: Key, emb: Key, km: Key, store: Store, key: Key) -> dict:
    """Nearest centroid and cosine distance per document; per-cluster partial sums."""
    centroids = store.get_array(km, "centroids.npy")
    cluster, dist = kmeans.assign(store.get_array(emb, "embeddings.npy"), centroids)
    domains = store.get_table(tok, "index.parquet", columns=["domain"])
    p = div.cluster_partials(
        cluster, dist, domains.column("domain").to_numpy(zero_copy_only=False), len(centroids)
    )
    store.put_table(key, "assign.parquet", pa.table({"cluster": cluster, "distance": dist}))
    sums = {name: getattr(p, name) for name in ("count", "dist_sum", "dist_min", "dist_max")}
    by_domain = {f"domain:{d}": c for d, c in p.by_domain.items()}
    store.put_arrays(key, "partials.npz", **sums, **by_domain)
    return store.commit(key, {"docs": int(len(cluster))})


def load_partials(store: Store, assign: Key) -> div.ClusterPartials:
    a = store.get_arrays(assign, "partials.npz")
    by_domain = {k.split(":", 1)[1]: v for k, v in a.items() if k.startswith("domain:")}
    return div.ClusterPartials(a["count"], a["dist_sum"], a["dist_min"], a["dist_max"], by_domain)


def run_clusters(assign_keys: list[Key], km: Key, cfg: Config, store: Store, key: Key) -> dict:
    """Compactness, separation and the cross-domain overlap from all shards' partials.

    Summary: d_min, d_max, k, nonempty, overlap_domains, overlap (D×D list).
    """
    p = div.merge_partials(load_partials(store, a) for a in assign_keys)
    stats = div.cluster_stats(p, store.get_array(km, "centroids.npy"), cfg.diversity)
    domains, overlap = div.overlap_matrix(p.by_domain)
    store.put_arrays(
        key,
        "stats.npz",
        count=stats.count,
        compactness=stats.compactness,
        separation=stats.separation,
    )
    return store.commit(
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


def run_weights(
    tok: Key,
    ids: Key,
    qual: list[Key],
    assign: Key,
    clusters: Key,
    q_range: list[float],
    reduce: Key | None,
    cfg: Config,
    store: Store,
    key: Key,
) -> dict:
    """d(x) and the sampling weight w(x) of ``cfg.mixing.method`` per document
    (mixing/methods.py): for SampleMix α·d̂ + (1 − α)·q̂ + ε from the first scorer's q
    (``q_range``) and d; for QuaDMix S(r̄) from every scorer's q and the ranks artifact;
    for a baseline p_m / T_m from the domains summary. ``reduce``: the method's last
    reduce (ranks, domains), None for SampleMix; d's range comes from ``clusters``.

    A document dropped for its duplicate id weighs 0, and so does one held out for
    evaluation (``evaluate.heldout_fraction``; ``mixing.heldout_mask`` of its final id).
    ``qual``: the shard's quality keys, one per scorer. Summary: wl = Σ w·len,
    w_sum = Σ w, heldout = documents held out."""
    stats = store.get_arrays(clusters, "stats.npz")
    a = store.get_table(assign, "assign.parquet")
    d = div.diversity_values(
        a.column("cluster").to_numpy(),
        a.column("distance").to_numpy(),
        stats["compactness"],
        stats["separation"],
        cfg.diversity,
    )
    method = methods.method_of(cfg)
    q = np.column_stack(
        [store.get_array(k, "quality.npy") for k in (qual if method.all_scorers else qual[:1])]
    )
    index = store.get_table(tok, "index.parquet", columns=["id", "domain", "tokens"])
    n_tok = index.column("tokens").to_numpy()
    if not len(q) == len(d) == len(n_tok):
        raise ValueError(
            f"shard {tok.shard}: {len(q)} quality scores, {len(d)} embeddings and "
            f"{len(n_tok)} indexed documents disagree; the shard was read "
            "differently by the stages (changed while the run read it?); rerun"
        )
    domains = index.column("domain").to_numpy(zero_copy_only=False).astype(str)
    cl = store.summary(clusters)
    assert cl is not None  # committed before the weights run
    reduced = None if reduce is None else {**(store.summary(reduce) or {}), "key": reduce}
    d_range = [cl["d_min"], cl["d_max"]]
    inputs = WeightInputs(q, d, domains, q_range, d_range, reduced, store)
    w = method.weights(inputs, cfg)
    drop, renames = shard_duplicates(store, ids, str(tok.shard))
    w[drop] = 0.0
    held = np.zeros(len(w), dtype=bool)
    if cfg.evaluate.heldout_fraction:
        held = heldout_mask(final_ids(index, renames), cfg)
        held[drop] = False  # a dropped document is a reject, not a held-out one
        w[held] = 0.0
    store.put_arrays(key, "weights.npz", diversity=d, weight=w)
    return store.commit(
        key,
        {
            "wl": float(np.dot(w, n_tok)),
            "w_sum": float(w.sum()),
            "heldout": int(held.sum()),
        },
    )


def final_ids(index: pa.Table, renames: dict[int, str]) -> list[str]:
    """The shard's document ids after duplicate-id renames (``shard_duplicates``)."""
    doc_ids = index.column("id").to_pylist()
    for position, new_id in renames.items():
        doc_ids[position] = new_id
    return doc_ids


def heldout_mask(doc_ids: list[str], cfg: Config) -> np.ndarray:
    """bool (n,): the documents ``evaluate.heldout_fraction`` holds out (final ids)."""
    return mixing.heldout_mask(doc_ids, cfg.evaluate.heldout_fraction, cfg.mixing.seed)


def run_budget(
    parts: list[tuple[Key, Key]], target: int, cfg: Config, store: Store, key: Key
) -> dict:
    """The scale s that fills ``target`` tokens, from (tokens key, weights key) per shard,
    and the number of mixture parts that keeps each within ``output.max_part_bytes``
    (and ``output.rows_per_shard``) on average.

    Summary: scale, expected_rows = Σ c(x), expected_bytes = Σ c(x) · bytes(x) (the
    index's bytes: what a copy weighs in a part), buckets (mixture parts), slices
    (per part: what a worker writing it holds at once is one slice).
    """

    def per_shard(column: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for tok, wk in parts:
            w = store.get_arrays(wk, "weights.npz")["weight"]
            n = store.get_table(tok, "index.parquet", columns=[column])
            yield w, n.column(column).to_numpy()

    max_repeats = cfg.mixing.max_repeats
    scale = mixing.budget_scale(lambda: per_shard("tokens"), target, max_repeats)
    rows, nbytes = 0.0, 0.0
    for w, copy_bytes in per_shard("bytes"):
        c = mixing.expected_counts(w, scale, max_repeats)
        rows += float(c.sum())
        nbytes += float(np.dot(c, copy_bytes))
    out = cfg.output
    buckets = materialise.bucket_count(nbytes, out.max_part_bytes, rows, out.rows_per_shard)
    slices = materialise.slice_count(nbytes, buckets)
    summary = {"scale": scale, "expected_rows": rows, "expected_bytes": nbytes}
    return store.commit(key, summary | {"buckets": buckets, "slices": slices})


def run_counts(
    shard: Shard,
    tok: Key,
    ids: Key,
    qual: Key,
    assign: Key,
    weights: Key,
    budget_key: Key,
    rates: dict[str, float],
    cfg: Config,
    store: Store,
    key: Key,
) -> dict:
    """c(x) and n(x) under the budget stage's scale (``budget_key``); the shard's plan
    and its copies scattered into output buckets. Documents dropped for their duplicate
    id are left out, renamed ones carry their new id.

    Summary: sums for the budget check (expected, realised, variance), per-domain
    documents and tokens in, copies and tokens selected, the histogram of n, raw q
    and d of the documents the report samples (domain d's at ``rates[d]``, drawn by a
    hash of the id: ``report_rates``), and spread: the
    ``SPREAD_DOCS`` documents with the largest rounding variance (id, shard, tokens,
    expected, count, variance), largest first; pieces: the mixture parts the shard has
    copies in (its ``PIECES`` file is written only when there are any).
    """
    budget = store.summary(budget_key)
    assert budget is not None  # committed before the counts run
    index = store.get_table(tok, "index.parquet")
    drop, renames = shard_duplicates(store, ids, shard.shard_id)
    keep = np.ones(index.num_rows, dtype=bool)
    keep[drop] = False
    doc_ids = final_ids(index, renames)
    wz = store.get_arrays(weights, "weights.npz")
    cluster = store.get_table(assign, "assign.parquet", columns=["cluster"])
    plan = pa.table(
        {
            "id": pa.array(doc_ids, pa.string()),
            "domain": index.column("domain"),
            "tokens": index.column("tokens"),
            "quality": store.get_array(qual, "quality.npy"),
            "diversity": wz["diversity"],
            "weight": wz["weight"],
            "cluster": cluster.column("cluster"),
            "shard": pa.array([shard.shard_id] * len(doc_ids), pa.string()),
            "row": index.column("row"),
        }
    ).filter(keep)
    kept_ids = plan.column("id").to_pylist()
    c = mixing.expected_counts(
        plan.column("weight").to_numpy(), budget["scale"], cfg.mixing.max_repeats
    )
    n = mixing.realised_counts(c, kept_ids, cfg.mixing.seed)
    plan = plan.add_column(6, "expected_count", pa.array(c)).add_column(7, "count", pa.array(n))
    store.put_table(key, "plan.parquet", plan)
    pieces = {}
    if n.any():
        text = read_docs(shard, cfg).docs.column("text").filter(pa.array(keep))
        columns = ["id", "domain", "quality", "diversity", "weight"]
        mix_docs = plan.select(columns).append_column("text", text)
        scattered = materialise.scatter(mix_docs, n, budget["buckets"], cfg.mixing.seed)
        pieces = {b: materialise.piece_bytes(t, budget["slices"]) for b, t in scattered.items()}
        store.put_bytes(key, PIECES, materialise.pieces_file(pieces, budget["buckets"]))
    summary = _counts_summary(plan, kept_ids, rates, cfg)
    return store.commit(key, {**summary, "pieces": len(pieces)})


def _counts_summary(plan: pa.Table, ids: list[str], rates: dict[str, float], cfg: Config) -> dict:
    c = plan.column("expected_count").to_numpy()
    n = plan.column("count").to_numpy()
    n_tok = plan.column("tokens").to_numpy().astype(np.float64)
    domains = plan.column("domain").to_numpy(zero_copy_only=False)
    u = mixing.doc_uniforms(ids, cfg.mixing.seed, "report")
    per_domain = {}
    for d in np.unique(domains):
        m = domains == d
        keep = np.flatnonzero(m & (u < rates.get(str(d), 1.0)))
        per_domain[str(d)] = {
            "docs_in": int(m.sum()),
            "tokens_in": int(n_tok[m].sum()),
            "copies": int(n[m].sum()),
            "tokens": int((n[m] * n_tok[m]).sum()),
            "quality": plan.column("quality").to_numpy()[keep].tolist(),
            "diversity": plan.column("diversity").to_numpy()[keep].tolist(),
        }
    values, freq = np.unique(n, return_counts=True)
    frac = c - np.floor(c)
    doc_variance = frac * (1 - frac) * n_tok**2  # the terms of mixing.rounding_variance
    top = [i for i in np.argsort(-doc_variance, kind="stable")[:SPREAD_DOCS] if doc_variance[i] > 0]
    shard_ids = plan.column("shard").to_pylist()
    return {
        "expected_tokens": float(np.dot(c, n_tok)),
        "realised_tokens": int(np.dot(n, n_tok)),
        "variance": mixing.rounding_variance(c, n_tok),
        "spread": [
            {
                "id": ids[i],
                "shard": shard_ids[i],
                "tokens": int(n_tok[i]),
                "expected": float(c[i]),
                "count": int(n[i]),
                "variance": float(doc_variance[i]),
            }
            for i in top
        ],
        "histogram": {str(v): int(f) for v, f in zip(values.tolist(), freq.tolist(), strict=True)},
        "domains": per_domain,
    }


#: The counts artifact's file of its copies, one piece per mixture part that has any
#: (``mixture_shards.pieces_file``).
PIECES = "pieces.arrows"


def run_gather(
    bucket: int,
    counts_keys: list[Key],
    buckets: int,
    slices: int,
    out: Output,
    store: Store,
    key: Key,
) -> dict:
    """Write mixture part ``bucket`` of ``buckets`` from the pieces of the counts
    artifacts ``counts_keys`` (those that hold copies), in ``slices`` slices (the
    budget's), streamed to the output (``key``: the output's, which the output's
    manifest records). Summary: rows."""
    release_free_memory()  # the gather holds slices of a part of up to max_part_bytes
    entries = store.get_ranges([(ck, PIECES, 8 * bucket, 8 * bucket + 16) for ck in counts_keys])
    holders, spans, urls = [], [], []  # spans: (start, end) of each holder's piece
    for ck, entry in zip(counts_keys, entries, strict=True):
        url = store.url(ck, PIECES)
        start, end = materialise.piece_span(url, entry, buckets)
        if end > start:
            holders.append(ck)
            spans.append((start, end))
            urls.append(url)

    def read_ranges(ranges: list[tuple[int, int, int]]) -> list[bytes]:
        for p, _, b in ranges:
            if spans[p][0] + b > spans[p][1]:  # a damaged index or header
                raise ValueError(
                    f"{urls[p]}: the piece of part {bucket} ends at byte {spans[p][1]}, but "
                    f"its header points to byte {spans[p][0] + b}: delete its counts "
                    "artifact folder and rerun"
                )
        return store.get_ranges(
            [(holders[p], PIECES, spans[p][0] + a, spans[p][0] + b) for p, a, b in ranges]
        )

    def fill(f: BinaryIO) -> int:
        return materialise.write_part(materialise.gather(urls, slices, read_ranges), f)

    return {"rows": out.put_stream(f"mixture/part-{bucket:05d}.parquet", fill)}


def run_publish_plan(part: int, counts: Key, out: Output, store: Store, key: Key) -> dict:
    """Copy one shard's per-document plan (``counts``) to plan/part-{part:05d}.parquet
    (``key``: the output's). Summary: rows."""
    plan = store.get_table(counts, "plan.parquet")
    out.put_table(f"plan/part-{part:05d}.parquet", plan)
    return {"rows": plan.num_rows}


def run_publish_rejects(
    tokens_keys: list[Key], ids: Key, out: Output, store: Store, key: Key
) -> dict:
    """Write all rejects in (shard, row) order, duplicates dropped included, and the
    duplicate-id table (drops and renames) (``key``: the output's). Holds every
    rejected row at once. Summary: rows (rejects)."""
    dups = store.get_table(ids, "duplicates.parquet")
    out.put_table("rejects/duplicate_ids.parquet", dups)
    drops = dups.filter(pc.equal(dups.column("action"), "drop")).to_pydict()
    dropped = pa.table(
        {
            "shard": drops["shard"],
            "row": drops["row"],
            "reason": ["duplicate_id"] * len(drops["row"]),
            "detail": [
                f"id {i!r} also at {o}" for i, o in zip(drops["id"], drops["other"], strict=True)
            ],
        },
        schema=REJECTS_SCHEMA,
    )
    rejects = pa.concat_tables(
        [store.get_table(tk, "rejects.parquet").cast(REJECTS_SCHEMA) for tk in tokens_keys]
        + [dropped]
    )
    order = {tk.shard: i for i, tk in enumerate(tokens_keys)}
    shard_order = np.array([order[s] for s in rejects.column("shard").to_pylist()], dtype=np.int64)
    rejects = rejects.take(np.lexsort((rejects.column("row").to_numpy(), shard_order)))
    out.put_table("rejects/rejects.parquet", rejects)
    return {"rows": rejects.num_rows}
