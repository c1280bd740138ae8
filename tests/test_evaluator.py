"""The quality evaluator end to end: annotate a corpus slice through a real
chat-completions server, train the ordinal scorer, then mix with it as the scorer."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import save_tiny_encoder, tiny_config, write_tiny_corpus
from test_annotate import ChatServer, expected_scores, server  # noqa: F401 - a fixture
from typer.testing import CliRunner

from samplemix.cli import app
from samplemix.scoring.annotate import TRUNCATION_MARKER

pytestmark = pytest.mark.slow


def test_annotate_train_and_mix_with_the_trained_scorer(
    server: ChatServer,  # noqa: F811 - the fixture imported from test_annotate
    tmp_path: Path,
    cluster: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from flows.mix import run_mix

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("SAMPLEMIX_ANNOTATOR_API_KEY", "test-key")
    corpus = write_tiny_corpus(tmp_path / "corpus")
    runner = CliRunner()
    args = ["annotate", "--input", str(corpus), "--endpoint", server.base_url, "--model", "m"]
    res = runner.invoke(
        app, [*args, "--n", "36", "--out", str(tmp_path / "labels"), "--rps", "100"]
    )
    assert res.exit_code == 0, res.output
    assert "36 of 36 documents labelled" in res.output
    assert set(server.auth) == {"Bearer test-key"} and server.requests == 36
    labels = pq.read_table(tmp_path / "labels" / "labels.parquet").to_pydict()
    texts = pq.read_table(tmp_path / "labels" / "texts.parquet").to_pydict()
    by_id = dict(zip(texts["id"], texts["text"], strict=True))
    assert set(texts["domain"]) == {"books", "code", "reference"}  # stratified: 12 each
    for i, total in zip(labels["id"], labels["total"], strict=True):
        sent = by_id[i] if len(by_id[i]) <= 8000 else by_id[i][:8000] + TRUNCATION_MARKER
        assert total == sum(expected_scores(sent).values())  # the server saw the cut text

    out = tmp_path / "scorer"
    res = runner.invoke(
        app,
        [
            "train-scorer",
            "--labels",
            str(tmp_path / "labels"),
            "--base",
            save_tiny_encoder(tmp_path / "b"),
        ]
        + ["--out", str(out), "--epochs", "2", "--max-length", "64", "--batch-size", "8"],
    )
    assert res.exit_code == 0, res.output
    assert "| ordinal" in res.output and "| classification" in res.output
    model_dir = out / "ordinal"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert model.config.samplemix_readout == "ordinal" and model.config.num_labels == 9

    cfg = tiny_config(
        corpus,
        tmp_path / "mix",
        **{"quality.scorer": "hf-classifier", "quality.model": str(model_dir)},
        **{"quality.max_length": 64},
        **cluster,
    )
    summary = run_mix(cfg)
    assert summary["computed"]["quality"] == 6
    plan = pq.read_table(sorted((tmp_path / "mix" / "plan").glob("*.parquet"))).to_pydict()
    assert all(0 <= q <= 9 for q in plan["quality"])
    # The pipeline's score is the expected level Σ_k sigmoid(logit_k), from the model run here.
    text = pq.read_table(corpus / plan["shard"][0]).column("text")[plan["row"][0]].as_py()
    tok = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(**tok(text, truncation=True, max_length=64, return_tensors="pt")).logits
    assert plan["quality"][0] == pytest.approx(float(torch.sigmoid(logits).sum()), abs=1e-5)
