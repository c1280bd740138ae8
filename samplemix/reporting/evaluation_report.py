"""The proxy evaluation report: which mixture trains the better small LM (method.md §4).

``samplemix.evaluation.stages`` trains one proxy per (mixture, seed) and commits a summary per run.
This module turns those summaries into statistics over seeds per variant (``variant_stats``),
paired differences to the baseline (``comparisons``: every arm shares the seeds, so the
seed-to-seed spread they share cancels), a plain-words verdict on the paired figures that
also says whether each planted control arm was resolved (``verdict``), Markdown, PNG plots
and a CSV, written together by ``write_evaluation``. Every number is a held-out loss in
nats/token: lower is better.

Like ``samplemix.reporting.run_report`` this is pure presentation and arithmetic: it never
imports Prefect or torch, and never touches pyplot's global state (figures come from
``formatting.new_figure``).
"""

from __future__ import annotations

import csv
import io
import math
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from matplotlib import colormaps
from matplotlib.figure import Figure

from samplemix.evaluation.paired import DocBootstrap, Paired, paired, spearman
from samplemix.reporting import formatting as fmt

#: Plot names in report order; ``evaluation_plots`` returns ``<name>.png`` for each.
PLOTS = ("evaluate_methods", "evaluate_alpha", "evaluate_domains")
#: Keys of ``write_evaluation``'s summary besides the variant names.
RESERVED = ("best", "verdict")
#: The keys of ``evaluate.run_proxy``'s summary that ``ProxyRun.from_summary`` reads.
SUMMARY_KEYS = ("losses", "heldout", "target", "objective", "seconds", "epochs", "mixture_tokens")

_COLOR = "#1f77b4"
_BASELINE_COLOR = "#9aa5b1"


@dataclass(frozen=True)
class ProxyRun:
    """One proxy trained on one mixture with one seed."""

    variant: str  # e.g. "vanilla", "samplemix-a0.8"
    seed: int
    losses: dict[str, float]  # held-out loss per domain, nats/token
    heldout: float  # mean of the per-domain losses
    target: float | None  # loss on the target set, if one was given
    objective: float  # target if given else heldout (lower is better)
    seconds: float
    epochs: float  # windows drawn / windows in the mixture (>1: cycled)
    mixture_tokens: int  # proxy-tokenizer tokens in the mixture, copies counted
    cached: bool  # came from the store, not trained in this run
    # Held-out loss over every evaluation token (domains weighted by their tokens); NaN
    # when the evaluation sets' sizes are not known.
    pooled: float = math.nan

    @classmethod
    def from_summary(
        cls,
        variant: str,
        seed: int,
        summary: Mapping,
        cached: bool,
        eval_tokens: Mapping[str, int] | None = None,
    ) -> ProxyRun:
        """A run from the summary ``evaluate.run_proxy`` commits; keys besides
        ``SUMMARY_KEYS`` (curve, steps, ...) are ignored. Loss keys are domain names (a
        ``domain/`` prefix is dropped should one be there); ``target`` may be None.
        ``eval_tokens`` ({set name: tokens}, as the evalsets summary gives them) weights
        the domains for ``pooled``. Raises ValueError naming the keys the summary lacks."""
        missing = [k for k in SUMMARY_KEYS if k not in summary]
        if missing:
            raise ValueError(f"proxy summary of {variant!r} seed {seed} lacks {missing}")
        target = summary["target"]
        losses = {str(k).removeprefix("domain/"): float(v) for k, v in summary["losses"].items()}
        return cls(
            variant=variant,
            seed=int(seed),
            losses=losses,
            heldout=float(summary["heldout"]),
            target=None if target is None else float(target),
            objective=float(summary["objective"]),
            seconds=float(summary["seconds"]),
            epochs=float(summary["epochs"]),
            mixture_tokens=int(summary["mixture_tokens"]),
            cached=bool(cached),
            pooled=pooled_loss(losses, eval_tokens or {}),
        )


def pooled_loss(losses: Mapping[str, float], eval_tokens: Mapping[str, int]) -> float:
    """Σ_d tokens_d · loss_d / Σ_d tokens_d over the domains of ``losses``; ``eval_tokens``
    keys may carry the ``domain/`` prefix. NaN when a domain's token count is missing."""
    tokens = {str(k).removeprefix("domain/"): int(v) for k, v in eval_tokens.items()}
    if not losses or any(d not in tokens for d in losses):
        return math.nan
    total = sum(tokens[d] for d in losses)
    return sum(tokens[d] * loss for d, loss in losses.items()) / total if total else math.nan


