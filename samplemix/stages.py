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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from samplemix import baselines, kmeans, materialise, mixing, quadmix
from samplemix import diversity as div
from samplemix import ids as dup
from samplemix.config import Config, QualityConfig
from samplemix.corpus import (
    DOCS_SCHEMA,
    REJECTS_SCHEMA,
    CorpusError,
    PassedOver,
    Shard,
    ShardDocs,
    count_rows,
    read_shard,
)
from samplemix.embed import embed_texts, truncated_count
from samplemix.models import model_fingerprint, pinned, resolve_device, resolve_dtype
from samplemix.quality import DomainClassifier, make_scorer
from samplemix.static import is_static
from samplemix.store import Key, Output, Store, artifact_key
from samplemix.tokens import token_counts, token_ids

# Bump a stage's version when its logic changes: its artifacts and all downstream recompute.
VERSIONS = {
    "tokens": "3",  # 2: rows read; 3: a skipped shard reads 0 rows and counts its own
    "ids": "1",
    "bigrams": "1",
    "domains": "1",
    "quality": "3",  # 2: truncated documents counted; 3: one thread per batch (below)
    # 3: every batch on one intra-op thread (models.batch_outputs): before, the bytes
    # under one key depended on the worker's torch thread count (bf16 on AMX: 6e-4).
    "embed": "3",
    "kmeans": "1",
    "assign": "1",
    "clusters": "1",
    "ranks": "1",
    "weights": "3",  # 2: duplicate ids; 3: methods
    "budget": "1",
    "counts": "3",  # 3: the documents that hold most of the rounding spread
    "output": "1",
}
# The stages with artifacts in the store, in pipeline order ("output" is the published
# files, whose key lives in the output's manifest).
STAGES = tuple(s for s in VERSIONS if s != "output")
REPORT_SAMPLE = 500  # raw q and d values kept per shard and domain for the report's plots
# Documents kept with the largest rounding variance f(1−f)·len², per shard and then
# overall (the overall top ones are among the shards' top ones), so that the report can
# name the few that make a realised total miss its target.
SPREAD_DOCS = 10


def tokenizer_name(cfg: Config) -> str:
    return cfg.tokens.tokenizer or cfg.embed.model


def pinned_config(cfg: Config) -> Config:
    """``cfg`` with every hub model it names pinned to its commit now (models.pinned),
    each looked up once.

    Flows pin once when they start, so the cache keys and the workers that load the
    models agree on the weights, and a model pushed to the hub since the last run
    recomputes what it feeds. A scorer keeps the name it had unpinned.
    """
    commits: dict[str, str] = {}

    def pin(name: str | None) -> str | None:
        if name is None:
            return None
        if name not in commits:
            commits[name] = pinned(name)
        return commits[name]

    quality = [
        q if model == q.model else q.model_copy(update={"model": model, "name": q.label})
        for q, model in zip(cfg.quality, [pin(q.model) for q in cfg.quality], strict=True)
    ]
    e = cfg.evaluate
    return cfg.model_copy(
        update={
            "corpus": cfg.corpus.model_copy(update={"domain_model": pin(cfg.corpus.domain_model)}),
            "tokens": cfg.tokens.model_copy(update={"tokenizer": pin(cfg.tokens.tokenizer)}),
            "embed": cfg.embed.model_copy(update={"model": pin(cfg.embed.model)}),
            "quality": quality,
            "evaluate": e
            if e.tokenizer == "train"
            else e.model_copy(update={"tokenizer": pin(e.tokenizer)}),
        }
    )


def _corpus_part(shard: Shard, cfg: Config) -> dict:
    c = cfg.corpus
    return {
        "shard": shard.shard_id,
        "folder_domain": shard.domain,
        "fingerprint": shard.fingerprint,
        "columns": [c.text_column, c.id_column, c.domain_column],
    }


