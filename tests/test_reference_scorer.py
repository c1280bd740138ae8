"""The DSIR-style reference scorer (samplemix.scoring.reference): real counting and
hashing, checked against an independent pure-Python implementation of the feature spec."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from samplemix.scoring import reference as ref
from samplemix.scoring.reference import ReferenceModel, fit_reference, ngram_buckets

# ------------------------------------------------- the feature spec, in plain Python

M64 = 2**64
P = 0x100000001B3
SALT1, SALT2 = 0x9E3779B97F4A7C15, 0xD6E8FEB86659FD93


def mix(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % M64
    return x ^ (x >> 31)


def token_hash(token: str) -> int:
    h = 0
    for byte in token.encode():
        h = (h * P + byte) % M64
    return h


def slow_buckets(text: str, buckets: int, max_chars: int = ref.MAX_CHARS) -> list[int]:
    """One text's n-gram buckets: its unigrams in order, then its bigrams in order."""
    hashes = [token_hash(t) for t in re.findall("[a-z0-9]+", text[:max_chars].lower())]
    unigrams = [mix(h ^ SALT1) for h in hashes]
    bigrams = [mix(((u * P) % M64) ^ h ^ SALT2) for u, h in zip(unigrams, hashes[1:], strict=False)]
    return [k % buckets for k in unigrams + bigrams]


def slow_log_ratio(reference: list[str], background: list[str], buckets: int, a: float):
    def log_p(texts: list[str]) -> list[float]:
        counts = [0] * buckets
        for text in texts:
            for k in slow_buckets(text, buckets):
                counts[k] += 1
        total = sum(counts)
        return [math.log((c + a) / (total + a * buckets)) for c in counts]

    return [r - b for r, b in zip(log_p(reference), log_p(background), strict=True)]


TEXTS = [
    "Hello, World! 42 hello",
    "",
    "   ...   ",
    "one",
    "Ünïcode café naïve İstanbul straße — don't stop",
    "x_y z\ta\nb",
]

# ------------------------------------------------------------------------------ tests


def test_buckets_match_plain_python_spec() -> None:
    keys, doc = ngram_buckets(TEXTS, 1000)
    expected = [slow_buckets(t, 1000) for t in TEXTS]
    assert keys.dtype == np.int64 and doc.dtype == np.int64
    assert keys.tolist() == [k for ks in expected for k in ks]
    assert doc.tolist() == [i for i, ks in enumerate(expected) for _ in ks]
    # n tokens give n unigrams and n - 1 bigrams; only ASCII letters and digits make tokens
    # (lowercased), so "café" gives "caf" and "İstanbul" gives "i", "stanbul"
    assert (np.bincount(doc, minlength=len(TEXTS)) == [7, 0, 0, 1, 23, 9]).all()


def test_hash_is_pinned() -> None:
    """Golden values: a change of the hash must also change TOKENIZER_VERSION."""
    keys, _ = ngram_buckets(["Hello, World! 42", "DSIR ftw"], 2**18)
    assert keys.tolist() == [180374, 151796, 110033, 51078, 232884, 258236, 193310, 215837]


def test_hash_is_stable_across_processes() -> None:
    code = (
        "import json; from samplemix.scoring.reference import ngram_buckets, fit_reference;"
        f"t = {TEXTS!r};"
        "print(json.dumps([ngram_buckets(t, 2**18)[0].tolist(),"
        " fit_reference(t, t[::-1] + ['x'], buckets=4096).fingerprint()]))"
    )
    here = [
        ngram_buckets(TEXTS, 2**18)[0].tolist(),
        fit_reference(TEXTS, TEXTS[::-1] + ["x"], buckets=4096).fingerprint(),
    ]
    root = Path(__file__).resolve().parents[1]
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == here


ASTRONOMY = [
    "The telescope observed a distant galaxy and its bright spiral arms.",
    "Astronomers measured the orbit of the planet around its star.",
    "A supernova in the galaxy outshone every star for weeks.",
    "The moon and the planet Jupiter rose before the stars faded.",
    "Dark matter shapes how each galaxy rotates, astronomers say.",
]
OTHER = [
    "Whisk the eggs with sugar, then fold in the flour and bake the cake.",
    "The striker scored a late goal and the team won the league.",
    "Shares fell as the bank raised interest rates again this quarter.",
    "Simmer the onions in butter and season the soup with salt.",
]


def test_ranks_reference_like_document_first() -> None:
    model = fit_reference(ASTRONOMY, ASTRONOMY + OTHER, buckets=2**12)
    space, cooking = model.score(
        [
            "Astronomers pointed the telescope at a star in a distant galaxy.",
            "Season the butter cake batter with salt and bake with sugar.",
        ]
    )
    assert space > cooking


def test_fit_and_score_match_hand_computation() -> None:
    reference, background = ["a b a", "c"], ["a b", "d e f", "c c"]
    buckets, a = 5, 0.5
    model = fit_reference(reference, background, buckets=buckets, smoothing=a)
    expected = slow_log_ratio(reference, background, buckets, a)
    np.testing.assert_allclose(model.log_ratio, expected, rtol=1e-12)
    docs = ["A, b! c a", "f", "?!", "a b c d e f a b"]
    want = [
        float(np.mean([expected[k] for k in slow_buckets(d, buckets)])) if slow_buckets(d, 5) else 0
        for d in docs
    ]
    got = model.score(docs)
    assert got.dtype == np.float64 and got.shape == (4,)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[2] == 0.0
    # "f" is one unigram: its score is exactly that bucket's log ratio
    assert got[1] == expected[slow_buckets("f", buckets)[0]]


