"""Benchmarks for the mix pipeline, each against the plain way, in one process.

1. embed: ``samplemix.scoring.embed.embed_texts`` vs a plain ``SentenceTransformer.encode``
   on the same documents and threads (docs/s and the ratio, plus cosine agreement).
2. overhead: the whole ``mix`` flow (Prefect + Dask LocalCluster) vs the same
   engine stages called one after another in this process (wall time ratio).
3. memory: peak RSS of each Dask worker on 1x and 4x the data (same shard size).

Usage: python -m bench.bench_pipeline [--corpus ../shared/corpus] [--skip overhead memory]
       [--batch-tokens 4096 1024] [--rounds 3] [--compile]
Prints a Markdown table to paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from distributed import Client, LocalCluster

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from bench.bench_scale import ProcessTree  # noqa: E402
from bench.flops import flops_per_token, matmul_rate  # noqa: E402
from flows.mix import run_mix  # noqa: E402
from flows.runtime import local_cluster
from samplemix.config import Config, EmbedConfig, load_config  # noqa: E402
from samplemix.io.corpus import (
    discover_shards,  # noqa: E402
    read_docs,  # noqa: E402
)
from samplemix.pipeline.walk import run_in_process  # noqa: E402
from samplemix.scoring.embed import embed_texts  # noqa: E402
from samplemix.scoring.models import (  # noqa: E402
    load_model,
    load_tokenizer,
    padded_batches,
    resolve_batch_tokens,
    resolve_dtype,
    resolve_model,
    set_torch_threads,
)

ROOT = Path(__file__).resolve().parents[1]
Row = tuple[str, str]


def sampled_texts(cfg: Config, n_docs: int) -> list[str]:
    """``n_docs`` documents drawn (seed 0) from every shard of ``cfg.corpus``."""
    texts: list[str] = []
    for shard in discover_shards(cfg.corpus):
        texts += read_docs(shard, cfg).docs.column("text").to_pylist()
    rng = np.random.default_rng(0)
    return [texts[i] for i in rng.choice(len(texts), min(n_docs, len(texts)), replace=False)]


def padded_tokens(cfg: Config, texts: list[str], batch_tokens: int) -> dict:
    """Real and padded tokens of both batchings (what the forward pass computes on):
    plain ``encode`` sorts by characters and pads batches of 32, samplemix sorts by
    tokens and fills ``batch_tokens``. Their ratio is the speed-up padding alone gives.
    ``flops`` is the forward FLOPs of the real tokens (bench.flops.flops_per_token)."""
    enc = load_tokenizer(cfg.embed.model)(texts, truncation=True, max_length=cfg.embed.max_length)
    lengths = np.array([len(ids) for ids in enc["input_ids"]])
    by_chars = np.argsort([-len(t) for t in texts], kind="stable")
    plain_batches = np.array_split(by_chars, -(-len(texts) // 32))
    plain = sum(int(lengths[b].max()) * len(b) for b in plain_batches)
    ours = sum(int(lengths[b].max()) * len(b) for b in padded_batches(lengths, batch_tokens))
    model = load_model(cfg.embed.model, "encoder")
    flops = sum(flops_per_token(model, int(n)) * int(n) for n in lengths)
    return {"real": int(lengths.sum()), "plain": plain, "ours": ours, "flops": flops}


def embedded_chunk(texts: list[str], embed: EmbedConfig) -> np.ndarray:
    """On a Dask worker: embed ``texts`` with one torch thread, as an embed task does."""
    set_torch_threads(1)
    return embed_texts(texts, embed)


def on_workers(client: Client, texts: list[str], embed: EmbedConfig) -> np.ndarray:
    """``texts`` embedded in 8 chunks (shards) over the client's workers, in order."""
    chunks = np.array_split(np.arange(len(texts)), 8)
    futures = [client.submit(embedded_chunk, [texts[i] for i in c], embed) for c in chunks]
    return np.concatenate(client.gather(futures))


