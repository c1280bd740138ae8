"""The n-gram instrument against a dict-based textbook Kneser-Ney, and its invariants."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np
import pytest

from samplemix.evaluation.ngram import fit_ngram, next_token_probs, ngram_loss, token_probs


class ReferenceKN:
    """Interpolated modified Kneser-Ney with plain dicts, straight from Chen & Goodman
    (eq. 26 discounts) with KenLM's conventions: raw counts for k-grams that start with
    the begin-of-document id, fallback discounts (0.5, 1, 1.5), uniform 0-gram."""

    def __init__(self, docs: Sequence[Sequence[int]], order: int, vocab_size: int) -> None:
        self.order, self.vocab_size, self.bos = order, vocab_size, vocab_size
        raw = {order: Counter()}
        for doc in docs:
            seq = [self.bos] * (order - 1) + [int(x) for x in doc]
            for t in range(order - 1, len(seq)):
                raw[order][tuple(seq[t - order + 1 : t + 1])] += 1
        self.adjusted = {order: dict(raw[order])}
        for k in range(order - 1, 0, -1):
            raw[k] = Counter()
            left = defaultdict(set)
            for gram, c in raw[k + 1].items():
                raw[k][gram[1:]] += c
                left[gram[1:]].add(gram[0])
            self.adjusted[k] = {g: raw[k][g] if g[0] == self.bos else len(left[g]) for g in raw[k]}
        self.discounts = {k: self._discounts(self.adjusted[k]) for k in self.adjusted}
        self.total: dict[int, dict] = {k: defaultdict(float) for k in self.adjusted}
        self.backoff: dict[int, dict] = {k: defaultdict(float) for k in self.adjusted}
        for k, counts in self.adjusted.items():
            for gram, a in counts.items():
                self.total[k][gram[:-1]] += a
                self.backoff[k][gram[:-1]] += self.discount(k, a)

    @staticmethod
    def _discounts(counts: dict) -> tuple[float, float, float]:
        n = Counter(counts.values())
        if n[1] and n[2] and n[3]:
            y = n[1] / (n[1] + 2 * n[2])
            d = tuple(j - (j + 1) * y * n[j + 1] / n[j] for j in (1, 2, 3))
            if all(0 < d[j - 1] <= j for j in (1, 2, 3)):
                return d
        return (0.5, 1.0, 1.5)

    def discount(self, k: int, a: int) -> float:
        return self.discounts[k][min(a, 3) - 1]

    def prob(self, history: tuple, w: int, k: int | None = None) -> float:
        """P_k(w | last k-1 items of history); history already padded to order-1 items."""
        k = self.order if k is None else k
        if k == 0:
            return 1.0 / self.vocab_size
        h = history[len(history) - (k - 1) :] if k > 1 else ()
        lower = self.prob(history, w, k - 1)
        total = self.total[k].get(h, 0.0)
        if total == 0:
            return lower
        a = self.adjusted[k].get(h + (w,), 0)
        own = a - self.discount(k, a) if a else 0.0
        return (own + self.backoff[k][h] * lower) / total

    def loss(self, docs: Sequence[Sequence[int]]) -> float:
        nll, n = 0.0, 0
        for doc in docs:
            seq = [self.bos] * (self.order - 1) + [int(x) for x in doc]
            for t in range(self.order - 1, len(seq)):
                nll -= math.log(self.prob(tuple(seq[t - self.order + 1 : t]), seq[t]))
                n += 1
        return nll / n


def random_docs(rng: np.random.Generator, n_docs: int, vocab: int, max_len: int) -> list:
    """Documents of Zipf-skewed ids in [0, vocab), lengths 0..max_len (some empty)."""
    p = 1.0 / np.arange(1, vocab + 1)
    p /= p.sum()
    return [rng.choice(vocab, size=rng.integers(0, max_len + 1), p=p) for _ in range(n_docs)]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("n_docs", [3, 40, 400])
def test_matches_reference_kn(order: int, n_docs: int) -> None:
    rng = np.random.default_rng(100 * order + n_docs)
    # Training never sees id 6, so evaluation has unseen tokens and unseen contexts.
    train = random_docs(rng, n_docs, 6, 12)
    held = random_docs(rng, 30, 7, 12)
    lm = fit_ngram(train, order, 7)
    ref = ReferenceKN(train, order, 7)
    for k in range(1, order + 1):
        np.testing.assert_allclose(lm.discounts[k - 1], ref.discounts[k], rtol=0, atol=1e-12)
    assert ngram_loss(lm, held) == pytest.approx(ref.loss(held), abs=1e-9)
    assert ngram_loss(lm, train) == pytest.approx(ref.loss(train), abs=1e-9)
    pad = (7,) * (order - 1)
    for context in [(), (0,), (6, 1, 0), (2, 2, 2, 2)]:
        history = (pad + context)[len(pad + context) - (order - 1) :] if order > 1 else ()
        expected = [ref.prob(history, w) for w in range(7)]
        np.testing.assert_allclose(
            next_token_probs(lm, np.array(context, np.int64)), expected, rtol=0, atol=1e-12
        )


def test_reference_cases_cover_both_discount_rules() -> None:
    """The formula (not only the fallback) is exercised by the comparison above."""
    rng = np.random.default_rng(100 * 3 + 400)
    lm = fit_ngram(random_docs(rng, 400, 6, 12), 3, 7)
    fitted = [d.tolist() for d in lm.discounts]
    assert any(d != [0.5, 1.0, 1.5] for d in fitted)
    tiny = fit_ngram([np.array([1, 2, 3])], 2, 7)
    assert [d.tolist() for d in tiny.discounts] == [[0.5, 1.0, 1.5]] * 2


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_next_token_distribution_sums_to_one(order: int) -> None:
    rng = np.random.default_rng(order)
    vocab = 50
    train = random_docs(rng, 200, 40, 60)  # ids 40..49 never seen
    lm = fit_ngram(train, order, vocab)
    seen = [train[i][j : j + order - 1] for i, j in [(0, 0), (1, 3), (5, 10)]]
    unseen = [np.array([45, 46, 47, 48]), np.array([0, 45]), np.array([44])]
    for context in [np.array([], np.int64), *seen, *unseen]:
        p = next_token_probs(lm, context)
        assert p.shape == (vocab,)
        assert (p > 0).all()
        assert p.sum() == pytest.approx(1.0, abs=1e-12)


def test_deterministic_and_independent_of_document_order() -> None:
    rng = np.random.default_rng(7)
    train = random_docs(rng, 300, 200, 80)
    held = random_docs(rng, 50, 200, 80)
    first = ngram_loss(fit_ngram(train, 4, 200), held)
    assert ngram_loss(fit_ngram(train, 4, 200), held) == first
    shuffled = [train[i] for i in rng.permutation(len(train))]
    assert ngram_loss(fit_ngram(shuffled, 4, 200), held) == first


def second_order_chain(
    rng: np.random.Generator, vocab: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P(w | a, b) for a second-order Markov chain (each context prefers 4 successors),
    its stationary distribution over pairs (a, b), and its unigram marginal."""
    trans = np.full((vocab, vocab, vocab), 0.05 / vocab)
    for a in range(vocab):
        for b in range(vocab):
            trans[a, b, rng.choice(vocab, 4, replace=False)] += 0.95 * rng.dirichlet([1.0] * 4)
    pairs = np.full((vocab, vocab), 1.0 / vocab**2)
    for _ in range(2000):
        pairs = np.einsum("ab,abw->bw", pairs, trans)
    return trans, pairs, pairs.sum(axis=0)


