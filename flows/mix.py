"""The ``mix`` flow: corpus → scores → weights → counts → mixture shards + report.

Per-shard stages fan out as Dask tasks; reduces run between them on small
summaries. See design.md for the stage graph. No maths here.
"""

from __future__ import annotations

import contextlib
import posixpath
import queue
import time
from collections import Counter
from collections.abc import Iterator

import dask
from prefect import Task, flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import PrefectFuture
from prefect_dask import DaskTaskRunner

from flows.runtime import (
    await_recorded,
    check_inputs,
    prefect_api,
    share_threads,
    task_runner,
    with_block_credentials,
)
from samplemix import kmeans, stages
from samplemix.config import ComputeConfig, Config
from samplemix.corpus import CorpusError, discover, passed_over_lines
from samplemix.models import model_fingerprint
from samplemix.static import is_static
from samplemix.store import Key, Output, Store
from tasks import stages as t


class NoWorkerError(RuntimeError):
    """The Dask cluster had no worker able to run a stage's tasks for
    ``compute.no_worker_timeout_s``; the message names the stage, the scheduler and
    what to do."""


def run_name(cfg: Config | None = None) -> str:
    """``mix-<corpus folder>-<method>-<budget>``, from ``cfg`` or else the running
    flow's ``config`` parameter (Prefect calls this with no argument)."""
    from prefect.runtime import flow_run

    if cfg is None:
        cfg = flow_run.parameters["config"]
    corpus = posixpath.basename(cfg.corpus.input.rstrip("/*")) or "corpus"
    m = cfg.mixing
    budget = f"{m.budget:,}tok" if m.budget else f"x{m.budget_ratio or 1.0:g}"
    method = f"samplemix-a{m.alpha:g}" if m.method == "samplemix" else m.method
    return f"mix-{corpus}-{method}-{budget}"


Launched = list[PrefectFuture | dict]


def _launch(
    task: Task, calls: list[tuple[Key, tuple]], store: Store, gpu: bool = False
) -> Launched:
    """Start ``task(*args)`` for each (key, args): on Dask when the artifact is not in
    the store, else right here, where serving it costs one read (a Cached run). With
    ``gpu`` each Dask task asks for the resource GPU=1, so only GPU workers run it."""
    done = store.summaries([key for key, _ in calls])
    with dask.annotate(resources={"GPU": 1}) if gpu else contextlib.nullcontext():
        out: Launched = [
            None if key in done else task.submit(*args)  # type: ignore[misc]
            for key, args in calls
        ]
    for i, (_, args) in enumerate(calls):
        if out[i] is None:
            out[i] = task(*args, return_state=True).result()
    return out


POLL_S = 2.0  # a wait with no task finishing asks the scheduler for its workers this often


class _WorkerWatch:
    """Ends a stage's wait once the running flow's Dask cluster has had no worker able
    to run the stage's tasks (with ``gpu``: none with the resource GPU=1) for
    ``timeout`` seconds, counted from the first check that found none. Dask itself
    waits for workers forever. Outside a Dask task runner it checks nothing."""

    def __init__(self, stage: str, gpu: bool, timeout: float) -> None:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        runner = ctx.task_runner if ctx is not None else None
        self.client = runner.client if isinstance(runner, DaskTaskRunner) else None
        self.stage, self.gpu, self.timeout = stage, gpu, timeout
        self.since: float | None = None

    def check(self) -> None:
        """Raise NoWorkerError when no able worker has been seen for ``timeout`` s."""
        if self.client is None:
            return
        workers = self.client.scheduler_info()["workers"].values()
        now = time.monotonic()
        if any(not self.gpu or w.get("resources", {}).get("GPU", 0) >= 1 for w in workers):
            if self.since is not None:
                get_run_logger().info(
                    "%s: Dask workers again after %.0f s", self.stage, now - self.since
                )
            self.since = None
            return
        if self.since is None:
            self.since = now
            get_run_logger().warning(
                "%s: the Dask cluster has no %s; waiting up to %g s for one "
                "(compute.no_worker_timeout_s)",
                self.stage,
                "worker with the resource GPU=1" if self.gpu else "worker",
                self.timeout,
            )
        elif now - self.since >= self.timeout:
            address = self.client.scheduler.address
            if self.gpu:
                raise NoWorkerError(
                    f"{self.stage}: no Dask worker with the resource GPU=1 for "
                    f"{self.timeout:g} s (scheduler {address}); start GPU workers (dask cuda "
                    "worker --resources GPU=1) or raise compute.no_worker_timeout_s"
                )
            raise NoWorkerError(
                f"{self.stage}: no Dask worker for {self.timeout:g} s (scheduler {address}); "
                "start workers or raise compute.no_worker_timeout_s"
            )


