"""The ``samplemix`` command line.

Only this module and flows/ touch Prefect; the commands that run a flow import it lazily
(``_run_flow``) so that ``samplemix config --show`` stays instant.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from samplemix.config import Config, ConfigError, config_to_yaml, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Sample-wise pre-training data mixtures (SampleMix).",
)

ConfigArg = Annotated[Path | None, typer.Argument(help="YAML config file (optional)")]
Set = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any field: --set mixing.alpha=0.5 (repeatable)"),
]


def _overrides(pairs: list[str] | None, **flags: Any) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected FIELD=VALUE, e.g. mixing.alpha=0.5")
        field, value = pair.split("=", 1)
        out[field.strip()] = yaml.safe_load(value)
    return out


def _load(config: Path | None, pairs: list[str] | None, **flags: Any) -> Config:
    try:
        return load_config(config, _overrides(pairs, **flags))
    except ConfigError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None


def _evaluation_config(config: Path | None, pairs: list[str] | None, **flags: Any) -> Config:
    """``_load``'s config for evaluate/search, where a held-out share of 0 (the default)
    becomes 5% unless ``--heldout`` set it: a proxy needs held-out text to be scored on."""
    cfg = _load(config, pairs, **flags)
    if cfg.evaluate.heldout_fraction == 0 and flags.get("evaluate.heldout_fraction") is None:
        cfg = _load(config, pairs, **(flags | {"evaluate.heldout_fraction": 0.05}))
    return cfg


def _names(text: str) -> list[str]:
    """The names in comma-separated ``text``, blanks dropped."""
    return [m.strip() for m in text.split(",") if m.strip()]


def _name_list(text: str | None) -> list[str] | None:
    """``_names(text)``; None (not given) as None."""
    return None if text is None else _names(text)


def _seed_list(seeds: str | None) -> list[int] | None:
    """``"0,1,2"`` as ``[0, 1, 2]``; None or empty (not given) as None."""
    return [int(s) for s in seeds.split(",")] if seeds else None


@dataclass(frozen=True)
class _FieldOption:
    """A command-line option that sets one config field; None (its default) leaves the
    field to the config file and ``--set``."""

    field: str
    kind: type
    help: str
    #: The field's value from the option's; None: the option's value as it is.
    parse: Callable[[Any], Any] | None = None

    def parameter(self, name: str) -> inspect.Parameter:
        """The option as the keyword parameter ``name`` of a Typer callback."""
        return inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[self.kind | None, typer.Option(help=self.help)],
        )

    def value(self, given: Any) -> Any:
        """The field's value for the option's value ``given``."""
        return given if self.parse is None else self.parse(given)


#: Every option that sets one config field, by parameter (and ``--flag``) name; a command
#: names the ones it takes in ``_config_command``.
_FIELD_OPTIONS = {
    "input": _FieldOption("corpus.input", str, "Corpus folder, glob or s3:// URL"),
    "output": _FieldOption("output.path", str, "Output folder or s3:// URL"),
    "workers": _FieldOption("compute.n_workers", int, "Local Dask workers"),
    # run's mixing settings
    "budget": _FieldOption("mixing.budget", str, "Target tokens, e.g. 2M"),
    "budget_ratio": _FieldOption("mixing.budget_ratio", float, "Target as a ratio of T_src"),
    "alpha": _FieldOption("mixing.alpha", float, "0 = quality only, 1 = diversity"),
    "seed": _FieldOption("mixing.seed", int, "Seed of the count draws"),
    # the proxy evaluation's (evaluate, search)
    "seeds": _FieldOption("evaluate.seeds", str, "Proxy seeds, e.g. 0,1,2", _seed_list),
    "heldout": _FieldOption(
        "evaluate.heldout_fraction",
        float,
        "Share of each domain held out (evaluate.heldout_fraction)",
    ),
    "controls": _FieldOption(
        "evaluate.controls",
        str,
        "Planted control arms that must train worse proxies, e.g. one-domain:code,repeat:20",
        _name_list,
    ),
}


def _config_command(
    *,
    before: tuple[str, ...] = (),
    after: tuple[str, ...] = (),
    load: Callable[..., Config] = _load,
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A decorator that turns ``command(cfg, **own_options)`` into a Typer callback taking,
    in this order: the optional CONFIG argument, the options ``before`` (names in
    ``_FIELD_OPTIONS``), the command's own options, the options ``after``, and ``--set``.

    The callback runs ``command`` with ``load(CONFIG, --set pairs, **{field: value})``;
    ``_load`` exits with code 2 on an invalid config, before ``command`` starts."""
    shared = {name: _FIELD_OPTIONS[name] for name in (*before, *after)}

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]
        params = [
            inspect.Parameter(
                "config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigArg
            ),
            *(shared[name].parameter(name) for name in before),
            *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own),
            *(shared[name].parameter(name) for name in after),
            inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Set),
        ]

        @functools.wraps(command)
        def callback(*, config: Path | None, set_: list[str] | None, **options: Any) -> None:
            fields = {opt.field: opt.value(options.pop(name)) for name, opt in shared.items()}
            command(load(config, set_, **fields), **options)

        # Typer reads the parameters from the signature and their types from the
        # annotations: both must describe the callback, not ``command``.
        callback.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        callback.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
        return callback

    return decorate