@dataclass(frozen=True)
class VariantStats:
    """A variant's results over its seeds: each pair is (mean, sample std with ddof=1),
    the std 0.0 when n == 1 (one seed has no measurable spread)."""

    variant: str
    n: int  # seeds
    mean: float  # of the objective
    std: float
    heldout: tuple[float, float]
    pooled: tuple[float, float]  # token-weighted held-out loss
    target: tuple[float, float] | None
    domains: dict[str, tuple[float, float]]


@dataclass(frozen=True)
class NgramRun:
    """The seedless instrument on one variant's mixture: Kneser–Ney models fitted on the
    proxy's training token count and scored on the same evaluation sets."""

    variant: str
    order: int
    objective: float  # of the order-``order`` model, nats/token
    floors: dict[int, float]  # objective of the order-1 (unigram) and order-2 (bigram) fits
    versus: DocBootstrap | None  # minus the reference variant's, by document; None for it


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _by_variant(runs: Sequence[ProxyRun]) -> dict[str, list[ProxyRun]]:
    groups: dict[str, list[ProxyRun]] = {}
    for r in runs:
        groups.setdefault(r.variant, []).append(r)
    return groups


def variant_stats(runs: Sequence[ProxyRun]) -> dict[str, VariantStats]:
    """``VariantStats`` per variant, in order of first appearance in ``runs``. A domain's
    pair is over the runs that report it. Raises ValueError when a (variant, seed) appears
    twice (one seed would count twice) or when some runs have a target loss and others do
    not (their objectives would measure different things)."""
    if len({r.target is None for r in runs}) > 1:
        raise ValueError("some proxy runs have a target loss and others not: not comparable")
    pairs = [(r.variant, r.seed) for r in runs]
    dup = next((p for i, p in enumerate(pairs) if p in pairs[:i]), None)
    if dup:
        raise ValueError(f"variant {dup[0]!r} seed {dup[1]} appears twice among the runs")
    out = {}
    for v, rs in _by_variant(runs).items():
        domains = sorted({d for r in rs for d in r.losses})
        mean, std = _mean_std([r.objective for r in rs])
        out[v] = VariantStats(
            variant=v,
            n=len(rs),
            mean=mean,
            std=std,
            heldout=_mean_std([r.heldout for r in rs]),
            pooled=_mean_std([r.pooled for r in rs]),
            target=None if rs[0].target is None else _mean_std([r.target for r in rs]),
            domains={d: _mean_std([r.losses[d] for r in rs if d in r.losses]) for d in domains},
        )
    return out


# ---------------------------------------------------------------------------------------
# Verdict


def _ranked(stats: Mapping[str, VariantStats]) -> list[VariantStats]:
    # A diverged proxy (NaN) ranks last instead of poisoning the order; ties keep input order.
    return sorted(stats.values(), key=lambda s: (not math.isfinite(s.mean), s.mean))


def comparisons(runs: Sequence[ProxyRun], reference: str) -> dict[str, Paired]:
    """Every other variant's objective paired with ``reference``'s by seed
    (``paired.paired``: variant minus reference), in order of first appearance."""
    by_seed = {v: {r.seed: r.objective for r in rs} for v, rs in _by_variant(runs).items()}
    base = by_seed.get(reference, {})
    return {v: paired(v, s, reference, base) for v, s in by_seed.items() if v != reference}


def reference_of(runs: Sequence[ProxyRun], baseline: str | None) -> str | None:
    """The variant every other is paired with: ``baseline`` when it was evaluated, else
    the first variant (None without runs)."""
    variants = [r.variant for r in runs]
    return baseline if baseline in variants else next(iter(variants), None)


def paired_sentence(p: Paired) -> str:
    """``p`` in words: the mean paired difference, its 95% CI and SE, whether it is
    resolved, and the minimum detectable difference at its seeds."""
    if p.n and not all(map(math.isfinite, p.diffs)):
        return f"{p.arm} − {p.baseline}: a loss is not finite (a diverged proxy?)."
    if p.n < 2:
        return (
            f"{p.arm} − {p.baseline} = {p.mean:+.4f} nats/token on {p.n} shared seed"
            f"{'s' if p.n != 1 else ''}: a paired comparison needs at least 2 seeds, so"
            " the difference cannot be judged."
        )
    per_seed = ", ".join(f"{d:+.4f}" for d in p.diffs)
    head = (
        f"{p.arm} − {p.baseline} = {p.mean:+.4f} nats/token paired over seeds"
        f" {', '.join(map(str, p.seeds))} (per seed {per_seed}; 95% CI"
        f" [{p.ci[0]:+.4f}, {p.ci[1]:+.4f}], paired SE {p.se:.4f}, t = {p.t:.1f})"
    )
    if p.resolved:
        return f"{head}: resolved; the minimum detectable difference here is {p.mdd:.4f}."
    return (
        f"{head}: not resolved, the CI includes 0; the minimum detectable difference at"
        f" these seeds is {p.mdd:.4f} (80% power), so a smaller true difference is"
        " invisible to this evaluation."
    )


