"""Benchmarks for resumable runs, in one process on the same corpus.

1. warm rerun: a cold ``mix`` run, then the same config again (nothing changed):
   wall-time ratio warm / cold (target <= 0.05).
2. scorer swap: the rerun after swapping the quality scorer, against the work that
   swap really needs (quality with the new scorer, weights, budget, counts, mixture,
   plan and report) done by the engine stages called directly in this process on a
   copy of the cold store: wall-time ratio (target <= 1.2).

The new scorer is a MiniLM-sized classifier: the packaged all-MiniLM-L6-v2 encoder
with a seeded, untrained regression head, standing in for a trained quality
classifier of the same size (its scores are not meaningful; its cost is).

Usage: python bench/bench_cache.py [--corpus ../shared/corpus]
Prints a Markdown table to paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from bench.bench_pipeline import ROOT, print_table, run_direct  # noqa: E402
from flows.mix import run_mix  # noqa: E402
from samplemix.config import Config, load_config  # noqa: E402
from samplemix.scoring.models import resolve_model, set_torch_threads  # noqa: E402


def minilm_classifier(path: Path) -> Path:
    """MiniLM's encoder + a seeded 1-output head, saved as a transformers classifier."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model("minilm"), num_labels=1
    )
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model("minilm")).save_pretrained(path)
    return path


def timed_run(cfg: Config) -> tuple[float, dict]:
    t0 = time.perf_counter()
    summary = run_mix(cfg)
    return time.perf_counter() - t0, summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus"))
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    tmp = Path(tempfile.mkdtemp(prefix="samplemix-bench-cache-"))
    base = {
        "corpus.input": args.corpus,
        "output.path": str(tmp / "flow"),
        "mixing.budget_ratio": 0.5,
    }
    cfg = load_config(None, base)
    rows = []

    t_cold, cold = timed_run(cfg)
    t_warm, warm = timed_run(cfg)
    assert set(warm["computed"].values()) == {0}, warm["computed"]
    rows += [
        (
            f"cold run, {cold['documents']:,} docs, {len(cold['artifacts'])} artifacts, s",
            f"{t_cold:.1f}",
        ),
        ("warm rerun (nothing changed), s", f"{t_warm:.1f}"),
        ("warm / cold", f"{t_warm / t_cold:.3f}"),
    ]
    print(rows, flush=True)

    scorer = minilm_classifier(tmp / "scorer")
    shutil.copytree(tmp / "flow" / "store", tmp / "direct-store")
    swap = {
        **base,
        "quality.scorer": "hf-classifier",
        "quality.model": str(scorer),
        "quality.max_length": 256,
    }
    t_swap, swapped = timed_run(load_config(None, swap))
    set_torch_threads(cores)
    direct = load_config(
        None,
        {**swap, "output.path": str(tmp / "direct"), "output.store": str(tmp / "direct-store")},
    )
    t_direct = run_direct(direct)
    recomputed = ", ".join(f"{s} {n}" for s, n in swapped["computed"].items() if n)
    busy = ", ".join(f"{s} {t:.1f}" for s, t in swapped["task_seconds"].items() if t)
    rows += [
        (f"scorer swap rerun, s (computed: {recomputed})", f"{t_swap:.1f}"),
        (
            "same stages called directly (quality, weights, budget, counts, output), s",
            f"{t_direct:.1f}",
        ),
        ("scorer swap / direct", f"{t_swap / t_direct:.3f}"),
        (
            f"scorer swap: seconds inside computing tasks, summed ({busy})",
            f"{sum(swapped['task_seconds'].values()):.1f}",
        ),
    ]
    print_table(rows, cores)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
