"""Per-device throughput of samplemix's stages: the inputs of docs/sizing.md.

Times, on the example corpus (examples/corpus, every document, repeated to make the
timed work long enough), the engine's own functions with no orchestration:

- ``embed``: ``samplemix.scoring.embed.embed_texts`` on the chosen device (the GPU by default
  when there is one), documents per second and real (unpadded) tokens per second;
- ``tokens`` and ``quality/heuristic``: the CPU stages, documents per second on one
  core (they run one per Dask worker thread, so a machine's rate is this times the
  threads given to them).

Prints one JSON object. With ``--random-weights`` the encoder is built from the
model's config with random weights: the same layers and shapes, so the same time,
for a machine where the weights are not installed.

    python infra/measure_throughput.py [--model minilm] [--max-length 256] [--repeat 8]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def corpus_texts() -> list[str]:
    """Every text of examples/corpus (Parquet and JSON Lines .gz shards), in path order."""
    import pyarrow.parquet as pq

    texts: list[str] = []
    for path in sorted((ROOT / "examples" / "corpus").rglob("part-*")):
        if path.suffix == ".parquet":
            texts += [t for t in pq.read_table(path, columns=["text"]).column(0).to_pylist() if t]
        elif path.name.endswith(".jsonl.gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                texts += [r["text"] for r in map(json.loads, f) if r.get("text")]
    return texts


def random_copy(model: str) -> str:
    """A folder with ``model``'s config and tokenizer and random weights."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from samplemix.scoring.models import resolve_model

    src = resolve_model(model)
    out = tempfile.mkdtemp(prefix="random-encoder-")
    AutoModel.from_config(AutoConfig.from_pretrained(src)).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def timed(fn, *args: object) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm", help="embed.model: 'minilm' or a folder")
    ap.add_argument("--random-weights", action="store_true", help="config + random weights")
    ap.add_argument("--max-length", type=int, default=256, help="embed.max_length")
    ap.add_argument("--device", default="auto", help="embed.device")
    ap.add_argument("--dtype", default="auto", help="embed.dtype: auto, float32, bfloat16")
    ap.add_argument("--repeat", type=int, default=8, help="corpus copies embedded (timed)")
    ap.add_argument("--cpu-docs", type=int, default=1400, help="documents for the CPU stages")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from samplemix.config import EmbedConfig, QualityConfig
    from samplemix.scoring.embed import embed_texts
    from samplemix.scoring.models import load_tokenizer, resolve_device, token_lengths
    from samplemix.scoring.quality import make_scorer

    texts = corpus_texts()
    model = random_copy(args.model) if args.random_weights else args.model
    cfg = EmbedConfig(model=model, max_length=args.max_length, device=args.device, dtype=args.dtype)
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(model)
    lengths = token_lengths(tokenizer, texts)
    read = int(sum(min(int(n) + 2, args.max_length) for n in lengths))  # + [CLS], [SEP]

    embed_texts(texts[:256], cfg)  # load the model, warm the kernels
    work = texts * args.repeat
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = timed(embed_texts, work, cfg)
    result: dict[str, object] = {
        "machine": platform.node(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "model": args.model + (" (random weights)" if args.random_weights else ""),
        "max_length": args.max_length,
        "dtype": args.dtype,
        "documents": len(work),
        "embed_seconds": round(seconds, 2),
        "embed_docs_per_s": round(len(work) / seconds, 1),
        "embed_tokens_per_s": round(read * args.repeat / seconds),
        "mean_tokens_read": round(read / len(texts), 1),
    }

    # The CPU stages on one core: one Dask worker thread's share.
    torch.set_num_threads(1)
    few = texts[: args.cpu_docs]
    token_lengths(tokenizer, few[:32])
    result["tokens_docs_per_s_per_core"] = round(len(few) / timed(token_lengths, tokenizer, few), 1)
    scorer = make_scorer(QualityConfig(scorer="heuristic"))
    result["heuristic_docs_per_s_per_core"] = round(len(few) / timed(scorer.score, few), 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