def _control_lines(
    pairs: Mapping[str, Paired], controls: Sequence[str], reference: str | None
) -> list[str]:
    """A sentence per control arm, and the conclusion when one was not resolved."""
    lines, blind = [], []
    for c in controls:
        p = pairs.get(c)
        if p is None:
            lines.append(f"Control {c} was not evaluated against {reference}.")
            blind.append(c)
            continue
        seen = p.resolved and p.mean > 0
        lines.append(
            f"Control {c} ({'resolved' if seen else 'NOT resolved'} as worse than"
            f" {reference}): {paired_sentence(p)}"
        )
        if not seen:
            blind.append(c)
    if blind:
        lines.append(
            f"Inconclusive: the control{'s' if len(blind) > 1 else ''} {', '.join(blind)}"
            " planted a difference this evaluation did not resolve, so a difference it does"
            " not resolve between the other mixtures proves nothing; add seeds or training"
            " tokens (evaluate.seeds, evaluate.proxy.tokens)."
        )
    return lines


def instrument_lines(
    stats: Mapping[str, VariantStats], ngram: Sequence[NgramRun], controls: Sequence[str] = ()
) -> list[str]:
    """Whether the proxy and the n-gram instrument rank the variants alike (Spearman ρ over
    every variant both scored but the ``controls``), and which proxies fail to beat the
    bigram fitted on their own training tokens; no lines without n-gram runs."""
    if not ngram:
        return []
    order = ngram[0].order
    proxy = {v: s.mean for v, s in stats.items()}
    # Controls are planted far off: ranking them alike says nothing about the others.
    ranked = {v: m for v, m in proxy.items() if v not in controls}
    rho = spearman(ranked, {r.variant: r.objective for r in ngram})
    n = len(set(ranked) & {r.variant for r in ngram})
    if math.isnan(rho):
        lines = [f"Instruments: too few variants ({n}) or no spread to compare rankings."]
    else:
        agree = "agree" if rho >= 0.8 else "partly agree" if rho > 0 else "disagree"
        lines = [
            f"Instruments: the proxy and the order-{order} n-gram model {agree} on the ranking"
            f" of the {n} variants{', controls left out' if controls else ''}"
            f" (Spearman ρ = {rho:.2f})."
        ]
    weak = [
        f"{r.variant} ({proxy[r.variant]:.4f} vs {r.floors[2]:.4f})"
        for r in ngram
        if r.variant in proxy
        and 2 in r.floors
        and not proxy[r.variant] < r.floors[2]
        and r.variant not in controls
    ]
    if weak:
        lines.append(
            "The proxy does not beat a bigram model fitted on the same training tokens for "
            + ", ".join(weak)
            + ": it learned no more than token-pair statistics, so its ranking says little;"
            " raise evaluate.proxy.tokens or use the n-gram ranking."
        )
    return lines


def verdict(
    runs: Sequence[ProxyRun],
    baseline: str | None,
    controls: Sequence[str] = (),
    ngram: Sequence[NgramRun] = (),
) -> list[str]:
    """Plain sentences: which variant has the lowest mean objective; its paired
    difference (``paired_sentence``) to the runner-up and to ``baseline`` (when evaluated
    and different); how the proxy and the ``ngram`` instrument agree
    (``instrument_lines``); and, for each variant named in ``controls`` (arms planted to be worse
    than ``baseline``), whether it was resolved; an unresolved control makes the verdict
    "Inconclusive". Controls never count as the best or the runner-up."""
    stats = variant_stats(runs)
    ranked = [s for s in _ranked(stats) if s.variant not in controls]
    if not ranked:
        return ["No proxy runs to compare."]
    best = ranked[0]
    if not math.isfinite(best.mean):
        return ["No variant has a finite mean objective (diverged proxies?)."]
    kind = "target loss" if best.target is not None else "mean held-out loss over domains"
    spread = f" ± {best.std:.4f} (seed std)" if best.n > 1 else ""
    lines = [
        f"Lowest mean objective ({kind}): {best.variant}, {best.mean:.4f}{spread} nats/token"
        f" over {best.n} seed{'s' if best.n != 1 else ''}."
    ]
    if len(ranked) == 1 and not controls:
        return lines + ["Only one variant was evaluated: there is nothing to compare it with."]
    if len(ranked) > 1:
        second = ranked[1].variant
        role = "the baseline and runner-up" if second == baseline else "the runner-up"
        lines.append(f"Against {role}: " + paired_sentence(comparisons(runs, second)[best.variant]))
    if baseline is not None and baseline != best.variant and baseline not in stats:
        lines.append(f"The baseline {baseline} was not evaluated, so there is no margin over it.")
    elif baseline == best.variant:
        lines.append(f"{baseline} is the baseline: no variant beats it on mean objective.")
    elif baseline is not None and len(ranked) > 1 and baseline != ranked[1].variant:
        pair = comparisons(runs, baseline)[best.variant]
        lines.append("Against the baseline: " + paired_sentence(pair))
    lines += instrument_lines(stats, ngram, controls)
    reference = reference_of(runs, baseline)
    if controls and reference is not None:
        lines += _control_lines(comparisons(runs, reference), controls, reference)
    return lines


