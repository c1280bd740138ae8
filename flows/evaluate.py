"""The ``evaluate`` and ``search`` flows: candidate mixtures → proxy LMs → held-out losses.

evaluate: every variant (a method, or SampleMix at an α) is mixed by ``mix`` (a subflow
run; the store is shared, so scores, embeddings and clusters are computed once), then one
proxy per variant and seed trains as a Dask task, all in parallel over the workers, and
the report goes to OUT/evaluate/.

search: mixes the base config (the reference, and the source of the domain list), draws
K parameter sets (samplemix/evaluation/search.py), mixes and evaluates each the same way
(or by the n-gram instrument alone), fits LightGBM θ → loss, averages the best predicted
θ, mixes and evaluates that too, and writes OUT/search/: chosen.yaml (a config
``samplemix run`` accepts), search.md, draws.csv and plots.

Every proxy result is cached in the store by (mixture, evaluation sets, proxy config and
seed): a rerun trains only what it has not. No maths here.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.compare import variants
from flows.mix import run_calls, run_mix
from flows.runtime import (
    check_inputs,
    prefect_api,
    shared_cluster,
    task_runner,
    with_block_credentials,
)
from samplemix.config import Config, ConfigError, config_to_yaml
from samplemix.evaluation import stages as ev
from samplemix.evaluation.paired import bootstrap_paired
from samplemix.io.corpus import discover_shards
from samplemix.io.store import Key
from samplemix.pipeline import keys
from samplemix.pipeline.graph import Call
from samplemix.reporting.evaluation_report import (
    NgramRun,
    ProxyRun,
    evaluation_markdown,
    variant_stats,
    write_evaluation,
)


def _root(cfg: Config) -> str:
    return cfg.output.path.rstrip("/")


def label(cfg: Config) -> str:
    """A readable name for a variant's mixing method."""
    m = cfg.mixing
    if m.method != "samplemix":
        return m.method
    what = {0.0: " (quality only)", 1.0: " (diversity only)"}.get(m.alpha, "")
    return f"samplemix α={m.alpha:g}{what}"


def variant(cfg: Config, mixing: Mapping[str, Any], output: str) -> Config:
    """``cfg`` with ``mixing`` merged into its mixing section (validated, so nested
    sections such as ``quadmix`` become models) and its output at ``output``; the store
    stays the one ``cfg`` uses."""
    data = cfg.model_dump()
    store = cfg.output.store or f"{_root(cfg)}/store"
    data["mixing"] = _merged(data["mixing"], mixing)
    data["output"] |= {"path": output, "store": store}
    return Config.model_validate(data)


def _merged(base: dict, update: Mapping[str, Any]) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = (
            _merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
        )
    return out


def control_arms(
    cfg: Config, configs: Mapping[str, Config], baseline: str, domains: list[str]
) -> tuple[dict[str, Config], dict[str, tuple[str, int]], list[str]]:
    """The arms ``evaluate.controls`` plant: (new mix configs by arm name, ``repeat`` arms
    {name: (the variant whose mixture they cut, documents)}, every control's arm name in
    spec order). ``domains``: the corpus's. Raises ConfigError for a domain not in
    ``domains`` or a variant name not among ``configs``."""
    root, mixes, repeats, names = _root(cfg), {}, {}, []
    for spec in cfg.evaluate.controls:
        kind, _, arg = spec.partition(":")
        if kind == "one-domain":
            if arg not in domains:
                raise ConfigError(
                    f"evaluate.controls {spec!r}: no domain {arg!r}; the corpus has {domains}"
                )
            name = f"control-one-domain-{arg}"
            weights = {d: float(d == arg) for d in domains}
            update = {"method": "fixed", "domain_weights": weights, "max_repeats": None}
            mixes[name] = variant(cfg, update, f"{root}/{name}")
        elif kind == "repeat":
            name = f"control-repeat-{arg}"
            repeats[name] = (baseline, int(arg))
        elif spec in configs:
            name = spec
        else:
            raise ConfigError(
                f"evaluate.controls {spec!r}: not a variant of this run ({list(configs)}); "
                "use one-domain:<domain>, repeat:<docs> or a name given to --methods"
            )
        names.append(name)
    return mixes, repeats, names