def _domain_model_part(cfg: Config) -> dict | None:
    c = cfg.corpus
    if c.domain_model is None:
        return None
    return {
        "model": c.domain_model,
        "max_length": c.domain_max_length,
        "weights": model_fingerprint(c.domain_model),
    }


# ---- keys -------------------------------------------------------------------------------


def tokens_key(shard: Shard, cfg: Config) -> Key:
    name = tokenizer_name(cfg)
    return artifact_key(
        "tokens",
        VERSIONS["tokens"],
        shard.shard_id,
        corpus=_corpus_part(shard, cfg),
        tokens={"tokenizer": name},
        model_weights=model_fingerprint(name),
        domain_model=_domain_model_part(cfg),
    )


def ids_key(tokens: list[Key], cfg: Config) -> Key:
    return artifact_key(
        "ids",
        VERSIONS["ids"],
        tokens=[k.id for k in tokens],
        corpus={"duplicate_ids": cfg.corpus.duplicate_ids},
    )


def bigrams_key(tokens: Key) -> Key:
    """Bigrams under the budget tokenizer, by the domains of the shard's index."""
    return artifact_key("bigrams", VERSIONS["bigrams"], tokens.shard, tokens=tokens.id)


def domains_key(tokens: list[Key], ids: Key, bigrams: list[Key] | None) -> Key:
    return artifact_key(
        "domains",
        VERSIONS["domains"],
        tokens=[k.id for k in tokens],
        ids=ids.id,
        bigrams=None if bigrams is None else [k.id for k in bigrams],
    )


def quality_key(shard: Shard, scorer: QualityConfig, cfg: Config) -> Key:
    """The key of one scorer's q(x) on ``shard``: each scorer is cached on its own."""
    q = scorer.model_dump(exclude={"name", "batch_tokens", "compile", "device"})
    fp = model_fingerprint(q["model"]) if q["model"] else None
    return artifact_key(
        "quality",
        VERSIONS["quality"],
        shard.shard_id,
        corpus=_corpus_part(shard, cfg),
        quality=q,
        model_weights=fp,
    )


def embed_key(shard: Shard, cfg: Config) -> Key:
    # The configured dtype, not the one a machine resolves "auto" to: keys must not
    # depend on where they are computed (a laptop planning a GPU cluster's run). bf16
    # and fp32 embeddings agree to cosine >= 0.999, and a rerun reuses whichever exists;
    # so do compiled and eager ones (cosine 0.99999).
    e = cfg.embed.model_dump(exclude={"batch_tokens", "compile", "device"})
    return artifact_key(
        "embed",
        VERSIONS["embed"],
        shard.shard_id,
        corpus=_corpus_part(shard, cfg),
        embed=e,
        model_weights=model_fingerprint(cfg.embed.model),
    )


def _kmeans_part(cfg: Config) -> dict:
    # The refit policy decides *whether* to fit, not what a fit computes.
    return cfg.kmeans.model_dump(exclude={"refit", "refit_new_share"})


def kmeans_key(embed: list[Key], cfg: Config) -> Key:
    """The key of a fresh fit over every shard's embeddings."""
    return artifact_key(
        "kmeans", VERSIONS["kmeans"], embed=[k.id for k in embed], kmeans=_kmeans_part(cfg)
    )


