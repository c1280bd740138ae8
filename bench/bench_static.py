"""Static (model2vec) embedder vs MiniLM, in one process.

1. distill: wall time of ``samplemix.scoring.static_embed.distill_static('minilm', ...)`` (PCA 256).
2. speed: docs/s of ``samplemix.scoring.embed.embed_texts`` with MiniLM on a sample of documents
   and with the static model on the same sample and on every document; same torch
   threads, same ``embed.max_length``.
3. agreement: spherical k-means (``kmeans.fit_centroids`` + ``assign``, the pipeline's
   niter/nredo, K = auto_k(N)) on every document's static and MiniLM embeddings;
   adjusted mutual information and adjusted Rand index between the two clusterings,
   and the same for MiniLM vs MiniLM with another k-means seed (the ceiling); AMI of
   each clustering with the documents' domains.

MiniLM embeddings of every document come from a finished run's store (``--store``,
keys computed as the pipeline does, checked against the sample embedded here) when it
has them all, else are computed here (minutes on a few cores).

Usage: python bench/bench_static.py [--corpus ../shared/corpus] [--store OUT/store]
       [--static DIR (skip the distillation)] [--sample 1000] [--max-length 256]
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_mutual_info_score as ami
from sklearn.metrics import adjusted_rand_score as ari

from bench.bench_pipeline import print_table
from samplemix.config import Config, load_config
from samplemix.io.corpus import discover_shards
from samplemix.mixing import kmeans
from samplemix.pipeline import keys as pipeline_keys  # noqa: E402
from samplemix.pipeline import stages
from samplemix.scoring.embed import embed_texts
from samplemix.scoring.models import set_torch_threads
from samplemix.scoring.static_embed import distill_static

ROOT = Path(__file__).resolve().parents[1]


def stored_minilm(cfg: Config, store_root: str) -> np.ndarray | None:
    """Every document's MiniLM embedding from the store at ``store_root``, in shard order
    (the order read_docs gives), or None when any shard's artifact is missing."""
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"store": store_root})})
    store = pipeline_keys.store_for(cfg)
    keys = [pipeline_keys.embed_key(s, cfg) for s in discover_shards(cfg.corpus)]
    if len(store.summaries(keys)) < len(keys):
        return None
    return np.concatenate([store.get_array(k, "embeddings.npy") for k in keys])


def timed(fn, *args):  # noqa: ANN001, ANN002, ANN201
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def clusters(e: np.ndarray, k: int, cfg: Config, seed: int) -> np.ndarray:
    c = kmeans.fit_centroids(e, k, cfg.kmeans.niter, seed, cfg.kmeans.nredo)
    return kmeans.assign(e, c)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus"))
    ap.add_argument("--store", default=None, help="A finished run's store with MiniLM embeddings")
    ap.add_argument("--static", default=None, help="An already distilled folder")
    ap.add_argument("--sample", type=int, default=1000, help="Documents MiniLM is timed on")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    set_torch_threads(cores)
    cfg = load_config(None, {"corpus.input": args.corpus, "embed.max_length": args.max_length})
    texts: list[str] = []
    domains: list[str] = []
    for shard in discover_shards(cfg.corpus):
        docs = stages.read_docs(shard, cfg).docs
        texts += docs.column("text").to_pylist()
        domains += docs.column("domain").to_pylist()
    rows: list[tuple[str, str]] = [("documents", f"{len(texts):,}"), ("torch threads", f"{cores}")]

    tmp = tempfile.TemporaryDirectory(prefix="samplemix-static-")
    if args.static:
        folder = args.static
    else:
        folder, t = timed(distill_static, "minilm", f"{tmp.name}/m2v", 256)
        rows.append(("distill MiniLM → static (PCA 256), s", f"{t:.1f}"))
    static_cfg = cfg.embed.model_copy(update={"model": str(folder)})

    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(texts), min(args.sample, len(texts)), replace=False)
    sample = [texts[i] for i in pick]
    embed_texts(sample[:8], cfg.embed)  # warm: models loaded once
    embed_texts(sample[:8], static_cfg)
    mini_sample, t_mini = timed(embed_texts, sample, cfg.embed)
    _, t_static_sample = timed(embed_texts, sample, static_cfg)
    static_all, t_static = timed(embed_texts, texts, static_cfg)
    rows += [
        (f"MiniLM docs/s ({len(sample):,} sampled docs)", f"{len(sample) / t_mini:.1f}"),
        (f"static docs/s (same {len(sample):,} docs)", f"{len(sample) / t_static_sample:.0f}"),
        (f"static docs/s (all {len(texts):,} docs)", f"{len(texts) / t_static:.0f}"),
        ("speed ratio static / MiniLM (same sample)", f"{t_mini / t_static_sample:.0f}x"),
    ]

    mini_all = stored_minilm(cfg, args.store) if args.store else None
    if mini_all is not None:
        cos = np.sum(mini_all[pick] * mini_sample, axis=1)
        rows.append(("MiniLM embeddings of all docs", f"from {args.store}"))
        rows.append(("  stored vs recomputed sample, min cosine", f"{cos.min():.5f}"))
    else:
        mini_all, t = timed(embed_texts, texts, cfg.embed)
        rows.append(("MiniLM embeddings of all docs", f"computed here, {t:.0f} s"))

    k = kmeans.auto_k(len(texts))
    mini0 = clusters(mini_all, k, cfg, args.seed)
    mini1 = clusters(mini_all, k, cfg, args.seed + 1)
    stat0 = clusters(static_all, k, cfg, args.seed)
    stat1 = clusters(static_all, k, cfg, args.seed + 1)
    rows += [
        ("k-means K (auto), niter, nredo", f"{k}, {cfg.kmeans.niter}, {cfg.kmeans.nredo}"),
        ("AMI static vs MiniLM", f"{ami(mini0, stat0):.3f}"),
        ("ARI static vs MiniLM", f"{ari(mini0, stat0):.3f}"),
        ("AMI MiniLM seed 0 vs seed 1 (ceiling)", f"{ami(mini0, mini1):.3f}"),
        ("ARI MiniLM seed 0 vs seed 1", f"{ari(mini0, mini1):.3f}"),
        ("AMI static seed 0 vs seed 1", f"{ami(stat0, stat1):.3f}"),
        ("AMI MiniLM clusters vs domains", f"{ami(domains, mini0):.3f}"),
        ("AMI static clusters vs domains", f"{ami(domains, stat0):.3f}"),
    ]
    tmp.cleanup()
    print_table(rows, cores)


if __name__ == "__main__":
    main()
