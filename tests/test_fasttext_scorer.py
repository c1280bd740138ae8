"""Tests for samplemix.scoring.fasttext_scorer: a DCLM-style fastText quality classifier.

Real fastText throughout: models are trained here, in milliseconds, on synthetic
documents whose positives and negatives draw most words from disjoint vocabularies.
Scores are checked against the library's own ``predict`` on the same model.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import fasttext
import numpy as np
import pytest

from samplemix.scoring.fasttext_scorer import (
    BLANK_SCORE,
    FastTextScorer,
    load_fasttext,
    one_line,
    train_fasttext,
)

GOOD = "theorem proof lemma axiom derivation hypothesis evidence analysis method result".split()
BAD = "click buy cheap free offer winner casino discount viagra subscribe".split()
SHARED = "the a of and to in is it that with".split()
# Small and fast: few hash buckets, a small embedding; enough epochs to learn the split.
FAST = {"epoch": 25, "dim": 16, "bucket": 10_000}


def synthetic(vocab: list[str], n: int, rng: random.Random) -> list[str]:
    """``n`` documents of 1-4 lines, each word from ``vocab`` (70%) or SHARED (30%)."""
    docs = []
    for _ in range(n):
        lines = [
            " ".join(rng.choice(vocab if rng.random() < 0.7 else SHARED) for _ in range(8))
            for _ in range(rng.randint(1, 4))
        ]
        docs.append("\n".join(lines))
    return docs


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2."""
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def fasttext_probability(model: fasttext.FastText._FastText, text: str, label: str) -> float:
    """The library's own probability of ``label`` for ``text`` made one line (DCLM)."""
    labels, probs = model.predict(text.replace("\n", " "), k=-1)
    return float(probs[labels.index(label)])


@pytest.fixture(scope="module")
def data() -> dict[str, list[str]]:
    rng = random.Random(0)
    return {
        "train_pos": synthetic(GOOD, 200, rng),
        "train_neg": synthetic(BAD, 200, rng),
        "test_pos": synthetic(GOOD, 100, rng),
        "test_neg": synthetic(BAD, 100, rng),
    }


@pytest.fixture(scope="module")
def model_path(data: dict[str, list[str]], tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("fasttext") / "quality.bin")
    assert train_fasttext(data["train_pos"], data["train_neg"], path, **FAST) == path
    return path


def test_scores_equal_fasttext_predict(model_path: str, data: dict[str, list[str]]) -> None:
    texts = (
        data["test_pos"][:20]
        + data["test_neg"][:20]
        + [
            "theorem\n\nproof\r\nlemma  offer\n",  # blank lines, CRLF, a trailing newline
            "  cheap\tfree casino\n",
            "unknownword",  # no word the model knows
        ]
    )
    assert sum("\n" in t for t in texts) > 10
    model = fasttext.load_model(model_path)
    for label in ("__label__hq", "__label__lq"):
        scores = FastTextScorer(model_path, label=label).score(texts)
        assert scores.dtype == np.float64 and scores.shape == (len(texts),)
        expected = [fasttext_probability(model, t, label) for t in texts]
        np.testing.assert_array_equal(scores, expected)
    # The two labels' probabilities are a softmax (each + fastText's 1e-5 smoothing).
    hq = FastTextScorer(model_path).score(texts)
    lq = FastTextScorer(model_path, label="__label__lq").score(texts)
    np.testing.assert_allclose(hq + lq, 1.0, atol=5e-5)


def test_one_line_is_dclm_flattening() -> None:
    text = "  First line\nsecond\r\nthird\u2028fourth\n\n"
    assert one_line(text) == " ".join(text.strip().splitlines()) == "First line second third fourth"
    assert one_line("abcdef", max_chars=3) == "abc"


def test_blank_texts_score_blank_score(model_path: str) -> None:
    scorer = FastTextScorer(model_path)
    scores = scorer.score(["", " \n\t\r\n", "theorem proof"])
    assert scores[0] == scores[1] == BLANK_SCORE == 0.0
    assert scores[2] > 0.5
    empty = scorer.score([])
    assert empty.dtype == np.float64 and empty.shape == (0,)


