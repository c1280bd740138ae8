"""Model outputs do not depend on the torch thread count (models.batch_outputs): a GEMM
split over more threads adds its reduction in another order, which made MiniLM's
embeddings differ by up to 6e-4 between a 1- and a 2-thread worker on an AMX Xeon, under
one cache key. Thread counts 1, 2 and 4 must give the same bits, whatever the cores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLES
from transformers import BertConfig, BertForSequenceClassification

from samplemix.config import EmbedConfig, QualityConfig
from samplemix.scoring.embed import embed_texts
from samplemix.scoring.models import batch_outputs, load_tokenizer
from samplemix.scoring.quality import make_scorer

THREADS = (1, 2, 4)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """The shards of the integrity test's corpus: 8 documents each, as a worker gets them."""
    import pyarrow.parquet as pq

    out = []
    for domain in ("books", "code", "reference"):
        out += pq.read_table(EXAMPLES / domain / "part-000.parquet").column("text").to_pylist()[:8]
    return out


def outputs_by_threads(compute) -> dict[int, np.ndarray]:  # noqa: ANN001 - () -> array
    """``compute()`` under each of THREADS torch threads, the thread count restored."""
    before = torch.get_num_threads()
    got = {}
    try:
        for n in THREADS:
            torch.set_num_threads(n)
            got[n] = compute()
            assert torch.get_num_threads() == n  # batch_outputs restores the count
    finally:
        torch.set_num_threads(before)
    return got


@pytest.mark.parametrize("dtype", ["auto", "float32"])
@pytest.mark.parametrize("max_length", [32, 128])
def test_embeddings_are_the_same_bits_on_any_thread_count(
    texts: list[str], dtype: str, max_length: int
) -> None:
    cfg = EmbedConfig(max_length=max_length, dtype=dtype)
    got = outputs_by_threads(
        lambda: np.concatenate([embed_texts(texts[i::3], cfg) for i in range(3)])
    )
    for n in THREADS[1:]:
        assert np.array_equal(got[n], got[1]), f"{n} threads vs 1: {np.abs(got[n] - got[1]).max()}"


def test_classifier_scores_are_the_same_bits_on_any_thread_count(
    texts: list[str], tmp_path: Path
) -> None:
    """An fp32 classifier as wide as MiniLM (384): its linears are the GEMM shapes that
    MKL split differently on 1 and 2 threads."""
    tokenizer = load_tokenizer("minilm")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=384,
        num_hidden_layers=1,
        num_attention_heads=6,
        intermediate_size=1536,
        num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    scorer = make_scorer(
        QualityConfig(scorer="hf-classifier", model=str(tmp_path), max_length=64, batch_tokens=256)
    )
    got = outputs_by_threads(lambda: scorer.score(texts))
    for n in THREADS[1:]:
        assert np.array_equal(got[n], got[1]), f"{n} threads vs 1: {np.abs(got[n] - got[1]).max()}"


def test_batch_outputs_keep_the_batch_order_and_run_each_batch_on_one_thread() -> None:
    """Every batch is answered in the order given, each call sees one intra-op thread
    and inference mode, and the caller's thread count is back afterwards."""
    batches = [(np.array([i]), {"x": torch.full((2,), float(i))}) for i in range(23)]
    seen: list[tuple[int, bool]] = []

    def forward(enc: dict[str, torch.Tensor]) -> float:
        seen.append((torch.get_num_threads(), torch.is_inference_mode_enabled()))
        return float(enc["x"].sum())

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        got = list(batch_outputs(iter(batches), forward, torch.device("cpu")))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert [(int(i[0]), y) for i, y in got] == [(i, 2.0 * i) for i in range(23)]
    assert set(seen) == {(1, True)}
