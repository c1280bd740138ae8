"""How well ``samplemix evaluate`` tells mixtures apart on the shared corpus (issue 27).

Two studies on a slice of the shared corpus (the first ``--docs`` documents of every
domain), with the example config's quality scorer and embedder:

1. ``arms``: vanilla, quadmix, SampleMix at every ``--alphas`` value and the
   ``--control`` arm, each trained by the default proxy at ``--tokens`` tokens with seeds
   ``--seeds``, and the seedless n-gram instrument on the same tokens. Prints the paired
   differences to vanilla (mean, 95% CI, paired SE, minimum detectable difference, resolved)
   for both instruments, the unigram and bigram floors, and the verdict.
2. ``budgets``: vanilla and SampleMix α=0.8 at each of ``--budgets`` training tokens: the
   seed std of the proxy, the paired SE and MDD of their difference, and whether the proxy
   beats the bigram on its own tokens.

Every evaluation goes through the real ``evaluate`` flow (Prefect, a local Dask cluster),
one store for all, so mixtures are mixed once. Usage:

    python -m bench.bench_evaluate [--study arms budgets] [--docs 300] [--tokens 200k]
        [--seeds 0,1,2] [--out /tmp/bench_evaluate]

Writes OUT/<study>.md (the tables, machine and date) and prints them.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import time
from pathlib import Path

import pyarrow.json as pj
import pyarrow.parquet as pq

from samplemix.config import load_config, parse_count  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "corpus"


def cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((x.split(":", 1)[1].strip() for x in out.splitlines() if "Model name" in x), "?")
    return (
        f"{name}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores"
    )


def write_slice(src: Path, dst: Path, docs: int) -> Path:
    """The first ``docs`` documents of every domain folder of ``src`` (its first shard),
    as ``dst/<domain>/part-000.parquet`` with columns id, text; files already there are
    kept (a rerun finds its cached stages)."""
    for domain in sorted(p.name for p in src.iterdir() if p.is_dir()):
        first = sorted((src / domain).glob("part-000.*"))[0]
        table = pj.read_json(first) if first.name.endswith(".jsonl.gz") else pq.read_table(first)
        out = dst / domain / "part-000.parquet"
        if out.exists():  # rewriting would change its fingerprint: every cached key
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.select(["id", "text"]).slice(0, docs), out)
    return dst


def evaluate(corpus: Path, out: Path, tokens: int, seeds: list[int], **extra: object) -> tuple:
    """(the evaluate flow's result, seconds) for the example config on ``corpus``."""
    from flows.evaluate import run_evaluate

    methods = extra.pop("methods")
    alphas = extra.pop("alphas")
    cfg = load_config(
        ROOT / "examples" / "mix.yaml",
        {
            "corpus.input": str(corpus),
            "output.path": str(out),
            "output.store": str(out.parent / "store"),
            "evaluate.heldout_fraction": 0.1,
            "evaluate.seeds": seeds,
            "evaluate.proxy.tokens": tokens,
            **extra,
        },
    )
    start = time.perf_counter()
    result = run_evaluate(cfg, methods, alphas)
    return result, time.perf_counter() - start


def _ci(p: dict | None) -> str:
    if p is None:
        return "(reference)"
    if p["se"] is None:
        return f"{p['mean']:+.4f}"
    return f"{p['mean']:+.4f} [{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]"


def _cells(p: dict | None) -> list[str]:
    """CI, SE, MDD and resolved of a paired summary ('–' for the reference)."""
    if p is None:
        return ["(reference)", "–", "–", "–"]
    se = "–" if p["se"] is None else f"{p['se']:.4f}"
    mdd = "–" if p["mdd"] is None else f"{p['mdd']:.4f}"
    return [_ci(p), se, mdd, "yes" if p["resolved"] else "no"]


def arms_table(report: dict) -> list[str]:
    """A Markdown row per arm of an evaluate report: both instruments, paired to vanilla."""
    rows = [
        "| arm | proxy mean ± seed std | proxy Δ to vanilla [95% CI] | paired SE | MDD | "
        "resolved | n-gram | n-gram Δ [95% CI] | bootstrap SE | MDD | resolved | unigram "
        "| bigram |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report.items():
        if not isinstance(r, dict) or "paired" not in r:
            continue
        g = r["ngram"]
        cells = [name, f"{r['mean']:.4f} ± {r['std']:.4f}", *_cells(r["paired"])]
        cells += [f"{g['objective']:.4f}", *_cells(g["versus"])]
        cells += [f"{g['floors']['1']:.4f}", f"{g['floors']['2']:.4f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", nargs="+", default=["arms", "budgets"])
    ap.add_argument("--corpus", type=Path, default=SHARED)
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--tokens", default="200k")
    ap.add_argument("--budgets", default="50k,200k,800k")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--alphas", default="0,0.2,0.4,0.6,0.8,1")
    ap.add_argument("--control", default="one-domain:code")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_evaluate"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    corpus = write_slice(args.corpus, args.out / "corpus", args.docs)
    head = [f"{datetime.date.today()}, {cpu()}, {args.docs} documents per domain", ""]
    if "arms" in args.study:
        result, seconds = evaluate(
            corpus,
            args.out / "arms",
            parse_count(args.tokens),
            seeds,
            methods=["vanilla", "quadmix"],
            alphas=[float(a) for a in args.alphas.split(",")],
            **{"evaluate.controls": [args.control]},
        )
        lines = [*head, f"proxy tokens {args.tokens}, seeds {args.seeds}, {seconds:.0f} s", ""]
        lines += arms_table(result["report"]) + [""]
        lines += [f"- {v}" for v in result["report"]["verdict"]]
        text = "\n".join(lines) + "\n"
        (args.out / "arms.md").write_text(text)
        print(text)
    if "budgets" in args.study:
        lines = [
            *head,
            "| proxy tokens | vanilla seed std | α=0.8 − vanilla [95% CI] | paired SE | MDD | "
            "proxy (vanilla) | bigram (vanilla) | seconds |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for budget in args.budgets.split(","):
            result, seconds = evaluate(
                corpus,
                args.out / f"budget-{budget}",
                parse_count(budget),
                seeds,
                methods=["vanilla"],
                alphas=[0.8],
            )
            r = result["report"]
            p, v = r["samplemix-a0.8"]["paired"], r["vanilla"]
            lines.append(
                f"| {budget} | {v['std']:.4f} | {_ci(p)} | {p['se']:.4f} | {p['mdd']:.4f} | "
                f"{v['mean']:.4f} | {v['ngram']['floors']['2']:.4f} | {seconds:.0f} |"
            )
        text = "\n".join(lines) + "\n"
        (args.out / "budgets.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
