"""Tests for samplemix.scoring.quality: heuristic rules, classifier readouts, perplexity.

Model scorers are checked against a direct, unbatched, unpadded forward pass of the
same tiny model, so batching, length sorting and padding must not change any score
and results must come back in input order.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import JUNK_IDS, junk_texts, save_tiny_classifier
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from samplemix.config import QualityConfig
from samplemix.scoring.heuristic import heuristic_score, rule_scores
from samplemix.scoring.models import load_tokenizer
from samplemix.scoring.quality import make_scorer

CLEAN = (
    "The river runs through the old town and past the mill that my grandfather built "
    "with his brothers. In spring the water rises, and the children watch the boats "
    "carry timber to the harbour. Most of the houses along the bank have small gardens "
    "where people grow beans, onions and flowers. On warm evenings the neighbours sit "
    "together, talk about the weather and share bread with anyone who passes by. It is "
    "a quiet place, but it has a long history that the town is proud of."
)

# Texts of very different token lengths, including one past max_length and an empty one.
TEXTS = [
    "A short sentence.",
    CLEAN,
    "",
    "Quality scores should not depend on the batch a document lands in.",
    "Numbers 1 2 3 and symbols # $ % make this one odd.",
    "word " * 80,
    "Tiny.",
]


# ---------------------------------------------------------------- heuristic


def test_clean_paragraph_scores_full_marks() -> None:
    assert heuristic_score(CLEAN) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", junk_texts(CLEAN), ids=JUNK_IDS)
def test_clean_paragraph_beats_junk(bad: str) -> None:
    assert heuristic_score(CLEAN) > heuristic_score(bad)
    assert 0.0 <= heuristic_score(bad) <= 1.0


@pytest.mark.parametrize("blank", ["", "   ", "\n\n\t \n"])
def test_blank_text_scores_zero(blank: str) -> None:
    assert heuristic_score(blank) == 0.0
    assert make_scorer(QualityConfig()).score([blank]).tolist() == [0.0]


def test_duplicate_line_share_by_hand() -> None:
    # 5 non-blank lines, 3 distinct (stripping makes the indented copy a duplicate):
    # share = 2/5 = 0.4; bound <= 0.3 with margin 0.3 -> pass = 1 - 0.1/0.3 = 2/3.
    text = "the cat sat on the mat\na dog ran\n  the cat sat on the mat \n\nbirds sing\n"
    text += "the cat sat on the mat"
    assert rule_scores(text)["duplicate_lines"] == pytest.approx(2 / 3)


def test_combined_score_by_hand() -> None:
    # "HELLO WORLD": 2 words -> word_count 1 - 48/50 = 0.04; no stop word -> 0;
    # all letters uppercase (share 1.0 >= 0.5) -> 0; the other 7 rules pass (1 each).
    assert heuristic_score("HELLO WORLD") == pytest.approx((0.04 + 7) / 10)


def test_heuristic_scorer_shape_range_and_order() -> None:
    scorer = make_scorer(QualityConfig(scorer="heuristic"))
    scores = scorer.score(TEXTS)
    assert scorer.name == "heuristic"
    assert scores.dtype == np.float64 and scores.shape == (len(TEXTS),)
    assert np.all((scores >= 0) & (scores <= 1))
    np.testing.assert_array_equal(scores, [heuristic_score(t) for t in TEXTS])
    assert make_scorer(QualityConfig()).score([]).shape == (0,)


def test_huge_document_is_scored_from_its_prefix() -> None:
    """Its cost is a 100k-char document's (bench/bench_stages.py times the scorer)."""
    huge = CLEAN * (2_000_000 // len(CLEAN))
    rules = rule_scores(huge)
    # Same 100k-char prefix statistics as a 100k-char document, except the word count:
    # extrapolated to the full 2 MB (about 340k words > 200k), which fails outright.
    prefix = rule_scores(huge[:100_000])
    assert prefix["word_count"] == 1.0 and rules.pop("word_count") == 0.0
    assert rules == {name: v for name, v in prefix.items() if name != "word_count"}


# ---------------------------------------------------------------- hf-classifier


def _reference_logits(model, tokenizer, texts: list[str], max_length: int) -> np.ndarray:  # noqa: ANN001
    """Logits of each text alone: no batching, no padding."""
    rows = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            rows.append(model(**enc).logits[0].numpy())
    return np.asarray(rows, dtype=np.float64)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _classifier_cfg(path: Path, readout: str = "auto") -> QualityConfig:
    # batch_tokens = 2 * max_length forces several batches of different padded lengths.
    return QualityConfig(
        scorer="hf-classifier",
        model=str(path),
        readout=readout,
        max_length=32,
        batch_tokens=64,
        device="cpu",
    )


def test_regression_readout_matches_unbatched_forward(tmp_path: Path) -> None:
    model = save_tiny_classifier(tmp_path, num_labels=1)
    ref = _reference_logits(model, load_tokenizer("minilm"), TEXTS, 32)[:, 0]
    assert np.min(np.diff(np.sort(ref))) > 1e-3  # distinct, so a permutation would fail

    for readout in ("auto", "regression"):
        scorer = make_scorer(_classifier_cfg(tmp_path, readout))
        scores = scorer.score(TEXTS)
        assert scorer.name == "hf-classifier"
        assert scores.dtype == np.float64 and scores.shape == (len(TEXTS),)
        np.testing.assert_allclose(scores, ref, atol=1e-4)


def test_probability_readouts_match_softmax_by_hand(tmp_path: Path) -> None:
    model = save_tiny_classifier(tmp_path, 3, id2label={0: "low", 1: "mid", 2: "high"})
    probs = _softmax(_reference_logits(model, load_tokenizer("minilm"), TEXTS, 32))
    expected = probs @ np.array([0.0, 1.0, 2.0])
    assert np.min(np.diff(np.sort(expected))) > 1e-3

    for readout, want in [
        ("expected", expected),
        ("auto", expected),
        ("label:high", probs[:, 2]),
        ("label:low", probs[:, 0]),
    ]:
        scores = make_scorer(_classifier_cfg(tmp_path, readout)).score(TEXTS)
        np.testing.assert_allclose(scores, want, atol=1e-4, err_msg=readout)


def test_unknown_label_names_field_and_labels(tmp_path: Path) -> None:
    save_tiny_classifier(tmp_path, 3, id2label={0: "low", 1: "mid", 2: "high"})
    with pytest.raises(ValueError, match=r"quality\.readout.*'high', 'low', 'mid'"):
        make_scorer(_classifier_cfg(tmp_path, "label:excellent"))
    with pytest.raises(ValueError, match=r"quality\.readout"):
        make_scorer(_classifier_cfg(tmp_path, "softmax"))


def test_probability_readout_on_single_output_model_is_rejected(tmp_path: Path) -> None:
    save_tiny_classifier(tmp_path, num_labels=1)
    with pytest.raises(ValueError, match=r"quality\.readout.*regression"):
        make_scorer(_classifier_cfg(tmp_path, "expected"))


@pytest.mark.parametrize("scorer", ["hf-classifier", "perplexity"])
def test_model_scorers_require_a_model(scorer: str) -> None:
    with pytest.raises(ValueError, match=r"quality\.model"):
        make_scorer(QualityConfig(scorer=scorer))


# ---------------------------------------------------------------- perplexity


def _save_lm(path: Path, tokenizer) -> GPT2LMHeadModel:  # noqa: ANN001
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=128,
        initializer_range=0.5,  # a peaked, far-from-uniform model
    )
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def _reference_scores(model, tokenizer, texts: list[str], max_length: int) -> np.ndarray:  # noqa: ANN001
    """-(mean NLL) of each text alone: one unpadded forward pass, shifted logits."""
    out = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
            if len(ids) < 2:
                out.append(-math.log(model.config.vocab_size))
                continue
            logits = model(input_ids=ids[None]).logits[0]
            out.append(-F.cross_entropy(logits[:-1], ids[1:]).item())
    return np.asarray(out)