def chain_docs(
    rng: np.random.Generator, trans: np.ndarray, pairs: np.ndarray, n_docs: int, length: int
) -> list[np.ndarray]:
    """``n_docs`` independent stationary runs of the chain, each ``length`` tokens."""
    vocab = len(pairs)
    start = rng.choice(vocab * vocab, n_docs, p=pairs.ravel())
    out = np.empty((n_docs, length), np.int64)
    out[:, 0], out[:, 1] = np.divmod(start, vocab)
    cdf = np.cumsum(trans, axis=2)
    for t in range(2, length):
        u = rng.random((n_docs, 1))
        out[:, t] = np.minimum((cdf[out[:, t - 2], out[:, t - 1]] < u).sum(axis=1), vocab - 1)
    return list(out)


def test_loss_falls_with_order_on_a_markov_chain() -> None:
    rng = np.random.default_rng(0)
    vocab = 50
    trans, pairs, unigram = second_order_chain(rng, vocab)
    train = chain_docs(rng, trans, pairs, 800, 500)
    held = chain_docs(rng, trans, pairs, 200, 500)
    losses = [ngram_loss(fit_ngram(train, n, vocab), held) for n in (1, 2, 3)]
    assert losses[0] > losses[1] + 0.1 > losses[2] + 0.2
    entropy = -np.sum(unigram * np.log(unigram))
    assert losses[0] == pytest.approx(entropy, abs=0.01)
    conditional = -np.einsum("ab,abw,abw->", pairs, trans, np.log(trans))
    assert losses[2] == pytest.approx(conditional, abs=0.05)


def test_errors_name_the_problem() -> None:
    ok = [np.array([0, 1, 2])]
    with pytest.raises(ValueError, match=r"document 1: token id 5 is outside \[0, 5\)"):
        fit_ngram([np.array([0, 1]), np.array([4, 5])], 2, 5)
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        fit_ngram([np.array([-1, 1])], 2, 5)
    with pytest.raises(ValueError, match="integer array"):
        fit_ngram([np.array([0.0, 1.0])], 2, 5)
    with pytest.raises(ValueError, match="no tokens"):
        fit_ngram([], 2, 5)
    with pytest.raises(ValueError, match="no tokens"):
        fit_ngram([np.array([], np.int64)], 2, 5)
    with pytest.raises(ValueError, match="order must be >= 1, got 0"):
        fit_ngram(ok, 0, 5)
    lm = fit_ngram(ok, 2, 5)
    with pytest.raises(ValueError, match=r"token id 9 is outside \[0, 5\)"):
        ngram_loss(lm, [np.array([9])])
    with pytest.raises(ValueError, match="no tokens"):
        ngram_loss(lm, [])
    assert token_probs(lm, ok).shape == (3,)
