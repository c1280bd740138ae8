"""The keys and places of a mix run's artifacts: what determines each one (design.md, "Cache keys").

Every ``*_key`` function names exactly what determines a stage's artifact; a stage's
version (``VERSIONS``) is bumped when its logic changes, so that its artifacts and all
downstream ones recompute. Nothing here reads an artifact's data; ``kmeans_to_use``
reads the store's manifests to choose between a fresh fit and a kept one.
"""

from __future__ import annotations

from samplemix.config import Config, QualityConfig
from samplemix.io.corpus import (
    Shard,
)
from samplemix.io.store import Key, Output, Store, artifact_key
from samplemix.mixing import methods, quadmix
from samplemix.scoring.models import model_fingerprint, pinned
from samplemix.scoring.reference import TOKENIZER_VERSION

# Bump a stage's version when its logic changes: its artifacts and all downstream recompute.
VERSIONS = {
    # 2: rows read; 3: a skipped shard reads 0 rows and counts its own; 4: the index's
    # bytes column (what a copy weighs in the mixture: the budget sizes parts by it);
    # 5: the ids' hashes stored (id_hashes.npy), which the ids reduce reads in passes
    "tokens": "5",
    "ids": "2",  # 2: from the stored hashes, in passes (duplicate_ids.pass_count)
    "bigrams": "1",
    "domains": "1",
    "reference": "1",
    "probe": "1",
    "quality": "3",  # 2: truncated documents counted; 3: one thread per batch (below)
    # 3: every batch on one intra-op thread (models.batch_outputs): before, the bytes
    # under one key depended on the worker's torch thread count (bf16 on AMX: 6e-4).
    "embed": "3",
    # 2: the sample's size bounded (max_sample), its rows read alone; 3: fit on float16;
    # 4: decoded 8,192 rows at a time (the search's blocks change results by ulps)
    "kmeans": "4",
    "assign": "1",
    "clusters": "2",  # 2: separation in blocks of rows (ulp-level differences)
    "ranks": "1",
    "weights": "3",  # 2: duplicate ids; 3: methods
    # 2: mixture parts from bytes (output.max_part_bytes), not rows; 3: slices per part
    "budget": "3",
    # 3: the documents that hold most of the rounding spread; 4: the report's sample
    # drawn at a rate per domain (stages.report_rates), not 500 per shard; 5: copies
    # stored in slices (mixture_shards.piece_bytes), not one Parquet table per part;
    # 6: a shard's pieces in one file (mixture_shards.pieces_file)
    "counts": "6",
    "output": "2",  # 2: a part's row groups are its slices (ranges of keys)
}


# The stages with artifacts in the store, in pipeline order ("output" is the published
# files, whose key lives in the output's manifest).
STAGES = tuple(s for s in VERSIONS if s != "output")


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


def _key(stage: str, shard: str | None = None, **parts: object) -> Key:
    """The key of ``stage`` at its current version (``VERSIONS``) over ``parts``."""
    return artifact_key(stage, VERSIONS[stage], shard, **parts)


def _shard_key(stage: str, shard: Shard, cfg: Config, **parts: object) -> Key:
    """The key of a stage that reads ``shard``'s documents: the shard's part and ``parts``."""
    return _key(stage, shard.shard_id, corpus=_corpus_part(shard, cfg), **parts)


def tokens_key(shard: Shard, cfg: Config) -> Key:
    name = tokenizer_name(cfg)
    return _shard_key(
        "tokens",
        shard,
        cfg,
        tokens={"tokenizer": name},
        model_weights=model_fingerprint(name),
        domain_model=_domain_model_part(cfg),
    )


def ids_key(tokens: list[Key], cfg: Config) -> Key:
    return _key(
        "ids",
        tokens=[k.id for k in tokens],
        corpus={"duplicate_ids": cfg.corpus.duplicate_ids},
    )


def bigrams_key(tokens: Key) -> Key:
    """Bigrams under the budget tokenizer, by the domains of the shard's index."""
    return _key("bigrams", tokens.shard, tokens=tokens.id)


def domains_key(tokens: list[Key], ids: Key, bigrams: list[Key] | None) -> Key:
    return _key(
        "domains",
        tokens=[k.id for k in tokens],
        ids=ids.id,
        bigrams=None if bigrams is None else [k.id for k in bigrams],
    )


def quality_key(
    shard: Shard, scorer: QualityConfig, cfg: Config, reference: Key | None = None
) -> Key:
    """The key of one scorer's q(x) on ``shard``: each scorer is cached on its own; a
    fitted scorer's (reference, embedding-probe) names the model the run fitted for it
    (``reference``)."""
    q = scorer.model_dump(exclude={"name", "batch_tokens", "compile", "device"})
    if q["reference"] is None:
        del q["reference"]  # a field added later: the other scorers keep their keys
    fp = model_fingerprint(q["model"]) if q["model"] else None
    fitted = {"reference_model": reference.id} if reference is not None else {}
    return _shard_key("quality", shard, cfg, quality=q, model_weights=fp, **fitted)


