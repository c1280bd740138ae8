"""GPU benchmarks (issue 4): encoder throughput and model FLOP utilisation, samplemix vs a
plain ``SentenceTransformer.encode`` on the same GPU, quality scoring, and FAISS k-means.

1. peak: the card's measured bf16 matmul rate (8192² GEMMs), the MFU denominator.
2. embed: ``samplemix.scoring.embed.embed_texts`` (bf16 autocast, length-sorted token-budget
   batches, tokenisation overlapped) on documents of >= ``--seq`` tokens, for MiniLM and a
   BERT-base-sized encoder (random weights: the cost is what is measured); tokens/s and
   MFU = achieved FLOP/s / peak, FLOPs per real token = 2·(linear params) + 4·L·s·d.
3. plain: ``SentenceTransformer(MiniLM).encode`` on the same documents and GPU (its
   defaults: fp32, batch 32); the ratio of the two times; minimum cosine between them.
4. quality: a BERT-base-sized ``hf-classifier`` scorer, tokens/s and MFU.
5. kmeans: ``samplemix.mixing.kmeans.fit_centroids`` on N × 384 with K centroids and
   ``assign`` of M vectors streamed in chunks of 10^6 (faiss-gpu when installed).

Usage: python -m bench.bench_gpu [--corpus ../shared/corpus] [--small] [--kmeans-only]
``--small`` shrinks every size so that the script runs on a CPU in about a minute
(a check that it works, not a measurement); ``--kmeans-only`` runs step 5 alone, at
full size without ``--small`` (8.4 minutes on 2 Zen 5 cores: a CPU reference for the GPU
times). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_pipeline import print_table
from bench.flops import flops_per_token, matmul_rate, sync
from samplemix.config import EmbedConfig, QualityConfig, load_config
from samplemix.io.corpus import discover_shards, read_docs
from samplemix.mixing import kmeans
from samplemix.scoring import models
from samplemix.scoring.embed import embed_texts
from samplemix.scoring.quality import make_scorer

ROOT = Path(__file__).resolve().parents[1]


def long_texts(corpus: str, tokenizer, seq: int, n: int) -> list[str]:  # noqa: ANN001
    """``n`` corpus documents of at least ``seq`` tokens (repeated when too few)."""
    cfg = load_config(None, {"corpus.input": corpus})
    texts: list[str] = []
    for shard in discover_shards(cfg.corpus):
        batch = read_docs(shard, cfg).docs.column("text").to_pylist()
        lens = models.token_lengths(tokenizer, batch)
        texts += [t for t, n_tok in zip(batch, lens, strict=True) if n_tok >= seq]
        if len(texts) >= n:
            break
    if not texts:
        raise SystemExit(f"no document of {seq} tokens under {corpus}")
    return (texts * (n // len(texts) + 1))[:n]


def save_bert_base(path: Path, classifier: bool) -> str:
    """A BERT-base-sized model (12 layers, width 768) with MiniLM's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    tok = models.load_tokenizer("minilm")
    cfg = BertConfig(vocab_size=len(tok), num_labels=1)
    (BertForSequenceClassification if classifier else BertModel)(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def timed(fn) -> tuple[object, float]:  # noqa: ANN001
    fn()  # warm: weights loaded, kernels chosen
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def kmeans_rows(n_fit: int, k: int, n_assign: int) -> list[tuple[str, str]]:
    """Seconds to fit ``k`` centroids on ``n_fit`` × 384 unit vectors drawn around ``k``
    random centres (20 iterations, one start) and to assign ``n_assign`` more, drawn
    and assigned in chunks of 10^6 (drawing not timed); on faiss-gpu where it sees a GPU."""
    rows: list[tuple[str, str]] = []
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(k, 384)).astype(np.float32)

    def points(n: int) -> np.ndarray:
        x = centres[rng.integers(0, k, n)] + 0.3 * rng.normal(size=(n, 384)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    sample = points(n_fit)
    t0 = time.perf_counter()
    cent = kmeans.fit_centroids(sample, k, niter=20, seed=0, nredo=1)
    rows.append(
        (
            f"kmeans fit {n_fit:,} x 384, K={k:,} (faiss GPUs: {kmeans.gpus()}), s",
            f"{time.perf_counter() - t0:.1f}",
        )
    )
    chunk, spent = min(n_assign, 1_000_000), 0.0
    for _ in range(n_assign // chunk):
        x = points(chunk)
        t0 = time.perf_counter()
        kmeans.assign(x, cent)
        spent += time.perf_counter() - t0
    rows.append((f"kmeans assign {n_assign:,} vectors (chunks of {chunk:,}), s", f"{spent:.1f}"))

    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus"))
    ap.add_argument("--small", action="store_true", help="tiny sizes: a CPU smoke run")
    ap.add_argument(
        "--kmeans-only",
        action="store_true",
        help="only the k-means part (full size without --small): a CPU reference",
    )
    args = ap.parse_args()
    device = models.resolve_device("auto")
    small = args.small
    seq, n_docs = (128, 64) if small else (512, 4096)
    n_fit, k, n_assign = (20_000, 64, 200_000) if small else (1_000_000, 4096, 10_000_000)
    if args.kmeans_only:
        print_table(kmeans_rows(n_fit, k, n_assign), len(os.sched_getaffinity(0)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="samplemix-gpu-"))
    rows: list[tuple[str, str]] = [
        ("device", torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    ]

    peak = matmul_rate(device, 1024 if small else 8192)
    rows.append(("peak matmul TFLOP/s (bf16 on GPU)", f"{peak / 1e12:.1f}"))

    tok = models.load_tokenizer("minilm")
    texts = long_texts(args.corpus, tok, seq, n_docs)
    tokens = n_docs * seq
    for name, model in (("MiniLM", "minilm"), ("BERT-base", save_bert_base(tmp / "base", False))):
        cfg = EmbedConfig(model=model, max_length=seq)
        ours, t = timed(lambda cfg=cfg: embed_texts(texts, cfg))
        f = flops_per_token(models.load_model(model, "encoder"), seq)
        rows += [
            (f"embed {name} at {seq} tokens: tokens/s", f"{tokens / t:,.0f}"),
            (f"embed {name}: MFU", f"{f * tokens / t / peak:.1%}"),
        ]
        if name == "MiniLM":
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(models.resolve_model("minilm"), device=str(device))
            st.max_seq_length = seq
            plain, t_plain = timed(lambda st=st: st.encode(texts, normalize_embeddings=True))
            rows += [
                ("plain SentenceTransformer.encode MiniLM: tokens/s", f"{tokens / t_plain:,.0f}"),
                ("samplemix / plain speed", f"{t_plain / t:.2f}x"),
                ("min cosine samplemix vs plain", f"{np.sum(ours * plain, axis=1).min():.5f}"),
            ]

    qcfg = QualityConfig(
        scorer="hf-classifier", model=save_bert_base(tmp / "clf", True), max_length=seq
    )
    scorer = make_scorer(qcfg)
    _, t = timed(lambda: scorer.score(texts))
    f = flops_per_token(models.load_model(qcfg.model, "classifier"), seq)
    rows += [
        (f"quality BERT-base classifier at {seq}: tokens/s", f"{tokens / t:,.0f}"),
        ("quality: MFU", f"{f * tokens / t / peak:.1%}"),
    ]

    rows += kmeans_rows(n_fit, k, n_assign)
    print_table(rows, len(os.sched_getaffinity(0)))


if __name__ == "__main__":
    main()
