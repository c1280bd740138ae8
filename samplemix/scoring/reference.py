"""Reference-set quality scorer: DSIR importance weights over hashed n-grams, no LLM.

After Xie et al. 2023, "Data Selection for Language Models via Importance Resampling".
Two bag-of-hashed-n-gram models are fitted by counting: one on a *reference* set (text
like the data we want) and one on the *background*, the raw pool. A document scores the
**mean over its hashed n-grams of log p_ref(bucket) - log p_bg(bucket)** (natural log):
above 0 it looks more like the reference than the pool, below 0 less. The score is
length-normalised (a mean, not DSIR's sum) so that a long document is not pushed to the
extremes just by having more n-grams, and scores of documents of any length compare.

Features (``TOKENIZER_VERSION``): the first ``max_chars`` characters, lowercased; tokens
are the maximal runs of ASCII ``[a-z0-9]``, exactly ``re.findall("[a-z0-9]+",
text[:max_chars].lower())``; n-grams are the unigrams and the bigrams of adjacent tokens.
Each is hashed to one of ``buckets`` bins with a stable 64-bit hash (a polynomial hash of
the token's bytes, then the splitmix64 finaliser), so bucket ids are identical across
processes, machines and ``PYTHONHASHSEED``. A document with no tokens scores 0.0: no
evidence either way is neutral.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOKENIZER_VERSION = "ascii-alnum-lower/poly64-splitmix/v1"
ORDERS = (1, 2)  # unigrams and bigrams
MAX_CHARS = 100_000
_CHUNK_CHARS = 1_000_000  # characters hashed per numpy pass: ~50 MB of temporaries

_U64 = np.uint64
_P = 0x100000001B3  # the FNV-64 prime, odd, so invertible mod 2**64
_P_INV = pow(_P, -1, 2**64)
_SALT = {1: _U64(0x9E3779B97F4A7C15), 2: _U64(0xD6E8FEB86659FD93)}  # per n-gram order
_IS_TOKEN_BYTE = np.zeros(256, dtype=bool)
_IS_TOKEN_BYTE[np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", np.uint8)] = True
_powers: tuple[np.ndarray, np.ndarray] = (np.ones(1, _U64), np.ones(1, _U64))


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(P**k, P**-k) mod 2**64 for k < at least ``n``; grown by doubling, cached."""
    global _powers
    if len(_powers[0]) < n:
        size = max(n, 2 * len(_powers[0]))
        _powers = tuple(
            np.cumprod(np.r_[_U64(1), np.full(size - 1, p, _U64)], dtype=_U64) for p in (_P, _P_INV)
        )
    return _powers


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads the polynomial hash's high bits into the low ones
    that ``% buckets`` reads (uint64 arithmetic wraps mod 2**64 on every platform)."""
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def ngram_buckets(
    texts: list[str], buckets: int, max_chars: int = MAX_CHARS
) -> tuple[np.ndarray, np.ndarray]:
    """The hashed n-grams of ``texts``: (bucket ids in [0, buckets), index of the text
    each belongs to), both int64 of the same length, grouped by text in input order.

    Vectorised over the whole list: texts are joined by a non-token byte, and the hash
    of the token at bytes [s, e) is P**(e-1) * (C[e] - C[s]) with C the prefix sums of
    byte * P**-k, i.e. sum_j byte_j * P**(e-1-j) mod 2**64, whatever its position.
    """
    parts = [t[:max_chars].lower().encode("utf-8") for t in texts]
    lengths = np.fromiter(map(len, parts), np.int64, len(parts))
    doc_start = np.cumsum(lengths + 1) - lengths - 1  # each text's first byte
    buf = np.frombuffer(b"\n".join(parts), np.uint8)
    edges = np.diff(_IS_TOKEN_BYTE[buf].view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    p_pow, p_inv = _power_tables(len(buf) + 1)
    prefix = np.zeros(len(buf) + 1, _U64)
    np.cumsum(buf.astype(_U64) * p_inv[: len(buf)], out=prefix[1:])
    token = p_pow[ends - 1] * (prefix[ends] - prefix[starts])
    doc = np.searchsorted(doc_start, starts, side="right") - 1
    unigram = _mix(token ^ _SALT[1])
    same_doc = doc[1:] == doc[:-1]  # a bigram never spans two texts
    bigram = _mix((unigram[:-1] * _U64(_P)) ^ token[1:] ^ _SALT[2])[same_doc]
    keys = np.concatenate([unigram, bigram]) % _U64(buckets)
    owner = np.concatenate([doc, doc[:-1][same_doc]])
    order = np.argsort(owner, kind="stable")
    return keys[order].astype(np.int64), owner[order]


def _chunks(texts: Iterable[str]) -> Iterator[list[str]]:
    """Consecutive lists of ``texts`` of about ``_CHUNK_CHARS`` characters each."""
    chunk: list[str] = []
    size = 0
    for text in texts:
        chunk.append(text)
        size += min(len(text), MAX_CHARS)
        if size >= _CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _log_probs(texts: Iterable[str], buckets: int, smoothing: float, max_chars: int) -> np.ndarray:
    """Laplace-smoothed log p(bucket), float64 (buckets,); ValueError if ``texts`` is empty."""
    counts = np.zeros(buckets, np.float64)
    n_texts = 0
    for chunk in _chunks(texts):
        n_texts += len(chunk)
        counts += np.bincount(ngram_buckets(chunk, buckets, max_chars)[0], minlength=buckets)
    if n_texts == 0:
        raise ValueError("cannot fit a reference model on an empty set of texts")
    return np.log(counts + smoothing) - np.log(counts.sum() + smoothing * buckets)


def fit_reference(
    reference: Iterable[str],
    background: Iterable[str],
    buckets: int = 2**18,
    smoothing: float = 1.0,
    max_chars: int = MAX_CHARS,
) -> ReferenceModel:
    """Fit log p_ref - log p_bg per bucket, each with add-``smoothing`` (Laplace)
    estimates. Either set is streamed once; ValueError if either is empty."""
    if buckets < 1 or not smoothing > 0 or max_chars < 1:
        raise ValueError("need buckets >= 1, smoothing > 0 and max_chars >= 1")
    ref = _log_probs(reference, buckets, smoothing, max_chars)
    bg = _log_probs(background, buckets, smoothing, max_chars)
    return ReferenceModel(ref - bg, max_chars)


@dataclass(eq=False)
class ReferenceModel:
    """log p_ref - log p_bg per hash bucket (``log_ratio``, float64 (buckets,), nats);
    satisfies the quality ``Scorer`` protocol."""

    log_ratio: np.ndarray
    max_chars: int = MAX_CHARS
    name = "reference"

    def __post_init__(self) -> None:
        self.log_ratio = np.ascontiguousarray(self.log_ratio, dtype=np.float64)
        if self.log_ratio.ndim != 1 or not np.isfinite(self.log_ratio).all():
            raise ValueError("log_ratio must be a finite 1-d array")

    @property
    def buckets(self) -> int:
        return len(self.log_ratio)

    def score(self, texts: list[str]) -> np.ndarray:
        """Mean log ratio over each text's n-grams: float64 (len(texts),), finite, in
        input order, nats per n-gram; 0.0 for a text without tokens."""
        out = np.zeros(len(texts), np.float64)
        done = 0
        for chunk in _chunks(texts):
            keys, doc = ngram_buckets(chunk, self.buckets, self.max_chars)
            n = np.bincount(doc, minlength=len(chunk))
            total = np.bincount(doc, weights=self.log_ratio[keys], minlength=len(chunk))
            np.divide(total, n, out=out[done : done + len(chunk)], where=n > 0)
            done += len(chunk)
        return out

    def truncated(self, texts: list[str]) -> int:
        """Texts longer than ``max_chars`` characters (scored on that prefix)."""
        return sum(len(t) > self.max_chars for t in texts)

    def _settings(self) -> dict[str, object]:
        return {
            "tokenizer": TOKENIZER_VERSION,
            "orders": list(ORDERS),
            "buckets": self.buckets,
            "max_chars": self.max_chars,
        }

    def fingerprint(self) -> str:
        """16 hex digits of SHA-256 over the settings and the log ratios: equal models
        (also across save/load and machines) share it; any change alters it."""
        digest = hashlib.sha256(json.dumps(self._settings(), sort_keys=True).encode())
        digest.update(self.log_ratio.astype("<f8").tobytes())
        return digest.hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write an .npz at exactly ``path`` (atomically: a reader never sees half)."""
        tmp = Path(f"{path}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            settings = json.dumps(self._settings(), sort_keys=True)
            np.savez(f, log_ratio=self.log_ratio.astype("<f8"), settings=np.array(settings))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceModel:
        """Read a model ``save`` wrote; ValueError if its features differ from this code's."""
        with np.load(path, allow_pickle=False) as npz:
            settings = json.loads(str(npz["settings"]))
            log_ratio = npz["log_ratio"]
        if settings["tokenizer"] != TOKENIZER_VERSION or tuple(settings["orders"]) != ORDERS:
            raise ValueError(f"{path}: model features {settings} differ from {TOKENIZER_VERSION}")
        return cls(log_ratio.astype(np.float64), int(settings["max_chars"]))