def test_text_the_model_cannot_read_scores_blank(tmp_path: Path) -> None:
    # min_count above the line count prunes the end-of-line token; with no word pairs
    # (word_ngrams=1) an unknown word then gives fastText no input and no prediction.
    path = train_fasttext(
        [" ".join(["theorem"] * 50)] * 5,
        [" ".join(["casino"] * 50)] * 5,
        str(tmp_path / "m.bin"),
        min_count=20,
        word_ngrams=1,
        dim=8,
    )
    assert fasttext.load_model(path).predict("unknownword", k=-1)[0] == ()
    scores = FastTextScorer(path).score(["unknownword", "theorem theorem"])
    assert scores[0] == BLANK_SCORE and scores[1] > 0.5


def test_batches_keep_input_order(model_path: str, data: dict[str, list[str]]) -> None:
    texts = (data["test_pos"] + [""] + data["test_neg"]) * 6  # > BATCH non-blank texts
    scorer = FastTextScorer(model_path)
    one_by_one = np.concatenate([scorer.score([t]) for t in texts[:210]])
    np.testing.assert_array_equal(scorer.score(texts)[:210], one_by_one)
    np.testing.assert_array_equal(scorer.score(texts), np.tile(scorer.score(texts[:201]), 6))


def test_max_chars_cuts_and_counts(model_path: str) -> None:
    good = "theorem proof lemma axiom " * 3  # 78 characters
    long = good + "cheap casino viagra offer " * 50
    scorer = FastTextScorer(model_path, max_chars=len(good))
    assert scorer.truncated([good, long, ""]) == 1
    np.testing.assert_array_equal(scorer.score([long]), scorer.score([good]))
    assert scorer.score([long])[0] > FastTextScorer(model_path).score([long])[0]


def test_separates_held_out_documents(model_path: str, data: dict[str, list[str]]) -> None:
    scorer = FastTextScorer(model_path)
    pos, neg = scorer.score(data["test_pos"]), scorer.score(data["test_neg"])
    assert auc(pos, neg) > 0.9
    assert np.all((pos > 0) & (pos <= 1 + 1e-5)) and np.all((neg > 0) & (neg <= 1 + 1e-5))