def _run_flow(module: str, name: str, *args: Any) -> Any:
    """``flows.<module>.<name>(*args)``, with the errors a user can fix printed instead
    of a traceback (exit code 1)."""
    flow = getattr(importlib.import_module(f"flows.{module}"), name)
    # After the import, which sets distributed's logger to INFO: cluster chatter is
    # not progress.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    from flows.mix import NoWorkerError
    from flows.runtime import ServerStartError
    from samplemix.io.corpus import CorpusError
    from samplemix.io.store import StoreError
    from samplemix.mixing.weights import BudgetError

    fixable = (BudgetError, ConfigError, CorpusError, NoWorkerError, ServerStartError, StoreError)
    try:
        return flow(*args)
    except (*fixable, ValueError) as e:
        raise _fail(e) from None


def _alphas(alpha: str | None) -> list[float]:
    """The α values in comma-separated ``alpha``; none for None or empty."""
    return [float(a) for a in alpha.split(",")] if alpha else []


@app.command()
@_config_command(after=("input", "output", "budget", "budget_ratio", "alpha", "seed", "workers"))
def run(cfg: Config) -> None:
    """Build a mixture: score, embed, cluster, weight, count and write it."""
    summary = _run_flow("mix", "run_mix", cfg)
    t, r, s = summary["target_tokens"], summary["realised_tokens"], summary["sigma_tokens"]
    typer.echo(
        f"mixture: {summary['mixture_rows']:,} rows in {summary['mixture_parts']} parts under "
        f"{summary['output']}/mixture\n"
        f"tokens: target {t:,}, realised {r:,} ({(r - t) / max(s, 1e-9):+.2f} σ, σ = {s:,.0f})\n"
        f"report: {summary['output']}/report/report.md"
    )
    for line in summary["warnings"]:
        typer.secho(f"warning: {line}", fg="yellow", err=True)


@app.command()
@_config_command(after=("input", "output", "workers"))
def compare(
    cfg: Config,
    methods: Annotated[
        str, typer.Option(help="Comma-separated: samplemix,quadmix,vanilla,fixed,temperature,ce")
    ] = "samplemix,quadmix,vanilla",
    alpha: Annotated[
        str | None, typer.Option(help="SampleMix α sweep, e.g. 0,0.2,0.4,0.6,0.8,1")
    ] = None,
) -> None:
    """Run several methods (and α values) over shared cached scores and compare them."""
    result = _run_flow("compare", "run_compare", cfg, _names(methods), _alphas(alpha))
    for name, r in result["runs"].items():
        computed = sum(n for s, n in r["computed"].items() if s != "materialise")
        typer.echo(
            f"{name}: {r['realised_tokens']:,} tokens, {computed} tasks computed -> {r['output']}"
        )
    typer.echo(f"comparison: {cfg.output.path.rstrip('/')}/compare/compare.md")


#: The options of the commands that train proxies (evaluate, search), after their own.
_PROXY_OPTIONS = ("seeds", "heldout", "input", "output", "workers")