def _lm_cfg(path: Path) -> QualityConfig:
    return QualityConfig(
        scorer="perplexity", model=str(path), max_length=24, batch_tokens=48, device="cpu"
    )


def test_perplexity_matches_unpadded_forward(tmp_path: Path) -> None:
    tokenizer = load_tokenizer("minilm")
    model = _save_lm(tmp_path, tokenizer)
    # The same text first and last: it lands in a different batch position each time.
    texts = [*TEXTS, TEXTS[0]]
    ref = _reference_scores(model, tokenizer, texts, 24)
    assert np.min(np.diff(np.sort(ref[:-1]))) > 1e-3

    scorer = make_scorer(_lm_cfg(tmp_path))
    scores = scorer.score(texts)
    assert scorer.name == "perplexity"
    assert scores.dtype == np.float64 and scores.shape == (len(texts),)
    np.testing.assert_allclose(scores, ref, atol=1e-4)
    assert scores[0] == pytest.approx(scores[-1], abs=1e-6)
    assert np.all(np.isfinite(scores)) and np.all(scores <= 0)


def _padless_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer like GPT-2's: no pad token, no special tokens added;
    left padding, which the scorer must not use."""
    words = sorted({w for t in texts for w in t.split()})
    vocab = {"[UNK]": 0, "<eos>": 1} | {w: i + 2 for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>", padding_side="left"
    )


def test_perplexity_without_pad_token_and_short_documents(tmp_path: Path) -> None:
    texts = [
        "one two three four five six seven eight nine ten eleven twelve",
        "",  # 0 tokens
        "one",  # 1 token
        "three two one",
        "ten nine eight seven six five four three two one zero one two three four five "
        "six seven eight nine ten eleven twelve thirteen fourteen fifteen",
        "three two one",
    ]
    tokenizer = _padless_tokenizer(texts)
    model = _save_lm(tmp_path, tokenizer)
    ref = _reference_scores(model, tokenizer, texts, 24)
    uniform = -math.log(len(tokenizer))
    assert ref[1] == ref[2] == uniform

    scores = make_scorer(_lm_cfg(tmp_path)).score(texts)
    np.testing.assert_allclose(scores, ref, atol=1e-4)
    assert scores[3] == pytest.approx(scores[5], abs=1e-6)
    assert load_tokenizer(str(tmp_path)).pad_token is None  # the cached one is untouched


def test_only_short_documents_skip_the_model(tmp_path: Path) -> None:
    tokenizer = _padless_tokenizer(["a b"])
    _save_lm(tmp_path, tokenizer)
    scores = make_scorer(_lm_cfg(tmp_path)).score(["", "a", " "])
    np.testing.assert_array_equal(scores, [-math.log(len(tokenizer))] * 3)
