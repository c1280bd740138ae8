"""The mix pipeline's stage graph, declared once (design.md, "The stage graph").

Each ``Stage`` says whether it maps over shards or reduces, which stages' artifacts it
reads (``inputs``), how its calls and their cache keys follow from what is known so far
(``calls``), the engine function that computes one call (``run``), the resources it asks
for (``gpu``) and, through the mixing methods' ``reduces``, which methods it serves.
Three walkers read ``GRAPH`` (pipeline/walk.py): the Prefect flow (flows/mix.py),
``samplemix plan`` (pipeline/plan.py) and the in-process runner (pipeline/walk.py).
Adding a stage is one declaration here plus its function in pipeline/stages.py.

``MATERIALISE`` writes the mixture's parts into the output, not the store, so it is not
in ``GRAPH``: the runners start it, and the ``PUBLISH_*`` stages that write the plan
and the rejects beside it, once the graph is walked (``OUTPUT_STAGES``, pipeline/walk.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from samplemix.config import Config, QualityConfig
from samplemix.io.corpus import CorpusError, Shard
from samplemix.io.store import Key
from samplemix.mixing import kmeans, methods
from samplemix.pipeline import keys, stages
from samplemix.scoring.static_embed import is_static

if TYPE_CHECKING:
    from samplemix.pipeline.walk import Walk


@dataclass(frozen=True)
class Call:
    """One task of a stage: ``run(*args, store, key)`` commits the artifact ``key``.
    ``label`` names the task run after its stage (a shard id, "fit", "part-00000");
    ``note`` is a choice worth a log line and a word in the plan (k-means reuse)."""

    key: Key
    label: str
    args: tuple
    note: str = ""


class Unknown(Exception):  # noqa: N818 - a state of knowledge, not an error to report
    """A stage's calls need a result of ``stage`` that is not in the store yet (only
    ``samplemix plan`` meets this: the runners compute before they read). ``reason``
    replaces the plan's "after <stage>" for the stage that raised it."""

    def __init__(self, stage: str, reason: str | None = None) -> None:
        super().__init__(stage)
        self.stage, self.reason = stage, reason


def _no_gpu(cfg: Config, args: tuple) -> bool:
    return False


@dataclass(frozen=True)
class Stage:
    """One stage of the graph; see the module docstring."""

    name: str
    per_shard: bool
    inputs: tuple[str, ...]
    calls: Callable[[Walk], list[Call]]
    run: Callable[..., dict]
    gpu: Callable[[Config, tuple], bool] = field(default=_no_gpu)
    done: Callable[[Walk], None] | None = None  # checks and log lines once its results are in
    when: Callable[[Config], bool] | None = None  # None: every run has it (but see applies)

    def applies(self, cfg: Config) -> bool:
        """Whether a run of ``cfg`` has this stage: ``when`` says, and a method's reduce
        is only for its method."""
        if self.when is not None and not self.when(cfg):
            return False
        return self.name not in METHOD_STAGES or self.name in methods.method_of(cfg).reduces


def _per_shard(make: Callable[..., tuple[Key, tuple]]) -> Callable[[Walk], list[Call]]:
    """calls() of a map stage: ``make(walk, i, shard)`` gives shard i's (key, args)."""

    def calls(w: Walk) -> list[Call]:
        made = [make(w, i, s) for i, s in enumerate(w.shards)]
        return [Call(key, s.shard_id, args) for s, (key, args) in zip(w.shards, made, strict=True)]

    return calls


# ---- corpus-wide reads: tokens, ids, embeddings, quality ---------------------------------


def _fitted(cfg: Config, scorer: str) -> list[QualityConfig]:
    """The scorers of kind ``scorer`` (reference, embedding-probe) of ``cfg``."""
    return [q for q in cfg.quality if q.scorer == scorer]


def _reference_calls(w: Walk) -> list[Call]:
    """One fit per reference scorer, over every shard."""
    tok = w.keys("tokens")
    return [
        Call(keys.reference_key(tok, q), q.label, (w.shards, tok, q, w.cfg))
        for q in _fitted(w.cfg, "reference")
    ]