def kmeans_to_use(
    store: Store, embed: list[Key], docs: list[int | None], cfg: Config
) -> tuple[Key | None, str]:
    """The centroids this run assigns with, and why: a fresh fit (``kmeans_key``), or an
    earlier fit over a subset of these shards, kept when the documents it has not seen
    are at most ``kmeans.refit_new_share`` of all (``refit: auto``) or always
    (``refit: never``). ``docs`` are the shards' document counts (None: not read yet);
    returns (None, why) when the choice needs a count that is not known yet. A kept
    fit keeps its K, also with ``k: auto``.
    """
    fresh = kmeans_key(embed, cfg)
    if cfg.kmeans.refit == "always" or store.manifest(fresh) is not None:
        return fresh, "fit over all shards"
    best: Key | None = None
    for kid, done in store.manifests("kmeans"):
        p = done["parts"]
        if p.get("version") != fresh.parts["version"] or p.get("kmeans") != fresh.parts["kmeans"]:
            continue
        if set(p["embed"]) <= set(fresh.parts["embed"]) and (
            best is None or len(p["embed"]) > len(best.parts["embed"])
        ):
            best = Key("kmeans", kid, p)
    if best is None:
        return fresh, "fit over all shards"
    kept = f"kept the fit over {len(best.parts['embed'])} of {len(embed)} shards"
    if cfg.kmeans.refit == "never":
        return best, f"{kept} (refit: never)"
    if None in docs:
        return None, "reuse or refit: decided once the new shards are read"
    seen = set(best.parts["embed"])
    unseen = sum(d for k, d in zip(embed, docs, strict=True) if k.id not in seen)  # type: ignore[misc]
    share = unseen / max(sum(docs), 1)  # type: ignore[arg-type]
    limit = cfg.kmeans.refit_new_share
    if share <= limit:
        return best, f"{kept} ({share:.1%} new documents <= refit_new_share {limit:g})"
    return fresh, f"refit: {share:.1%} new documents > refit_new_share {limit:g}"


def assign_key(embed: Key, km: Key) -> Key:
    return artifact_key("assign", VERSIONS["assign"], embed.shard, embed=embed.id, kmeans=km.id)


def clusters_key(assign: list[Key], cfg: Config) -> Key:
    return artifact_key(
        "clusters",
        VERSIONS["clusters"],
        assign=[k.id for k in assign],
        diversity=cfg.diversity.model_dump(),
    )


BASELINES = ("vanilla", "fixed", "temperature", "ce")


def _method_part(cfg: Config) -> dict:
    """The mixing settings a method's weights depend on (beyond its reduce's key)."""
    m = cfg.mixing
    extra = {
        "samplemix": {"alpha": m.alpha, "epsilon": m.epsilon},
        "temperature": {"temperature": m.temperature},
        "fixed": {"domain_weights": m.domain_weights},
    }
    return {"method": m.method, **extra.get(m.method, {})}


def quadmix_params(cfg: Config, domains: list[str]) -> quadmix.QuadMixParams:
    """θ for ``domains``: ``mixing.quadmix.params`` (a file or a mapping), with
    ``mixing.quadmix.default`` and equal merge weights for the domains it does not list."""
    qm = cfg.mixing.quadmix
    given = qm.params
    if isinstance(given, str):
        import yaml
        from fsspec import open as fs_open

        with fs_open(given, "r", **cfg.storage.fsspec_options(given)) as f:
            given = yaml.safe_load(f)
    listed = dict((given or {}).get("domains", {}))
    n = len(cfg.quality)
    fill = {"alpha": [1.0 / n] * n, **qm.default}
    try:
        return quadmix.QuadMixParams.from_dict(
            {"domains": {d: listed.get(d, fill) for d in domains}}
        )
    except ValueError as e:
        raise ValueError(f"mixing.quadmix.params: {e}") from None


def ranks_key(
    tokens: list[Key], ids: Key, quality: list[list[Key]], params: dict, cfg: Config
) -> Key:
    return artifact_key(
        "ranks",
        VERSIONS["ranks"],
        tokens=[k.id for k in tokens],
        ids=ids.id,
        quality=[[k.id for k in per_shard] for per_shard in quality],
        quadmix={"params": params, "rank_sample": cfg.mixing.quadmix.rank_sample},
        mixing={"seed": cfg.mixing.seed},
    )


