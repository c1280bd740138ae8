"""fp32 model stages on CPU with their linears on MKL (``nn.Linear``, what a plain
transformers model runs) and on oneDNN (samplemix.scoring.onednn, what samplemix loads).

Three models through samplemix's own stage code, fp32, the same documents:
MiniLM (``embed_texts``, ``embed.dtype: float32``), a BERT-base-sized ``hf-classifier``
scorer and a SmolLM2-135M-shaped ``perplexity`` scorer (random weights: the cost is
what is measured). For each model in turn, each round times both kernels, in an order
that alternates round by round; ratios are taken within a round, medians reported,
with the largest difference of the outputs.

Usage: python -m bench.bench_onednn [--corpus ../shared/corpus] [--docs 64]
       [--rounds 3] [--threads 2 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.bench_gpu import save_bert_base
from bench.bench_pipeline import print_table, sampled_texts
from samplemix.config import EmbedConfig, QualityConfig, load_config
from samplemix.scoring import models
from samplemix.scoring.embed import embed_texts
from samplemix.scoring.onednn import OneDNNLinear
from samplemix.scoring.quality import make_scorer

ROOT = Path(__file__).resolve().parents[1]


def save_smollm_shaped(path: Path) -> str:
    """A causal LM shaped like SmolLM2-135M (30 layers, width 576, GQA 9/3 heads) with
    MiniLM's tokenizer, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = models.load_tokenizer("minilm")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def set_kernel(model: torch.nn.Module, linear: type[torch.nn.Linear]) -> None:
    """Make every plain linear of ``model`` (as loaded: OneDNNLinear) a ``linear``."""
    for m in model.modules():
        if type(m) in (torch.nn.Linear, OneDNNLinear):
            m.__class__ = linear


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus"))
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="*", default=[2, 1])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="samplemix-onednn-"))
    texts = sampled_texts(load_config(None, {"corpus.input": args.corpus}), args.docs)
    bert = save_bert_base(tmp / "bert-base", classifier=True)
    lm = save_smollm_shaped(tmp / "smollm")
    stages: dict[str, tuple[str, str, Callable[[], np.ndarray]]] = {
        "MiniLM embed (256 tokens)": (
            "minilm",
            "encoder",
            lambda: embed_texts(texts, EmbedConfig(dtype="float32")),
        ),
        "BERT-base hf-classifier (256 tokens)": (
            bert,
            "classifier",
            lambda: make_scorer(
                QualityConfig(scorer="hf-classifier", model=bert, max_length=256)
            ).score(texts),
        ),
        "SmolLM2-135M-shaped perplexity (256 tokens)": (
            lm,
            "causal-lm",
            lambda: make_scorer(QualityConfig(scorer="perplexity", model=lm, max_length=256)).score(
                texts
            ),
        ),
    }
    rows = [("documents, rounds", f"{len(texts)}, {args.rounds}")]
    for threads in args.threads:
        models.set_torch_threads(threads)
        for name, (model_name, kind, run) in stages.items():
            run()  # loads the model, with OneDNNLinear
            model = models.load_model(model_name, kind, "auto")  # the stages' own device
            assert any(isinstance(m, OneDNNLinear) for m in model.modules()), name
            seconds: dict[str, list[float]] = {"MKL": [], "oneDNN": []}
            out: dict[str, np.ndarray] = {}
            kernels = {"MKL": torch.nn.Linear, "oneDNN": OneDNNLinear}
            set_kernel(model, torch.nn.Linear)
            run()  # warms MKL's side too
            for r in range(args.rounds):
                for kernel in sorted(kernels, reverse=r % 2 == 1):
                    set_kernel(model, kernels[kernel])
                    t0 = time.perf_counter()
                    out[kernel] = np.asarray(run())
                    seconds[kernel].append(time.perf_counter() - t0)
            set_kernel(model, OneDNNLinear)
            ratio = np.array(seconds["MKL"]) / np.array(seconds["oneDNN"])
            diff = float(np.abs(out["MKL"] - out["oneDNN"]).max())
            mkl, dnn = (len(texts) / np.median(seconds[k]) for k in ("MKL", "oneDNN"))
            rows.append(
                (
                    f"{name}, {threads} thread(s): docs/s MKL / oneDNN; ratio (median "
                    "[min, max]); max abs difference",
                    f"{mkl:.1f} / {dnn:.1f}; {np.median(ratio):.2f} "
                    f"[{ratio.min():.2f}, {ratio.max():.2f}]; {diff:.1e}",
                )
            )
            print(rows[-1], flush=True)
    print_table(rows, max(args.threads))


if __name__ == "__main__":
    main()