def _finished(pending: list[PrefectFuture], watch: _WorkerWatch) -> Iterator[PrefectFuture]:
    """``pending`` as each finishes; while none does, ``watch`` checks the workers."""
    finished: queue.SimpleQueue[PrefectFuture] = queue.SimpleQueue()
    for fut in pending:
        fut.add_done_callback(finished.put)  # called at once for a finished future
    for _ in pending:
        while True:
            try:
                yield finished.get(timeout=POLL_S)
                break
            except queue.Empty:
                watch.check()


def _collect(
    launched: Launched, stage: str, gpu: bool = False, compute: ComputeConfig | None = None
) -> list[dict]:
    """Results in submission order. While Dask computes, a progress artifact and log
    lines say how many of the stage's tasks are done. A failed task fails the flow
    with its exception, whose message then starts with the task run's name
    (``embed/books/part-000.parquet: ...``), so the flow run's message names the
    stage, the shard and the cause. A cluster with no worker able to run the tasks
    (``gpu``: they ask for GPU=1) for ``compute.no_worker_timeout_s`` (``compute``: the
    run's settings; by default ComputeConfig's) fails the flow with NoWorkerError."""
    if not launched:
        return []
    log = get_run_logger()
    futures = {id(f): i for i, f in enumerate(launched) if isinstance(f, PrefectFuture)}
    results: list[dict] = [r if isinstance(r, dict) else {} for r in launched]
    if futures:
        pending = [f for f in launched if isinstance(f, PrefectFuture)]
        n = len(pending)
        log.info("%s: waiting for %d tasks on Dask, %d from the store", stage, n, len(launched) - n)
        # A progress bar for the per-shard stages; a single reduce task is 0 % then 100 %.
        artifact = (
            create_progress_artifact(0.0, description=f"{stage}: {n} tasks on Dask")
            if n > 1
            else None
        )
        every = max(1, n // 20)  # about 20 progress lines per stage, however many shards
        t0 = shown = time.monotonic()
        timeout = (compute or ComputeConfig()).no_worker_timeout_s
        watch = _WorkerWatch(stage, gpu, timeout)
        for done, fut in enumerate(_finished(pending, watch), 1):
            try:
                results[futures[id(fut)]] = fut.result()
            except Exception as e:
                from prefect import get_client

                # The server records task runs from events, a moment after they end, and
                # holds a generated name until the event of the final state brings the
                # run's own; a run whose worker died before it started has none.
                where, deadline = f"a task of stage {stage}", time.monotonic() + 10
                with get_client(sync_client=True) as client:
                    while time.monotonic() < deadline:
                        with contextlib.suppress(Exception):  # not recorded yet
                            run = client.read_task_run(fut.task_run_id)
                            if run.state is not None and run.state.is_final():
                                where = run.name
                                break
                        time.sleep(0.2)
                log.error("%s failed: %s: %s", where, type(e).__name__, e)
                # Keep the type (callers catch BudgetError, CorpusError, ...) and put the
                # task run's name into the message, which becomes the flow run's message.
                if len(e.args) == 1 and isinstance(e.args[0], str) and str(e) == e.args[0]:
                    if not e.args[0].startswith(where):
                        e.args = (f"{where}: {e.args[0]}",)
                raise
            # An update is an API call (~40 ms): at most one a second, and the last.
            if artifact is not None and (done == n or time.monotonic() - shown >= 1.0):
                update_progress_artifact(artifact, 100.0 * done / n)
                shown = time.monotonic()
            if done % every == 0 or done == n:
                log.info(
                    "%s: %d/%d computed (%.0f%%, %.0f s)",
                    stage,
                    done,
                    n,
                    100.0 * done / n,
                    time.monotonic() - t0,
                )
    log.info(
        "%s: %d computed, %d from the store",
        stage,
        sum(not r["cached"] for r in results),
        sum(r["cached"] for r in results),
    )
    return results


def run_stage(
    task: Task,
    calls: list[tuple[Key, tuple]],
    store: Store,
    gpu: bool = False,
    compute: ComputeConfig | None = None,
) -> list[dict]:
    """``_launch`` then ``_collect``: one stage's results, in order."""
    return _collect(_launch(task, calls, store, gpu), task.name, gpu, compute)


@flow(name="mix", flow_run_name=run_name)
def mix(config: Config) -> dict:
    """Build the mixture for ``config``. Returns the run summary (budget figures, the
    files written, and per stage how many tasks computed vs came from the store)."""
    cfg = stages.pinned_config(config)  # one commit per hub model for the whole run
    log = get_run_logger()
    model_fingerprint.cache_clear()  # a model replaced since the last run must show
    store = stages.store_for(cfg)
    out = stages.output_for(cfg)
    store.check()
    out.check()  # a missing or refused output fails now, not after the compute
    with out.lease(cfg.output.lease_wait_s, log.info, log.warning):
        return _build(cfg, store, out)


def _build(cfg: Config, store: Store, out: Output) -> dict:
    """The flow's body, run while this run holds the output's lease."""
    log = get_run_logger()
    found = discover(cfg.corpus, cfg.storage.fsspec_options(cfg.corpus.input))
    shards = found.shards
    log.info("%d shards under %s; store %s", len(shards), cfg.corpus.input, store.root)
    for line in passed_over_lines(found.passed_over):
        log.warning(line)

    keys = [
        {
            "tokens": stages.tokens_key(s, cfg),
            "quality": [stages.quality_key(s, q, cfg) for q in cfg.quality],
            "embed": stages.embed_key(s, cfg),
        }
        for s in shards
    ]

    def per_shard(stage: str, *args: object) -> list[tuple[Key, tuple]]:
        return [(k[stage], (s, *args, k[stage])) for s, k in zip(shards, keys, strict=True)]

    method = cfg.mixing.method
    gpus = cfg.compute.gpus > 0
    faiss_gpu = gpus and kmeans.gpus() > 0  # k-means and assignments on GPU workers
    compute = cfg.compute
    tok_gpu = gpus and bool(cfg.corpus.domain_model)
    emb_gpu = gpus and not is_static(cfg.embed.model)
    qual_gpu = [gpus and q.scorer != "heuristic" for q in cfg.quality]
    tok_f = _launch(t.tokens, per_shard("tokens", cfg, store), store, tok_gpu)
    emb_f = _launch(t.embed, per_shard("embed", cfg, store), store, emb_gpu)
    qual_f = [
        _launch(
            t.quality,
            [
                (k["quality"][n], (s, q, cfg, store, k["quality"][n]))
                for s, k in zip(shards, keys, strict=True)
            ],
            store,
            qual_gpu[n],
        )
        for n, q in enumerate(cfg.quality)
    ]

    tok = _collect(tok_f, "tokens", tok_gpu, compute)
    ids_key = stages.ids_key([k["tokens"] for k in keys], cfg)
    ids_args = ([k["tokens"] for k in keys], cfg, store, ids_key)
    dups = run_stage(t.ids, [(ids_key, ids_args)], store, compute=compute)[0]
    n_docs = sum(r["docs"] for r in tok)  # embedded, duplicates dropped included
    accepted = n_docs - sum(dups["dropped"].values())
    if accepted == 0:
        rejects = sum(sum(r["rejects"].values()) for r in tok)
        skipped = sum(r["skipped"] for r in tok)
        raise CorpusError(
            f"no usable documents under {cfg.corpus.input}: {len(shards)} shards "
            f"({skipped} skipped as unreadable), {rejects} rows rejected (see the reasons in "
            f"{store.root}/tokens/*/rejects.parquet); check corpus.text_column = "
            f"{cfg.corpus.text_column!r}"
        )
    source_tokens = stages.source_tokens(tok, dups)
    target = stages.target_tokens(source_tokens, cfg)
    log.info("%d documents, T_src = %d tokens, T_tgt = %d", n_docs, source_tokens, target)

    emb = _collect(emb_f, "embed", emb_gpu, compute)
    km_key, why = stages.kmeans_to_use(
        store, [k["embed"] for k in keys], [r["docs"] for r in tok], cfg
    )
    assert km_key is not None  # every shard's document count is known by now
    log.info("kmeans: %s", why)
    km = run_stage(
        t.kmeans,
        [(km_key, ([(k["tokens"], k["embed"]) for k in keys], n_docs, cfg, store, km_key))],
        store,
        faiss_gpu,
        compute,
    )[0]
    for k in keys:
        k["assign"] = stages.assign_key(k["embed"], km_key)
    asg = run_stage(
        t.assign,
        [
            (k["assign"], (s, k["tokens"], k["embed"], km_key, store, k["assign"]))
            for s, k in zip(shards, keys, strict=True)
        ],
        store,
        faiss_gpu,
        compute,
    )
    cl_key = stages.clusters_key([k["assign"] for k in keys], cfg)
    cl_args = ([k["assign"] for k in keys], km_key, cfg, store, cl_key)
    cl = run_stage(t.clusters, [(cl_key, cl_args)], store, compute=compute)[0]

    qual = [_collect(f, "quality", g, compute) for f, g in zip(qual_f, qual_gpu, strict=True)]
    q_range = stages.quality_range(qual[0])
    d_range = [cl["d_min"], cl["d_max"]]
    reduces: dict[str, list[dict]] = {}
    tok_keys = [k["tokens"] for k in keys]
    method_key: Key | None = None
    method_input: Key | dict | None = None
    if method == "quadmix":
        domain_docs: Counter[str] = Counter()
        for r in tok:
            domain_docs.update(r["domain_docs"])
        params = stages.quadmix_params(cfg, sorted(domain_docs)).to_dict()
        qkeys = [k["quality"] for k in keys]
        method_key = method_input = stages.ranks_key(tok_keys, ids_key, qkeys, params, cfg)
        args = (tok_keys, ids_key, qkeys, dict(domain_docs), cfg, store, method_key)
        reduces["ranks"] = run_stage(t.ranks, [(method_key, args)], store, compute=compute)
    elif method in stages.BASELINES:
        bigram_keys = None
        if method == "ce":
            for k in keys:
                k["bigrams"] = stages.bigrams_key(k["tokens"])
            bigram_keys = [k["bigrams"] for k in keys]
            reduces["bigrams"] = run_stage(
                t.bigrams,
                [
                    (k["bigrams"], (s, k["tokens"], cfg, store, k["bigrams"]))
                    for s, k in zip(shards, keys, strict=True)
                ],
                store,
                compute=compute,
            )
        method_key = stages.domains_key(tok_keys, ids_key, bigram_keys)
        args = (tok_keys, ids_key, bigram_keys, store, method_key)
        reduces["domains"] = run_stage(t.domains, [(method_key, args)], store, compute=compute)
        method_input = reduces["domains"][0]
        log.info("domain shares: %s", stages.baseline_proportions(cfg, method_input))
    for k in keys:
        k["ids"] = ids_key
        k["clusters"] = cl_key
        k["weights"] = stages.weights_key(
            k["tokens"], ids_key, k["quality"], k["assign"], cl_key, q_range, cfg, method_key
        )
    wts = run_stage(
        t.weights,
        [
            (k["weights"], (s, k, q_range, d_range, method_input, cfg, store, k["weights"]))
            for s, k in zip(shards, keys, strict=True)
        ],
        store,
        compute=compute,
    )

    b_key = stages.budget_key([k["weights"] for k in keys], target, cfg)
    plan = run_stage(
        t.budget,
        [(b_key, ([(k["tokens"], k["weights"]) for k in keys], target, cfg, store, b_key))],
        store,
        compute=compute,
    )[0]
    for k in keys:
        k["counts"] = stages.counts_key(k["weights"], b_key, cfg)
    cnt = run_stage(
        t.counts,
        [
            (k["counts"], (s, k, plan, cfg, store, k["counts"]))
            for s, k in zip(shards, keys, strict=True)
        ],
        store,
        compute=compute,
    )

    out_key = stages.output_key([k["counts"] for k in keys], b_key)
    fresh = not out.current(out_key)
    if fresh:
        out.clear()
    published = None if fresh else out.manifest()["summary"]["part_rows"]  # type: ignore[index]
    mixture = _materialise(keys, cnt, plan, store, out, published, compute)
    if fresh:
        stages.run_publish(
            [k["counts"] for k in keys], [k["tokens"] for k in keys], ids_key, store, out
        )

    settings = _settings(cfg, km["k"], target, method_input)
    labels = [q.label for q in cfg.quality]
    truncated = {
        ("quality" if len(labels) == 1 else f"quality ({label})"): sum(r["truncated"] for r in rs)
        for label, rs in zip(labels, qual, strict=True)
    }
    truncated["embedding"] = sum(r["truncated"] for r in emb)
    inputs = stages.report_inputs(
        [s.shard_id for s in shards],
        tok,
        dups,
        truncated,
        cnt,
        cl,
        target,
        settings,
        passed_over=found.passed_over,
    )
    _publish_report(inputs, out, fresh)
    from samplemix import report  # matplotlib: imported once the report is due

    warnings = report.run_warnings(inputs)
    for line in warnings:
        log.warning(line)
    stage_results = {
        "tokens": tok,
        "ids": [dups],
        "quality": [r for rs in qual for r in rs],
        "embed": emb,
        "kmeans": [km],
        "assign": asg,
        "clusters": [cl],
        "weights": wts,
        "budget": [plan],
        "counts": cnt,
        **reduces,
        "materialise": mixture,
    }
    artifacts = {ids_key, km_key, b_key, *([method_key] if method_key else [])}
    for k in keys:
        for v in k.values():
            artifacts.update(v if isinstance(v, list) else [v])
    summary = {
        "target_tokens": target,
        "source_tokens": source_tokens,
        "expected_tokens": inputs.expected_tokens,
        "realised_tokens": inputs.realised_tokens,
        "sigma_tokens": inputs.sigma_tokens,
        "read": sum(r["read"] for r in tok),
        "documents": accepted,
        "rejects": sum(inputs.rejects.values()),
        "skipped_shards": sum(r["skipped"] for r in tok),
        "warnings": warnings,
        "clusters": km["k"],
        "mixture_rows": sum(r["rows"] for r in mixture),
        "mixture_parts": len(mixture),
        "part_rows": [r["rows"] for r in mixture],
        "output": out.url,
        "store": store.root,
        "mixture_key": str(out_key),
        "computed": {s: sum(not r["cached"] for r in rs) for s, rs in stage_results.items()},
        "cached": {s: sum(r["cached"] for r in rs) for s, rs in stage_results.items()},
        # Wall seconds inside the tasks that computed, summed over tasks (worker time).
        "task_seconds": {
            s: round(sum(r["seconds"] for r in rs), 2) for s, rs in stage_results.items()
        },
        "artifacts": sorted(str(k) for k in artifacts),
    }
    out.seal(out_key, summary)
    log.info(
        "mixture: %d rows in %d parts; %d of %d target tokens (σ = %.0f)",
        summary["mixture_rows"],
        summary["mixture_parts"],
        summary["realised_tokens"],
        target,
        summary["sigma_tokens"],
    )
    return summary


def _settings(cfg: Config, k: int, target: int, method_input: Key | dict | None) -> dict:
    """What the report lists under Settings for ``cfg.mixing.method``."""
    m = cfg.mixing
    settings: dict = {"method": m.method}
    if m.method == "samplemix":
        settings |= {"alpha": m.alpha, "scorer": cfg.quality[0].label}
    elif m.method == "quadmix":
        settings |= {
            "criteria": ", ".join(q.label for q in cfg.quality),
            "rank sample": m.quadmix.rank_sample or "all (exact)",
        }
    else:
        shares = stages.baseline_proportions(cfg, method_input)  # type: ignore[arg-type]
        settings["domain shares"] = ", ".join(f"{d} {p:.1%}" for d, p in shares.items())
        if m.method == "temperature":
            settings["temperature"] = m.temperature
    return settings | {
        "embed model": cfg.embed.model,
        "K": k,
        "seed": m.seed,
        "budget": f"{target:,} tokens",
        "max_repeats": m.max_repeats,
        "diversity": f"{cfg.diversity.form}/{cfg.diversity.separation}",
    }


def _materialise(
    keys: list[dict],
    cnt: list[dict],
    plan: dict,
    store: Store,
    out: Output,
    published: list[int] | None,
    compute: ComputeConfig,
) -> list[dict]:
    """Write the mixture parts on Dask, or, when ``published`` (rows per part, from
    the output's manifest) says they are all there, serve them here as Cached runs."""
    holders: dict[int, list[Key]] = {b: [] for b in range(plan["buckets"])}
    for k, c in zip(keys, cnt, strict=True):
        for b in c["buckets"]:
            holders[b].append(k["counts"])
    if published is not None:
        launched: Launched = [
            t.materialise(b, holders[b], store, out, published[b], return_state=True).result()
            for b in range(plan["buckets"])
        ]
    else:
        launched = [
            t.materialise.submit(b, holders[b], store, out, None) for b in range(plan["buckets"])
        ]
    return _collect(launched, "materialise", compute=compute)


def _publish_report(inputs, out: Output, write_files: bool) -> None:  # noqa: ANN001
    """Write the report files (when the output is new) and publish the report as
    Prefect artifacts: ``mixture-report`` (Markdown, the plots embedded as PNG data
    URLs read back from the output, so the UI shows exactly the published figures),
    ``mixture-domains`` (shares before/after) and ``mixture-shards`` (rows read,
    accepted, rejected per shard)."""
    import base64

    import fsspec

    from samplemix import report

    folder = f"{out.url}/report"
    if write_files:
        report.write_report(inputs, folder, out.fs.storage_options)
    fs, root = fsspec.core.url_to_fs(folder, **out.fs.storage_options)
    images: dict[str, str] = {}
    size = 0
    for name in report.PLOTS:
        with contextlib.suppress(FileNotFoundError):  # an output from before a plot existed
            data = fs.cat_file(f"{root}/{name}.png")
            size += len(data)
            images[name] = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    # The artifact lives in the Prefect database, once per run: above a few MB the
    # figures stay in the report folder only (the footer says where).
    if size > 4_000_000:
        images = {}
    text = report.report_markdown(inputs, images)
    text += (
        f"\n---\nFiles: `{folder}/report.md` (this report), the figures beside it, "
        f"`{folder}/shards.csv`; the mixture under `{out.url}/mixture`, the per-document "
        f"plan under `{out.url}/plan`, rejected rows in `{out.url}/rejects`.\n"
    )
    create_markdown_artifact(text, key="mixture-report", description="SampleMix mixture report")
    create_table_artifact(
        report.table_rows(inputs), key="mixture-domains", description="Domain shares before/after"
    )
    if inputs.shards:
        create_table_artifact(
            inputs.shards,
            key="mixture-shards",
            description="Rows read, accepted, rejected and renamed (duplicate ids) per shard",
        )


def run_mix(cfg: Config) -> dict:
    """Run the flow with the task runner ``cfg.compute`` asks for; torch threads per
    worker default to the cores shared out among the local workers."""
    cfg = share_threads(cfg)
    check_inputs(cfg)
    with prefect_api():
        cfg = with_block_credentials(cfg)
        state = mix.with_options(task_runner=task_runner(cfg))(cfg, return_state=True)
        summary = state.result()
        runs = sum(summary["computed"].values()) + sum(summary["cached"].values())
        await_recorded(state.state_details.flow_run_id, runs)
        return summary