def weights_key(
    tokens: Key,
    ids: Key,
    quality: list[Key],
    assign: Key,
    clusters: Key,
    q_range: list[float],
    cfg: Config,
    method: Key | None = None,
) -> Key:
    """``quality``: the shard's keys, one per scorer (SampleMix reads the first,
    QuaDMix all); ``method``: the method's reduce (ranks for QuaDMix, domains for the
    baselines)."""
    used = quality if cfg.mixing.method == "quadmix" else quality[:1]
    return artifact_key(
        "weights",
        VERSIONS["weights"],
        tokens.shard,
        tokens=tokens.id,
        ids=ids.id,
        quality=[k.id for k in used],
        assign=assign.id,
        clusters=clusters.id,
        quality_range=q_range,
        method_stats=None if method is None else method.id,
        mixing=_method_part(cfg),
        # Only when set, so that runs without held-out documents keep their keys.
        **({"heldout": _heldout_part(cfg)} if cfg.evaluate.heldout_fraction else {}),
    )


def _heldout_part(cfg: Config) -> dict:
    return {"fraction": cfg.evaluate.heldout_fraction, "seed": cfg.mixing.seed}


def budget_key(weights: list[Key], target: int, cfg: Config) -> Key:
    return artifact_key(
        "budget",
        VERSIONS["budget"],
        weights=[k.id for k in weights],
        mixing={"target_tokens": target, "max_repeats": cfg.mixing.max_repeats},
        output={"rows_per_shard": cfg.output.rows_per_shard},
    )


def counts_key(weights: Key, budget: Key, cfg: Config) -> Key:
    return artifact_key(
        "counts",
        VERSIONS["counts"],
        weights.shard,
        weights=weights.id,
        budget=budget.id,
        mixing={"seed": cfg.mixing.seed},
    )


def output_key(counts: list[Key], budget: Key) -> Key:
    """What the files under ``output.path`` were written from."""
    return artifact_key(
        "output", VERSIONS["output"], counts=[k.id for k in counts], budget=budget.id
    )


def quality_range(quality: list[dict]) -> list[float]:
    """[min, max] of q over all shards' quality summaries (empty shards have None)."""
    return [
        min(r["min"] for r in quality if r["min"] is not None),
        max(r["max"] for r in quality if r["max"] is not None),
    ]


# ---- per-shard map stages ---------------------------------------------------------------


def read_docs(shard: Shard, cfg: Config) -> ShardDocs:
    """The shard's documents; an unreadable shard under ``on_bad_shard: skip`` is
    ``skipped``: no rows read, no documents, and one rejects record for the file (row
    −1, reason ``unreadable_shard``, the error as detail)."""
    try:
        return read_shard(shard, cfg.corpus, cfg.storage.fsspec_options(shard.path))
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
        return ShardDocs(DOCS_SCHEMA.empty_table(), rejects, read=0, skipped=True)


def _texts(shard: Shard, cfg: Config) -> list[str]:
    return read_docs(shard, cfg).docs.column("text").to_pylist()


