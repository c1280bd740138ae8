"""fp32 linears on oneDNN for CPU inference: the loaded models use them, they give
nn.Linear's results, and everything but fp32 inference still runs nn.Linear."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import example_texts, save_tiny_classifier, save_tiny_encoder

from samplemix.config import EmbedConfig
from samplemix.scoring import models, onednn
from samplemix.scoring.embed import embed_texts
from samplemix.scoring.onednn import OneDNNLinear

pytestmark = pytest.mark.usefixtures("one_torch_thread", "amd")


@pytest.fixture
def amd(monkeypatch: pytest.MonkeyPatch) -> None:
    """The swap as on the AMD CPUs it is made for, whatever CPU runs the tests (oneDNN's
    linear runs on any x86-64 or Arm CPU)."""
    monkeypatch.setattr(onednn, "_amd", lambda: True)


def linear_types(model: torch.nn.Module) -> list[type]:
    return [type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_this_torch_has_a_onednn_linear_that_agrees() -> None:
    """The speed-up is installed, so a torch upgrade that loses it shows here."""
    assert onednn.onednn_agrees()


def test_loaded_models_run_their_linears_on_onednn_with_the_same_results(
    tmp_path: Path,
) -> None:
    from transformers import AutoModelForSequenceClassification

    path = str(tmp_path / "clf")
    save_tiny_classifier(tmp_path / "clf", num_labels=3)
    loaded = models.load_model(path, "classifier", "cpu")
    plain = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert set(linear_types(plain)) == {torch.nn.Linear}
    assert set(linear_types(loaded)) == {OneDNNLinear}
    assert len(linear_types(loaded)) == len(linear_types(plain))
    assert loaded.state_dict().keys() == plain.state_dict().keys()
    tok = models.load_tokenizer(path)
    enc = tok(example_texts(8), truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.inference_mode():
        got, want = loaded(**enc).logits, plain(**enc).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_row_does_not_depend_on_the_rest_of_its_batch() -> None:
    """A document's output does not depend on the batch it is in (of two rows or more;
    see samplemix.scoring.onednn for single rows)."""
    g = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(384, 1536)
    layer.__class__ = OneDNNLinear
    x = torch.randn(12, 37, 384, generator=g)
    with torch.inference_mode():
        whole = layer(x)
        assert torch.equal(layer(x[3:5]), whole[3:5])
        assert torch.equal(layer(x[:, :9]), whole[:, :9])
        assert torch.equal(layer(x), whole)


def test_training_and_autocast_run_nn_linear() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 384, generator=g)
    plain = torch.nn.Linear(384, 96)
    swapped = torch.nn.Linear(384, 96)
    swapped.load_state_dict(plain.state_dict())
    swapped.__class__ = OneDNNLinear
    swapped(x).square().sum().backward()
    plain(x).square().sum().backward()
    assert torch.equal(swapped.weight.grad, plain.weight.grad)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert swapped(x).dtype is torch.bfloat16
        assert torch.equal(swapped(x), plain(x))


def test_a_disagreeing_kernel_leaves_the_model_on_nn_linear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(onednn, "_agrees_here", lambda: False)
    path = save_tiny_encoder(tmp_path / "enc")
    with caplog.at_level(logging.WARNING, logger="samplemix.scoring.onednn"):
        model = models.load_model(path, "encoder", "cpu")
    assert set(linear_types(model)) == {torch.nn.Linear}
    assert "using nn.Linear" in caplog.text


def test_other_cpus_keep_nn_linear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onednn, "_amd", lambda: False)
    model = models.load_model(save_tiny_encoder(tmp_path / "enc"), "encoder", "cpu")
    assert set(linear_types(model)) == {torch.nn.Linear}


def test_minilm_embeddings_match_plain_sentence_transformers() -> None:
    """The packaged MiniLM through embed_texts (oneDNN fp32) against
    sentence-transformers' own encode (MKL fp32), and bf16 autocast against fp32:
    the precision the GPU path is held to (cosine >= 0.999)."""
    from sentence_transformers import SentenceTransformer

    texts = example_texts(40)
    st = SentenceTransformer(models.resolve_model("minilm"), device="cpu")
    st.max_seq_length = 128
    want = st.encode(texts, batch_size=8, normalize_embeddings=True)
    fp32 = embed_texts(texts, EmbedConfig(max_length=128, dtype="float32"))
    bf16 = embed_texts(texts, EmbedConfig(max_length=128, dtype="bfloat16"))
    assert np.sum(fp32 * want, axis=1).min() >= 0.99999
    assert np.sum(bf16 * fp32, axis=1).min() >= 0.999
