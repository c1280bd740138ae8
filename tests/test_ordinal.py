"""The quality evaluator's training: CORAL maths, metrics, split, labels, training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import save_tiny_classifier, save_tiny_encoder

from samplemix.scoring import ordinal_evaluator as ordinal
from samplemix.scoring.ordinal_evaluator import (
    METRIC_KEYS,
    class_expected_level,
    compare_heads,
    coral_loss,
    expected_level,
    load_training_pairs,
    metrics,
    metrics_table,
    ordinal_targets,
    predicted_level,
    split,
    train_scorer,
)

K = 5
# a tiny random BERT learns "level = number of 'gold' among 6 words" in ~15 short epochs
TRAIN = {
    "K": K,
    "epochs": 15,
    "lr": 3e-3,
    "batch_size": 8,
    "max_length": 16,
    "val_share": 0.25,
    "seed": 0,
    "device": "cpu",
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, width-32 BERT encoder (no head, like MiniLM) with MiniLM's tokenizer."""
    return save_tiny_encoder(tmp_path_factory.mktemp("base"))


def counting_task(n: int = 60) -> tuple[list[str], list[int]]:
    """Texts of six words; the level is how many of them are 'gold' (0..4)."""
    rng = random.Random(0)
    texts, levels = [], []
    for i in range(n):
        level = i % K
        words = ["gold"] * level + ["sand"] * (6 - level)
        rng.shuffle(words)
        texts.append(" ".join(words))
        levels.append(level)
    return texts, levels


@pytest.fixture(scope="module")
def ordinal_run(tiny_base: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("ordinal")
    texts, levels = counting_task()
    return train_scorer(texts, levels, tiny_base, out, head="ordinal", **TRAIN), out


# ---------------------------------------------------------------- ordinal maths


def test_expected_level_hand_values():
    big = 50.0
    logits = torch.tensor([[0.0, 0.0], [big, -big], [big, big], [-big, -big], [-big, big]])
    assert expected_level(logits).tolist() == pytest.approx([1.0, 1.0, 2.0, 0.0, 1.0])
    assert predicted_level(torch.tensor([[0.1, -0.1], [2.0, 1.0], [-1.0, -2.0]])).tolist() == [
        1,
        2,
        0,
    ]
    # a K-way classifier with equal logits expects the middle level
    assert class_expected_level(torch.zeros(1, 10)).item() == pytest.approx(4.5)


def test_expected_level_monotone_in_each_logit_and_bounded():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 9, generator=gen) * 4
    base = expected_level(logits)
    assert ((base >= 0) & (base <= 9)).all()
    for k in range(9):
        bumped = logits.clone()
        bumped[:, k] += torch.rand(200, generator=gen) * 3
        assert (expected_level(bumped) >= base).all()
        lowered = logits.clone()
        lowered[:, k] -= torch.rand(200, generator=gen) * 3
        assert (expected_level(lowered) <= base).all()


def test_ordinal_targets_and_coral_loss():
    levels = torch.tensor([0, 2, 1])
    assert ordinal_targets(levels, 3).tolist() == [[0, 0], [1, 1], [1, 0]]
    # zero logits: every threshold costs log 2
    assert coral_loss(torch.zeros(3, 2), levels).item() == pytest.approx(2 * np.log(2))
    # confident and right costs ~0, confident and wrong costs a lot
    right = torch.tensor([[-20.0, -20.0], [20.0, 20.0], [20.0, -20.0]])
    assert coral_loss(right, levels).item() < 1e-6
    assert coral_loss(-right, levels).item() > 20


def test_metrics_on_hand_made_predictions():
    m = metrics([0, 2, 2, 5, 8], [0, 1, 2, 3, 9])
    assert m == pytest.approx({"ACC": 0.4, "MAE": 0.8, "MSE": 1.2, "CACC": 0.8})
    assert metrics(np.array([3, 3]), np.array([3, 3])) == {
        "ACC": 1.0,
        "MAE": 0.0,
        "MSE": 0.0,
        "CACC": 1.0,
    }
    with pytest.raises(ValueError):
        metrics([1, 2], [1])


# ---------------------------------------------------------------- data