# ---------------------------------------------------------------------------------------
# Markdown


def _pm(pair: tuple[float, float], n: int) -> str:
    # One seed has no spread to show; "± 0.0000" would claim there is none.
    return f"{pair[0]:.4f}" if n < 2 else f"{pair[0]:.4f} ± {pair[1]:.4f}"


def _name(variant: str, labels: Mapping[str, str]) -> str:
    label = labels.get(variant, variant)
    return label if label == variant else f"{label} ({variant})"


def _variants_section(
    runs: Sequence[ProxyRun], stats: Mapping[str, VariantStats], labels: Mapping[str, str]
) -> list[str]:
    groups = _by_variant(runs)
    has_target = any(s.target is not None for s in stats.values())
    has_pooled = any(math.isfinite(s.pooled[0]) for s in stats.values())
    finite = [s.mean for s in stats.values() if math.isfinite(s.mean)]
    rows = []
    for v, s in stats.items():
        obj = _pm((s.mean, s.std), s.n)
        row = [_name(v, labels), s.n, f"**{obj}**" if finite and s.mean == min(finite) else obj]
        row.append(_pm(s.heldout, s.n))
        if has_pooled:
            row.append(_pm(s.pooled, s.n))
        if has_target:
            row.append(_pm(s.target, s.n) if s.target is not None else "–")
        row.append(f"{np.mean([r.epochs for r in groups.get(v, [])] or [math.nan]):.2f}")
        rows.append(row)
    headers = ["Variant", "Seeds", "Objective", "Held-out"]
    headers += ["Token-weighted"] * has_pooled + ["Target"] * has_target + ["Epochs"]
    lines = ["## Variants", "", fmt.markdown_table(headers, rows), ""]
    if has_pooled:
        lines += [
            "Held-out: every domain counts the same; token-weighted: every held-out token"
            " does (a small domain weighs less).",
            "",
        ]
    if any(r.epochs > 1 for r in runs):
        lines += [
            "Epochs > 1: the proxy cycled its mixture (fewer tokens than it trains on), so"
            " it saw repeated windows.",
            "",
        ]
    return lines


def _paired_section(
    runs: Sequence[ProxyRun],
    labels: Mapping[str, str],
    baseline: str | None,
    controls: Sequence[str],
) -> list[str]:
    reference = reference_of(runs, baseline)
    pairs = comparisons(runs, reference) if reference is not None else {}
    if not pairs:
        return []
    rows = []
    for v, p in pairs.items():
        finite = p.n >= 2 and math.isfinite(p.se)
        rows.append(
            [
                _name(v, labels) + (" (control)" if v in controls else ""),
                ", ".join(f"{d:+.4f}" for d in p.diffs),
                f"{p.mean:+.4f}",
                f"[{p.ci[0]:+.4f}, {p.ci[1]:+.4f}]" if finite else "–",
                f"{p.se:.4f}" if finite else "–",
                f"{p.t:.1f}" if finite else "–",
                f"{p.mdd:.4f}" if finite else "–",
                "yes" if p.resolved else "no",
            ]
        )
    headers = ["Variant", "Δ per seed", "Mean Δ", "95% CI", "Paired SE", "t", "MDD", "Resolved"]
    name = labels.get(reference, reference)
    return [
        f"## Paired differences to {name}",
        "",
        f"Objective minus {name}'s, seed by seed (negative: better than {name}). Every"
        " variant trains with the same seeds and is scored on the same documents, so the"
        " spread the seeds share cancels in the paired difference. Resolved: the 95% t"
        " interval excludes 0. MDD, the minimum detectable difference: the true difference"
        " a paired t test at 5% finds with 80% power at this spread and number of seeds.",
        "",
        fmt.markdown_table(headers, rows),
        "",
    ]


