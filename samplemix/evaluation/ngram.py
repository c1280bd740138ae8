"""Interpolated modified Kneser-Ney n-gram LM over token ids: a seedless evaluation instrument.

The proxy LMs of ``proxy.py`` score a mixture by held-out loss, but their losses move
with the training seed. This model is exact and deterministic: ``fit_ngram`` counts
n-grams of token ids (order 1-5, ids in ``[0, vocab_size)``) and ``ngram_loss`` returns
the mean negative log-likelihood of evaluation documents in nats per token.

Documents. Each document is prefixed with ``order - 1`` copies of a begin-of-document id
``B = vocab_size`` that is a context item only, never predicted; every document token is a
target, predicted from the ``order - 1`` items before it (so its first tokens see ``B``).

Model (Chen & Goodman 1998, interpolated modified KN, as in KenLM). With ``h`` a context of
``k - 1`` items and ``a_k(h w)`` the adjusted count of the k-gram ``h w``:

    P_k(w | h) = (a_k(h w) - D_k(a_k(h w))) / A_k(h) + gamma_k(h) P_{k-1}(w | h')   if A_k(h) > 0
    P_k(w | h) = P_{k-1}(w | h')                                                    otherwise
    A_k(h) = sum_w a_k(h w),  gamma_k(h) = (D_k1 N_1(h) + D_k2 N_2(h) + D_k3 N_3+(h)) / A_k(h)
    P_0(w) = 1 / vocab_size

where ``h'`` is ``h`` without its first item and ``N_j(h)`` counts the ``w`` with
``a_k(h w) = j`` (``3+``: at least 3). Adjusted counts: raw counts at the highest order;
below it, continuation counts (the number of distinct items ``v`` with ``v h w`` observed),
except for k-grams starting with ``B``, which nothing real precedes, so they keep raw
counts (KenLM's rule). Order 1 is therefore the discounted unigram (raw counts when
``order == 1``, continuation counts otherwise) interpolated with the uniform ``1 / V``.

Discounts per order from the count-of-counts ``n_1..n_4`` of its adjusted counts:
``Y = n_1 / (n_1 + 2 n_2)`` and ``D_kj = j - (j + 1) Y n_{j+1} / n_j`` for j = 1, 2, 3. When
``n_1``, ``n_2`` or ``n_3`` is 0, or some ``D_kj`` falls outside ``(0, j]`` (tiny or artificial
data), the order uses KenLM's fallback ``(0.5, 1.0, 1.5)``. Every ``D > 0`` makes every
``gamma > 0``, so every probability is positive and the loss is finite for unseen tokens.

Exact keys. Level ``j`` holds the sorted distinct j-grams; a j-gram's key is
``id_{j-1}(suffix) * (V + 1) + first item``, with ``id_{j-1}`` its (j-1)-item suffix's index in
level ``j - 1``. Keys are below ``positions * (V + 1)``, far from 2**63 for any vocabulary
and order, so there is no hashing and no collision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FALLBACK_DISCOUNTS = np.array([0.5, 1.0, 1.5])


@dataclass(frozen=True, eq=False)
class NgramLM:
    """A fitted model. Tuples hold one entry per order k = 1..order (index k - 1).

    keys[k-1]: sorted int64 keys of the distinct k-grams of the padded training stream.
    discounted[k-1]: per k-gram, ``a_k - D_k(a_k)`` (0 for k-grams that are never a target).
    context_total[k-1], context_backoff[k-1]: per (k-1)-gram of level k - 1 (the single empty
    context when k = 1), ``A_k(h)`` and ``gamma_k(h) A_k(h)``; both 0 for unseen contexts.
    discounts[k-1]: ``(D_k1, D_k2, D_k3+)``.
    """

    order: int
    vocab_size: int
    keys: tuple[np.ndarray, ...]
    discounted: tuple[np.ndarray, ...]
    context_total: tuple[np.ndarray, ...]
    context_backoff: tuple[np.ndarray, ...]
    discounts: tuple[np.ndarray, ...]


def _checked_docs(docs: Sequence[np.ndarray], vocab_size: int) -> list[np.ndarray]:
    """The non-empty documents as int64 arrays; ValueError unless ids lie in [0, vocab_size)."""
    out = []
    for i, doc in enumerate(docs):
        doc = np.asarray(doc)
        if doc.size == 0:
            continue
        if doc.ndim != 1 or doc.dtype.kind not in "iu":
            raise ValueError(f"document {i}: expected a 1-D integer array, got {doc.dtype}")
        lo, hi = int(doc.min()), int(doc.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"document {i}: token id {bad} is outside [0, {vocab_size})")
        out.append(doc.astype(np.int64))
    if not out:
        raise ValueError("no tokens: every document is empty")
    return out


def _padded_stream(docs: list[np.ndarray], order: int, bos: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents each prefixed by ``order - 1`` ids ``bos``, concatenated (int64, length P),
    and each item's offset within its padded document (targets: offset >= order - 1)."""
    lengths = np.array([len(d) for d in docs]) + order - 1
    offset = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    items = np.full(lengths.sum(), bos, np.int64)
    items[offset >= order - 1] = np.concatenate(docs)
    return items, offset


def _gram_keys(
    suffix_ids: np.ndarray, items: np.ndarray, offset: np.ndarray, j: int, bos: int
) -> np.ndarray:
    """Key of the j-gram ending at each position of the stream, from the ids of the
    (j-1)-grams ending there. Before a document's start every item reads as ``bos``."""
    first = np.full_like(items, bos)
    inside = np.flatnonzero(offset >= j - 1)
    first[inside] = items[inside - (j - 1)]
    return suffix_ids * (bos + 1) + first


