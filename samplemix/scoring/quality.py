"""Quality scorers q(x): one float per document, higher = better.

Every scorer has a ``name`` and ``score(texts) -> np.ndarray`` returning float64 of
shape ``(len(texts),)``, finite, in input order. ``make_scorer(cfg.quality)`` picks
one of three:

``heuristic``
    Rule-based text statistics after Gopher (Rae et al. 2021, appendix A) and the C4
    cleaning rules. Each rule turns one statistic into a *soft pass* value in [0, 1]:
    1 inside its bound, falling linearly over a margin outside it to 0 at the value in
    the "zero at" column, and 0 beyond. The score is the **unweighted mean of the ten
    pass values**, so it lies in [0, 1]; a document failing one rule outright loses
    0.1. Words are whitespace-separated tokens; lines are the non-blank lines,
    stripped.

    ========================  =============================================  ===========  ==========
    rule                      statistic                                      pass = 1     zero at
    ========================  =============================================  ===========  ==========
    ``word_count``            number of words                                50..100,000  0; 200,000
    ``mean_word_length``      mean characters per word                       3..10        1; 12
    ``symbol_ratio``          (``#`` chars + ``...`` + ``…``) per word       <= 0.1       0.2
    ``ellipsis_lines``        share of lines ending in ``...`` or ``…``      <= 0.3       0.6
    ``bullet_lines``          share of lines starting with a bullet          <= 0.9       1.0
                              (``•●○◦▪‣·*-–``)
    ``alpha_words``           share of words containing a letter             >= 0.8       0.4
    ``stop_words``            occurrences of the, be, to, of, and, that,     >= 2         0
                              have, with (case-insensitive)
    ``duplicate_lines``       share of lines that repeat an earlier line     <= 0.3       0.6
    ``uppercase``             uppercase letters / letters (0 if none)        <= 0.25      0.5
    ``digit_punct``           non-letters (digits, punctuation, symbols)     <= 0.25      0.5
                              / non-space characters
    ========================  =============================================  ===========  ==========

    Only the first 100,000 characters are analysed, so a 1 MB document costs the
    same as a 100 kB one; its word count is extrapolated from that prefix (prefix
    words x total length / prefix length). Empty or whitespace-only text scores 0.

``hf-classifier``
    A Hugging Face sequence-classification model (``quality.model``). ``quality.readout``
    turns its logits into the score: ``regression`` = logit 0; ``expected`` =
    sum_i softmax_i * i (in [0, num_labels - 1]); ``label:NAME`` = the softmax
    probability of label NAME (in [0, 1]; names from the model's ``label2id``, else
    its ``id2label``); ``ordinal`` = sum_k sigmoid(logit_k), the expected level of an
    ordinal (CORAL) head with K - 1 cumulative logits (in [0, K - 1]); ``auto`` = the
    readout the model's config names (``samplemix_readout``, set by
    ``samplemix train-scorer``), else regression when the model has one output, else
    expected. Texts are truncated to ``quality.max_length`` tokens.

``perplexity``
    A causal LM (``quality.model``, optionally ``quality.gguf_file``). The score is
    minus the mean next-token negative log-likelihood over the document's first
    ``quality.max_length`` tokens, i.e. -log(perplexity) (lower perplexity = higher
    score, always <= 0). A document with fewer than 2 tokens has no prediction to
    score and gets -log(vocab size), the value of a uniform model.

Model scorers run length-sorted batches of at most ``quality.batch_tokens`` padded
tokens, in bf16 autocast on CUDA and fp32 elsewhere; padding never changes a score, and
on CPU neither does the thread count (models.batch_outputs).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from samplemix.config import QualityConfig
from samplemix.scoring.models import (
    batch_outputs,
    count_truncated,
    device_batches,
    load_model,
    load_tokenizer,
    resolve_batch_tokens,
    resolve_device,
)

T = TypeVar("T")


class Scorer(Protocol):
    """Scores documents; higher = better."""

    name: str

    def score(self, texts: list[str]) -> np.ndarray:
        """float64, shape ``(len(texts),)``, finite, in input order."""
        ...

    def truncated(self, texts: list[str]) -> int:
        """How many ``texts`` the score reads only a prefix of."""
        ...


def make_scorer(cfg: QualityConfig) -> Scorer:
    """The scorer ``cfg.scorer`` names, with its model loaded (once per process)."""
    if cfg.scorer == "heuristic":
        return HeuristicScorer()
    if cfg.scorer == "hf-classifier":
        return HFClassifierScorer(cfg)
    return PerplexityScorer(cfg)


# ---------------------------------------------------------------- heuristic rules

MAX_CHARS = 100_000
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "◦", "▪", "‣", "·", "*", "-", "–")
ELLIPSES = ("...", "…")
_LETTER = re.compile(r"[^\W\d_]")
_STRIP = "\"'()[]{}<>.,;:!?`“”‘’«»"


class Bound(NamedTuple):
    """Pass = 1 on [lo, hi]; linear to 0 at lo - below and at hi + above."""

    lo: float
    hi: float
    below: float = 1.0
    above: float = 1.0


RULES: dict[str, Bound] = {
    "word_count": Bound(50, 100_000, below=50, above=100_000),
    "mean_word_length": Bound(3, 10, below=2, above=2),
    "symbol_ratio": Bound(-math.inf, 0.1, above=0.1),
    "ellipsis_lines": Bound(-math.inf, 0.3, above=0.3),
    "bullet_lines": Bound(-math.inf, 0.9, above=0.1),
    "alpha_words": Bound(0.8, math.inf, below=0.4),
    "stop_words": Bound(2, math.inf, below=2),
    "duplicate_lines": Bound(-math.inf, 0.3, above=0.3),
    "uppercase": Bound(-math.inf, 0.25, above=0.25),
    "digit_punct": Bound(-math.inf, 0.25, above=0.25),
}


def soft_pass(value: float, bound: Bound) -> float:
    """1 inside ``bound``, decaying linearly to 0 over its margin outside; in [0, 1]."""
    if value < bound.lo:
        return max(0.0, 1.0 - (bound.lo - value) / bound.below)
    if value > bound.hi:
        return max(0.0, 1.0 - (value - bound.hi) / bound.above)
    return 1.0


def _share(count: int, total: int) -> float:
    return count / total if total else 0.0


def text_statistics(text: str) -> dict[str, float]:
    """The statistic of every rule in ``RULES`` for a non-blank ``text``.

    Analyses the first ``MAX_CHARS`` characters; the word count is extrapolated.
    """
    prefix = text[:MAX_CHARS]
    words = prefix.split()
    lines = [s for s in (line.strip() for line in prefix.splitlines()) if s]
    n_words, n_lines = len(words), len(lines)
    word_chars = sum(map(len, words))  # = non-whitespace characters
    letters = sum(map(str.isalpha, prefix))  # 5x faster than a regex findall
    return {
        "word_count": n_words * len(text) / len(prefix),
        "mean_word_length": _share(word_chars, n_words),
        "symbol_ratio": _share(prefix.count("#") + sum(prefix.count(e) for e in ELLIPSES), n_words),
        "ellipsis_lines": _share(sum(s.endswith(ELLIPSES) for s in lines), n_lines),
        "bullet_lines": _share(sum(s.startswith(BULLETS) for s in lines), n_lines),
        "alpha_words": _share(sum(map(bool, map(_LETTER.search, words))), n_words),
        "stop_words": sum(map(STOP_WORDS.__contains__, [w.strip(_STRIP).lower() for w in words])),
        "duplicate_lines": _share(n_lines - len(set(lines)), n_lines),
        "uppercase": _share(sum(map(str.isupper, prefix)), letters),
        "digit_punct": _share(word_chars - letters, word_chars),
    }


def rule_scores(text: str) -> dict[str, float]:
    """The soft pass value in [0, 1] of every rule; all 0 for blank text."""
    if not text.strip():
        return dict.fromkeys(RULES, 0.0)
    stats = text_statistics(text)
    return {name: soft_pass(stats[name], bound) for name, bound in RULES.items()}


def heuristic_score(text: str) -> float:
    """Mean of the rules' pass values, in [0, 1]; 0 for blank text."""
    passes = rule_scores(text).values()
    return sum(passes) / len(passes)