def probe_key(tokens: list[Key], embed: list[Key], scorer: QualityConfig) -> Key:
    """The embedding probe of ``scorer``: fitted on the embeddings ``embed`` of the
    documents of the domains ``scorer.reference`` against the corpus (``tokens``)."""
    assert scorer.reference is not None
    return _key(
        "probe",
        tokens=[k.id for k in tokens],
        embed=[k.id for k in embed],
        reference={"domains": sorted(scorer.reference)},
    )


def reference_key(tokens: list[Key], scorer: QualityConfig) -> Key:
    """The reference scorer's model: fitted on the domains ``scorer.reference`` of the
    shards ``tokens`` index, against all of them."""
    assert scorer.reference is not None
    return _key(
        "reference",
        tokens=[k.id for k in tokens],
        reference={"domains": sorted(scorer.reference), "features": TOKENIZER_VERSION},
    )


def embed_key(shard: Shard, cfg: Config) -> Key:
    # The configured dtype, not the one a machine resolves "auto" to: keys must not
    # depend on where they are computed (a laptop planning a GPU cluster's run). bf16
    # and fp32 embeddings agree to cosine >= 0.999, and a rerun reuses whichever exists;
    # so do compiled and eager ones (cosine 0.99999).
    e = cfg.embed.model_dump(exclude={"batch_tokens", "compile", "device"})
    return _shard_key(
        "embed", shard, cfg, embed=e, model_weights=model_fingerprint(cfg.embed.model)
    )


def _kmeans_part(cfg: Config) -> dict:
    # The refit policy decides *whether* to fit, not what a fit computes.
    return cfg.kmeans.model_dump(exclude={"refit", "refit_new_share"})


def kmeans_key(embed: list[Key], cfg: Config) -> Key:
    """The key of a fresh fit over every shard's embeddings."""
    return _key("kmeans", embed=[k.id for k in embed], kmeans=_kmeans_part(cfg))


FRESH_FIT = "fit over all shards"  # kmeans_to_use's reason for a fit of its own


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
        return fresh, FRESH_FIT
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
        return fresh, FRESH_FIT
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
    return _key("assign", embed.shard, embed=embed.id, kmeans=km.id)


def clusters_key(assign: list[Key], cfg: Config) -> Key:
    return _key(
        "clusters",
        assign=[k.id for k in assign],
        diversity=cfg.diversity.model_dump(),
    )


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
    return _key(
        "ranks",
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
    used = quality if methods.method_of(cfg).all_scorers else quality[:1]
    return _key(
        "weights",
        tokens.shard,
        tokens=tokens.id,
        ids=ids.id,
        quality=[k.id for k in used],
        assign=assign.id,
        clusters=clusters.id,
        quality_range=q_range,
        method_stats=None if method is None else method.id,
        mixing=methods.key_part(cfg),
        # Only when set, so that runs without held-out documents keep their keys.
        **({"heldout": heldout_part(cfg)} if cfg.evaluate.heldout_fraction else {}),
    )


def heldout_part(cfg: Config) -> dict:
    """What decides which documents ``evaluate.heldout_fraction`` holds out."""
    return {"fraction": cfg.evaluate.heldout_fraction, "seed": cfg.mixing.seed}


def budget_key(weights: list[Key], target: int, cfg: Config) -> Key:
    return _key(
        "budget",
        weights=[k.id for k in weights],
        mixing={"target_tokens": target, "max_repeats": cfg.mixing.max_repeats},
        output={
            "max_part_bytes": cfg.output.max_part_bytes,
            "rows_per_shard": cfg.output.rows_per_shard,
        },
    )


def counts_key(weights: Key, budget: Key, rates: dict[str, float], cfg: Config) -> Key:
    return _key(
        "counts",
        weights.shard,
        weights=weights.id,
        budget=budget.id,
        report=rates,
        mixing={"seed": cfg.mixing.seed},
    )


def output_key(counts: list[Key], budget: Key) -> Key:
    """What the files under ``output.path`` were written from."""
    return _key("output", counts=[k.id for k in counts], budget=budget.id)


def quality_range(quality: list[dict]) -> list[float]:
    """[min, max] of q over all shards' quality summaries (empty shards have None)."""
    return [
        min(r["min"] for r in quality if r["min"] is not None),
        max(r["max"] for r in quality if r["max"] is not None),
    ]


def target_tokens(source_tokens: int, cfg: Config) -> int:
    """T_tgt: the configured budget, or budget_ratio (default 1.0) × T_src."""
    if cfg.mixing.budget is not None:
        return cfg.mixing.budget
    return round((cfg.mixing.budget_ratio or 1.0) * source_tokens)


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