def _evaluate_mixtures(
    cfg: Config,
    configs: dict[str, Config],
    repeats: Mapping[str, tuple[str, int]] | None = None,
    mixed: Mapping[str, dict] | None = None,
    baseline: str | None = None,
    *,
    proxies: bool = True,
) -> tuple[dict, list[ProxyRun], list[NgramRun], dict]:
    """Mix every config (but those in ``mixed``: {name: its mix summary}), then train
    ``evaluate.seeds`` proxies on each mixture, and on the first documents of a mixture
    for each ``repeats`` arm ({name: (variant, documents)}), and fit the n-gram
    instrument on each (its differences paired with ``baseline``'s). ``proxies=False``
    trains no proxy: the n-gram instrument alone measures the arms (the caller makes sure
    ``evaluate.ngram_order`` > 0), and the settings name no proxy.

    Returns ({variant: mix summary}, the proxy runs in (variant, seed) order, the n-gram
    runs in arm order, the settings the report lists)."""
    log = get_run_logger()
    mixes = dict(mixed or {})
    mixes |= {name: run_mix(c) for name, c in configs.items() if name not in mixes}
    store = keys.store_for(cfg)
    shards = discover_shards(cfg.corpus, cfg.storage.fsspec_options(cfg.corpus.input))
    ids_key = keys.ids_key([keys.tokens_key(s, cfg) for s in shards], cfg)
    plan = ev.plan_for_evaluation(next(iter(mixes.values()))["output"], cfg)
    by_id = {s.shard_id: s for s in shards}
    tok_key = ev.tokenizer_key(ids_key, cfg)
    tokenizer, evalsets, proxy_stage, _ = ev.EVALUATION
    label = cfg.evaluate.tokenizer
    tok = run_calls(tokenizer, [Call(tok_key, label, (plan, by_id, cfg))], cfg, store)[0]
    sets_key = ev.evalsets_key(ids_key, tok_key, cfg, plan)
    sets_call = Call(sets_key, "heldout", (plan, by_id, tok_key, cfg))
    sets = run_calls(evalsets, [sets_call], cfg, store)[0]
    log.info("evaluation sets (tokens): %s", sets["tokens"])
    arms = {name: (name, None) for name in mixes} | {
        name: (source, docs) for name, (source, docs) in (repeats or {}).items()
    }
    calls, which = [], []
    seeds = cfg.evaluate.seeds if proxies else []
    resolved = ev.proxy_config(cfg)  # the device's preset fills the unset fields
    for name, (source, docs) in arms.items():
        mix = mixes[source]
        for seed in seeds:
            proxy = resolved.model_copy(update={"seed": seed})
            key = ev.proxy_key(mix["mixture_key"], sets_key, proxy, docs)
            args = (mix["output"], tok_key, sets_key, proxy, cfg, docs)
            calls.append(Call(key, f"{name}/seed-{seed}", args))
            which.append((name, seed))
    results = run_calls(proxy_stage, calls, cfg, store) if calls else []
    runs = [
        ProxyRun.from_summary(name, seed, r, r["cached"], sets["tokens"])
        for (name, seed), r in zip(which, results, strict=True)
    ]
    ngram = _ngram_runs(cfg, arms, mixes, tok_key, sets_key, baseline)
    settings = _proxy_settings(cfg, results[0]) if results else {}
    settings |= {
        "tokenizer": f"{cfg.evaluate.tokenizer} (vocabulary {tok['vocab_size']:,}"
        + (f", trained on {tok['docs']:,} documents)" if tok["docs"] else ")"),
        "held out": f"{cfg.evaluate.heldout_fraction:g} of every domain"
        + (
            f", scored on those at or above their domain's {q:g} quality quantile"
            if (q := cfg.evaluate.heldout_quality)
            else ""
        ),
        "evaluation tokens": ", ".join(f"{k}: {v:,}" for k, v in sets["tokens"].items()),
        "mixture budget": ", ".join(
            sorted({f"{m['target_tokens']:,} tokens" for m in mixes.values()})
        ),
    }
    if ngram:
        settings["n-gram instrument"] = (
            f"interpolated Kneser–Ney, order {cfg.evaluate.ngram_order} (and 1, 2), on "
            f"the mixture's first {resolved.tokens_trained:,} tokens (all of a shorter one)"
        )
    return mixes, runs, ngram, settings


def _proxy_settings(cfg: Config, first: dict) -> dict[str, str]:
    """The report's settings lines on the proxies, from one proxy run's summary."""
    p = ev.proxy_config(cfg)
    rates = f"AdamW lr {p.lr:g} (embeddings {p.embedding_lr:g}"
    rates += ")" if p.tie_embeddings else f", untied head {p.head_lr:g})"
    if p.optimizer == "muon":
        rates += f", Muon {p.muon_lr:g} on the blocks' matrices"
    return {
        "proxy": f"{p.n_layer} layers, {p.n_head} heads, width {p.d_model}, "
        f"{first['n_params']:,} parameters ({p.preset} preset)",
        "training tokens": f"{first['tokens_trained']:,} ({first['steps']} steps of "
        f"{p.batch_size} × {p.seq_len})",
        "schedule": f"{rates}; warmup {p.warmup_frac:g}, cosine to {p.min_lr_ratio:g}×",
        "seeds": ", ".join(map(str, cfg.evaluate.seeds)),
        "device": first["device"],
    }


