"""Model inputs read from each text's start give exactly the tokens, and the truncation
counts, that tokenising the whole text gives (models.prefixes and its callers)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from conftest import EXAMPLES

from samplemix.scoring import models


def corpus_texts() -> list[str]:
    texts: list[str] = []
    for domain in ("books", "code", "reference", "techdocs", "gov"):
        table = pq.read_table(EXAMPLES / domain / "part-000.parquet", columns=["text"])
        texts += table.column("text").to_pylist()[:40]
    return texts + [
        "x" * 5000,  # no whitespace: never cut
        "a" + " " * 5000 + "b c d",  # a whitespace run across the cut
        "\n".join(["def f():", "\treturn 1"] * 300),
        "short",
        "",
    ]


def bytelevel_bpe():  # noqa: ANN201 - a transformers tokenizer
    """A GPT-2-style byte-level BPE (no special tokens added) trained on the texts."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tm
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tm.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus_texts(), trainers.BpeTrainer(vocab_size=600))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


@pytest.fixture(params=["minilm", "bytelevel"])
def tokenizer(request: pytest.FixtureRequest):  # noqa: ANN201
    return models.load_tokenizer("minilm") if request.param == "minilm" else bytelevel_bpe()


@pytest.mark.parametrize("max_length", [16, 64])
def test_prefix_tokens_equal_whole_text_tokens(
    tokenizer,  # noqa: ANN001
    max_length: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 3 characters per token cuts most texts, and leaves some prefixes too short, so both
    # the cut path and the fallback to the whole text run.
    monkeypatch.setattr(models, "CHARS_PER_TOKEN", 3)
    texts = corpus_texts()
    cut, was_cut = models.prefixes(texts, max_length)
    assert 0 < was_cut.sum() < len(texts)
    whole = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    got: dict[int, list[int]] = {}
    for idx, enc in models.length_sorted_batches(tokenizer, texts, max_length, 256):
        for r, i in enumerate(idx.tolist()):
            got[i] = enc["input_ids"][r, : int(enc["attention_mask"][r].sum())].tolist()
    assert [got[i] for i in range(len(texts))] == whole
    specials = tokenizer.backend_tokenizer.num_special_tokens_to_add(False)
    lengths = models.token_lengths(tokenizer, texts)
    assert models.count_truncated(tokenizer, texts, max_length) == int(
        (lengths + specials > max_length).sum()
    )


def test_prefixes_cut_at_the_last_whitespace_before_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(models, "CHARS_PER_TOKEN", 10)
    cut, was_cut = models.prefixes(["aaaa bbbb cccc", "zzzzzzzzzzzz", "ab", "a\tb\nccccccccc"], 1)
    assert cut == ["aaaa bbbb", "zzzzzzzzzzzz", "ab", "a\tb"]
    assert was_cut.tolist() == [True, False, False, True]  # no whitespace: read whole