class HeuristicScorer:
    """The rule-based scorer; pure Python, no model."""

    name = "heuristic"

    def score(self, texts: list[str]) -> np.ndarray:
        """float64 in [0, 1], shape ``(len(texts),)``."""
        return np.fromiter(map(heuristic_score, texts), dtype=np.float64, count=len(texts))

    def truncated(self, texts: list[str]) -> int:
        """Texts longer than MAX_CHARS characters (their statistics use the prefix)."""
        return sum(len(t) > MAX_CHARS for t in texts)


# ---------------------------------------------------------------- model scorers


def _require_model(cfg: QualityConfig) -> str:
    if not cfg.model:
        raise ValueError(
            f"quality.model must name a local model directory or hub id for "
            f"quality.scorer={cfg.scorer!r}"
        )
    return cfg.model


def _right_padding(tokenizer):  # noqa: ANN001, ANN202 - transformers tokenizer
    """``tokenizer``, or a copy of it, that pads and truncates on the right and has a
    pad token (eos, else token id 0: padded positions are masked, never read).

    The cached tokenizer is shared, so it is copied rather than changed.
    """
    if (
        tokenizer.pad_token is not None
        and tokenizer.padding_side == "right"
        and tokenizer.truncation_side == "right"
    ):
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = tokenizer.truncation_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
    return tokenizer