def _instruments_section(
    stats: Mapping[str, VariantStats],
    ngram: Sequence[NgramRun],
    labels: Mapping[str, str],
    controls: Sequence[str],
) -> list[str]:
    if not ngram:
        return []
    order = ngram[0].order
    rows = []
    for r in ngram:
        b = r.versus
        proxy = stats[r.variant].mean if r.variant in stats else math.nan
        rows.append(
            [
                _name(r.variant, labels),
                f"{proxy:.4f}" if math.isfinite(proxy) else "–",
                f"{r.objective:.4f}",
                "–" if b is None else f"{b.mean:+.4f} [{b.ci[0]:+.4f}, {b.ci[1]:+.4f}]",
                "–" if b is None else f"{b.mdd:.4f}",
                "–" if b is None else "yes" if b.resolved else "no",
                f"{r.floors.get(1, math.nan):.4f}",
                f"{r.floors.get(2, math.nan):.4f}",
                "yes" if proxy < r.floors.get(2, math.nan) else "NO",
            ]
        )
    reference = next((r.versus.baseline for r in ngram if r.versus is not None), None)
    headers = [
        "Variant",
        "Proxy",
        f"{order}-gram",
        f"Δ {order}-gram [95% CI]",
        "MDD",
        "Resolved",
        "Unigram",
        "Bigram",
        "Proxy < bigram",
    ]
    return [
        "## Instruments",
        "",
        f"Beside the proxies, a seedless instrument: interpolated Kneser–Ney models of order"
        f" {order}, 2 and 1 fitted on each mixture's first proxy-training-count tokens (the"
        " same tokenizer) and scored on the same evaluation sets; its differences to"
        f" {labels.get(reference, reference)} are paired over evaluation documents"
        " (bootstrap, 2,000 draws; MDD at 5% two-sided and 80% power). A proxy that does not"
        " beat the bigram on its own training tokens learned no more than token pairs.",
        "",
        *instrument_lines(stats, ngram, controls),
        "",
        fmt.markdown_table(headers, rows),
        "",
    ]


def _domains_section(stats: Mapping[str, VariantStats], labels: Mapping[str, str]) -> list[str]:
    domains = sorted({d for s in stats.values() for d in s.domains})
    rows = []
    for d in domains:
        means = [s.domains[d][0] for s in stats.values() if d in s.domains]
        best = min((m for m in means if math.isfinite(m)), default=None)
        cells = []
        for s in stats.values():
            cell = _pm(s.domains[d], s.n) if d in s.domains else "–"
            cells.append(f"**{cell}**" if d in s.domains and s.domains[d][0] == best else cell)
        rows.append([d, *cells])
    headers = ["Domain", *(labels.get(v, v) for v in stats)]
    lines = ["## Per-domain held-out loss", ""]
    lines += ["Mean ± seed std per domain; the lowest of each row in bold.", ""]
    return lines + [fmt.markdown_table(headers, rows) if rows else "none recorded", ""]


def _runs_section(runs: Sequence[ProxyRun]) -> list[str]:
    domains = sorted({d for r in runs for d in r.losses})
    rows = [
        [
            r.variant,
            r.seed,
            f"{r.objective:.4f}",
            *(f"{r.losses[d]:.4f}" if d in r.losses else "–" for d in domains),
            f"{r.seconds:.1f}",
            "yes" if r.cached else "no",
        ]
        for r in runs
    ]
    headers = ["Variant", "Seed", "Objective", *domains, "Seconds", "Cached"]
    return ["## Runs", "", fmt.markdown_table(headers, rows), ""]