@app.command()
@_config_command(after=("controls", *_PROXY_OPTIONS), load=_evaluation_config)
def evaluate(
    cfg: Config,
    methods: Annotated[
        str, typer.Option(help="Comma-separated methods: samplemix,quadmix,vanilla,...")
    ] = "vanilla",
    alpha: Annotated[
        str | None,
        typer.Option(help="SampleMix α values, e.g. 0.8,0,1 (0 = quality only, 1 = diversity)"),
    ] = "0.8,0,1",
) -> None:
    """Mix several methods / α values and compare them by training proxy LMs (held-out loss)."""
    result = _run_flow("evaluate", "run_evaluate", cfg, _names(methods), _alphas(alpha))
    report = result["report"]
    for line in report["verdict"]:
        typer.echo(line)
    typer.echo(f"report: {result['output']}/evaluate.md")


@app.command()
@_config_command(after=_PROXY_OPTIONS, load=_evaluation_config)
def search(
    cfg: Config,
    space: Annotated[str, typer.Option(help="samplemix (α) or quadmix (Algorithm 1's θ)")] = (
        "samplemix"
    ),
    instrument: Annotated[
        str,
        typer.Option(
            help="What measures each draw: proxy (evaluate.seeds proxy LMs) or ngram (the "
            "seedless n-gram model alone, no proxy trained: for many draws)"
        ),
    ] = "proxy",
    draws: Annotated[
        int | None,
        typer.Option(
            help="Parameter sets to evaluate", show_default="4 per searched parameter, ≥ 16"
        ),
    ] = None,
    validation: Annotated[
        int | None,
        typer.Option(help="Draws held out to measure the fit", show_default="max(4, draws / 4)"),
    ] = None,
    candidates: Annotated[int, typer.Option(help="Fresh draws the regressor ranks")] = 100_000,
    top: Annotated[int, typer.Option(help="Best predicted draws averaged")] = 10,
) -> None:
    """Search mixing parameters: draw, evaluate by proxy or n-gram, fit LightGBM, write the
    best config."""
    r = _run_flow(
        "evaluate", "run_search", cfg, space, draws, validation, candidates, top, instrument
    )
    if r["mae"] is None:
        fit = "not measured (no held-out draws)"
    else:
        rho = "undefined" if math.isnan(r["spearman"]) else f"{r['spearman']:.2f}"
        verdict = "beats" if r["predicts"] else "does not beat (the fit predicts nothing)"
        fit = (
            f"MAE {r['mae']:.4f} on {r['validation']} of {r['draws']} draws held out, "
            f"constant predictor {r['constant_mae']:.4f}: it {verdict}; Spearman ρ {rho}"
        )
    typer.echo(
        f"chosen: {r['theta'] if space == 'samplemix' else 'see the config'}; "
        f"{instrument} loss predicted {r['predicted']:.4f}, observed {r['observed']:.4f} "
        f"(base {r['base']:.4f}, best draw {r['best_draw']:.4f})\n"
        f"regression: {fit}\n"
        f"config: {r['config']}\nreport: {r['output']}/search.md"
    )


