"""Model inference on CPU: one batch per thread (samplemix's ``models.batch_outputs``,
thread-count independent results) against one batch at a time on all threads (plain
intra-op parallelism, what samplemix ran before and what a plain transformers loop does).

The same documents, the same length-sorted batches and the same model in one process:
MiniLM through ``embed_texts``'s batching (``embed.dtype`` auto, i.e. bf16 autocast on a
CPU with AVX-512 bf16 / AMX, else fp32, at 256 tokens and at the flow tests' 32 tokens in
256-token batches; and float32) and a BERT-base-sized fp32
``hf-classifier``. Each round times both ways in alternating order; the ratio is taken
within a round and the median printed, with whether each way gives the same bits on 1
thread as on ``--threads``.

Usage: python -m bench.bench_threads [--corpus ../shared/corpus] [--docs 400]
       [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.bench_gpu import save_bert_base
from bench.bench_pipeline import print_table, sampled_texts
from samplemix.config import load_config
from samplemix.scoring import models

ROOT = Path(__file__).resolve().parents[1]


def plain_outputs(batches, forward, amp):  # noqa: ANN001, ANN201 - as batch_outputs
    """One batch at a time on every intra-op thread: the loop before batch_outputs."""
    ctx = torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        return [(idx, forward(enc)) for idx, enc in batches]


def run(way, model, tokenizer, texts, max_length, amp, threads, batch_tokens):  # noqa: ANN001, ANN201
    """(seconds, outputs in text order) of ``way`` on ``threads`` torch threads."""
    torch.set_num_threads(threads)
    batches = list(models.length_sorted_batches(tokenizer, texts, max_length, batch_tokens))

    def forward(enc: dict) -> np.ndarray:
        out = model(**enc)
        rows = out.logits if hasattr(out, "logits") else out.last_hidden_state[:, 0]
        return rows.float().numpy()

    t0 = time.perf_counter()
    if way == "plain":
        got = plain_outputs(batches, forward, amp)
    else:
        got = list(models.batch_outputs(iter(batches), forward, torch.device("cpu"), amp))
    seconds = time.perf_counter() - t0
    out = np.empty((len(texts), got[0][1].shape[1]), dtype=np.float32)
    for idx, rows in got:
        out[idx] = rows
    return seconds, out


def compare(
    name: str,
    load: Callable[[], tuple],
    texts: list[str],
    max_length: int,
    amp: torch.dtype | None,
    args: argparse.Namespace,
    batch_tokens: int = 4096,
) -> list[tuple[str, str]]:
    """The table rows of one model and shape: docs/s of each way, their ratio, and
    whether each gives the same bits on 1 thread as on ``args.threads``."""
    model, tokenizer = load()

    def timed(way: str, docs: list[str], threads: int) -> tuple[float, np.ndarray]:
        return run(way, model, tokenizer, docs, max_length, amp, threads, batch_tokens)

    for way in ("plain", "samplemix"):  # warm both (oneDNN primitives, allocator)
        timed(way, texts[:32], args.threads)
    ratios, secs = [], {"plain": [], "samplemix": []}
    for r in range(args.rounds):
        order = ("plain", "samplemix") if r % 2 == 0 else ("samplemix", "plain")
        got = {w: timed(w, texts, args.threads) for w in order}
        for w in got:
            secs[w].append(got[w][0])
        ratios.append(got["plain"][0] / got["samplemix"][0])
    one = {w: timed(w, texts, 1)[1] for w in secs}
    many = {w: timed(w, texts, args.threads)[1] for w in secs}
    same = {w: bool(np.array_equal(one[w], many[w])) for w in secs}
    diff = {w: float(np.abs(one[w] - many[w]).max()) for w in secs}
    n = len(texts)
    print(f"{name}: ratios {[round(x, 3) for x in ratios]}")
    return [
        (f"{name}: plain, docs/s", f"{n / np.median(secs['plain']):.1f}"),
        (f"{name}: samplemix, docs/s", f"{n / np.median(secs['samplemix']):.1f}"),
        (
            f"{name}: samplemix / plain speed, median [min, max]",
            f"{np.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]",
        ),
        (
            f"{name}: 1 vs {args.threads} threads, plain",
            f"same bits {same['plain']} (max diff {diff['plain']:.1e})",
        ),
        (
            f"{name}: 1 vs {args.threads} threads, samplemix",
            f"same bits {same['samplemix']} (max diff {diff['samplemix']:.1e})",
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus"))
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cfg = load_config(None, {"corpus.input": args.corpus})
    texts = sampled_texts(cfg, args.docs)
    auto = models.resolve_dtype("auto", torch.device("cpu"))
    amp = auto if auto != torch.float32 else None

    def minilm() -> tuple:
        return models.load_model("minilm", "encoder"), models.load_tokenizer("minilm")

    rows = compare(f"MiniLM 256 tok, {str(auto)[6:]}", minilm, texts, 256, amp, args)
    # The flow tests' shape: shards of 8 documents at 32 tokens, one batch of 256 rows.
    name = f"MiniLM 32 tok, {str(auto)[6:]}, 256-token batches"
    rows += compare(name, minilm, texts, 32, amp, args, batch_tokens=256)
    rows += compare("MiniLM 256 tok, float32", minilm, texts, 256, None, args)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_bert_base(Path(tmp) / "bert", classifier=True)

        def bert() -> tuple:
            return models.load_model(path, "classifier"), models.load_tokenizer(path)

        rows += compare("BERT-base classifier 512 tok, float32", bert, texts[:100], 512, None, args)
    print_table(rows, args.threads)


if __name__ == "__main__":
    main()
