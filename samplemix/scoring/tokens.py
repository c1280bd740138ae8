"""len(x): a document's token count under the budget tokenizer."""

from __future__ import annotations

import numpy as np

from samplemix.scoring.models import load_tokenizer, token_lengths


def token_counts(texts: list[str], tokenizer_name: str) -> np.ndarray:
    """Tokens per text (no special tokens, no truncation): int64, shape (n,)."""
    return token_lengths(load_tokenizer(tokenizer_name), texts)


def token_ids(texts: list[str], tokenizer_name: str, batch_size: int = 256) -> list[list[int]]:
    """Token ids per text (no special tokens, no truncation)."""
    backend = load_tokenizer(tokenizer_name).backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    out: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        encs = backend.encode_batch(texts[start : start + batch_size], add_special_tokens=False)
        out += [e.ids for e in encs]
    return out