def _ngram_runs(
    cfg: Config,
    arms: Mapping[str, tuple[str, int | None]],
    mixes: Mapping[str, dict],
    tok_key: Key,
    sets_key: Key,
    reference: str | None,
) -> list[NgramRun]:
    """The seedless instrument on every arm ({name: (mixed variant, documents)}), each
    paired by document with ``reference`` (or the first arm); none when
    ``evaluate.ngram_order`` is 0."""
    order = cfg.evaluate.ngram_order
    if not order:
        return []
    store = keys.store_for(cfg)
    tokens = ev.proxy_config(cfg).tokens_trained  # the proxy's
    calls = []
    for name, (source, docs) in arms.items():
        mix = mixes[source]
        key = ev.ngram_key(mix["mixture_key"], sets_key, tokens, order, docs)
        calls.append(Call(key, name, (mix["output"], tok_key, sets_key, tokens, cfg, docs)))
    *_, ngram_stage = ev.EVALUATION
    results = run_calls(ngram_stage, calls, cfg, store)
    docs = {c.label: ev.load_doc_losses(store, sets_key, c.key) for c in calls}
    reference = reference if reference in arms else next(iter(arms))
    runs = []
    for call, r in zip(calls, results, strict=True):
        floors = {n: r["objectives"][str(n)]["objective"] for n in ev.FLOORS}
        versus = None
        if call.label != reference:
            versus = bootstrap_paired(call.label, docs[call.label], reference, docs[reference])
        objective = r["objectives"][str(order)]["objective"]
        runs.append(NgramRun(call.label, order, objective, floors, versus))
    return runs


def _publish(
    cfg: Config,
    runs: list[ProxyRun],
    ngram: list[NgramRun],
    labels: dict[str, str],
    alphas: dict[str, float],
    baseline: str | None,
    settings: dict,
    out: str,
    controls: list[str],
) -> dict:
    """Write the evaluation report under ``out`` and show it in the UI."""
    options = cfg.storage.fsspec_options(out)
    summary = write_evaluation(
        runs, labels, alphas, baseline, settings, out, options, controls=controls, ngram=ngram
    )
    stats = variant_stats(runs)
    create_markdown_artifact(
        evaluation_markdown(
            runs, stats, labels, settings, baseline=baseline, controls=controls, ngram=ngram
        ),
        key="proxy-evaluation",
        description="Held-out loss of proxies trained on each mixture",
    )
    create_table_artifact(
        [
            {
                "variant": labels.get(s.variant, s.variant),
                "seeds": s.n,
                "mean": s.mean,
                "std": s.std,
            }
            for s in stats.values()
        ],
        key="proxy-evaluation-table",
        description="Objective (nats/token) per variant: mean and std over seeds",
    )
    return summary


def _evaluate_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    n = len(params["methods"]) + len(params["alphas"])
    return f"evaluate-{n}-mixtures-{len(params['config'].evaluate.seeds)}-seeds"


@flow(name="evaluate", flow_run_name=_evaluate_name)
def evaluate(config: Config, methods: list[str], alphas: list[float]) -> dict:
    """Mix each method (and SampleMix at each α) and compare them by proxy training.
    Returns {"mixes": {variant: mix summary}, "runs": [proxy run], "report": summary,
    "output": the report folder}."""
    cfg = keys.pinned_config(config)  # one commit per hub model for the whole run
    ev.require_heldout(cfg)
    configs = variants(cfg, methods, alphas)
    baseline = "vanilla" if "vanilla" in configs else next(iter(configs))
    mixed = {}
    if cfg.evaluate.controls:  # a control needs the corpus's domains: the baseline's plan
        mixed[baseline] = run_mix(configs[baseline])
        plan = ev.plan_for_evaluation(mixed[baseline]["output"], cfg)
        domains = sorted(set(plan.column("domain").to_pylist()))
    else:
        domains = []
    planted, repeats, controls = control_arms(cfg, configs, baseline, domains)
    mixes, runs, ngram, settings = _evaluate_mixtures(
        cfg, configs | planted, repeats, mixed, baseline
    )
    labels = {name: label(c) for name, c in configs.items()}
    labels |= {name: f"{name.removeprefix('control-one-domain-')} only" for name in planted}
    labels |= {n: f"{source}'s first {docs} documents" for n, (source, docs) in repeats.items()}
    alphas_of = {n: c.mixing.alpha for n, c in configs.items() if c.mixing.method == "samplemix"}
    out = f"{_root(cfg)}/evaluate"
    report = _publish(cfg, runs, ngram, labels, alphas_of, baseline, settings, out, controls)
    get_run_logger().info("evaluation report: %s/evaluate.md", out)
    return {"mixes": mixes, "runs": [r.__dict__ for r in runs], "report": report, "output": out}