def run_tokens(shard: Shard, cfg: Config, store: Store, key: Key) -> dict:
    """Index the shard (row, id, domain, tokens) and record its rejects.

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
    store.put_table(key, "index.parquet", index)
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


def run_ids(tokens: list[Key], cfg: Config, store: Store, key: Key) -> dict:
    """Documents whose id another document has, resolved by ``corpus.duplicate_ids``
    (ids.py), from every shard's index (``tokens``, in shard order).

    Writes duplicates.parquet (ids.DUPLICATES_SCHEMA). Summary: dropped, renamed,
    dropped_tokens, each {shard: count} over the shards that have any.
    """

    def index(i: int, columns: list[str]) -> pa.Table:
        return store.get_table(tokens[i], "index.parquet", columns=columns)

    def rows_of(i: int, positions: np.ndarray) -> tuple[list[str], np.ndarray]:
        t = index(i, ["id", "row"]).take(pa.array(positions))
        return t.column("id").to_pylist(), t.column("row").to_numpy()

    hashes = [dup.id_hashes(index(i, ["id"]).column("id").to_pylist()) for i in range(len(tokens))]
    shards = [str(k.shard) for k in tokens]
    table = dup.duplicates(shards, hashes, rows_of, cfg.corpus.duplicate_ids)
    store.put_table(key, "duplicates.parquet", table)
    dropped: Counter[str] = Counter()
    renamed: Counter[str] = Counter()
    dropped_tokens: Counter[str] = Counter()
    for i, shard in enumerate(shards):
        mine = table.filter(pc.equal(table.column("shard"), shard))
        if not mine.num_rows:
            continue
        drop = mine.filter(pc.equal(mine.column("action"), "drop"))
        dropped[shard] = drop.num_rows
        renamed[shard] = mine.num_rows - drop.num_rows
        n_tok = index(i, ["tokens"]).column("tokens").to_numpy()
        dropped_tokens[shard] = int(n_tok[drop.column("position").to_numpy()].sum())
    return store.commit(
        key,
        {
            "dropped": {k: v for k, v in dropped.items() if v},
            "renamed": {k: v for k, v in renamed.items() if v},
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


def baseline_proportions(cfg: Config, domains: dict) -> dict[str, float]:
    """Token share per domain for the baseline ``cfg.mixing.method`` from the domains
    summary."""
    m = cfg.mixing
    if m.method == "vanilla":
        return baselines.vanilla_proportions(domains["tokens"])
    if m.method == "temperature":
        return baselines.temperature_proportions(domains["tokens"], m.temperature)
    if m.method == "fixed":
        try:
            return baselines.fixed_proportions(m.domain_weights or {}, list(domains["tokens"]))
        except ValueError as e:
            raise ValueError(f"mixing.domain_weights: {e}") from None
    return baselines.ce_proportions(domains["entropy"])


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


def load_ranks(
    store: Store, ranks: Key
) -> tuple[list[quadmix.PercentileMap], dict[str, quadmix.PercentileMap]]:
    """The σ maps (criterion order) and the r̄ maps (by domain) of a ranks artifact."""
    a = store.get_arrays(ranks, "maps.npz")
    sigma: dict[int, dict] = {}
    rank: dict[str, dict] = {}
    for name, values in a.items():
        kind, which, part = name.split(":")
        if kind == "sigma":
            sigma.setdefault(int(which), {})[part] = values
        else:
            rank.setdefault(which, {})[part] = values
    return (
        [quadmix.PercentileMap(sigma[n]["xs"], sigma[n]["ps"], True) for n in sorted(sigma)],
        {d: quadmix.PercentileMap(m["xs"], m["ps"]) for d, m in rank.items()},
    )


def run_quality(
    shard: Shard, scorer_cfg: QualityConfig, cfg: Config, store: Store, key: Key
) -> dict:
    """q(x) for every accepted document. Summary: min, max (None when empty),
    truncated (documents scored on a prefix)."""
    texts = _texts(shard, cfg)
    scorer = make_scorer(scorer_cfg)
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


# ---- k-means and diversity -------------------------------------------------------------


def cluster_count(n_docs: int, cfg: Config) -> int:
    return kmeans.auto_k(n_docs) if cfg.kmeans.k == "auto" else int(cfg.kmeans.k)


def run_kmeans(
    parts: list[tuple[Key, Key]], n_docs: int, cfg: Config, store: Store, key: Key
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
        ids = store.get_table(tok, "index.parquet", columns=["id"]).column("id")
        u = mixing.doc_uniforms(ids.to_pylist(), cfg.kmeans.seed, "kmeans")
        take = u < rate
        if take.any():
            keys.append(u[take])
            chunks.append(np.asarray(store.get_array(emb, "embeddings.npy")[take]))
    if not chunks:
        raise ValueError("no embeddings to fit k-means on")
    # Ordered by the ids' uniforms, the sample (and so FAISS's seeded initialisation)
    # is the same however the corpus is sharded.
    sample = np.concatenate(chunks)[np.argsort(np.concatenate(keys), kind="stable")]
    centroids = kmeans.fit_centroids(sample, k, cfg.kmeans.niter, cfg.kmeans.seed, cfg.kmeans.nredo)
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
    store.put_arrays(
        key,
        "partials.npz",
        count=p.count,
        dist_sum=p.dist_sum,
        dist_min=p.dist_min,
        dist_max=p.dist_max,
        **{f"domain:{d}": c for d, c in p.by_domain.items()},
    )
    return store.commit(key, {"docs": int(len(cluster))})


def load_partials(store: Store, assign: Key) -> div.ClusterPartials:
    a = store.get_arrays(assign, "partials.npz")
    by_domain = {k.split(":", 1)[1]: v for k, v in a.items() if k.startswith("domain:")}
    return div.ClusterPartials(a["count"], a["dist_sum"], a["dist_min"], a["dist_max"], by_domain)


def run_clusters(assign_keys: list[Key], km: Key, cfg: Config, store: Store, key: Key) -> dict:
    """Compactness, separation and the cross-domain overlap from all shards' partials.

    Summary: d_min, d_max, k, nonempty, overlap_domains, overlap (D×D list).
    """
    p = div.merge_partials([load_partials(store, a) for a in assign_keys])
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


# ---- weights, budget, counts -----------------------------------------------------------


def run_weights(
    tok: Key,
    ids: Key,
    qual: list[Key],
    assign: Key,
    clusters: Key,
    q_range: list[float],
    d_range: list[float],
    method: Key | dict | None,
    cfg: Config,
    store: Store,
    key: Key,
) -> dict:
    """d(x) and the sampling weight w(x) of ``cfg.mixing.method`` per document:

    - samplemix: α·d̂ + (1 − α)·q̂ + ε from the first scorer's q (``q_range``) and d;
    - quadmix: S(r̄) from every scorer's q and the ranks artifact ``method``;
    - baselines: p_m / T_m from the domains summary ``method`` (uniform in a domain).

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
    q = store.get_array(qual[0], "quality.npy")
    index = store.get_table(tok, "index.parquet", columns=["id", "domain", "tokens"])
    n_tok = index.column("tokens").to_numpy()
    if not len(q) == len(d) == len(n_tok):
        raise ValueError(
            f"shard {tok.shard}: {len(q)} quality scores, {len(d)} embeddings and "
            f"{len(n_tok)} indexed documents disagree; the shard was read "
            "differently by the stages (changed while the run read it?); rerun"
        )
    domains = index.column("domain").to_numpy(zero_copy_only=False).astype(str)
    m = cfg.mixing
    if m.method == "samplemix":
        w = mixing.sample_weights(q, d, tuple(q_range), tuple(d_range), m.alpha, m.epsilon)
    elif m.method == "quadmix":
        assert isinstance(method, Key)
        sigma, ranks = load_ranks(store, method)
        params = quadmix.QuadMixParams.from_dict(store.summary(method)["params"])  # type: ignore[index]
        q_all = np.column_stack([store.get_array(k, "quality.npy") for k in qual])
        w = quadmix.document_values(q_all, domains, sigma, ranks, params)
    else:
        assert isinstance(method, dict)
        shares = baseline_proportions(cfg, method)
        w = baselines.domain_weights(domains, shares, method["tokens"])
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


