"""Peak memory of writing one mixture part: samplemix's sliced gather (``gather`` +
``part_bytes``: sorted slices of ``SLICE_BYTES`` written as row groups) against the
plain way (the whole part reordered at once, then ``pq.write_table``).

Each variant runs in a fresh child process that builds the scattered pieces of one
part (``--pieces`` tables of random documents, ``--mib`` MiB of Arrow data in all) and
reports its peak RSS above the RSS it had with the pieces built: what writing the part
costs a worker beyond holding its input.

    python -m bench.bench_gather [--mib 64 256] [--pieces 200]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from samplemix.io.mixture_shards import MIXTURE_SCHEMA, gather, part_bytes, scatter


def pieces(mib: int, n_pieces: int) -> list[pa.Table]:
    """Scattered pieces of one bucket: random 2-6 KB documents, ``mib`` MiB in all."""
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(5000)])
    per_piece = mib * 2**20 // n_pieces
    out = []
    for p in range(n_pieces):
        texts, size = [], 0
        while size < per_piece:
            text = " ".join(rng.choice(words, int(rng.integers(400, 1200))))
            texts.append(text)
            size += len(text)
        n = len(texts)
        docs = pa.table(
            {
                "id": [f"p{p}-{i}" for i in range(n)],
                "domain": ["web"] * n,
                "text": texts,
                "quality": rng.random(n),
                "diversity": rng.random(n),
                "weight": rng.random(n),
            }
        )
        out.append(scatter(docs, np.ones(n, np.int64), 1, seed=0)[0])
    return out


def plain(parts: list[pa.Table]) -> int:
    """The whole part sorted and taken at once, then written: its bytes."""
    table = pa.concat_tables(parts)
    order = pc.sort_indices(
        table, sort_keys=[("key", "ascending"), ("id", "ascending"), ("copy", "ascending")]
    )
    part = table.take(order).drop_columns(["key"]).cast(MIXTURE_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(part, buf)
    return len(buf.getvalue())


def child(variant: str, mib: int, n_pieces: int) -> None:
    built = pieces(mib, n_pieces)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, after the pieces
    size = len(part_bytes(gather(built))[0]) if variant == "samplemix" else plain(built)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    arrow = sum(t.nbytes for t in built)
    print(json.dumps({"arrow_mib": arrow / 2**20, "above_mib": (peak - base) / 1024, "file": size}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--pieces", type=int, default=200)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    print(
        "| part, Arrow MiB | peak above the input, MiB: samplemix | plain | ratio "
        "| file MiB: samplemix / plain |"
    )
    print("| ---: | ---: | ---: | ---: | ---: |")
    for mib in args.mib:
        got = {}
        for variant in ("samplemix", "plain"):
            cmd = [sys.executable, "-m", "bench.bench_gather", "--child", variant]
            out = subprocess.run(
                [*cmd, str(mib), str(args.pieces)], capture_output=True, text=True, check=True
            )
            got[variant] = json.loads(out.stdout)
        s, p = got["samplemix"], got["plain"]
        ratio = s["above_mib"] / p["above_mib"]
        files = f"{s['file'] / 2**20:.1f} / {p['file'] / 2**20:.1f}"
        print(
            f"| {s['arrow_mib']:.0f} | {s['above_mib']:.0f} | {p['above_mib']:.0f} "
            f"| {ratio:.2f} | {files} |"
        )


if __name__ == "__main__":
    main()
