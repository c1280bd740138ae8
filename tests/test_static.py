"""The static (model2vec) embedder: real distillation of a tiny BERT with MiniLM's
tokenizer (the real MiniLM takes minutes on 2 cores), values derived independently
from the saved vector table and MiniLM's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_encoder
from safetensors.numpy import load_file
from typer.testing import CliRunner

from samplemix.config import EmbedConfig
from samplemix.scoring.embed import embed_texts, truncated_count
from samplemix.scoring.models import load_tokenizer, token_lengths
from samplemix.scoring.static_embed import distill_static, embed_static, is_static, static_truncated
from samplemix.scoring.tokens import token_counts, token_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # distilling: 8x faster
PCA = 16
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square",
    "Zürich, São Paulo and 東京 are cities; naïve café façades!",
    "Dear team, the meeting moved to 3pm. Regards, Ann",
    "[CLS] literal special tokens [SEP] and [MASK] and [unused3] in text",
    "a a a a b",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def static(base: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(distill_static(base, str(tmp_path_factory.mktemp("static") / "m2v"), PCA))


def vectors(model: str) -> np.ndarray:
    return load_file(str(Path(model) / "model.safetensors"))["embeddings"].astype(np.float64)


def expected(texts: list[str], model: str, max_length: int) -> np.ndarray:
    """Normalised mean of the vectors of each text's first ``max_length`` MiniLM token
    ids (no special tokens), [UNK] skipped as model2vec does."""
    w = vectors(model)
    unk = load_tokenizer("minilm").unk_token_id
    rows = []
    for ids in token_ids(texts, "minilm"):
        kept = [i for i in ids[:max_length] if i != unk]
        v = w[kept].mean(axis=0)
        rows.append(v / np.linalg.norm(v))
    return np.array(rows)


def test_is_static_recognises_the_distilled_folder(static: str, base: str, tmp_path: Path) -> None:
    assert is_static(static)
    assert not is_static("minilm")
    assert not is_static(base)
    assert not is_static(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text("not json")
    assert not is_static(str(tmp_path))


def test_vector_table_is_indexed_by_minilm_token_ids(static: str) -> None:
    w = vectors(static)
    assert w.shape == (len(load_tokenizer("minilm")), PCA)
    tok = load_tokenizer("minilm")
    dropped = [tok.cls_token_id, tok.sep_token_id, tok.mask_token_id]
    assert not w[dropped].any()  # model2vec drops these from its vocabulary
    assert (np.linalg.norm(w[1000:], axis=1) > 0).all()  # ordinary word pieces


def test_embedding_is_normalised_mean_of_token_vectors(static: str) -> None:
    e = embed_static(TEXTS, static, 64)
    assert e.dtype == np.float32 and e.shape == (len(TEXTS), PCA)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(e, expected(TEXTS, static, 64), atol=1e-6)
    order = [3, 0, 5, 1, 4, 2]
    np.testing.assert_allclose(embed_static([TEXTS[i] for i in order], static, 64), e[order])
    assert embed_static([], static, 64).shape == (0, PCA)


def test_matches_model2vecs_own_distillation(static: str, base: str) -> None:
    """Re-indexing the table by MiniLM's ids changes no embedding of ordinary text."""
    from model2vec.distill import distill

    own = distill(base, pca_dims=PCA, quantize_to="float32")
    texts = TEXTS[:4] + TEXTS[5:]
    ref = own.encode(texts, max_length=64, normalize=True, use_multiprocessing=False)
    np.testing.assert_allclose(embed_static(texts, static, 64), ref, atol=1e-5)


def test_long_texts_read_their_first_max_length_tokens(static: str) -> None:
    prose = " ".join(f"word{i} and more" for i in range(200))
    # 20 spaces between words: model2vec's own encode cuts the string at
    # max_length · median-token-length characters, which holds fewer than 32 tokens here
    spaced = (" " * 20).join(["alpha", "beta", "gamma", "delta"] * 30)
    unbroken = ",".join(["ab", "cd", "efg"] * 200)  # no whitespace to cut at
    texts = [prose, spaced, "short text", unbroken]
    lengths = token_lengths(load_tokenizer("minilm"), texts)
    assert (lengths[[0, 1, 3]] > 32).all() and lengths[2] < 32
    e = embed_static(texts, static, 32)
    np.testing.assert_allclose(e, expected(texts, static, 32), atol=1e-6)
    assert not np.allclose(e[0], expected(texts[:1], static, 600)[0], atol=1e-3)
    assert static_truncated(texts, static, 32) == 3
    assert static_truncated(texts, static, int(lengths.max())) == 0
    assert static_truncated([], static, 32) == 0


def test_text_without_known_tokens_gets_a_unit_vector(static: str) -> None:
    e = embed_static(["x" * 150, "ok"], static, 32)  # one word over 100 chars is [UNK]
    w = vectors(static)
    np.testing.assert_allclose(e[0], w.mean(0) / np.linalg.norm(w.mean(0)), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)


def test_budget_tokenizer_counts_as_minilm(static: str) -> None:
    """tokens.tokenizer defaults to embed.model: the distilled folder must count (and
    number) tokens exactly as MiniLM does."""
    texts = [*TEXTS, " ".join(TEXTS) * 20]
    np.testing.assert_array_equal(token_counts(texts, static), token_counts(texts, "minilm"))
    assert token_ids(texts, static) == token_ids(texts, "minilm")


def test_embed_texts_dispatches_to_the_static_path(static: str) -> None:
    cfg = EmbedConfig(model=static, max_length=16)
    np.testing.assert_array_equal(embed_texts(TEXTS, cfg), embed_static(TEXTS, static, 16))
    assert truncated_count(TEXTS, cfg) == static_truncated(TEXTS, static, 16)
    assert truncated_count(TEXTS, cfg) == int((token_counts(TEXTS, "minilm") > 16).sum())


def test_cli_distill_embedder(base: str, tmp_path: Path) -> None:
    from samplemix.cli import app

    out = tmp_path / "cli-m2v"
    args = ["distill-embedder", "--base", base, "--out", str(out), "--pca-dims", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and f"--set embed.model={out}" in result.output
    assert is_static(str(out))
    assert embed_static(["hello world"], str(out), 16).shape == (1, 8)
    # the base as the user named it (not where this machine installed it); no MIT card
    assert json.loads((out / "config.json").read_text())["tokenizer_name"] == base
    assert "mit" not in (out / "README.md").read_text().lower().split()