def target_tokens(source_tokens: int, cfg: Config) -> int:
    """T_tgt: the configured budget, or budget_ratio (default 1.0) × T_src."""
    if cfg.mixing.budget is not None:
        return cfg.mixing.budget
    return round((cfg.mixing.budget_ratio or 1.0) * source_tokens)


def run_budget(
    parts: list[tuple[Key, Key]], target: int, cfg: Config, store: Store, key: Key
) -> dict:
    """The scale s that fills ``target`` tokens, from (tokens key, weights key) per shard.

    Summary: scale, expected_rows = Σ c(x), buckets (output shards).
    """

    def wl() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for tok, wk in parts:
            w = store.get_arrays(wk, "weights.npz")["weight"]
            n = store.get_table(tok, "index.parquet", columns=["tokens"])
            yield w, n.column("tokens").to_numpy()

    scale = mixing.budget_scale(wl, target, cfg.mixing.max_repeats)
    rows = sum(
        float(mixing.expected_counts(w, scale, cfg.mixing.max_repeats).sum()) for w, _ in wl()
    )
    buckets = materialise.bucket_count(rows, cfg.output.rows_per_shard)
    return store.commit(key, {"scale": scale, "expected_rows": rows, "buckets": buckets})


def run_counts(
    shard: Shard,
    tok: Key,
    ids: Key,
    qual: Key,
    assign: Key,
    weights: Key,
    budget: dict,
    cfg: Config,
    store: Store,
    key: Key,
) -> dict:
    """c(x) and n(x); the shard's plan and its copies scattered into output buckets.
    Documents dropped for their duplicate id are left out, renamed ones carry their
    new id.

    Summary: sums for the budget check (expected, realised, variance), per-domain
    documents and tokens in, copies and tokens selected, the histogram of n, a
    bounded sample of raw q and d per domain for the report, and spread: the
    ``SPREAD_DOCS`` documents with the largest rounding variance (id, shard, tokens,
    expected, count, variance), largest first.
    """
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
    buckets: list[int] = []
    if n.any():
        text = read_docs(shard, cfg).docs.column("text").filter(pa.array(keep))
        columns = ["id", "domain", "quality", "diversity", "weight"]
        mix_docs = plan.select(columns).append_column("text", text)
        for b, part in materialise.scatter(mix_docs, n, budget["buckets"], cfg.mixing.seed).items():
            store.put_table(key, f"bucket-{b:05d}.parquet", part)
            buckets.append(b)
    return store.commit(key, {**_counts_summary(plan, kept_ids, cfg), "buckets": buckets})


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


