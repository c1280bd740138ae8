"""The ``evaluate`` and ``search`` flows: candidate mixtures → proxy LMs → held-out losses.

evaluate: every variant (a method, or SampleMix at an α) is mixed by ``mix`` (a subflow
run; the store is shared, so scores, embeddings and clusters are computed once), then one
proxy per variant and seed trains as a Dask task, all in parallel over the workers, and
the report goes to OUT/evaluate/.

search: mixes the base config (the reference, and the source of the domain list), draws
K parameter sets (samplemix/evaluation/search.py), mixes and evaluates each the same way, fits
LightGBM θ → loss, averages the best predicted θ, mixes and evaluates that too, and
writes OUT/search/: chosen.yaml (a config ``samplemix run`` accepts), search.md,
draws.csv and plots.

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
from samplemix.config import Config, config_to_yaml
from samplemix.evaluation import stages as ev
from samplemix.io.corpus import discover_shards
from samplemix.pipeline import keys
from samplemix.pipeline.graph import Call
from samplemix.reporting.evaluation_report import (
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


def _evaluate_mixtures(
    cfg: Config, configs: dict[str, Config]
) -> tuple[dict, list[ProxyRun], dict]:
    """Mix every config, then train ``evaluate.seeds`` proxies on each mixture.

    Returns ({variant: mix summary}, the proxy runs in (variant, seed) order, the
    settings the report lists)."""
    log = get_run_logger()
    mixes = {name: run_mix(c) for name, c in configs.items()}
    store = keys.store_for(cfg)
    shards = discover_shards(cfg.corpus, cfg.storage.fsspec_options(cfg.corpus.input))
    ids_key = keys.ids_key([keys.tokens_key(s, cfg) for s in shards], cfg)
    plan = ev.plan_for_evaluation(next(iter(mixes.values()))["output"], cfg)
    by_id = {s.shard_id: s for s in shards}
    tok_key = ev.tokenizer_key(ids_key, cfg)
    tokenizer, evalsets, proxy_stage = ev.EVALUATION
    label = cfg.evaluate.tokenizer
    tok = run_calls(tokenizer, [Call(tok_key, label, (plan, by_id, cfg))], cfg, store)[0]
    sets_key = ev.evalsets_key(ids_key, tok_key, cfg)
    sets_call = Call(sets_key, "heldout", (plan, by_id, tok_key, cfg))
    sets = run_calls(evalsets, [sets_call], cfg, store)[0]
    log.info("evaluation sets (tokens): %s", sets["tokens"])
    calls, which = [], []
    for name, mix in mixes.items():
        for seed in cfg.evaluate.seeds:
            proxy = cfg.evaluate.proxy.model_copy(update={"seed": seed})
            key = ev.proxy_key(mix["mixture_key"], sets_key, proxy)
            args = (mix["output"], tok_key, sets_key, proxy, cfg)
            calls.append(Call(key, f"{name}/seed-{seed}", args))
            which.append((name, seed))
    results = run_calls(proxy_stage, calls, cfg, store)
    runs = [
        ProxyRun.from_summary(name, seed, r, r["cached"])
        for (name, seed), r in zip(which, results, strict=True)
    ]
    p = cfg.evaluate.proxy
    first = results[0]
    settings = {
        "proxy": f"{p.n_layer} layers, {p.n_head} heads, width {p.d_model}, "
        f"{first['n_params']:,} parameters",
        "training tokens": f"{first['tokens_trained']:,} ({first['steps']} steps of "
        f"{p.batch_size} × {p.seq_len})",
        "schedule": f"lr {p.lr:g}, warmup {p.warmup_frac:g}, cosine to {p.min_lr_ratio:g}×",
        "seeds": ", ".join(map(str, cfg.evaluate.seeds)),
        "tokenizer": f"{cfg.evaluate.tokenizer} (vocabulary {tok['vocab_size']:,}"
        + (f", trained on {tok['docs']:,} documents)" if tok["docs"] else ")"),
        "held out": f"{cfg.evaluate.heldout_fraction:g} of every domain",
        "evaluation tokens": ", ".join(f"{k}: {v:,}" for k, v in sets["tokens"].items()),
        "mixture budget": ", ".join(
            sorted({f"{m['target_tokens']:,} tokens" for m in mixes.values()})
        ),
        "device": first["device"],
    }
    return mixes, runs, settings


def _publish(
    cfg: Config,
    runs: list[ProxyRun],
    labels: dict[str, str],
    alphas: dict[str, float],
    baseline: str | None,
    settings: dict,
    out: str,
) -> dict:
    """Write the evaluation report under ``out`` and show it in the UI."""
    summary = write_evaluation(
        runs, labels, alphas, baseline, settings, out, cfg.storage.fsspec_options(out)
    )
    stats = variant_stats(runs)
    create_markdown_artifact(
        evaluation_markdown(runs, stats, labels, settings, baseline=baseline),
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
    mixes, runs, settings = _evaluate_mixtures(cfg, configs)
    labels = {name: label(c) for name, c in configs.items()}
    alphas_of = {n: c.mixing.alpha for n, c in configs.items() if c.mixing.method == "samplemix"}
    baseline = "vanilla" if "vanilla" in configs else None
    out = f"{_root(cfg)}/evaluate"
    report = _publish(cfg, runs, labels, alphas_of, baseline, settings, out)
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
    return f"search-{params['space']}-{params['draws']}-draws"


@flow(name="search", flow_run_name=_search_name)
def search(
    config: Config, space: str, draws: int, validation: int, candidates: int, top: int
) -> dict:
    """Search the parameters of ``space`` ('samplemix': α; 'quadmix': Algorithm 1's θ)
    by proxy evaluation and LightGBM. Returns {"theta", "predicted", "observed", "mae",
    "config": the chosen config's path, "output": the report folder}."""
    from samplemix.evaluation import search as sr
    from samplemix.reporting.run_report import write_files

    cfg = keys.pinned_config(config)  # one commit per hub model for the whole run
    ev.require_heldout(cfg)
    log = get_run_logger()
    out = f"{_root(cfg)}/search"
    base = variant(cfg, {}, f"{out}/base")
    base_mix = run_mix(base)
    domains = sorted(
        set(ev.plan_for_evaluation(base_mix["output"], cfg).column("domain").to_pylist())
    )
    sp = sr.search_space(space, domains, len(cfg.quality))
    thetas = sr.draw_parameters(sp, draws, cfg.mixing.seed)
    configs = {"base": base}
    for i, theta in enumerate(thetas):
        configs[f"draw-{i:03d}"] = variant(
            cfg, sp.mixing_update(theta), f"{out}/draws/draw-{i:03d}"
        )
    _, runs, settings = _evaluate_mixtures(cfg, configs)
    stats = variant_stats(runs)
    losses = [stats[f"draw-{i:03d}"].mean for i in range(draws)]
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
    _, chosen_runs, _ = _evaluate_mixtures(cfg, {"chosen": chosen})
    observed = variant_stats(chosen_runs)["chosen"]
    log.info(
        "chosen θ: predicted %.4f, observed %.4f ± %.4f; base %.4f; best draw %.4f",
        result.predicted_loss,
        observed.mean,
        observed.std,
        stats["base"].mean,
        result.best_observed[1],
    )
    header = (
        f"# samplemix search ({space}, {draws} draws): the chosen parameters.\n"
        f"# Predicted proxy loss {result.predicted_loss:.4f}, observed {observed.mean:.4f}.\n"
        "# `samplemix run` this file; set evaluate.heldout_fraction: 0 to mix every document.\n"
    )
    text = sr.search_markdown(result, sp)
    text += (
        "\n\n## Checked by proxy\n\n"
        f"The chosen θ's mixture, trained as every draw: **{observed.mean:.4f}** nats/token "
        f"(± {observed.std:.4f} over {observed.n} seeds; predicted {result.predicted_loss:.4f}). "
        f"The base config ({label(base)}): {stats['base'].mean:.4f}; "
        f"the best draw: {result.best_observed[1]:.4f}.\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in settings.items())
        + "\n"
    )
    files = dict(sr.search_plots(result, thetas, losses, sp))
    files["draws.csv"] = _draws_csv(sp, thetas, losses).encode()
    files["chosen.yaml"] = (header + config_to_yaml(chosen)).encode()
    files["search.md"] = text.encode()
    write_files(out, files, cfg.storage.fsspec_options(out))
    create_markdown_artifact(text, key="mixture-search", description="Parameter search by proxy")
    return {
        "theta": result.theta,
        "predicted": result.predicted_loss,
        "observed": observed.mean,
        "base": stats["base"].mean,
        "best_draw": result.best_observed[1],
        "mae": result.mae,
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
    cfg: Config, space: str, draws: int, validation: int, candidates: int, top: int
) -> dict:
    """Run the ``search`` flow on the task runner ``cfg.compute`` asks for."""
    check_inputs(cfg)
    with prefect_api(), shared_cluster(with_block_credentials(cfg)) as cfg:
        flow_ = search.with_options(task_runner=task_runner(cfg))
        return flow_(cfg, space, draws, validation, candidates, top)
