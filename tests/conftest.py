"""Shared fixtures: one local Prefect server per test session, small corpora."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "corpus"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def example_texts(n: int) -> list[str]:
    """``n`` documents of examples/corpus, a quarter from each of four domains."""
    texts: list[str] = []
    for domain in ("books", "code", "reference", "techdocs"):
        table = pq.read_table(EXAMPLES / domain / "part-000.parquet", columns=["text"])
        texts += table.column("text").to_pylist()[: n // 4]
    return texts


@pytest.fixture(scope="session", autouse=True)
def fingerprint_records(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Model fingerprints stored for the session's temporary models go to a temporary
    folder, not the home's cache."""
    from samplemix.scoring import models

    models.FINGERPRINTS = tmp_path_factory.mktemp("fingerprints")


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """A real Prefect API on 127.0.0.1 for the whole session (flows.runtime.prefect_api)."""
    from flows.runtime import prefect_api

    with prefect_api() as url:
        yield url


@pytest.fixture(scope="session")
def cluster(prefect_server: str) -> Iterator[dict]:
    """One local Dask cluster for the session's flow tests, as a team's long-lived
    cluster (``compute.scheduler_address``): its workers start, import torch and load
    MiniLM once instead of once per run (~10 s of a tiny run's ~30 s). Yields the
    overrides that point a ``tiny_config`` at it. Tests that kill workers, set
    environment variables for them or vary the worker count start their own."""
    from flows.runtime import shared_cluster

    with shared_cluster(tiny_config(Path("corpus"), Path("out"))) as cfg:
        c = cfg.compute
        yield {
            "compute.scheduler_address": c.scheduler_address,
            "compute.torch_threads": c.torch_threads,
        }


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module's tests (use with pytest.mark.usefixtures): tiny
    models run faster on one thread than on two OpenMP threads on a busy 2-core machine
    (distilling a tiny BERT: 3.1 s vs 23.6 s)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 120.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` if it has not after
    ``timeout`` s (the limit guards against a hang, it is not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.1)


def tiny_settings(corpus: Path, out: Path) -> dict[str, object]:
    """The overrides of a fast flow test: MiniLM at 32 tokens, K = 3, 2 local workers."""
    return {
        "corpus.input": str(corpus),
        "output.path": str(out),
        "embed.max_length": 32,
        "kmeans.k": 3,
        "mixing.budget_ratio": 0.8,
        "compute.n_workers": 2,
    }


def tiny_config(corpus: Path, out: Path, **overrides: object):  # noqa: ANN201 - a Config
    """The config of ``tiny_settings`` with ``overrides``."""
    from samplemix.config import load_config

    return load_config(None, {**tiny_settings(corpus, out), **overrides})


@pytest.fixture(scope="module")
def moto():  # noqa: ANN201 - Iterator[s3.MotoServer]
    """moto's standalone S3 server on 127.0.0.1 for a module, with the bucket ``mix``."""
    from s3 import MotoServer

    with MotoServer() as server:
        server.create_bucket("mix")
        yield server


@pytest.fixture
def proxy(moto):  # noqa: ANN001, ANN201 - Iterator[s3.FlakyProxy]
    """A TCP proxy in front of ``moto`` that a test can cut and restore."""
    from s3 import FlakyProxy

    with FlakyProxy(moto.host, moto.port) as p:
        yield p


def write_tiny_corpus(root: Path, docs_per_domain: int = 16, shards_per_domain: int = 2) -> Path:
    """Copy the first ``docs_per_domain`` documents of three example domains into
    ``root/{domain}/part-*.parquet``, split into ``shards_per_domain`` shards."""
    for domain in ("books", "code", "reference"):
        table = pq.read_table(EXAMPLES / domain / "part-000.parquet").slice(0, docs_per_domain)
        (root / domain).mkdir(parents=True, exist_ok=True)
        step = -(-docs_per_domain // shards_per_domain)
        for i in range(shards_per_domain):
            pq.write_table(table.slice(i * step, step), root / domain / f"part-{i:03d}.parquet")
    return root


def save_tiny_classifier(  # noqa: ANN201
    path: Path, num_labels: int, id2label: dict[int, str] | None = None, seed: int = 0
):
    """A 2-layer BERT classifier (random weights drawn with ``seed``, MiniLM's tokenizer)
    saved to ``path``; returns the model (transformers BertForSequenceClassification)."""
    import torch
    from transformers import BertForSequenceClassification

    from samplemix.scoring.models import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    torch.manual_seed(seed)
    config = tiny_bert_config(
        len(tokenizer),
        num_labels=num_labels,
        initializer_range=0.5,  # large weights so texts get clearly different logits
        **({"id2label": id2label} if id2label else {}),
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def tiny_bert_config(vocab_size: int, **extra: object):  # noqa: ANN201 - a BertConfig
    """A 2-layer, width-32 BERT: fast enough to train and run in tests."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        **extra,
    )


def save_tiny_encoder(path: Path) -> str:
    """A tiny BERT encoder (no head, like MiniLM) with MiniLM's tokenizer saved to
    ``path``; returns the path."""
    import torch
    from transformers import BertModel

    from samplemix.scoring.models import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    torch.manual_seed(0)
    BertModel(tiny_bert_config(len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


JUNK_IDS = ["symbols", "repeated-lines", "all-caps", "bullets"]


def junk_texts(clean: str) -> list[str]:
    """Texts every quality heuristic must score below ``clean`` prose, as ``JUNK_IDS``
    name them: symbols, one repeated line, ``clean`` in capitals, a bullet list."""
    return [
        "#### $$$ %%% @@@ !!! *** &&& ^^^ ~~~ ### ... ... ...",
        "click here to subscribe\n" * 30,
        clean.upper(),
        "\n".join(f"- item number {i} on the list" for i in range(40)),
    ]