def _probe_calls(w: Walk) -> list[Call]:
    """One fit per embedding-probe scorer, over every shard's embeddings."""
    tok, emb = w.keys("tokens"), w.keys("embed")
    return [
        Call(keys.probe_key(tok, emb, q), q.label, (tok, emb, q))
        for q in _fitted(w.cfg, "embedding-probe")
    ]


def _quality_calls(w: Walk) -> list[Call]:
    """Scorer by scorer, shard by shard (``Walk.quality_keys`` reads them back per shard);
    a fitted scorer's calls name the model the run fitted for it (and a probe's, the
    shard's embeddings)."""
    cfg = w.cfg
    model: dict[int, Key] = {}
    for stage, kind in (("reference", "reference"), ("probe", "embedding-probe")):
        scorers = _fitted(cfg, kind)
        if scorers:
            model |= dict(zip(map(id, scorers), w.keys(stage), strict=True))
    calls = []
    for q in cfg.quality:
        for i, s in enumerate(w.shards):
            fitted = model.get(id(q))
            reads = () if fitted is None else (fitted,)
            if q.scorer == "embedding-probe":
                reads = (*reads, w.keys("embed")[i])
            key = keys.quality_key(s, q, cfg, fitted)
            calls.append(Call(key, f"{q.label}/{s.shard_id}", (s, q, reads, cfg)))
    return calls


def _ids_done(w: Walk) -> None:
    """Fail at once, in one line, on a corpus with no usable document."""
    tok, dups = w.summaries("tokens"), w.summary("ids")
    n_docs = sum(r["docs"] for r in tok)
    if n_docs - sum(dups["dropped"].values()) == 0:
        rejects = sum(sum(r["rejects"].values()) for r in tok)
        skipped = sum(r["skipped"] for r in tok)
        raise CorpusError(
            f"no usable documents under {w.cfg.corpus.input}: {len(w.shards)} shards "
            f"({skipped} skipped as unreadable), {rejects} rows rejected (see the reasons in "
            f"{w.store.root}/tokens/*/rejects.parquet); check corpus.text_column = "
            f"{w.cfg.corpus.text_column!r}"
        )
    source = keys.source_tokens(tok, dups)
    target = keys.target_tokens(source, w.cfg)
    w.log.info("%d documents, T_src = %d tokens, T_tgt = %d", n_docs, source, target)


def _ids_calls(w: Walk) -> list[Call]:
    tok = w.keys("tokens")
    docs = [None if r is None else r["docs"] for r in w.summaries("tokens", partial=True)]
    n_docs = sum(d or 0 for d in docs)  # all known whenever the reduce runs
    return [Call(keys.ids_key(tok, w.cfg), "duplicates", (tok, n_docs, w.cfg))]


# ---- clusters and diversity ------------------------------------------------------------


def _faiss_gpu(cfg: Config, args: tuple) -> bool:
    return cfg.compute.gpus > 0 and kmeans.gpus() > 0


def _kmeans_calls(w: Walk) -> list[Call]:
    tok, emb = w.keys("tokens"), w.keys("embed")
    docs = [None if r is None else r["docs"] for r in w.summaries("tokens", partial=True)]
    key, why = keys.kmeans_to_use(w.store, emb, docs, w.cfg)
    if key is None:
        raise Unknown("kmeans", why)
    n_docs = sum(d or 0 for d in docs)  # all known whenever the fit runs
    note = "" if why == keys.FRESH_FIT else why
    return [Call(key, "fit", (list(zip(tok, emb, strict=True)), n_docs, w.cfg), note)]


def _assign(w: Walk, i: int, shard: Shard) -> tuple[Key, tuple]:
    tok, emb, km = w.keys("tokens")[i], w.keys("embed")[i], w.keys("kmeans")[0]
    return keys.assign_key(emb, km), (tok, emb, km)