class _BatchedModel:
    """A model with its tokenizer that scores texts in length-sorted padded batches."""

    def __init__(self, cfg: QualityConfig, kind: str, gguf_file: str | None = None) -> None:
        name = _require_model(cfg)
        self.device = resolve_device(cfg.device)
        self.model = load_model(name, kind, cfg.device, gguf_file, cfg.compile)
        self.tokenizer = _right_padding(load_tokenizer(name))
        self.max_length = cfg.max_length
        self.batch_tokens = resolve_batch_tokens(cfg.batch_tokens, self.device)
        self.compiled = cfg.compile  # a compiled model is called from one thread

    def batches(self, texts: list[str]) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """Yield (indices into ``texts``, encoded batch on the model's device); on CUDA
        the next batches are tokenised while the model runs (models.device_batches)."""
        yield from device_batches(
            self.tokenizer, texts, self.max_length, self.batch_tokens, self.device
        )

    def truncated(self, texts: list[str]) -> int:
        """Texts longer than ``quality.max_length`` tokens."""
        return count_truncated(self.tokenizer, texts, self.max_length)

    def outputs(
        self, texts: list[str], forward: Callable[[dict[str, torch.Tensor]], T]
    ) -> Iterator[tuple[np.ndarray, T]]:
        """(indices into ``texts``, ``forward(batch)``) per batch (models.batch_outputs):
        bf16 autocast on CUDA; fp32 elsewhere, where bf16 would only lose precision."""
        amp = torch.bfloat16 if self.device.type == "cuda" else None
        yield from batch_outputs(
            self.batches(texts), forward, self.device, amp, concurrent=not self.compiled
        )


Readout = Callable[[torch.Tensor], torch.Tensor]


def make_readout(
    readout: str, num_labels: int, label2id: dict[str, int], saved: str | None = None
) -> Readout:
    """Map logits ``(batch, num_labels)`` to scores ``(batch,)`` as ``readout`` says.
    ``saved``: the readout the model's config names (``samplemix_readout``, written by
    ``samplemix train-scorer``), which ``auto`` follows.

    Raises ValueError naming ``quality.readout`` for an unknown readout or label, or
    a probability readout on a single-output model.
    """
    if readout == "auto":
        readout = saved or ("regression" if num_labels == 1 else "expected")
    if readout == "regression":
        return lambda logits: logits[:, 0]
    if readout == "ordinal":  # K − 1 cumulative logits of P(level > k): E[level] = Σ_k σ
        return lambda logits: torch.sigmoid(logits).sum(-1)
    if readout != "expected" and not readout.startswith("label:"):
        raise ValueError(
            f"quality.readout {readout!r} is not one of 'auto', 'regression', 'expected', "
            "'ordinal', 'label:NAME'"
        )
    if num_labels < 2:
        raise ValueError(
            f"quality.readout {readout!r} needs a model with >= 2 labels; this one has 1 "
            "output, use 'regression'"
        )
    if readout == "expected":
        levels = torch.arange(num_labels, dtype=torch.float32)
        return lambda logits: logits.softmax(-1) @ levels.to(logits.device)
    label = readout.removeprefix("label:")
    if label not in label2id:
        raise ValueError(
            f"quality.readout names label {label!r}, but the model's labels are {sorted(label2id)}"
        )
    column = label2id[label]
    return lambda logits: logits.softmax(-1)[:, column]