def run_gather(bucket: int, counts_keys: list[Key], store: Store, out: Output) -> dict:
    """Write mixture shard ``bucket`` from the counts artifacts that hold copies in it.
    Summary: rows."""
    name = f"bucket-{bucket:05d}.parquet"
    table = materialise.gather([store.get_table(ck, name) for ck in counts_keys])
    out.put_table(f"mixture/part-{bucket:05d}.parquet", table)
    return {"rows": table.num_rows}


def run_publish(
    counts_keys: list[Key], tokens_keys: list[Key], ids: Key, store: Store, out: Output
) -> dict:
    """Write the per-document plan (one part per source shard, in shard order), all
    rejects in (shard, row) order, duplicates dropped included, and the duplicate-id
    table (drops and renames). Summary: plan_parts, rejects."""
    for i, ck in enumerate(counts_keys):
        out.put_table(f"plan/part-{i:05d}.parquet", store.get_table(ck, "plan.parquet"))
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
    return {"plan_parts": len(counts_keys), "rejects": rejects.num_rows}


def store_for(cfg: Config) -> Store:
    """The artifact store: ``output.store``, else OUT/store."""
    root = cfg.output.store or f"{cfg.output.path.rstrip('/')}/store"
    return Store(root, cfg.storage.fsspec_options(root), cfg.storage.retries, STAGES)


def output_for(cfg: Config) -> Output:
    """Where the run publishes: ``output.path``."""
    path = cfg.output.path
    return Output(path, cfg.storage.fsspec_options(path), cfg.storage.retries)


def source_tokens(tokens: list[dict], ids: dict) -> int:
    """T_src: the tokens of the accepted documents (duplicates dropped excluded)."""
    return sum(t["tokens"] for t in tokens) - sum(ids["dropped_tokens"].values())


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
    from samplemix.report import ReportInputs

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
