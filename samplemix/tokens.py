"""len(x): a document's token count under the budget tokenizer."""

from __future__ import annotations

import numpy as np

from samplemix.models import load_tokenizer


def token_counts(texts: list[str], tokenizer_name: str, batch_size: int = 256) -> np.ndarray:
    """Tokens per text (no special tokens, no truncation): int64, shape (n,).

    Uses the fast tokenizer's Rust backend directly so that a tokenizer.json that
    configures truncation (MiniLM's truncates at 128) cannot shorten the count.
    """
    backend = load_tokenizer(tokenizer_name).backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    out = np.empty(len(texts), dtype=np.int64)
    for start in range(0, len(texts), batch_size):
        encs = backend.encode_batch(texts[start : start + batch_size], add_special_tokens=False)
        out[start : start + len(encs)] = [len(e.ids) for e in encs]
    return out
