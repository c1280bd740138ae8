"""Peak memory and time of the ids reduce (``duplicate_ids.duplicates``): at the default
``PASS_BYTES`` (one pass for 3 million ids), and in passes spilled to files
(``PASS_BYTES`` lowered to ``--pass-mib``), against the plain way (every shard's hashes
concatenated and ``np.unique``'d at once, as the reduce did before).

The corpus: ``--docs`` ids in shards of ``--shard-docs``, 0.1% of them repeating an
earlier id; a shard's hashes are made when asked for (as the reduce reads them from the
store), so the input is never held whole. Each variant runs in a fresh child process
and reports its peak RSS above its RSS at the start, and its seconds.

    python -m bench.bench_ids [--docs 3000000] [--shard-docs 10000] [--pass-mib 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from bench.procfs import status_bytes
from samplemix.io import duplicate_ids


def shard_hashes(s: int, shard_docs: int) -> np.ndarray:
    """Shard s's id hashes: distinct random 64-bit values, the last 0.1% of each shard
    repeating hashes of shard s // 2 (duplicate ids)."""
    h = np.random.default_rng(s).integers(0, 2**63, shard_docs, dtype=np.uint64)
    repeats = shard_docs // 1000
    if s and repeats:
        h[-repeats:] = np.random.default_rng(s // 2).integers(0, 2**63, shard_docs, np.uint64)[
            :repeats
        ]
    return h


def child(variant: str, docs: int, shard_docs: int, pass_mib: int) -> None:
    n_shards = docs // shard_docs
    base = status_bytes("VmRSS") / 2**20
    t0 = time.perf_counter()
    if variant == "plain":
        flat = np.concatenate([shard_hashes(s, shard_docs) for s in range(n_shards)])
        _, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
        found = int((counts[inverse] > 1).sum())
    else:
        if variant == "passes":
            duplicate_ids.PASS_BYTES = pass_mib << 20
        shards = [f"s{s}" for s in range(n_shards)]

        def rows_of(i: int, positions: np.ndarray) -> tuple[list[str], np.ndarray]:
            return [f"h{h}" for h in shard_hashes(i, shard_docs)[positions]], positions

        table = duplicate_ids.duplicates(
            shards,
            lambda s: shard_hashes(s, shard_docs),
            n_shards * shard_docs,
            rows_of,
            "reject",
        )
        found = table.num_rows
    seconds = time.perf_counter() - t0
    out = {"above_mib": status_bytes("VmHWM") / 2**20 - base, "s": seconds, "found": found}
    out["passes"] = duplicate_ids.pass_count(docs) if variant != "plain" else 1
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=3_000_000)
    ap.add_argument("--shard-docs", type=int, default=10_000)
    ap.add_argument("--pass-mib", type=int, default=32, help="PASS_BYTES of the passes variant")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [str(args.docs), str(args.shard_docs), str(args.pass_mib)]
    if args.child:
        child(args.child, *map(int, sizes))
        return
    got = {}
    for variant in ("plain", "default", "passes"):
        cmd = [sys.executable, "-m", "bench.bench_ids", "--child", variant]
        cmd += ["--docs", sizes[0], "--shard-docs", sizes[1], "--pass-mib", sizes[2]]
        got[variant] = json.loads(subprocess.run(cmd, capture_output=True, text=True).stdout)
    print(f"{args.docs:,} ids in shards of {args.shard_docs:,}")
    print("| variant | passes | peak above the start, MiB | s | duplicates found |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for variant, r in got.items():
        print(
            f"| {variant} | {r['passes']} | {r['above_mib']:.0f} | {r['s']:.1f} | {r['found']:,} |"
        )
    plain = got["plain"]["above_mib"]
    print(f"\nmemory, passes / plain: {got['passes']['above_mib'] / plain:.2f}")


if __name__ == "__main__":
    main()