def _discounts(adjusted: np.ndarray) -> np.ndarray:
    """``(D_1, D_2, D_3+)`` from the count-of-counts of one order's adjusted counts."""
    n = np.bincount(adjusted, minlength=5)[1:5].astype(np.float64)
    if n[:3].all():
        y = n[0] / (n[0] + 2 * n[1])
        d = np.arange(1, 4) - np.arange(2, 5) * y * n[1:] / n[:3]
        if np.all((d > 0) & (d <= np.arange(1, 4))):
            return d
    return FALLBACK_DISCOUNTS


def fit_ngram(docs: Sequence[np.ndarray], order: int, vocab_size: int) -> NgramLM:
    """Fit the model on ``docs`` (1-D integer arrays, ids in [0, vocab_size), one per
    document; empty ones are skipped). ValueError on ids out of range, ``order < 1`` or
    ``vocab_size < 1``, or no tokens. Independent of the order of ``docs``."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    bos = vocab_size
    items, offset = _padded_stream(_checked_docs(docs, vocab_size), order, bos)
    targets = np.flatnonzero(offset >= order - 1)
    ids = [np.zeros(len(items), np.int64)]  # level 0: the empty gram, id 0 everywhere
    keys = []
    for j in range(1, order + 1):
        level_keys, level_ids = np.unique(
            _gram_keys(ids[-1], items, offset, j, bos), return_inverse=True
        )
        keys.append(level_keys)
        ids.append(level_ids.reshape(-1))
    raw = [np.bincount(ids[k][targets], minlength=len(keys[k - 1])) for k in range(1, order + 1)]

    discounted, totals, backoffs, discounts = [], [], [], []
    for k in range(1, order + 1):
        if k == order:
            adjusted = raw[k - 1]
        else:
            # Each observed (k+1)-gram adds one distinct left extension to its k-item suffix.
            longer = keys[k][raw[k] > 0]
            continuation = np.bincount(longer // (bos + 1), minlength=len(keys[k - 1]))
            at_doc_start = keys[k - 1] % (bos + 1) == bos
            adjusted = np.where(at_doc_start, raw[k - 1], continuation)
        d = np.concatenate([[0.0], _discounts(adjusted)])
        discount = d[np.minimum(adjusted, 3)]  # 0 where adjusted is 0
        # A k-gram's context is the (k-1)-gram ending one position earlier; every
        # occurrence of a k-gram writes the same context, so duplicates agree.
        context = np.zeros(len(keys[k - 1]), np.int64)
        if k > 1:
            context[ids[k][targets]] = ids[k - 1][targets - 1]
        n_contexts = len(keys[k - 2]) if k > 1 else 1
        totals.append(np.bincount(context, weights=adjusted, minlength=n_contexts))
        backoffs.append(np.bincount(context, weights=discount, minlength=n_contexts))
        discounted.append(adjusted - discount)
        discounts.append(d[1:])
    return NgramLM(
        order=order,
        vocab_size=vocab_size,
        keys=tuple(keys),
        discounted=tuple(discounted),
        context_total=tuple(totals),
        context_backoff=tuple(backoffs),
        discounts=tuple(discounts),
    )


def token_probs(lm: NgramLM, docs: Sequence[np.ndarray]) -> np.ndarray:
    """P(token | its order - 1 preceding items) for every token of ``docs`` in order
    (float64, one per token, each in (0, 1]); documents padded as in ``fit_ngram``."""
    bos = lm.vocab_size
    items, offset = _padded_stream(_checked_docs(docs, lm.vocab_size), lm.order, bos)
    targets = np.flatnonzero(offset >= lm.order - 1)
    prob = np.full(len(targets), 1.0 / lm.vocab_size)
    ids = np.zeros(len(items), np.int64)  # level 0; -1 below marks grams unseen in training
    for k in range(1, lm.order + 1):
        context = ids[targets - 1] if k > 1 else np.zeros(len(targets), np.int64)
        # A key built on a -1 suffix id is negative, so it matches no stored key.
        key = _gram_keys(ids, items, offset, k, bos)
        level = lm.keys[k - 1]
        pos = np.minimum(np.searchsorted(level, key), len(level) - 1)
        ids = np.where(level[pos] == key, pos, -1)
        total = np.where(context >= 0, lm.context_total[k - 1][context], 0.0)
        seen = np.flatnonzero(total > 0)
        gram = ids[targets[seen]]
        own = np.where(gram >= 0, lm.discounted[k - 1][gram], 0.0)
        backoff = lm.context_backoff[k - 1][context[seen]]
        prob[seen] = (own + backoff * prob[seen]) / total[seen]
    return prob


def ngram_loss(lm: NgramLM, docs: Sequence[np.ndarray]) -> float:
    """Mean negative log-likelihood of every token of ``docs`` under ``lm``, in nats per
    token (finite). ValueError on ids outside [0, lm.vocab_size) or no tokens."""
    return float(-np.mean(np.log(token_probs(lm, docs))))


def next_token_probs(lm: NgramLM, context: np.ndarray) -> np.ndarray:
    """P(w | context) for every w in [0, vocab_size) (float64, shape (vocab_size,), sums to 1).
    ``context`` holds the document's tokens so far; shorter than ``order - 1`` means the
    prediction is near the document's start (padded with the begin-of-document id)."""
    context = np.asarray(context, np.int64)
    context = context[max(len(context) - (lm.order - 1), 0) :]
    rows = np.column_stack(
        [np.tile(context, (lm.vocab_size, 1)), np.arange(lm.vocab_size, dtype=np.int64)]
    )
    return token_probs(lm, list(rows)).reshape(lm.vocab_size, -1)[:, -1]