def bench_embed(
    cfg: Config, n_docs: int, batch_tokens: list[int], rounds: int, compiled: bool
) -> list[Row]:
    """Same documents, same cores, same truncation; all warm (models loaded).

    Variants: plain ``encode`` and ``embed_texts`` at each of ``batch_tokens`` in this
    process on every core's thread; ``embed_texts`` as a CPU run lays it out (one
    single-threaded Dask worker per core, flows.mix.local_cluster, the documents in 8
    shards); with ``compiled``, ``embed.compile`` at the first of ``batch_tokens`` (its
    compile time reported, not timed in the rounds). Where ``embed.dtype: auto`` is
    bf16 on this CPU (AVX-512 bf16 or AMX), two more variants keep precision apart from
    the method: plain ``encode`` under bf16 autocast, and ``embed_texts`` with
    ``embed.dtype: float32``; every variant's ratio is given to plain fp32 ``encode``
    (what a user runs without samplemix) and to the plain variant of its own precision.

    Each round times every variant once, in an order rotated round by round, so that a
    slow spell of this shared machine falls on all of them; ratios are taken within each
    round and medians over the rounds are reported. The GEMM rate of each precision (the
    most of one 2048² GEMM per round) is what the FLOPs of the real tokens are set against.
    """
    from sentence_transformers import SentenceTransformer

    cpu = torch.device("cpu")
    auto = resolve_dtype(cfg.embed.dtype, cpu)
    texts = sampled_texts(cfg, n_docs)
    st = SentenceTransformer(resolve_model(cfg.embed.model), device="cpu")
    st.max_seq_length = cfg.embed.max_length
    first = cfg.embed.model_copy(update={"batch_tokens": batch_tokens[0]})

    def plain(t: list[str], dtype: torch.dtype) -> np.ndarray:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            return st.encode(t, batch_size=32, normalize_embeddings=True)

    variants: dict[str, Callable[[list[str]], np.ndarray]] = {
        "plain": lambda t: plain(t, torch.float32)
    }
    precision = {"plain": torch.float32}  # what each variant computes in
    reference = {torch.float32: "plain"}  # the plain variant of each precision
    if auto != torch.float32:
        variants["plain, bf16 autocast"] = lambda t: plain(t, auto)
        precision["plain, bf16 autocast"], reference[auto] = auto, "plain, bf16 autocast"
    for b in batch_tokens:
        e = cfg.embed.model_copy(update={"batch_tokens": b})
        variants[f"batch_tokens {b}"] = lambda t, e=e: embed_texts(t, e)
    compiled_name = f"batch_tokens {first.batch_tokens}, compiled"
    if compiled:
        e = first.model_copy(update={"compile": True})
        variants[compiled_name] = lambda t: embed_texts(t, e)
    if auto != torch.float32:
        e = first.model_copy(update={"dtype": "float32"})
        variants[f"batch_tokens {first.batch_tokens}, float32"] = lambda t: embed_texts(t, e)
        precision[f"batch_tokens {first.batch_tokens}, float32"] = torch.float32
    _, kwargs = local_cluster(cfg)
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        layout = f"batch_tokens {first.batch_tokens}, {kwargs['n_workers']} workers x 1 thread"
        variants[layout] = lambda t: on_workers(client, t, first)
        warm = {}
        for name, run in variants.items():
            t0 = time.perf_counter()
            run(texts[:64] if name != layout else texts[:64] * 4)  # loads, compiling
            warm[name] = time.perf_counter() - t0
        names = list(variants)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        outputs: dict[str, np.ndarray] = {}
        gemm = dict.fromkeys(reference, 0.0)
        for r in range(rounds):
            for dtype in gemm:
                gemm[dtype] = max(gemm[dtype], matmul_rate(cpu, 2048, dtype))
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                outputs[name] = variants[name](texts)
                seconds[name].append(time.perf_counter() - t0)
    pads = padded_tokens(cfg, texts, max(batch_tokens))
    ideal_s = {dtype: pads["flops"] / rate for dtype, rate in gemm.items()}

    def label(dtype: torch.dtype) -> str:
        return str(dtype).removeprefix("torch.")

    def rate(name: str) -> str:
        t = float(np.median(seconds[name]))
        share = ideal_s[precision.get(name, auto)] / t
        return f"{len(texts) / t:.1f} ({share:.0%} of {label(precision.get(name, auto))})"

    def ratio(name: str, to: str) -> str:
        r = np.array(seconds[to]) / np.array(seconds[name])
        return f"{np.median(r):.2f} [{r.min():.2f}, {r.max():.2f}]"

    rows = [
        (
            "embed: documents, rounds; embed.dtype auto on this CPU",
            f"{len(texts)}, {rounds}; {label(auto)}",
        )
    ]
    rows += [
        (f"embed: {label(d)} GEMM rate (2048², best of rounds), GFLOP/s", f"{g / 1e9:.0f}")
        for d, g in gemm.items()
    ]
    rows.append(
        ("embed: plain SentenceTransformer.encode docs/s (share of GEMM rate)", rate("plain"))
    )
    for name in names[1:]:
        own = reference[precision.get(name, auto)]
        cos = float(np.sum(outputs[name] * outputs["plain"], axis=1).min())
        rows.append((f"embed: {name} docs/s (share of GEMM rate)", rate(name)))
        rows.append(
            (
                f"embed: {name}: ratio to plain (median [min, max]); min cosine",
                f"{ratio(name, 'plain')}; {cos:.5f}",
            )
        )
        if own not in ("plain", name):
            rows.append((f"embed: {name}: ratio to {own}", ratio(name, own)))
    if compiled:
        first_call = f"{warm[compiled_name]:.1f}"
        rows.append((f"embed: {compiled_name}: first call on 64 documents, s", first_call))
    bound = f"{pads['plain']:,} / {pads['ours']:,} = {pads['plain'] / pads['ours']:.3f}"
    rows.append((f"embed: padded tokens plain / samplemix (real {pads['real']:,})", bound))
    for dtype, ideal in ideal_s.items():
        ceiling = float(np.median(seconds["plain"])) / ideal
        rows.append(
            (
                f"embed: ratio to plain of a run at the full {label(dtype)} GEMM rate",
                f"{ceiling:.2f}",
            )
        )
    return rows


