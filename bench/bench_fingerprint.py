"""What a run's start pays to fingerprint a local model folder, against hashing it.

Cache keys include a hash of every byte of each local model (models.model_fingerprint).
The hash is stored with the files' local_version (size, inode, modification and change
time of each), so a later run of an unchanged folder stats the files instead of reading
them. This times, on a folder of MiniLM plus ``--gb`` GB of random weights: hashing
every byte (what every run paid before; the page cache warm, the best case), the
first fingerprint (hash and store) and a later run's (read back), in one process.

Usage: python -m bench.bench_fingerprint [--gb 4]
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.bench_pipeline import print_table
from samplemix.scoring import models
from samplemix.scoring.models import content_hash, model_fingerprint, resolve_model


def hashed(folder: Path) -> float:
    """Seconds to hash every byte under ``folder`` (models.content_hash)."""
    t0 = time.perf_counter()
    content_hash(folder)
    return time.perf_counter() - t0


def fingerprinted(folder: Path) -> float:
    """Seconds of model_fingerprint as a run's start calls it (process cache cleared)."""
    model_fingerprint.cache_clear()
    t0 = time.perf_counter()
    model_fingerprint(str(folder))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=4.0, help="random weights added to MiniLM")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="samplemix-bench-fingerprint-"))
    models.FINGERPRINTS = tmp / "fingerprints"
    folder = Path(shutil.copytree(resolve_model("minilm"), tmp / "model"))
    with open(folder / "extra-weights.bin", "wb") as fh:
        for _ in range(int(args.gb * 1024)):
            fh.write(os.urandom(1 << 20))
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    hashed(folder)  # into the page cache, untimed
    t_hash = min(hashed(folder) for _ in range(2))
    t_first = fingerprinted(folder)
    t_later = min(fingerprinted(folder) for _ in range(5))
    rows = [
        (f"model folder, GB ({len(list(folder.rglob('*')))} files)", f"{size / 1e9:.2f}"),
        ("sha256 of every byte (page cache warm), s", f"{t_hash:.2f}"),
        ("first run: fingerprint (hash and store), s", f"{t_first:.2f}"),
        ("later run: fingerprint (stored, files unchanged), ms", f"{t_later * 1e3:.2f}"),
        ("**later run / hashing**", f"**{t_later / t_hash:.5f}**"),
    ]
    print_table(rows, len(os.sched_getaffinity(0)))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