def evaluation_markdown(
    runs: Sequence[ProxyRun],
    stats: Mapping[str, VariantStats],
    labels: Mapping[str, str],
    settings: Mapping[str, object],
    images: Mapping[str, str] | None = None,
    *,
    baseline: str | None = None,
    controls: Sequence[str] = (),
    ngram: Sequence[NgramRun] = (),
) -> str:
    """The report as Markdown: "# Proxy evaluation", then Verdict (``verdict(runs,
    baseline, controls, ngram)``), Variants, Paired differences to the baseline (or the
    first variant), Instruments (with ``ngram`` runs), Per-domain held-out loss (best per
    row in bold), Runs, Settings.
    ``labels`` maps a variant to a readable label (missing: its name). ``images`` maps a
    plot name from ``PLOTS`` (``".png"`` may be included) to a file name relative to the
    report; each is embedded in its section."""
    imgs = {k.removesuffix(".png"): v for k, v in (images or {}).items()}
    lines = ["# Proxy evaluation", ""]
    lines += [
        "Every variant's mixture trained the same small proxy LM (same tokenizer, schedule"
        " and training tokens), once per seed. Numbers are held-out next-token losses in"
        " nats/token, lower is better, as mean ± sample std (ddof = 1) over seeds; arms"
        " are compared by their paired (same-seed) differences. The objective is the"
        " target-set loss when a target is given, else the mean of the per-domain losses."
        " A margin between proxies is evidence at proxy scale only.",
        "",
        "## Verdict",
        "",
    ]
    lines += [f"- {s}" for s in verdict(runs, baseline, controls, ngram)] + [""]
    lines += _variants_section(runs, stats, labels)
    lines += fmt.image_lines(imgs, "evaluate_methods", "Objective per variant")
    lines += _paired_section(runs, labels, baseline, controls)
    lines += _instruments_section(stats, ngram, labels, controls)
    lines += fmt.image_lines(imgs, "evaluate_alpha", "Mean objective vs SampleMix α")
    lines += _domains_section(stats, labels)
    lines += fmt.image_lines(imgs, "evaluate_domains", "Per-domain loss difference")
    lines += _runs_section(runs)
    lines += ["## Settings", ""]
    if settings:
        rows = [(k, f"{v:g}" if isinstance(v, float) else v) for k, v in settings.items()]
        lines += [fmt.markdown_table(["Setting", "Value"], rows, right=2), ""]
    else:
        lines += ["none recorded", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------
# Plots


def _methods_plot(
    runs: Sequence[ProxyRun],
    stats: Mapping[str, VariantStats],
    labels: Mapping[str, str],
    baseline: str | None,
) -> Figure:
    names = list(stats)
    fig = fmt.new_figure(min(max(6.0, 1.1 * len(names) + 2.5), 16.0), 4.5)
    ax = fig.subplots()
    title = "Objective per variant (bar: mean, error bar: seed std, dots: seeds)"
    if not names:
        fmt.no_data_panel(ax, title, "proxy runs")
        return fig
    x = np.arange(len(names))
    means = np.array([stats[v].mean for v in names])
    stds = np.array([stats[v].std for v in names])
    colors = [_BASELINE_COLOR if v == baseline else _COLOR for v in names]
    ax.bar(x, means, 0.6, color=colors, alpha=0.85)
    ax.errorbar(x, means, yerr=stds, fmt="none", ecolor="black", capsize=6, zorder=3)
    groups = _by_variant(runs)
    seeds = []
    for i, v in enumerate(names):
        ys = [r.objective for r in groups.get(v, [])]
        # Spread the dots sideways so equal losses still show as separate seeds.
        ax.plot(i + np.linspace(-0.12, 0.12, len(ys)) * (len(ys) > 1), ys, "o", color="k", ms=4)
        seeds += ys
    # Proxy losses differ in the second decimal; an axis from 0 would flatten them.
    ends = np.array([*seeds, *(means - stds), *(means + stds)], dtype=float)
    ends = ends[np.isfinite(ends)]
    if ends.size:
        pad = 0.15 * (ends.max() - ends.min()) or 0.05 * max(abs(ends.max()), 1e-3)
        ax.set_ylim(ends.min() - pad, ends.max() + pad)
    fmt.label_ticks(ax, [labels.get(v, v) for v in names], x)
    ax.set_ylabel("objective (nats/token; axis not from 0)")
    ax.set_title(title)
    return fig


def _alpha_plot(
    stats: Mapping[str, VariantStats],
    labels: Mapping[str, str],
    alphas: Mapping[str, float],
    baseline: str | None,
) -> Figure:
    fig = fmt.new_figure(6.5, 4.5)
    ax = fig.subplots()
    title = "Mean objective vs SampleMix α (error bar: seed std)"
    points = sorted(
        ((float(a), stats[v]) for v, a in alphas.items() if v in stats), key=lambda p: p[0]
    )
    if len({a for a, _ in points}) < 2:
        fmt.no_data_panel(ax, title, "α sweep (fewer than 2 α values)")
        return fig
    xs = [a for a, _ in points]
    means, stds = [s.mean for _, s in points], [s.std for _, s in points]
    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=5, color=_COLOR, label="SampleMix")
    if baseline in stats and baseline not in alphas:
        name = labels.get(baseline, baseline)
        ax.axhline(stats[baseline].mean, ls="--", color=_BASELINE_COLOR, label=name)
    ax.set_xlabel("α  (w = α·d̂ + (1 − α)·q̂: 0 quality only, 1 diversity only)")
    ax.set_ylabel("objective (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return fig


def _domains_plot(
    stats: Mapping[str, VariantStats], labels: Mapping[str, str], baseline: str | None
) -> Figure:
    domains = sorted({d for s in stats.values() for d in s.domains})
    fig = fmt.new_figure(min(max(6.0, (0.3 * len(stats) + 0.6) * len(domains) + 2.5), 18.0), 4.8)
    ax = fig.subplots()
    if baseline in stats:
        ref = stats[baseline].domains
        shown = [v for v in stats if v != baseline]
        name = labels.get(baseline, baseline)
        title = f"Per-domain loss minus {name}'s (negative = better than {name})"
        reference = {d: ref[d][0] for d in domains if d in ref}
    else:
        shown = list(stats)
        title = "Per-domain loss minus the mean over variants (negative = better than average)"
        reference = {
            d: float(np.mean([s.domains[d][0] for s in stats.values() if d in s.domains]))
            for d in domains
        }
    if not domains or not shown:
        fmt.no_data_panel(ax, title, "variants to compare")
        return fig
    x = np.arange(len(domains))
    w = 0.8 / len(shown)
    cmap = colormaps["tab10" if len(shown) <= 10 else "tab20"]
    for k, v in enumerate(shown):
        own = stats[v].domains
        diff = [own[d][0] - reference[d] if d in own and d in reference else 0.0 for d in domains]
        ax.bar(x - 0.4 + (k + 0.5) * w, diff, w, color=cmap(k % cmap.N), label=labels.get(v, v))
    ax.axhline(0, color="black", lw=1)
    fmt.label_ticks(ax, domains, x)
    ax.set_xlabel("domain")
    ax.set_ylabel("Δ loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, fontsize=8, ncols=min(len(shown), 4))
    return fig


def evaluation_plots(
    runs: Sequence[ProxyRun],
    stats: Mapping[str, VariantStats],
    labels: Mapping[str, str],
    alphas: Mapping[str, float],
    baseline: str | None,
) -> dict[str, bytes]:
    """PNG bytes for every plot in ``PLOTS``, keyed ``<name>.png``: objective per variant
    (bar mean, error bar std, dots seeds; baseline in grey), mean objective vs α for the
    variants in ``alphas`` (a "no α sweep" panel under 2 α values), and per-domain mean loss
    minus the baseline's (or, without one, the mean over variants; negative = better)."""
    figures = {
        "evaluate_methods": _methods_plot(runs, stats, labels, baseline),
        "evaluate_alpha": _alpha_plot(stats, labels, alphas, baseline),
        "evaluate_domains": _domains_plot(stats, labels, baseline),
    }
    return {f"{name}.png": fmt.png_bytes(figures[name]) for name in PLOTS}


# ---------------------------------------------------------------------------------------
# CSV and writing


def results_csv(runs: Sequence[ProxyRun], baseline: str | None = None) -> str:
    """One row per run, in order: variant, seed, objective, heldout, pooled, target, then
    ``loss:<domain>`` per domain (sorted), seconds, epochs, mixture_tokens, cached
    (``true``/``false``), and the paired comparison with the reference variant
    (``reference_of``): ``diff`` (this run's objective minus the reference's at the same
    seed) and, the same on every row of a variant, ``paired_mean``, ``paired_se``,
    ``ci_low``, ``ci_high``, ``mdd`` and ``resolved``. Floats are exact (repr); None, NaN,
    a missing domain or the reference's own paired cells are empty."""
    domains = sorted({d for r in runs for d in r.losses})
    reference = reference_of(runs, baseline)
    pairs = comparisons(runs, reference) if reference is not None else {}
    base = {r.seed: r.objective for r in runs if r.variant == reference}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["variant", "seed", "objective", "heldout", "pooled", "target"]
        + [f"loss:{d}" for d in domains]
        + ["seconds", "epochs", "mixture_tokens", "cached", "diff"]
        + ["paired_mean", "paired_se", "ci_low", "ci_high", "mdd", "resolved"]
    )
    for r in runs:
        p = pairs.get(r.variant)
        diff = r.objective - base[r.seed] if p is not None and r.seed in base else None
        figures = (p.mean, p.se, p.ci[0], p.ci[1], p.mdd) if p is not None else (None,) * 5
        writer.writerow(
            [r.variant, r.seed, *map(fmt.csv_float, (r.objective, r.heldout, r.pooled, r.target))]
            + [fmt.csv_float(r.losses.get(d)) for d in domains]
            + [fmt.csv_float(r.seconds), fmt.csv_float(r.epochs), r.mixture_tokens]
            + ["true" if r.cached else "false", fmt.csv_float(diff)]
            + [fmt.csv_float(x) for x in figures]
            + ["" if p is None else "true" if p.resolved else "false"]
        )
    return buf.getvalue()


def write_evaluation(
    runs: Sequence[ProxyRun],
    labels: Mapping[str, str],
    alphas: Mapping[str, float],
    baseline: str | None,
    settings: Mapping[str, object],
    out: str,
    storage_options: dict | None = None,
    *,
    controls: Sequence[str] = (),
    ngram: Sequence[NgramRun] = (),
) -> dict:
    """Write the ``PLOTS`` PNGs, ``results.csv`` and ``evaluate.md`` (last, so a reader
    never finds it with missing pictures) under ``out``, a local folder (created) or any
    fsspec URL; ``storage_options`` go to its filesystem.

    Returns a JSON-able summary ``{variant: {"mean", "std", "n", "heldout", "pooled",
    "target", "domains": {domain: mean}, "paired": {"reference", "mean", "se", "ci",
    "mdd", "resolved"} or None}, "best": variant, "verdict": [sentences]}``; NaN is None,
    ``target`` the mean target loss or None, ``paired`` None for the reference itself.
    ``controls`` name the variants planted to be worse than ``baseline`` (``verdict``).
    Raises ValueError for no runs, for a variant named like a summary key (``RESERVED``),
    and as ``variant_stats`` does."""
    if not runs:
        raise ValueError("no proxy runs to report")
    clash = [r.variant for r in runs if r.variant in RESERVED]
    if clash:
        raise ValueError(f"variant name {clash[0]!r} is reserved for the summary; rename it")
    stats = variant_stats(runs)
    pairs = comparisons(runs, reference_of(runs, baseline))  # type: ignore[arg-type]
    grams = {r.variant: r for r in ngram}
    fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
    # Object stores have no directories; only a local target needs one created.
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(root, exist_ok=True)
    pngs = evaluation_plots(runs, stats, labels, alphas, baseline)
    for name, data in pngs.items():
        fs.pipe_file(posixpath.join(root, name), data)
    csv_text = results_csv(runs, baseline)
    fs.pipe_file(posixpath.join(root, "results.csv"), csv_text.encode("utf-8"))
    images = {name.removesuffix(".png"): name for name in pngs}
    text = evaluation_markdown(
        runs, stats, labels, settings, images, baseline=baseline, controls=controls, ngram=ngram
    )
    fs.pipe_file(posixpath.join(root, "evaluate.md"), text.encode("utf-8"))

    summary: dict = {
        v: {
            "mean": fmt.json_float(s.mean),
            "std": fmt.json_float(s.std),
            "n": s.n,
            "heldout": fmt.json_float(s.heldout[0]),
            "pooled": fmt.json_float(s.pooled[0]),
            "target": None if s.target is None else fmt.json_float(s.target[0]),
            "domains": {d: fmt.json_float(m) for d, (m, _) in s.domains.items()},
            "paired": _paired_summary(pairs.get(v)),
            "ngram": _ngram_summary(grams.get(v)),
        }
        for v, s in stats.items()
    }
    summary["best"] = _ranked(stats)[0].variant
    summary["verdict"] = verdict(runs, baseline, controls, ngram)
    return summary


def _paired_summary(p: Paired | None) -> dict | None:
    if p is None:
        return None
    return {
        "reference": p.baseline,
        "diffs": [fmt.json_float(d) for d in p.diffs],
        "mean": fmt.json_float(p.mean),
        "se": fmt.json_float(p.se),
        "ci": [fmt.json_float(c) for c in p.ci],
        "mdd": fmt.json_float(p.mdd),
        "resolved": p.resolved,
    }


def _ngram_summary(r: NgramRun | None) -> dict | None:
    if r is None:
        return None
    b = r.versus
    return {
        "order": r.order,
        "objective": fmt.json_float(r.objective),
        "floors": {str(k): fmt.json_float(v) for k, v in r.floors.items()},
        "versus": None
        if b is None
        else {
            "reference": b.baseline,
            "mean": fmt.json_float(b.mean),
            "se": fmt.json_float(b.se),
            "ci": [fmt.json_float(c) for c in b.ci],
            "mdd": fmt.json_float(b.mdd),
            "resolved": b.resolved,
        },
    }


__all__ = [
    "PLOTS",
    "RESERVED",
    "SUMMARY_KEYS",
    "NgramRun",
    "ProxyRun",
    "VariantStats",
    "comparisons",
    "evaluation_markdown",
    "evaluation_plots",
    "results_csv",
    "variant_stats",
    "verdict",
    "write_evaluation",
]
