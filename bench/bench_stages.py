"""What each per-shard stage costs on one thread, in one process (no Prefect, no Dask).

For every shard of the corpus: reading it (corpus.read_shard through stages.read_docs),
counting its tokens (the tokens stage's work, and the plain ``encode_batch`` that
computes offsets too), the heuristic quality score, MiniLM's
truncation count and MiniLM embeddings (on every ``--embed-every``-th shard, scaled up
to the corpus). Also the per-run cost of the model fingerprint that cache keys hash.

The question it answers: what would scoring and embedding a shard in one pass save?
Only the second read of the shard, i.e. ``read`` against ``embed`` below.

Usage: python -m bench.bench_stages [--corpus ../shared/corpus] [--max-length 128]
       [--embed-every 3]
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from pathlib import Path

from bench.bench_pipeline import print_table
from samplemix.config import load_config
from samplemix.io.corpus import discover_shards
from samplemix.pipeline import keys, stages
from samplemix.scoring.embed import embed_texts, truncated_count
from samplemix.scoring.models import (
    load_tokenizer,
    local_version,
    model_fingerprint,
    set_torch_threads,
)
from samplemix.scoring.quality import make_scorer
from samplemix.scoring.tokens import token_counts

ROOT = Path(__file__).resolve().parents[1]


def seconds(f, *args) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    f(*args)
    return time.perf_counter() - t0


def plain_token_counts(texts: list[str], tokenizer: str) -> list[int]:
    """The plain way to count tokens: the backend's ``encode_batch``, which also
    computes every token's character offsets (the tokens stage's way before issue 28)."""
    backend = load_tokenizer(tokenizer).backend_tokenizer
    backend.no_truncation()
    encs = backend.encode_batch(texts, add_special_tokens=False)
    return [len(e.ids) for e in encs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus"))
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--embed-every", type=int, default=3)
    args = ap.parse_args()
    set_torch_threads(1)
    cfg = load_config(None, {"corpus.input": args.corpus, "embed.max_length": args.max_length})
    shards = discover_shards(cfg.corpus)
    tokenizer = keys.tokenizer_name(cfg)
    scorer = make_scorer(cfg.quality[0])
    embed_texts(["warm up"], cfg.embed)  # load MiniLM and its tokenizer once, untimed
    token_counts(["warm up"], tokenizer)
    cost: Counter[str] = Counter()
    docs = embedded = 0
    for i, shard in enumerate(shards):
        t0 = time.perf_counter()
        texts = stages.read_docs(shard, cfg).docs.column("text").to_pylist()
        cost["read"] += time.perf_counter() - t0
        docs += len(texts)
        cost["tokens"] += seconds(token_counts, texts, tokenizer)
        cost["plain tokens"] += seconds(plain_token_counts, texts, tokenizer)
        cost["quality"] += seconds(scorer.score, texts)
        cost["truncated"] += seconds(truncated_count, texts, cfg.embed)
        if i % args.embed_every == 0:
            cost["embed"] += seconds(embed_texts, texts, cfg.embed)
            embedded += len(texts)
    embed = cost["embed"] * docs / embedded
    model_fingerprint.cache_clear()
    fingerprint = seconds(model_fingerprint, cfg.embed.model)
    stat = seconds(local_version, cfg.embed.model)
    size = sum(entry[1] for entry in local_version(cfg.embed.model))  # (path, size, ...)
    rows = [
        ("documents, shards", f"{docs:,}, {len(shards)}"),
        ("read every shard, s", f"{cost['read']:.1f}"),
        ("count tokens (tokens stage), s", f"{cost['tokens']:.1f}"),
        ("count tokens, plain `encode_batch` (with offsets), s", f"{cost['plain tokens']:.1f}"),
        ("**tokens stage / plain**", f"**{cost['tokens'] / cost['plain tokens']:.2f}**"),
        ("heuristic quality, s", f"{cost['quality']:.1f}"),
        ("MiniLM truncation count, s", f"{cost['truncated']:.1f}"),
        (
            f"MiniLM embed at {args.max_length} tokens, s (from {embedded:,} docs)",
            f"{embed:.0f}",
        ),
        ("**read / embed** (what one pass would save)", f"**{cost['read'] / embed:.2%}**"),
        (f"model fingerprint ({size / 1e6:.0f} MB hashed), ms", f"{fingerprint * 1e3:.0f}"),
        ("stat of the model folder (worker reload check), ms", f"{stat * 1e3:.2f}"),
    ]
    print_table(rows, len(os.sched_getaffinity(0)))


if __name__ == "__main__":
    main()