def test_split_is_deterministic_disjoint_and_stratified():
    levels = np.repeat(np.arange(5), [20, 10, 10, 5, 5])
    train, val = split(len(levels), 0.2, seed=3, levels=levels)
    again = split(len(levels), 0.2, seed=3, levels=levels)
    assert train.tolist() == again[0].tolist() and val.tolist() == again[1].tolist()
    assert sorted([*train, *val]) == list(range(len(levels)))
    assert len(val) == 10
    assert np.bincount(levels[val], minlength=5).tolist() == [4, 2, 2, 1, 1]
    assert split(len(levels), 0.2, seed=4, levels=levels)[1].tolist() != val.tolist()
    assert len(split(3, 0.01, seed=0)[1]) == 1  # never an empty validation set


def test_load_training_pairs(tmp_path: Path):
    labels = tmp_path / "labels.parquet"
    pq.write_table(
        pa.table(
            {
                "id": ["a", "b", "c", "d", "a", "e"],
                "text_sha256": ["x"] * 6,
                "total": pa.array([3, None, 9, 0, 5, 2], pa.int64()),
                "label_model": ["m"] * 6,
                "error": [None, "timeout", None, None, None, None],
            }
        ),
        labels,
    )
    texts = {"a": "text a", "b": "text b", "c": "text c", "d": "text d"}
    got_texts, got_levels, skipped = load_training_pairs(labels, texts)
    assert got_texts == ["text a", "text c", "text d"]
    assert got_levels == [3, 9, 0]
    assert skipped == {"null_total": 1, "missing_text": 1, "duplicate_id": 1}
    with pytest.raises(ValueError, match="1 labelled id.*'e'"):
        load_training_pairs(labels, texts, missing="error")


# ---------------------------------------------------------------- training


def test_ordinal_training_learns_and_saves_a_plain_transformers_model(ordinal_run):
    from transformers import AutoModelForSequenceClassification

    result, out = ordinal_run
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0] * 0.8
    assert result["MAE"] < result["baseline"]["MAE"]
    assert set(METRIC_KEYS) <= set(result)
    assert result["n_train"] + result["n_val"] == 60 and result["n_val"] == 15
    assert json.loads((out / "metrics.json").read_text()) == result

    model = AutoModelForSequenceClassification.from_pretrained(out)  # no custom code
    assert model.config.samplemix_readout == "ordinal"
    assert model.config.num_labels == K - 1
    assert model.config.id2label[0] == "level>0"
    weight = model.classifier.weight
    assert torch.equal(weight, weight[:1].expand_as(weight))  # CORAL: one shared row

    # the reloaded model reproduces the saved validation metrics
    texts, levels = counting_task()
    _, val = split(60, TRAIN["val_share"], TRAIN["seed"], levels)
    from samplemix.scoring.models import load_tokenizer

    enc = load_tokenizer(str(out))([texts[i] for i in val], padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model.eval()(**enc).logits
    again = metrics(predicted_level(logits).numpy(), np.asarray(levels)[val])
    assert again == pytest.approx({k: result[k] for k in METRIC_KEYS})


def test_compare_heads_same_seed_same_result(ordinal_run, tiny_base: str, tmp_path: Path):
    texts, levels = counting_task()
    result = compare_heads(texts, levels, tiny_base, tmp_path, **TRAIN)
    assert set(result) == {"ordinal", "classification"}
    for head in result.values():
        assert set(METRIC_KEYS) <= set(head)
    # the same seed and settings reproduce the ordinal run exactly
    assert {k: result["ordinal"][k] for k in METRIC_KEYS} == {
        k: ordinal_run[0][k] for k in METRIC_KEYS
    }
    assert result["classification"]["MAE"] < result["classification"]["baseline"]["MAE"]
    table = metrics_table(result)
    assert "| ordinal |" in table and "| classification |" in table
    assert table.splitlines()[0] == "| head | ACC (%) | MAE | MSE | CACC (%) |"
    assert (tmp_path / "comparison.md").read_text() == table

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path / "classification")
    assert config.num_labels == K and config.samplemix_readout == "expected"


def test_base_with_another_head_size_gets_a_fresh_head(tmp_path: Path):
    """A base that is already a classifier (3 labels) is re-headed for K = 10."""
    from transformers import AutoConfig

    save_tiny_classifier(tmp_path / "base", num_labels=3)
    texts, levels = counting_task(12)
    kw = TRAIN | {"K": ordinal.RUBRIC_LEVELS, "epochs": 1}
    result = train_scorer(texts, levels, str(tmp_path / "base"), tmp_path / "out", **kw)
    assert result["K"] == 10
    assert AutoConfig.from_pretrained(tmp_path / "out").num_labels == 9
    with pytest.raises(ValueError, match="0..K-1"):
        train_scorer(texts, [20] * 12, str(tmp_path / "base"), tmp_path / "bad", **kw)