def _label_columns(model) -> dict[str, int]:  # noqa: ANN001 - transformers model
    """Label name -> logit column: ``config.label2id``, else the inverse of ``id2label``
    (transformers leaves label2id unset when a config gives only id2label)."""
    config = model.config
    if config.label2id:
        return dict(config.label2id)
    return {name: int(i) for i, name in (config.id2label or {}).items()}


class HFClassifierScorer:
    """A sequence-classification model read out as ``quality.readout`` says."""

    name = "hf-classifier"

    def truncated(self, texts: list[str]) -> int:
        return self._runner.truncated(texts)

    def __init__(self, cfg: QualityConfig) -> None:
        self._runner = _BatchedModel(cfg, "classifier")
        config = self._runner.model.config
        self._readout = make_readout(
            cfg.readout,
            config.num_labels,
            _label_columns(self._runner.model),
            getattr(config, "samplemix_readout", None),
        )

    def score(self, texts: list[str]) -> np.ndarray:
        """float64, shape ``(len(texts),)``; range depends on the readout."""
        out = np.zeros(len(texts), dtype=np.float64)
        if not texts:
            return out

        def forward(enc: dict[str, torch.Tensor]) -> np.ndarray:
            return self._readout(self._runner.model(**enc).logits.float()).cpu().numpy()

        for idx, scores in self._runner.outputs(texts, forward):
            out[idx] = scores
        return out


class PerplexityScorer:
    """-log(perplexity) of a causal LM over each document's first max_length tokens."""

    name = "perplexity"

    def truncated(self, texts: list[str]) -> int:
        return self._runner.truncated(texts)

    def __init__(self, cfg: QualityConfig) -> None:
        self._runner = _BatchedModel(cfg, "causal-lm", cfg.gguf_file)
        vocab_size = self._runner.model.get_output_embeddings().weight.shape[0]
        self.floor = -math.log(vocab_size)

    def score(self, texts: list[str]) -> np.ndarray:
        """float64 <= 0, shape ``(len(texts),)``; -log(vocab size) for < 2 tokens."""
        out = np.full(len(texts), self.floor, dtype=np.float64)
        if not texts:
            return out

        def forward(enc: dict[str, torch.Tensor]) -> np.ndarray | None:
            if enc["input_ids"].shape[1] < 2:  # nothing to predict in this batch
                return None
            # Only ids and mask: GPT-2 would add token_type_ids from a BERT-style
            # tokenizer as extra embeddings, changing the model's predictions.
            logits = self._runner.model(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
            ).logits
            return self._mean_log_likelihood(logits, enc)

        for idx, scores in self._runner.outputs(texts, forward):
            if scores is not None:
                out[idx] = scores
        return out

    def _mean_log_likelihood(
        self, logits: torch.Tensor, enc: dict[str, torch.Tensor]
    ) -> np.ndarray:
        """Per row: -mean NLL of tokens 1..n-1 given their prefix, n = the row's length.

        Right padding puts each row's n real tokens first, so slicing drops the padding;
        rows are upcast to fp32 one at a time to bound memory by one (length, vocab).
        """
        lengths = enc["attention_mask"].sum(1).tolist()
        scores = np.full(len(lengths), self.floor, dtype=np.float64)
        for row, n in enumerate(lengths):
            if n >= 2:
                nll = F.cross_entropy(logits[row, : n - 1].float(), enc["input_ids"][row, 1:n])
                scores[row] = -nll.item()
        return scores


class DomainClassifier:
    """The most probable label of a sequence-classification model, per text: a domain.
    Label names come from the model's ``id2label``."""

    def __init__(self, model: str, max_length: int, device: str = "auto") -> None:
        cfg = QualityConfig(
            scorer="hf-classifier", model=model, max_length=max_length, device=device
        )
        self._runner = _BatchedModel(cfg, "classifier")
        self._names = self._runner.model.config.id2label

    def labels(self, texts: list[str]) -> list[str]:
        out = np.zeros(len(texts), dtype=np.int64)

        def forward(enc: dict[str, torch.Tensor]) -> np.ndarray:
            return self._runner.model(**enc).logits.argmax(-1).cpu().numpy()

        for idx, labels in self._runner.outputs(texts, forward):
            out[idx] = labels
        return [str(self._names[int(i)]) for i in out]
