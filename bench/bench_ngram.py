"""Speed of the Kneser-Ney n-gram instrument (samplemix.evaluation.ngram), in one process.

1. Against the plain alternative: the dict-based textbook implementation of the tests
   (``tests/test_ngram.py::ReferenceKN``) on the same data, fit and scoring timed apart,
   with the two losses (they must agree to 1e-9) and the speed ratio.
2. The module alone on ``--sizes`` training tokens at each of ``--orders``, scoring a
   held-out set a fifth that size.

Data: synthetic documents of 100-1,000 Zipf-distributed ids (exponent 1.1, ``--vocab``
4,096); i.i.d. ids make almost every long n-gram distinct, the costly case for the tables.

Usage: python -m bench.bench_ngram [--compare-tokens 200000] [--sizes 1000000 5000000]
       [--orders 3 5] [--vocab 4096]
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

import numpy as np

from samplemix.evaluation.ngram import fit_ngram, ngram_loss
from tests.test_ngram import ReferenceKN


def cpu_model() -> str:
    """``lscpu``'s Model name, or "unknown"."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    names = [ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name:")]
    return names[0] if names else "unknown"


def zipf_docs(rng: np.random.Generator, tokens: int, vocab: int) -> list[np.ndarray]:
    """Documents of 100-1,000 ids drawn with P(id) proportional to (id + 1)^-1.1, about
    ``tokens`` ids in all (int32, like tokenizer output)."""
    p = np.arange(1, vocab + 1, dtype=np.float64) ** -1.1
    ids = rng.choice(vocab, size=tokens, p=p / p.sum()).astype(np.int32)
    cuts = np.cumsum(rng.integers(100, 1001, size=tokens // 100 + 1))
    return np.split(ids, cuts[cuts < tokens])


def timed(fn, *args):  # noqa: ANN001, ANN002, ANN201
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compare-tokens", type=int, default=200_000)
    ap.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 5_000_000])
    ap.add_argument("--orders", type=int, nargs="*", default=[3, 5])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    rows = [("CPU", cpu_model()), ("vocabulary", f"{args.vocab:,}")]

    n, order = args.compare_tokens, 3
    train, held = zipf_docs(rng, n, args.vocab), zipf_docs(rng, n // 5, args.vocab)
    lm, t_fit = timed(fit_ngram, train, order, args.vocab)
    loss, t_loss = timed(ngram_loss, lm, held)
    ref, t_ref_fit = timed(ReferenceKN, train, order, args.vocab)
    ref_loss, t_ref_loss = timed(ref.loss, held)
    ratio = (t_ref_fit + t_ref_loss) / (t_fit + t_loss)
    rows += [
        (f"module vs dicts: order {order}, fit {n:,} / score {n // 5:,} tokens", ""),
        ("  module fit s, score s", f"{t_fit:.2f}, {t_loss:.2f}"),
        ("  dicts fit s, score s", f"{t_ref_fit:.2f}, {t_ref_loss:.2f}"),
        ("  speed ratio dicts / module (fit + score)", f"{ratio:.0f}x"),
        ("  loss module, dicts (nats/token)", f"{loss:.9f}, {ref_loss:.9f}"),
    ]

    for n in args.sizes:
        train, held = zipf_docs(rng, n, args.vocab), zipf_docs(rng, n // 5, args.vocab)
        for order in args.orders:
            lm, t_fit = timed(fit_ngram, train, order, args.vocab)
            loss, t_loss = timed(ngram_loss, lm, held)
            rows.append(
                (
                    f"module order {order}: fit {n:,} tokens s, score {n // 5:,} s (loss)",
                    f"{t_fit:.2f}, {t_loss:.2f} ({loss:.4f})",
                )
            )
    print(f"\n| measure (1 process, {len(os.sched_getaffinity(0))} cores) | value |")
    print("| --- | ---: |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