def run_evaluate(cfg: Config, methods: list[str], alphas: list[float]) -> dict:
    """Run the ``evaluate`` flow on the task runner ``cfg.compute`` asks for; the config
    and the inputs are checked first, before any server or cluster starts."""
    ev.require_heldout(cfg)
    check_inputs(cfg)
    with prefect_api(), shared_cluster(with_block_credentials(cfg)) as cfg:
        return evaluate.with_options(task_runner=task_runner(cfg))(cfg, methods, alphas)


# ---- search -----------------------------------------------------------------------------


def _search_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    # None: default_draws, which needs the corpus's domains, resolved inside the flow.
    draws = "auto" if params["draws"] is None else params["draws"]
    return f"search-{params['space']}-{draws}-draws-{params['instrument']}"


def _require_instrument(cfg: Config, instrument: str) -> None:
    """Raise ConfigError for an instrument not in ``INSTRUMENTS``, or for ``ngram`` when
    ``evaluate.ngram_order`` is 0 (no n-gram model is fitted)."""
    from samplemix.evaluation.search import INSTRUMENTS

    if instrument not in INSTRUMENTS:
        raise ConfigError(f"search instrument must be one of {INSTRUMENTS}, got {instrument!r}")
    if instrument == "ngram" and not cfg.evaluate.ngram_order:
        raise ConfigError(
            "the ngram instrument needs evaluate.ngram_order > 0 (it is 0); "
            "set it (e.g. --set evaluate.ngram_order=4) or use --instrument proxy"
        )


def _arm_losses(runs: list[ProxyRun], ngram: list[NgramRun], instrument: str) -> dict[str, float]:
    """Each arm's loss by ``instrument``: the mean objective over its proxies' seeds, or
    its n-gram objective."""
    if instrument == "proxy":
        return {name: s.mean for name, s in variant_stats(runs).items()}
    return {r.variant: r.objective for r in ngram}


