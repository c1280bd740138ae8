"""len(x): a document's token count under the budget tokenizer."""

from __future__ import annotations

import numpy as np

from samplemix.scoring.models import load_tokenizer, token_lengths, untruncated_ids


def token_counts(texts: list[str], tokenizer_name: str) -> np.ndarray:
    """Tokens per text (no special tokens, no truncation): int64, shape (n,)."""
    return token_lengths(load_tokenizer(tokenizer_name), texts)


def token_ids(texts: list[str], tokenizer_name: str) -> list[list[int]]:
    """Token ids per text (no special tokens, no truncation)."""
    return list(untruncated_ids(load_tokenizer(tokenizer_name), texts))
