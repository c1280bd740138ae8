"""The ``mix`` flow: corpus → scores → weights → counts → mixture shards + report.

Per-shard stages fan out as Dask tasks; reduces run between them on small
summaries. See design.md for the stage graph. No maths here.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from collections.abc import Iterator

import fsspec
from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import PrefectFuture, as_completed
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
from prefect_dask import DaskTaskRunner

from samplemix import stages
from samplemix.config import Config
from samplemix.corpus import CorpusError, discover_shards
from samplemix.store import Store
from tasks import stages as t


def store_for(cfg: Config) -> Store:
    return Store(
        cfg.output.store or f"{cfg.output.path.rstrip('/')}/store", cfg.corpus.storage_options
    )


def _run_name() -> str:
    from prefect.runtime import flow_run

    cfg: Config = flow_run.parameters["config"]
    corpus = posixpath.basename(cfg.corpus.input.rstrip("/*")) or "corpus"
    m = cfg.mixing
    budget = f"{m.budget:,}tok" if m.budget else f"x{m.budget_ratio or 1.0:g}"
    return f"mix-{corpus}-samplemix-a{m.alpha:g}-{budget}"


def _collect(futures: list[PrefectFuture], stage: str) -> list[dict]:
    """Results in submission order; a progress artifact counts finished tasks."""
    if not futures:
        return []
    artifact = create_progress_artifact(0.0, description=f"{stage}: tasks done")
    log = get_run_logger()
    index = {f.task_run_id: i for i, f in enumerate(futures)}
    results: list[dict | None] = [None] * len(futures)
    for done, fut in enumerate(as_completed(futures), 1):
        results[index[fut.task_run_id]] = fut.result()
        update_progress_artifact(artifact, 100.0 * done / len(futures))
        log.info("%s: %d/%d done", stage, done, len(futures))
    log.info(
        "%s: %d computed, %d from the store",
        stage,
        sum(not r["cached"] for r in results),
        sum(r["cached"] for r in results),
    )
    return results  # type: ignore[return-value]


@flow(name="mix", flow_run_name=_run_name)
def mix(config: Config) -> dict:
    """Build the mixture for ``config``. Returns the run summary (budget figures, the
    files written, and per stage how many tasks computed vs came from the store)."""
    cfg = config
    log = get_run_logger()
    store = store_for(cfg)
    out = cfg.output.path.rstrip("/")
    shards = discover_shards(cfg.corpus)
    log.info("%d shards under %s; store %s", len(shards), cfg.corpus.input, store.root)

    keys = [
        {
            "tokens": stages.tokens_key(s, cfg),
            "quality": stages.quality_key(s, cfg),
            "embed": stages.embed_key(s, cfg),
        }
        for s in shards
    ]
    tok_f = [t.tokens.submit(s, cfg, store, k["tokens"]) for s, k in zip(shards, keys, strict=True)]
    emb_f = [t.embed.submit(s, cfg, store, k["embed"]) for s, k in zip(shards, keys, strict=True)]
    qual_f = [
        t.quality.submit(s, cfg, store, k["quality"]) for s, k in zip(shards, keys, strict=True)
    ]

    tok = _collect(tok_f, "tokens")
    n_docs = sum(r["docs"] for r in tok)
    if n_docs == 0:
        rejects = sum(sum(r["rejects"].values()) for r in tok)
        raise CorpusError(
            f"no usable documents under {cfg.corpus.input}: {len(shards)} shards, "
            f"{rejects} rows rejected (see the reasons in {store.root}/tokens/*/rejects.parquet); "
            f"check corpus.text_column = {cfg.corpus.text_column!r}"
        )
    source_tokens = sum(r["tokens"] for r in tok)
    target = stages.target_tokens(source_tokens, cfg)
    log.info("%d documents, T_src = %d tokens, T_tgt = %d", n_docs, source_tokens, target)

    emb = _collect(emb_f, "embed")
    km_key = stages.kmeans_key([k["embed"] for k in keys], cfg)
    km = t.kmeans.submit(
        [(k["tokens"], k["embed"]) for k in keys], n_docs, cfg, store, km_key
    ).result()
    for k in keys:
        k["assign"] = stages.assign_key(k["embed"], km_key)
    asg = _collect(
        [
            t.assign.submit(s, k["tokens"], k["embed"], km_key, store, k["assign"])
            for s, k in zip(shards, keys, strict=True)
        ],
        "assign",
    )
    cl_key = stages.clusters_key([k["assign"] for k in keys], cfg)
    cl = t.clusters.submit([k["assign"] for k in keys], km_key, cfg, store, cl_key).result()

    qual = _collect(qual_f, "quality")
    q_range = [
        min(r["min"] for r in qual if r["min"] is not None),
        max(r["max"] for r in qual if r["max"] is not None),
    ]
    d_range = [cl["d_min"], cl["d_max"]]
    for k in keys:
        k["clusters"] = cl_key
        k["weights"] = stages.weights_key(
            k["tokens"], k["quality"], k["assign"], cl_key, q_range, cfg
        )
    wts = _collect(
        [
            t.weights.submit(s, k, q_range, d_range, cfg, store, k["weights"])
            for s, k in zip(shards, keys, strict=True)
        ],
        "weights",
    )

    b_key = stages.budget_key([k["weights"] for k in keys], target, cfg)
    plan = t.budget.submit(
        [(k["tokens"], k["weights"]) for k in keys], target, cfg, store, b_key
    ).result()
    for k in keys:
        k["counts"] = stages.counts_key(k["weights"], b_key, cfg)
    cnt = _collect(
        [
            t.counts.submit(s, k, plan, cfg, store, k["counts"])
            for s, k in zip(shards, keys, strict=True)
        ],
        "counts",
    )

    fs, out_path = fsspec.core.url_to_fs(out, **cfg.corpus.storage_options)
    for folder in ("mixture", "plan"):  # a previous run may have written more parts
        if fs.exists(f"{out_path}/{folder}"):
            fs.rm(f"{out_path}/{folder}", recursive=True)
    mixture = _materialise(keys, cnt, plan, store, out)
    stages.run_publish([k["counts"] for k in keys], [k["tokens"] for k in keys], store, out)

    settings = {
        "method": "samplemix",
        "alpha": cfg.mixing.alpha,
        "scorer": cfg.quality.scorer,
        "embed model": cfg.embed.model,
        "K": km["k"],
        "seed": cfg.mixing.seed,
        "budget": f"{target:,} tokens",
        "max_repeats": cfg.mixing.max_repeats,
        "diversity": f"{cfg.diversity.form}/{cfg.diversity.separation}",
    }
    inputs = stages.report_inputs(tok, cnt, cl, target, settings)
    _publish_report(inputs, out, cfg)
    stage_results = {
        "tokens": tok,
        "embed": emb,
        "quality": qual,
        "assign": asg,
        "weights": wts,
        "counts": cnt,
    }
    summary = {
        "target_tokens": target,
        "source_tokens": source_tokens,
        "expected_tokens": inputs.expected_tokens,
        "realised_tokens": inputs.realised_tokens,
        "sigma_tokens": inputs.sigma_tokens,
        "documents": n_docs,
        "rejects": sum(inputs.rejects.values()),
        "clusters": km["k"],
        "mixture_rows": sum(r["rows"] for r in mixture),
        "mixture_parts": len(mixture),
        "output": out,
        "computed": {s: sum(not r["cached"] for r in rs) for s, rs in stage_results.items()}
        | {
            "kmeans": int(not km["cached"]),
            "clusters": int(not cl["cached"]),
            "budget": int(not plan["cached"]),
        },
    }
    log.info(
        "mixture: %d rows in %d parts; %d of %d target tokens (σ = %.0f)",
        summary["mixture_rows"],
        summary["mixture_parts"],
        summary["realised_tokens"],
        target,
        summary["sigma_tokens"],
    )
    return summary


def _materialise(keys: list[dict], cnt: list[dict], plan: dict, store: Store, out: str) -> list:
    holders: dict[int, list[str]] = {b: [] for b in range(plan["buckets"])}
    for k, c in zip(keys, cnt, strict=True):
        for b in c["buckets"]:
            holders[b].append(k["counts"])
    tasks = [t.materialise.submit(b, holders[b], store, out) for b in range(plan["buckets"])]
    return _collect(tasks, "materialise")


def _publish_report(inputs, out: str, cfg: Config) -> None:  # noqa: ANN001
    from samplemix import report

    report.write_report(inputs, f"{out}/report", cfg.corpus.storage_options)
    create_markdown_artifact(
        report.report_markdown(inputs), key="mixture-report", description="SampleMix mixture report"
    )
    create_table_artifact(
        report.table_rows(inputs), key="mixture-domains", description="Domain shares before/after"
    )


def task_runner(cfg: Config) -> DaskTaskRunner:
    """A runner on ``compute.scheduler_address``, else a LocalCluster of single-threaded
    worker processes (one per core by default)."""
    if cfg.compute.scheduler_address:
        return DaskTaskRunner(address=cfg.compute.scheduler_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers(cfg),
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": ":0",
        },
    )


def workers(cfg: Config) -> int:
    return cfg.compute.n_workers or len(os.sched_getaffinity(0))


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Yield the Prefect API URL, starting a temporary local server when none is set.

    Prefect's own ephemeral mode would start one more server inside every Dask worker
    process, and their task runs would never reach the flow's database; one server
    whose URL the workers inherit through the environment keeps a run in one place.
    """
    url = get_current_settings().api.url
    if url:
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # send queued logs while the server still listens
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def run_mix(cfg: Config) -> dict:
    """Run the flow with the task runner ``cfg.compute`` asks for; torch threads per
    worker default to the cores shared out among the local workers."""
    if cfg.compute.torch_threads is None and not cfg.compute.scheduler_address:
        threads = max(1, len(os.sched_getaffinity(0)) // workers(cfg))
        cfg = cfg.model_copy(
            update={"compute": cfg.compute.model_copy(update={"torch_threads": threads})}
        )
    with prefect_api():
        return mix.with_options(task_runner=task_runner(cfg))(cfg)