def test_streaming_and_chunking_do_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = [f"{ASTRONOMY[i % 5]} {OTHER[i % 4]} {i}" for i in range(60)]
    whole = fit_reference(ASTRONOMY, docs, buckets=256)
    scores = whole.score(docs)
    monkeypatch.setattr(ref, "_CHUNK_CHARS", 300)  # a few texts per numpy pass
    streamed = fit_reference(iter(ASTRONOMY), (d for d in docs), buckets=256)
    np.testing.assert_array_equal(streamed.log_ratio, whole.log_ratio)
    np.testing.assert_array_equal(streamed.score(docs), scores)


def test_empty_sets_raise_and_empty_documents_score_zero() -> None:
    with pytest.raises(ValueError):
        fit_reference([], ["a"])
    with pytest.raises(ValueError):
        fit_reference(["a"], iter([]))
    with pytest.raises(ValueError):
        fit_reference(["a"], ["b"], smoothing=0)
    model = fit_reference(ASTRONOMY, OTHER, buckets=64)
    assert model.score(["", "  \n", "— … ✓"]).tolist() == [0.0, 0.0, 0.0]
    assert model.score([]).shape == (0,)
    # a text of only empty strings still fits (no n-grams: every bucket equally likely)
    assert np.all(fit_reference([""], ["a"], buckets=4).log_ratio != 0)


def test_truncation_reads_only_the_prefix() -> None:
    model = fit_reference(ASTRONOMY, OTHER, buckets=64, max_chars=20)
    short = "Astronomers measured"  # exactly max_chars
    assert model.score([short + " cake cake soup"])[0] == model.score([short + "x"])[0]
    assert model.truncated([short, short + "x" * 2, "a" * 20]) == 1


def test_save_load_round_trip_and_fingerprint(tmp_path: Path) -> None:
    model = fit_reference(ASTRONOMY, ASTRONOMY + OTHER, buckets=512, max_chars=5000)
    path = tmp_path / "ref.npz"
    model.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]
    loaded = ReferenceModel.load(path)
    assert loaded.log_ratio.tobytes() == model.log_ratio.tobytes()
    assert (loaded.buckets, loaded.max_chars) == (512, 5000)
    assert loaded.fingerprint() == model.fingerprint()
    assert len(model.fingerprint()) == 16
    np.testing.assert_array_equal(loaded.score(OTHER), model.score(OTHER))

    changed = ReferenceModel(model.log_ratio.copy(), model.max_chars)
    assert changed.fingerprint() == model.fingerprint()
    changed.log_ratio[7] += 1e-9
    assert changed.fingerprint() != model.fingerprint()
    assert ReferenceModel(model.log_ratio, 4999).fingerprint() != model.fingerprint()
    other = fit_reference(OTHER, ASTRONOMY + OTHER, buckets=512, max_chars=5000)
    assert other.fingerprint() != model.fingerprint()

    settings = {"tokenizer": "something-else", "orders": [1, 2], "max_chars": 1}
    np.savez(tmp_path / "old.npz", log_ratio=np.zeros(4), settings=json.dumps(settings))
    with pytest.raises(ValueError, match="differ"):
        ReferenceModel.load(tmp_path / "old.npz")


def test_a_run_fits_the_reference_once_and_reuses_it(tmp_path: Path) -> None:
    """``quality.scorer: reference`` in a whole run (the in-process runner): the fit is a
    stage of its own, committed once; the books-and-reference scorer puts those domains
    above code; a rerun computes nothing; other reference domains refit and rescore
    only."""
    from conftest import tiny_config, write_tiny_corpus

    from samplemix.pipeline.walk import run_in_process

    corpus = write_tiny_corpus(tmp_path / "corpus")
    scorer = {"scorer": "reference", "reference": ["books", "reference"]}
    cfg = tiny_config(corpus, tmp_path / "out", quality=[scorer])
    first = run_in_process(cfg)
    assert first["computed"]["reference"] == 1
    assert first["computed"]["quality"] == 6
    plan = pq.read_table(sorted((tmp_path / "out" / "plan").glob("*.parquet"))).to_pydict()
    by_domain: dict[str, list[float]] = {}
    for domain, q in zip(plan["domain"], plan["quality"], strict=True):
        by_domain.setdefault(domain, []).append(q)
    mean = {d: float(np.mean(v)) for d, v in by_domain.items()}
    assert min(mean["books"], mean["reference"]) > mean["code"]

    again = run_in_process(cfg)
    assert set(again["computed"].values()) == {0}
    other = tiny_config(
        corpus, tmp_path / "out", quality=[{"scorer": "reference", "reference": ["code"]}]
    )
    changed = run_in_process(other)
    assert changed["computed"]["reference"] == 1
    assert changed["computed"]["quality"] == 6
    assert changed["computed"]["tokens"] == changed["computed"]["embed"] == 0


def test_the_reference_scorer_needs_its_domains() -> None:
    from samplemix.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="needs quality.reference"):
        load_config(None, {"corpus.input": "x", "quality": {"scorer": "reference"}})
    with pytest.raises(ConfigError, match="for the scorers reference and embedding-probe"):
        load_config(None, {"corpus.input": "x", "quality": {"reference": ["books"]}})
