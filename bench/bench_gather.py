"""Peak memory of writing one mixture part: samplemix's sliced gather (``gather`` +
``write_part``: slice r of every encoded piece, sorted, written as row group r) against
the plain way (the whole part read, reordered at once, then ``pq.write_table``).

Each variant runs in a fresh child process that builds the scattered pieces of one
part (``--pieces`` tables of random documents, ``--mib`` MiB of Arrow data in all) and
saves them as the counts stage does (samplemix: ``piece_bytes``; plain: Parquet), then
reads them back and writes the part to a file, and reports its peak RSS above the RSS
it had before reading: what writing the part costs a worker.

    python -m bench.bench_gather [--mib 64 256] [--pieces 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.procfs import status_bytes
from samplemix.io.mixture_shards import (
    MIXTURE_SCHEMA,
    gather,
    piece_bytes,
    scatter,
    slice_count,
    write_part,
)


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


def plain(pieces: list[Path], out: Path) -> None:
    """The whole part read, sorted and taken at once, then written."""
    table = pa.concat_tables([pq.read_table(p) for p in pieces])
    order = pc.sort_indices(
        table, sort_keys=[("key", "ascending"), ("id", "ascending"), ("copy", "ascending")]
    )
    pq.write_table(table.take(order).drop_columns(["key"]).cast(MIXTURE_SCHEMA), out)


def samplemix(pieces: list[Path], n_slices: int, out: Path) -> None:
    """The part written slice by slice, each slice's ranges read from the pieces' files."""

    def read_ranges(ranges: list[tuple[int, int, int]]) -> list[bytes]:
        got = []
        for p, start, end in ranges:
            with pieces[p].open("rb") as f:
                f.seek(start)
                got.append(f.read(end - start))
        return got

    with out.open("wb") as f:
        write_part(gather([str(p) for p in pieces], n_slices, read_ranges), f)


def save(mib: int, n_pieces: int, folder: Path) -> int:
    """The pieces of one part saved in ``folder`` both ways (samplemix-i, plain-i); its
    slice count."""
    built = pieces(mib, n_pieces)
    n_slices = slice_count(sum(t.nbytes for t in built), 1)
    for i, table in enumerate(built):
        (folder / f"samplemix-{i}").write_bytes(piece_bytes(table, n_slices))
        pq.write_table(table, folder / f"plain-{i}")
    return n_slices


def child(variant: str, folder: Path, n_pieces: int, n_slices: int) -> None:
    """Write the part from the saved pieces; print the peak RSS above the RSS at the
    start (an upper bound of what writing it held: the peak may predate the start)."""
    files = [folder / f"{variant}-{i}" for i in range(n_pieces)]
    base = status_bytes("VmRSS") // 1024
    out = folder / f"part-{variant}.parquet"
    if variant == "samplemix":
        samplemix(files, n_slices, out)
    else:
        plain(files, out)
    peak = status_bytes("VmHWM") // 1024
    print(json.dumps({"above_mib": (peak - base) / 1024, "file": out.stat().st_size}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--pieces", type=int, default=200)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        variant, folder, n_pieces, n_slices = args.child
        child(variant, Path(folder), int(n_pieces), int(n_slices))
        return
    print(
        "| part, Arrow MiB | slices | peak above the start, MiB: samplemix | plain | ratio "
        "| file MiB: samplemix / plain |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for mib in args.mib:
        with tempfile.TemporaryDirectory() as tmp:
            n_slices = save(mib, args.pieces, Path(tmp))
            got = {}
            for variant in ("samplemix", "plain"):
                cmd = [sys.executable, "-m", "bench.bench_gather", "--child", variant, tmp]
                out = subprocess.run(
                    [*cmd, str(args.pieces), str(n_slices)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                got[variant] = json.loads(out.stdout)
        s, p = got["samplemix"], got["plain"]
        ratio = s["above_mib"] / p["above_mib"]
        files = f"{s['file'] / 2**20:.1f} / {p['file'] / 2**20:.1f}"
        print(
            f"| {mib} | {n_slices} | {s['above_mib']:.0f} | {p['above_mib']:.0f} "
            f"| {ratio:.2f} | {files} |"
        )


if __name__ == "__main__":
    main()