def test_training_is_deterministic(data: dict[str, list[str]], tmp_path: Path) -> None:
    texts = data["test_pos"] + data["test_neg"]
    scores = []
    for name in ("a.bin", "b.bin"):
        path = train_fasttext(data["train_pos"], data["train_neg"], str(tmp_path / name), **FAST)
        scores.append(FastTextScorer(path).score(texts))
    np.testing.assert_array_equal(scores[0], scores[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]  # no leftovers


def test_training_ignores_leftover_memory(data: dict[str, list[str]], tmp_path: Path) -> None:
    """fastText (since 2024) leaves 9/10 of its input matrix uninitialised when it trains
    on one thread; train_fasttext makes malloc zero-fill it. Freed NaN-filled buffers
    are what malloc would otherwise hand back: training failed with "Encountered NaN"."""
    texts = data["test_pos"] + data["test_neg"]
    clean = train_fasttext(data["train_pos"], data["train_neg"], str(tmp_path / "a.bin"), **FAST)
    for size in (1_000, 50_000, 2_000_000, 20_000):  # as in the failure this reproduces
        dirty = np.full(size, np.nan, dtype=np.float32)
        del dirty
    dirty_path = str(tmp_path / "b.bin")
    train_fasttext(data["train_pos"], data["train_neg"], dirty_path, **FAST)
    np.testing.assert_array_equal(
        FastTextScorer(dirty_path).score(texts), FastTextScorer(clean).score(texts)
    )


def test_label_tokens_in_documents_are_not_labels(tmp_path: Path) -> None:
    path = train_fasttext(
        ["theorem proof __label__spam", "lemma axiom"],
        ["cheap __label__hq casino"],
        str(tmp_path / "m.bin"),
        **FAST,
    )
    assert sorted(load_fasttext(path).labels) == ["__label__hq", "__label__lq"]


def test_missing_label_names_the_models_labels(model_path: str) -> None:
    with pytest.raises(ValueError, match=r"no label '__label__cc'.*__label__hq.*__label__lq"):
        FastTextScorer(model_path, label="__label__cc")


def test_empty_training_inputs(tmp_path: Path) -> None:
    for positives, negatives in (([], ["cheap"]), (["theorem"], []), ([], [])):
        with pytest.raises(ValueError, match="at least one positive and one negative"):
            train_fasttext(positives, negatives, str(tmp_path / "m.bin"))
    assert not any(tmp_path.iterdir())


def test_bad_training_arguments(tmp_path: Path) -> None:
    # bucket=0 with word bigrams would kill the process (fastText divides by zero).
    with pytest.raises(ValueError, match=r"positive arguments; got lr=0\.0, bucket=0$"):
        train_fasttext(["theorem"], ["cheap"], str(tmp_path / "m.bin"), bucket=0, lr=0.0)


def test_model_folder(model_path: str, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .bin or .ftz file"):
        FastTextScorer(str(folder))
    (folder / "quality.bin").symlink_to(model_path)
    assert FastTextScorer(str(folder))._model is FastTextScorer(model_path)._model
    (folder / "other.ftz").symlink_to(model_path)
    with pytest.raises(ValueError, match=r"several model files \['other.ftz', 'quality.bin'\]"):
        FastTextScorer(str(folder))


def test_missing_or_wrong_model_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a file"):
        FastTextScorer(str(tmp_path / "absent.bin"))
    (tmp_path / "words.txt").write_text("alpha beta gamma delta\n" * 20)
    vectors = fasttext.train_unsupervised(
        str(tmp_path / "words.txt"), dim=4, minCount=1, epoch=1, thread=1, verbose=0
    )
    vectors.save_model(str(tmp_path / "vectors.bin"))
    with pytest.raises(ValueError, match="not a supervised classifier"):
        FastTextScorer(str(tmp_path / "vectors.bin"))


def test_model_loaded_once_and_reloaded_when_retrained(
    data: dict[str, list[str]], tmp_path: Path
) -> None:
    path = str(tmp_path / "m.bin")
    train_fasttext(data["train_pos"], data["train_neg"], path, **FAST)
    first = FastTextScorer(path)
    assert FastTextScorer(path)._model is first._model
    train_fasttext(data["train_neg"], data["train_pos"], path, **FAST)  # labels swapped
    second = FastTextScorer(path)
    assert second._model is not first._model
    assert second.score(["theorem proof lemma"])[0] < 0.5 < first.score(["theorem proof lemma"])[0]


def test_pickled_scorer_scores_the_same(model_path: str, data: dict[str, list[str]]) -> None:
    scorer = FastTextScorer(model_path, label="__label__lq", max_chars=40)
    copy = pickle.loads(pickle.dumps(scorer))
    assert (copy.label, copy.max_chars) == ("__label__lq", 40)
    np.testing.assert_array_equal(copy.score(data["test_pos"]), scorer.score(data["test_pos"]))


def test_text_utf8_cannot_encode(model_path: str) -> None:
    scorer = FastTextScorer(model_path)
    scores = scorer.score(["theorem \udcff proof", "cheap casino"])
    np.testing.assert_array_equal(scores, scorer.score(["theorem ? proof", "cheap casino"]))


def test_train_scorer_cli_then_the_quality_stage_scores_with_it(tmp_path: Path) -> None:
    """``samplemix train-scorer --head fasttext`` on a corpus's domains, then a quality
    config naming the .bin: its key hashes the file, and the stage's scorer gives the
    fastText library's probabilities."""
    from conftest import write_tiny_corpus
    from typer.testing import CliRunner

    from samplemix.cli import app
    from samplemix.config import QualityConfig, load_config
    from samplemix.io.corpus import discover_shards, read_docs
    from samplemix.pipeline.keys import quality_key
    from samplemix.scoring.quality import make_scorer

    corpus = write_tiny_corpus(tmp_path / "corpus")
    out = tmp_path / "scorer"
    args = ["train-scorer", "--head", "fasttext", "--positives", "domains:books,reference"]
    unsaid = CliRunner().invoke(app, [*args, "--out", str(out)])  # which corpus's domains?
    assert unsaid.exit_code == 1 and "give it with --input" in unsaid.output
    result = CliRunner().invoke(app, [*args, "--input", str(corpus), "--out", str(out)])
    assert result.exit_code == 0, result.output
    path = out / "fasttext.bin"
    assert f"quality.model={path}" in result.output

    q = QualityConfig(scorer="fasttext", model=str(path))
    cfg = load_config(None, {"corpus.input": str(corpus)})
    shard = discover_shards(cfg.corpus)[0]
    key = quality_key(shard, q, cfg)
    assert key.parts["model_weights"]  # the file's content hash
    texts = read_docs(shard, cfg).docs.column("text").to_pylist()
    scores = make_scorer(q).score(texts)
    model = fasttext.load_model(str(path))
    expected = [fasttext_probability(model, t, "__label__hq") for t in texts]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