def _clusters_calls(w: Walk) -> list[Call]:
    assign, km = w.keys("assign"), w.keys("kmeans")[0]
    return [Call(keys.clusters_key(assign, w.cfg), "stats", (assign, km, w.cfg))]


# ---- the methods' reduces ----------------------------------------------------------------


def _ranks_calls(w: Walk) -> list[Call]:
    domain_docs: Counter[str] = Counter()
    for r in w.summaries("tokens"):
        domain_docs.update(r["domain_docs"])
    params = keys.quadmix_params(w.cfg, sorted(domain_docs)).to_dict()
    tok, ids, qual = w.keys("tokens"), w.keys("ids")[0], w.quality_keys()
    key = keys.ranks_key(tok, ids, qual, params, w.cfg)
    return [Call(key, "quadmix", (tok, ids, qual, dict(domain_docs), w.cfg))]


def _bigrams(w: Walk, i: int, shard: Shard) -> tuple[Key, tuple]:
    tok = w.keys("tokens")[i]
    return keys.bigrams_key(tok), (shard, tok, w.cfg)


def _domains_calls(w: Walk) -> list[Call]:
    tok, ids = w.keys("tokens"), w.keys("ids")[0]
    bigrams = w.keys("bigrams") if GRAPH_BY_NAME["bigrams"].applies(w.cfg) else None
    return [Call(keys.domains_key(tok, ids, bigrams), "stats", (tok, ids, bigrams))]


def _domains_done(w: Walk) -> None:
    w.log.info("domain shares: %s", methods.baseline_proportions(w.cfg, w.summary("domains")))


# ---- weights, budget, counts -------------------------------------------------------------


def _weights_calls(w: Walk) -> list[Call]:
    cfg = w.cfg
    q_range = keys.quality_range(w.summaries("quality")[: len(w.shards)])  # the first scorer
    reduces = methods.method_of(cfg).reduces
    reduce = w.keys(reduces[-1])[0] if reduces else None
    tok, ids, assign = w.keys("tokens"), w.keys("ids")[0], w.keys("assign")
    cl = w.keys("clusters")[0]
    out = []
    for i, (s, q) in enumerate(zip(w.shards, w.quality_keys(), strict=True)):
        key = keys.weights_key(tok[i], ids, q, assign[i], cl, q_range, cfg, reduce)
        out.append(Call(key, s.shard_id, (tok[i], ids, q, assign[i], cl, q_range, reduce, cfg)))
    return out


def _budget_calls(w: Walk) -> list[Call]:
    target = keys.target_tokens(keys.source_tokens(w.summaries("tokens"), w.summary("ids")), w.cfg)
    weights = w.keys("weights")
    parts = list(zip(w.keys("tokens"), weights, strict=True))
    return [Call(keys.budget_key(weights, target, w.cfg), "scale", (parts, target, w.cfg))]


def _counts_calls(w: Walk) -> list[Call]:
    """Shard by shard, with the report's sampling rates worked out once for all."""
    budget, ids = w.keys("budget")[0], w.keys("ids")[0]
    rates = stages.report_rates(w.summaries("tokens"))
    tok, assign, weights = w.keys("tokens"), w.keys("assign"), w.keys("weights")
    calls = []
    for i, (s, q) in enumerate(zip(w.shards, w.quality_keys(), strict=True)):
        args = (s, tok[i], ids, q[0], assign[i], weights[i], budget, rates, w.cfg)
        calls.append(Call(keys.counts_key(weights[i], budget, rates, w.cfg), s.shard_id, args))
    return calls


def _tokens(w: Walk, i: int, shard: Shard) -> tuple[Key, tuple]:
    return keys.tokens_key(shard, w.cfg), (shard, w.cfg)


def _embed(w: Walk, i: int, shard: Shard) -> tuple[Key, tuple]:
    return keys.embed_key(shard, w.cfg), (shard, w.cfg)


def _domain_model_gpu(cfg: Config, args: tuple) -> bool:
    return cfg.compute.gpus > 0 and bool(cfg.corpus.domain_model)