@app.command()
@_config_command(after=("input",))
def annotate(
    cfg: Config,
    endpoint: Annotated[
        str, typer.Option(help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    ] = "",
    model: Annotated[str, typer.Option(help="Model name sent with each request")] = "",
    n: Annotated[
        int, typer.Option(help="Documents to annotate (stratified by domain and length)")
    ] = 500,
    out: Annotated[
        str, typer.Option(help="Folder for labels.parquet and texts.parquet")
    ] = "labels",
    cache: Annotated[
        Path | None, typer.Option(help="Answer cache folder (reruns ask nothing twice)")
    ] = None,
    prompt: Annotated[
        str, typer.Option(help="Packaged prompt name or template path")
    ] = "rubric_v1",
    rps: Annotated[float, typer.Option(help="Requests per second at most")] = 5.0,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the sample")] = 0,
) -> None:
    """Label a stratified sample of the corpus with an LLM on the seven-dimension rubric
    (API key from $SAMPLEMIX_ANNOTATOR_API_KEY or $OPENAI_API_KEY)."""
    from samplemix.scoring.annotate import (
        Annotator,
        AnnotatorConfig,
        corpus_sample,
        write_labels,
        write_table,
    )

    try:
        ann_cfg = AnnotatorConfig(
            base_url=endpoint,
            model=model,
            prompt=prompt,
            cache_dir=cache,
            requests_per_second=rps,
            concurrency=concurrency,
        )
        docs = corpus_sample(cfg, n, seed)
        with Annotator(ann_cfg) as annotator:
            labels = annotator.annotate(
                list(
                    zip(docs.column("id").to_pylist(), docs.column("text").to_pylist(), strict=True)
                )
            )
    except Exception as e:  # noqa: BLE001 - every failure is reported, none is a traceback
        raise _fail(e) from None
    root = out.rstrip("/")
    write_labels(labels, f"{root}/labels.parquet")
    write_table(docs, f"{root}/texts.parquet")
    ok = labels.column("error").null_count
    typer.echo(
        f"{ok} of {labels.num_rows} documents labelled -> {root}/labels.parquet "
        f"({labels.num_rows - ok} failed after retries; texts in {root}/texts.parquet)"
    )


@app.command("train-scorer")
def train_scorer(
    labels: Annotated[
        str | None, typer.Option(help="Folder written by `samplemix annotate` (ordinal)")
    ] = None,
    head: Annotated[
        str, typer.Option(help="ordinal (fine-tune an encoder on labels) or fasttext (DCLM)")
    ] = "ordinal",
    positives: Annotated[
        str | None,
        typer.Option(help="fasttext: good text: 'domains:a,b' of --input, or a folder/glob"),
    ] = None,
    negatives: Annotated[
        str, typer.Option(help="fasttext: the rest: 'all' of --input, domains:..., a folder")
    ] = "all",
    input: Annotated[str | None, typer.Option(help="fasttext: the corpus of domains:/all")] = None,
    max_docs: Annotated[int, typer.Option(help="fasttext: documents per side, at most")] = 20_000,
    base: Annotated[
        str, typer.Option(help="Encoder to fine-tune: local path, hub id or 'minilm'")
    ] = "minilm",
    out: Annotated[
        str, typer.Option(help="Output folder: ordinal/, classification/, comparison.md")
    ] = "scorer",
    epochs: int = 3,
    lr: float = 5e-5,
    batch_size: int = 16,
    max_length: int = 256,
    val_share: float = 0.1,
    seed: int = 0,
    compare: Annotated[
        bool, typer.Option(help="Also train a classification head (Table 2)")
    ] = True,
) -> None:
    """Train a quality scorer: an ordinal (CORAL) evaluator fine-tuned on the annotator's
    labels, or (``--head fasttext``) a DCLM-style fastText classifier of good text
    (``--positives``) against the corpus at large (``--negatives``)."""
    if head == "fasttext":
        _train_fasttext(positives, negatives, input, max_docs, out, epochs, seed)
        return
    if head != "ordinal" or labels is None:
        raise _fail(ValueError("--head ordinal needs --labels; --head is ordinal or fasttext"))
    import pyarrow.parquet as pq

    from samplemix.scoring.ordinal_evaluator import metrics_table, train_from_labels

    root = labels.rstrip("/")
    try:
        texts = pq.read_table(f"{root}/texts.parquet", columns=["id", "text"]).to_pydict()
        result = train_from_labels(
            f"{root}/labels.parquet",
            dict(zip(texts["id"], texts["text"], strict=True)),
            base,
            out,
            compare=compare,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            max_length=max_length,
            val_share=val_share,
            seed=seed,
        )
    except (OSError, ValueError) as e:
        raise _fail(e) from None
    if compare:
        typer.echo(metrics_table(result))
    model_dir = f"{out}/ordinal" if compare else out
    typer.echo(
        f"skipped: {result['skipped']}\nscore with it: --set quality.scorer=hf-classifier "
        f"--set quality.model={model_dir}"
    )


def _train_fasttext(
    positives: str | None,
    negatives: str,
    corpus: str | None,
    max_docs: int,
    out: str,
    epochs: int,
    seed: int,
) -> None:
    """``train-scorer --head fasttext``: sample both sides, train, print how to use it."""
    from samplemix.io.corpus import CorpusError, sample_texts
    from samplemix.scoring.fasttext_scorer import train_fasttext

    if positives is None:
        raise _fail(ValueError("--head fasttext needs --positives (e.g. domains:books,reference)"))
    from_corpus = [s for s in (positives, negatives) if s == "all" or s.startswith("domains:")]
    if from_corpus and corpus is None:
        raise _fail(ValueError(f"{from_corpus[0]!r} reads the corpus: give it with --input"))
    # Specs that name folders read those alone; the corpus setting is then a placeholder.
    cfg = _load(None, None, **{"corpus.input": corpus or "."})
    path = out if out.endswith((".bin", ".ftz")) else f"{out.rstrip('/')}/fasttext.bin"
    try:
        good = sample_texts(positives, cfg, max_docs, seed)
        rest = sample_texts(negatives, cfg, len(good), seed + 1)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        train_fasttext(good, rest, path, epoch=epochs, seed=seed, bucket=200_000)
    except (OSError, ValueError, CorpusError) as e:
        raise _fail(e) from None
    typer.echo(
        f"fastText scorer: {path} ({len(good)} positives, {len(rest)} negatives)\n"
        f"score with it: --set quality.scorer=fasttext --set quality.model={path}"
    )


@app.command("distill-embedder")
def distill_embedder(
    out: Annotated[str, typer.Option(help="Folder for the static model")],
    base: Annotated[str, typer.Option(help="Local encoder to distill: 'minilm' or a path")] = (
        "minilm"
    ),
    pca_dims: Annotated[int, typer.Option(help="Vector size after PCA; 0 = no PCA")] = 256,
) -> None:
    """Distill a static (model2vec) embedder from a local encoder: a fast CPU path."""
    from samplemix.scoring.static_embed import distill_static

    try:
        folder = distill_static(base, out, pca_dims or None)
    except (OSError, ValueError) as e:
        raise _fail(e) from None
    typer.echo(f"static embedder: {folder}\nembed with it: --set embed.model={folder}")


def _with_credentials(cfg: Config) -> Config:
    """``cfg`` with its Prefect AWS credentials block (if any) read into the storage."""
    if not cfg.storage.aws_credentials_block:
        return cfg
    from flows.runtime import prefect_api, with_block_credentials

    try:
        with prefect_api():
            return with_block_credentials(cfg)
    except ConfigError as e:
        raise _fail(e) from None


def _fail(e: Exception) -> typer.Exit:
    typer.secho(f"error: {e}", fg="red", err=True)
    return typer.Exit(1)


@app.command()
@_config_command(before=("input", "output"))
def plan(
    cfg: Config,
    shards: Annotated[bool, typer.Option("--shards", help="One line per shard")] = False,
) -> None:
    """Show, before running, which stages and shards are cached and which would be
    computed, and why."""
    from rich.console import Console
    from rich.table import Table

    from samplemix.io.corpus import CorpusError
    from samplemix.io.store import StoreError
    from samplemix.pipeline import keys
    from samplemix.pipeline.plan import plan_rows, plan_steps

    cfg = _with_credentials(cfg)
    try:
        steps = plan_steps(cfg, keys.store_for(cfg), keys.output_for(cfg))
    except (CorpusError, StoreError, ConfigError) as e:
        raise _fail(e) from None
    table = Table("stage", "shard" if shards else "tasks", "status", "reason", box=None)
    if shards:
        for st in steps:
            status = "cached" if st.cached else "compute"
            table.add_row(st.stage, st.shard or "-", status, st.reason)
    else:
        for stage, n, status, why in plan_rows(steps):
            table.add_row(stage, str(n), status, why)
    Console(width=200).print(table)
    todo = sum(not st.cached for st in steps)
    typer.echo(f"{todo} of {len(steps)} tasks to compute, {len(steps) - todo} from the store")


@app.command()
def status(
    output: Annotated[str, typer.Argument(help="A run's output folder or s3:// URL")],
    config: Annotated[
        Path | None, typer.Option(help="Config with the storage settings, for s3:// outputs")
    ] = None,
) -> None:
    """Show what the last finished run under OUTPUT computed and reused, and whether
    its output and store artifacts are all still there."""
    from samplemix.io.store import Key, Output, Store, StoreError

    cfg = _with_credentials(_load(config, None, **{"corpus.input": "-"})) if config else None
    retries = cfg.storage.retries if cfg else 5
    out = Output(output, cfg.storage.fsspec_options(output) if cfg else {}, retries)
    try:
        done = out.manifest()
    except StoreError as e:
        raise _fail(e) from None
    if done is None:
        typer.secho(
            f"no finished run under {output} (no _manifest.json); "
            "`samplemix plan CONFIG` shows what a run would compute",
            fg="yellow",
            err=True,
        )
        raise typer.Exit(1)
    s = done["summary"]
    typer.echo(
        f"output {out.url}: {s['mixture_rows']:,} rows in {s['mixture_parts']} parts, "
        f"{s['realised_tokens']:,} of {s['target_tokens']:,} target tokens, "
        f"{s['documents']:,} documents read, {s['rejects']:,} rejected"
    )
    typer.echo(f"{'stage':<12}{'computed':>10}{'cached':>8}{'task s':>10}")
    for stage, n in s["computed"].items():
        typer.echo(f"{stage:<12}{n:>10}{s['cached'][stage]:>8}{s['task_seconds'][stage]:>10.1f}")
    store = Store(s["store"], cfg.storage.fsspec_options(s["store"]) if cfg else {}, retries)
    keys = [Key(*a.split("/"), {}) for a in s["artifacts"]]  # type: ignore[misc]
    try:
        present = store.summaries(keys)
        intact = out.current(Key("output", done["key"], {}))
    except StoreError as e:
        raise _fail(e) from None
    missing = [str(k) for k in keys if k not in present]
    typer.echo(
        f"files: {len(done['files'])} listed, {'all present' if intact else 'SOME MISSING'}; "
        f"store {store.root}: {len(s['artifacts']) - len(missing)} of {len(s['artifacts'])} "
        "artifacts present" + (f" (missing: {', '.join(missing[:5])})" if missing else "")
    )
    if missing or not intact:
        raise typer.Exit(1)


@app.command()
def gc(
    configs: Annotated[list[Path], typer.Argument(help="The configs whose artifacts to keep")],
    delete: Annotated[bool, typer.Option("--delete", help="Remove them (default: list)")] = False,
    min_age_hours: Annotated[
        float, typer.Option(help="Keep anything written more recently (runs in flight)")
    ] = 24.0,
) -> None:
    """List (or, with --delete, remove) store artifacts that none of CONFIGS uses:
    earlier scorers, models, settings, and artifacts left incomplete by killed runs.
    Artifacts written in the last --min-age-hours are kept: another run may be
    writing them."""
    from samplemix.io.corpus import CorpusError
    from samplemix.io.store import StoreError
    from samplemix.pipeline import keys
    from samplemix.pipeline.plan import STAGES, plan_steps

    keep: dict[str, set[str]] = {st: set() for st in STAGES}
    unsure: set[str] = set()
    store = None
    for path in configs:
        cfg = _with_credentials(_load(path, None))
        this = keys.store_for(cfg)
        if store is not None and this.root != store.root:
            raise _fail(ValueError(f"{path} uses store {this.root}, not {store.root}"))
        store = this
        try:
            steps = plan_steps(cfg, store, keys.output_for(cfg))
        except (CorpusError, StoreError, ConfigError) as e:
            raise _fail(e) from None
        for st in steps:
            if st.key is None:
                unsure.add(st.stage)  # keys that wait on computation: keep the stage whole
            else:
                keep[st.stage].add(st.key.id)
    assert store is not None
    cutoff = time.time() - 3600 * min_age_hours
    try:
        drop = [
            a
            for a in store.artifacts()
            if a.stage not in unsure and a.id not in keep[a.stage] and a.modified <= cutoff
        ]
        for a in drop:
            state = "unreferenced" if a.committed else "incomplete"
            verb = "removing" if delete else "would remove"
            typer.echo(f"{verb} {a.stage}/{a.id}  {state}  {a.size:,} B")
            if delete:
                store.remove(a.stage, a.id)
    except StoreError as e:
        raise _fail(e) from None
    total = sum(a.size for a in drop)
    if unsure:
        typer.echo(f"kept every artifact of {', '.join(sorted(unsure))}: their keys wait on a run")
    verb = "removed" if delete else "would free"
    typer.echo(
        f"{len(drop)} artifacts, {total:,} bytes {verb}"
        + ("" if delete else "; --delete removes them")
    )


@app.command("config")
@_config_command(after=("input",))
def config_cmd(
    cfg: Config,
    show: Annotated[bool, typer.Option("--show", help="Print the resolved config")] = True,
) -> None:
    """Validate a config and print it resolved, with every default."""
    if show:
        typer.echo(config_to_yaml(cfg), nl=False)


@app.command()
def schema() -> None:
    """Print the config's JSON schema (every field, its type, default and description)."""
    json.dump(Config.model_json_schema(), sys.stdout, indent=2)
    typer.echo()


if __name__ == "__main__":
    app()