def run_direct(cfg: Config) -> float:
    """The same run by the in-process runner (pipeline/walk.py): every stage in order
    in this process, no Prefect, no Dask, committed artifacts read, not recomputed.
    Returns the wall time in seconds."""
    t0 = time.perf_counter()
    run_in_process(cfg)
    return time.perf_counter() - t0


def replicate(src: Path, dst: Path, times: int) -> Path:
    """``times`` copies of every shard (as extra shards in the same domain folders)."""
    for shard in sorted(p for p in src.rglob("*") if p.is_file() and "part-" in p.name):
        (dst / shard.parent.name).mkdir(parents=True, exist_ok=True)
        for i in range(times):
            shutil.copy(shard, dst / shard.parent.name / f"r{i}-{shard.name}")
    return dst


def print_table(rows: list[tuple[str, str]], cores: int) -> None:
    """The results as a Markdown table for BENCHMARKS.md."""
    print(f"\n| measure ({cores} cores) | value |\n| --- | ---: |")
    for name, value in rows:
        print(f"| {name} | {value} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus"))
    ap.add_argument("--embed-docs", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds of each embed variant")
    ap.add_argument("--compile", action="store_true", help="add an embed.compile variant")
    ap.add_argument(
        "--batch-tokens",
        type=int,
        nargs="*",
        default=[],
        help="samplemix variants (default: CPU default)",
    )
    ap.add_argument("--skip", nargs="*", default=[], choices=["embed", "overhead", "memory"])
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    tmp = Path(tempfile.mkdtemp(prefix="samplemix-bench-"))
    rows = []

    if "embed" not in args.skip:
        set_torch_threads(cores)
        cfg = load_config(None, {"corpus.input": args.corpus})
        batch_tokens = args.batch_tokens or [resolve_batch_tokens(None, torch.device("cpu"))]
        embed_rows = bench_embed(cfg, args.embed_docs, batch_tokens, args.rounds, args.compile)
        rows += embed_rows
        print(embed_rows, flush=True)

    if "overhead" not in args.skip:
        cfg = load_config(
            None,
            {
                "corpus.input": args.corpus,
                "output.path": str(tmp / "flow"),
                "mixing.budget_ratio": 0.5,
            },
        )
        t0 = time.perf_counter()
        run_mix(cfg)
        t_flow = time.perf_counter() - t0
        set_torch_threads(cores)
        direct = cfg.model_copy(
            update={"output": cfg.output.model_copy(update={"path": str(tmp / "direct")})}
        )
        t_direct = run_direct(direct)
        rows.append(("overhead: mix flow wall s (Prefect server start included)", f"{t_flow:.1f}"))
        rows.append(("overhead: engine stages called directly, s", f"{t_direct:.1f}"))
        rows.append(("overhead: ratio flow / direct", f"{t_flow / t_direct:.3f}"))
        print(rows[-3:], flush=True)

    if "memory" not in args.skip:
        for times in (1, 4):
            corpus = replicate(ROOT / "examples" / "corpus", tmp / f"x{times}", times)
            cfg = load_config(
                None,
                {
                    "corpus.input": str(corpus),
                    "output.path": str(tmp / f"mem{times}"),
                    "embed.max_length": 64,
                },
            )
            with ProcessTree(os.getpid()) as tree:  # this process runs the flow
                s = run_mix(cfg)
            workers = [p for p in tree.seen.values() if p["class"] == "worker"]
            peak = max(p.get("peak_rss", 0) for p in workers) / 2**20
            rows.append(
                (
                    f"memory: {times}x data ({s['documents']} docs), peak worker RSS MiB",
                    f"{peak:.0f}",
                )
            )
            print(rows[-1], flush=True)

    print_table(rows, cores)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