def _encoder_gpu(cfg: Config, args: tuple) -> bool:
    return cfg.compute.gpus > 0 and not is_static(cfg.embed.model)


def _scorer_gpu(cfg: Config, args: tuple) -> bool:
    # args: shard, scorer, cfg. Rules and fastText run on CPU (fastText has no GPU path).
    return cfg.compute.gpus > 0 and args[1].scorer in ("hf-classifier", "perplexity")


# The pipeline, in the order a walk takes it. The inputs are what a stage's run reads;
# a stage whose inputs are all finished starts, so tokens, embed and quality run together.
# kmeans waits for the ids only so that a corpus with no usable document fails in one
# line (_ids_done) before a fit on nothing.
# fmt: off
GRAPH: tuple[Stage, ...] = (
    # Stage(name, per shard, inputs, calls, run, gpu)
    Stage("tokens", True, (), _per_shard(_tokens), stages.run_tokens, _domain_model_gpu),
    Stage("embed", True, (), _per_shard(_embed), stages.run_embed, _encoder_gpu),
    Stage("reference", False, ("tokens",), _reference_calls, stages.run_reference,
          when=lambda cfg: bool(_fitted(cfg, "reference"))),
    Stage("probe", False, ("tokens", "embed"), _probe_calls, stages.run_probe,
          when=lambda cfg: bool(_fitted(cfg, "embedding-probe"))),
    Stage("quality", True, ("reference", "probe"), _quality_calls, stages.run_quality,
          _scorer_gpu),
    Stage("ids", False, ("tokens",), _ids_calls, stages.run_ids, done=_ids_done),
    Stage("kmeans", False, ("tokens", "ids", "embed"), _kmeans_calls, stages.run_kmeans,
          _faiss_gpu),
    Stage("assign", True, ("tokens", "embed", "kmeans"), _per_shard(_assign), stages.run_assign,
          _faiss_gpu),
    Stage("clusters", False, ("assign", "kmeans"), _clusters_calls, stages.run_clusters),
    Stage("ranks", False, ("tokens", "ids", "quality"), _ranks_calls, stages.run_ranks),
    Stage("bigrams", True, ("tokens",), _per_shard(_bigrams), stages.run_bigrams),
    Stage("domains", False, ("tokens", "ids", "bigrams"), _domains_calls, stages.run_domains,
          done=_domains_done),
    Stage("weights", True, ("tokens", "ids", "quality", "assign", "clusters", "ranks", "domains"),
          _weights_calls, stages.run_weights),
    Stage("budget", False, ("tokens", "ids", "weights"), _budget_calls, stages.run_budget),
    Stage("counts", True, ("tokens", "ids", "quality", "assign", "weights", "budget"),
          _counts_calls, stages.run_counts),
)
# fmt: on
GRAPH_BY_NAME = {s.name: s for s in GRAPH}
# The stages that only some methods have: those the methods name as their reduces.
METHOD_STAGES = frozenset(r for m in methods.BY_NAME.values() for r in m.reduces)


def made_by_runner(w: Walk) -> list[Call]:
    """The calls of a stage outside ``GRAPH``, which its runner makes itself."""
    raise TypeError("this stage's calls are made by the code that runs it, not by a walk")


# Their calls depend on the output's state (walk.build makes them).
MATERIALISE = Stage("materialise", False, ("counts", "budget"), made_by_runner, stages.run_gather)
# The per-document plan, shard by shard, and the rejects: on workers, so that the flow
# moves no data whatever the corpus's size.
PUBLISH_PLAN = Stage("publish-plan", True, ("counts",), made_by_runner, stages.run_publish_plan)
PUBLISH_REJECTS = Stage(
    "publish-rejects", False, ("tokens", "ids"), made_by_runner, stages.run_publish_rejects
)
#: The stages that write the output, in the order a run starts them.
OUTPUT_STAGES = (MATERIALISE, PUBLISH_PLAN, PUBLISH_REJECTS)