@flow(name="search", flow_run_name=_search_name)
def search(
    config: Config,
    space: str,
    draws: int | None,
    validation: int | None,
    candidates: int,
    top: int,
    instrument: str = "proxy",
) -> dict:
    """Search the parameters of ``space`` ('samplemix': α; 'quadmix': Algorithm 1's θ)
    by LightGBM on draws measured by ``instrument`` ('proxy': ``evaluate.seeds`` proxy
    LMs per draw; 'ngram': the seedless n-gram instrument alone, no proxy trained); the
    chosen θ is measured by the same instrument. ``draws`` None: ``default_draws`` of the
    space; ``validation`` None: ``default_validation`` of the draws.

    Returns {"theta", "predicted", "observed", "base", "best_draw", "mae",
    "constant_mae", "spearman", "predicts", "instrument", "draws", "validation",
    "config": the chosen config's path, "output": the report folder}."""
    from samplemix.evaluation import search as sr
    from samplemix.reporting.run_report import write_files

    cfg = keys.pinned_config(config)  # one commit per hub model for the whole run
    ev.require_heldout(cfg)
    _require_instrument(cfg, instrument)
    by_proxy = instrument == "proxy"
    log = get_run_logger()
    out = f"{_root(cfg)}/search"
    base = variant(cfg, {}, f"{out}/base")
    base_mix = run_mix(base)
    domains = sorted(
        set(ev.plan_for_evaluation(base_mix["output"], cfg).column("domain").to_pylist())
    )
    sp = sr.search_space(space, domains, len(cfg.quality))
    draws = sr.default_draws(sp) if draws is None else draws
    validation = sr.default_validation(draws) if validation is None else validation
    log.info("%d draws (%d held out), measured by %s", draws, validation, instrument)
    thetas = sr.draw_parameters(sp, draws, cfg.mixing.seed)
    configs = {"base": base}
    for i, theta in enumerate(thetas):
        configs[f"draw-{i:03d}"] = variant(
            cfg, sp.mixing_update(theta), f"{out}/draws/draw-{i:03d}"
        )
    _, runs, ngram, settings = _evaluate_mixtures(
        cfg, configs, mixed={"base": base_mix}, proxies=by_proxy
    )
    measured = _arm_losses(runs, ngram, instrument)
    losses = [measured[f"draw-{i:03d}"] for i in range(draws)]
    result = sr.search(
        sp,
        thetas,
        losses,
        validation=validation,
        candidates=candidates,
        top=top,
        seed=cfg.mixing.seed,
    )
    chosen = variant(cfg, sp.mixing_update(result.theta), f"{out}/chosen")
    _, chosen_runs, chosen_ngram, _ = _evaluate_mixtures(cfg, {"chosen": chosen}, proxies=by_proxy)
    observed = _arm_losses(chosen_runs, chosen_ngram, instrument)["chosen"]
    log.info(
        "chosen θ: predicted %.4f, observed %.4f by %s; base %.4f; best draw %.4f",
        result.predicted_loss,
        observed,
        instrument,
        measured["base"],
        result.best_observed[1],
    )
    if by_proxy:
        s = variant_stats(chosen_runs)["chosen"]
        seeds = ", ".join(map(str, cfg.evaluate.seeds))
        what = f"the mean held-out objective of its proxy LMs (seeds {seeds})"
        spread = f"± {s.std:.4f} over {s.n} seeds; "
    else:
        what = (
            f"the held-out objective of an order-{cfg.evaluate.ngram_order} Kneser–Ney "
            "n-gram model fitted on the proxy's training tokens of the mixture (seedless; "
            "no proxy trained)"
        )
        spread = ""
    header = (
        f"# samplemix search ({space}, {draws} draws by {instrument}): the chosen parameters.\n"
        f"# Predicted {instrument} loss {result.predicted_loss:.4f}, observed {observed:.4f}.\n"
        "# `samplemix run` this file; set evaluate.heldout_fraction: 0 to mix every document.\n"
    )
    text = f"Instrument: **{instrument}**; a draw's loss is {what}.\n\n"
    text += sr.search_markdown(result, sp)
    text += (
        f"\n\n## Checked by {instrument}\n\n"
        f"The chosen θ's mixture, measured as every draw: **{observed:.4f}** nats/token "
        f"({spread}predicted {result.predicted_loss:.4f}). "
        f"The base config ({label(base)}): {measured['base']:.4f}; "
        f"the best draw: {result.best_observed[1]:.4f}.\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in settings.items())
        + "\n"
    )
    files = dict(sr.search_plots(result, thetas, losses, sp))
    files["draws.csv"] = _draws_csv(sp, thetas, losses).encode()
    files["chosen.yaml"] = (header + config_to_yaml(chosen)).encode()
    files["search.md"] = text.encode()
    write_files(out, files, cfg.storage.fsspec_options(out))
    create_markdown_artifact(
        text, key="mixture-search", description=f"Parameter search by {instrument}"
    )
    return {
        "theta": result.theta,
        "predicted": result.predicted_loss,
        "observed": observed,
        "base": measured["base"],
        "best_draw": result.best_observed[1],
        "mae": result.mae,
        "constant_mae": result.constant_mae,
        "spearman": result.spearman,
        "predicts": result.predicts,
        "instrument": instrument,
        "draws": draws,
        "validation": validation,
        "config": posixpath.join(out, "chosen.yaml"),
        "output": out,
    }


def _draws_csv(sp: Any, thetas: list[dict], losses: list[float]) -> str:
    names = sp.feature_names()
    rows = [",".join(["draw", *names, "loss"])]
    for i, (theta, loss) in enumerate(zip(thetas, losses, strict=True)):
        rows.append(",".join([str(i), *(f"{v:.6g}" for v in sp.features(theta)), f"{loss:.6f}"]))
    return "\n".join(rows) + "\n"


def run_search(
    cfg: Config,
    space: str,
    draws: int | None,
    validation: int | None,
    candidates: int,
    top: int,
    instrument: str = "proxy",
) -> dict:
    """Run the ``search`` flow on the task runner ``cfg.compute`` asks for; the config
    and the instrument are checked first, before any server or cluster starts."""
    ev.require_heldout(cfg)
    _require_instrument(cfg, instrument)
    check_inputs(cfg)
    with prefect_api(), shared_cluster(with_block_credentials(cfg)) as cfg:
        flow_ = search.with_options(task_runner=task_runner(cfg))
        return flow_(cfg, space, draws, validation, candidates, top, instrument)
