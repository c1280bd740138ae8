"""The GPU execution path: overlapped batching, GPU worker layout and resource routing
(runnable without CUDA), and the CUDA-only checks, which skip cleanly without a GPU."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    EXAMPLES,
    example_texts,
    save_tiny_classifier,
    save_tiny_encoder,
    tiny_config,
    write_tiny_corpus,
)

from flows.mix import run_mix
from flows.runtime import gpu_cluster, local_cluster
from samplemix.config import ConfigError, EmbedConfig, QualityConfig
from samplemix.mixing import kmeans
from samplemix.scoring import models
from samplemix.scoring.embed import embed_texts
from samplemix.scoring.quality import make_scorer

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def test_prefetched_keeps_order_and_raises_the_producers_error() -> None:
    assert list(models.prefetched(iter(range(100)), depth=3)) == list(range(100))

    def failing():  # noqa: ANN202
        yield 1
        raise ValueError("bad batch 2")

    got = []
    with pytest.raises(ValueError, match="bad batch 2"):
        for x in models.prefetched(failing(), depth=2):
            got.append(x)
    assert got == [1]


def test_prefetched_stops_its_thread_when_the_consumer_stops() -> None:
    before = threading.active_count()
    it = models.prefetched(iter(range(10**6)), depth=2)
    assert next(it) == 0
    it.close()
    assert threading.active_count() == before


def test_overlapped_batches_hold_the_same_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked, threaded batching gives every document once, with the tokens the plain
    path gives it; batches stay within the token budget."""
    monkeypatch.setattr(models, "OVERLAP_CHUNK", 7)
    tok = models.load_tokenizer("minilm")
    texts = example_texts(40)

    def rows(overlap: bool) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for idx, enc in models.device_batches(
            tok, texts, 64, 512, torch.device("cpu"), overlap=overlap
        ):
            assert enc["input_ids"].numel() <= max(512, enc["input_ids"].shape[1])
            for r, i in enumerate(idx.tolist()):
                assert i not in out
                n = int(enc["attention_mask"][r].sum())
                out[i] = enc["input_ids"][r, :n].tolist()
        return out

    plain, overlapped = rows(False), rows(True)
    assert sorted(overlapped) == list(range(len(texts)))
    assert overlapped == plain


def test_scores_do_not_depend_on_overlap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_tiny_classifier(tmp_path / "clf", num_labels=1)
    cfg = QualityConfig(scorer="hf-classifier", model=str(tmp_path / "clf"), max_length=64)
    texts = example_texts(24)
    plain = make_scorer(cfg).score(texts)
    monkeypatch.setattr(models, "OVERLAP_CHUNK", 5)
    real = models.device_batches
    monkeypatch.setattr(
        "samplemix.scoring.quality.device_batches",
        lambda *a, **k: real(*a, **k, overlap=True),
    )
    np.testing.assert_allclose(make_scorer(cfg).score(texts), plain, rtol=1e-5, atol=1e-6)


def test_gpu_cluster_layout() -> None:
    cls, kwargs = gpu_cluster(3, ["0", "2"])
    spec = kwargs["workers"]
    assert cls.__name__ == "SpecCluster"
    assert sorted(spec) == ["cpu-0", "cpu-1", "cpu-2", "gpu-0", "gpu-2"]
    for name, w in spec.items():
        opts = w["options"]
        assert opts["nthreads"] == 1
        if name.startswith("gpu-"):
            assert opts["env"]["CUDA_VISIBLE_DEVICES"] == name.removeprefix("gpu-")
            assert opts["resources"] == {"GPU": 1}
        else:
            assert opts["env"]["CUDA_VISIBLE_DEVICES"] == ""
            assert opts["resources"] == {}


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_more_gpus_than_present_is_a_config_error(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, tmp_path / "out", **{"compute.gpus": 1})
    with pytest.raises(ConfigError, match=r"compute.gpus = 1 .* 0 CUDA device"):
        local_cluster(cfg)


def test_model_stages_run_on_gpu_workers_only(tmp_path: Path, prefect_server: str) -> None:
    """A cluster of one CPU worker and one worker advertising GPU=1 (here without a
    real device: the resource is what routes tasks): with compute.gpus, every embed
    and model-quality task runs on the GPU worker; the CPU stages may run anywhere, and
    do use the CPU worker."""
    from distributed import Client, get_task_stream

    save_tiny_classifier(tmp_path / "clf", num_labels=1)
    corpus = write_tiny_corpus(tmp_path / "corpus")
    cls, kwargs = gpu_cluster(1, ["none"])
    with cls(**kwargs) as cluster, Client(cluster) as client:
        gpu_worker = next(
            a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "gpu-none"
        )
        cfg = tiny_config(
            corpus,
            tmp_path / "out",
            **{
                "compute.scheduler_address": cluster.scheduler_address,
                "compute.gpus": 1,
                "quality": {"scorer": "hf-classifier", "model": str(tmp_path / "clf")},
            },
        )
        with get_task_stream(client) as stream:
            summary = run_mix(cfg)
        assert summary["computed"]["embed"] == 6
        ran: dict[str, set[str]] = {}
        for t in stream.data:
            ran.setdefault(t["key"].split("-")[0], set()).add(t["worker"])
        assert ran["embed"] == ran["quality"] == {gpu_worker}
        cpu_stages = set().union(*(w for s, w in ran.items() if s not in ("embed", "quality")))
        assert cpu_stages - {gpu_worker}  # the CPU worker took the CPU stages' work


def test_compiled_models_give_the_eager_results_under_the_same_keys(tmp_path: Path) -> None:
    """``compile: true`` runs torch.compile'd models (a tiny one here, on the CPU) that
    embed as the eager ones do; it is an execution setting, so the cache keys do not
    change."""
    from torch._dynamo.eval_frame import OptimizedModule

    from samplemix.config import load_config
    from samplemix.io.corpus import discover_shards
    from samplemix.pipeline.keys import embed_key, quality_key

    texts = example_texts(24)
    encoder = save_tiny_encoder(tmp_path / "enc")
    # fp32 on every CPU: the precision CPU scorers always run in, on OneDNNLinear layers.
    eager = EmbedConfig(model=encoder, max_length=64, dtype="float32")
    compiled = eager.model_copy(update={"compile": True})
    cos = np.sum(embed_texts(texts, eager) * embed_texts(texts, compiled), axis=1)
    assert isinstance(models.load_model(encoder, "encoder", compile=True), OptimizedModule)
    assert cos.min() >= 0.9999

    save_tiny_classifier(tmp_path / "clf", num_labels=1)
    q = QualityConfig(scorer="hf-classifier", model=str(tmp_path / "clf"), max_length=64)
    qc = q.model_copy(update={"compile": True})
    # The scorer's model is loaded the same way; compiling it too would double the cost.
    assert isinstance(make_scorer(qc)._runner.model, OptimizedModule)

    cfg = load_config(None, {"corpus.input": str(EXAMPLES), "embed.model": encoder})
    shard = discover_shards(cfg.corpus)[0]
    on = cfg.model_copy(update={"embed": cfg.embed.model_copy(update={"compile": True})})
    assert embed_key(shard, on) == embed_key(shard, cfg)
    assert quality_key(shard, qc, cfg) == quality_key(shard, q, cfg)


@needs_cuda
@pytest.mark.parametrize("compile", [False, True])
def test_gpu_bf16_embeddings_match_cpu_fp32(compile: bool) -> None:  # noqa: A002
    texts = example_texts(200)
    cpu = embed_texts(texts, EmbedConfig(device="cpu", dtype="float32"))
    gpu = embed_texts(texts, EmbedConfig(device="cuda", dtype="bfloat16", compile=compile))
    assert np.sum(cpu * gpu, axis=1).min() >= 0.999


@needs_cuda
def test_gpu_bf16_quality_ranks_match_cpu_fp32(tmp_path: Path) -> None:
    from scipy.stats import spearmanr

    save_tiny_classifier(tmp_path / "clf", num_labels=1)
    texts = example_texts(200)
    base = {"scorer": "hf-classifier", "model": str(tmp_path / "clf"), "max_length": 128}
    cpu = make_scorer(QualityConfig(**base, device="cpu")).score(texts)
    gpu = make_scorer(QualityConfig(**base, device="cuda")).score(texts)
    assert spearmanr(cpu, gpu).statistic >= 0.99


@pytest.mark.skipif(kmeans.gpus() == 0, reason="needs faiss-gpu and a CUDA device")
def test_faiss_gpu_kmeans_finds_planted_clusters() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 64)).astype(np.float32)
    labels = rng.integers(0, 8, 4000)
    x = centres[labels] + 0.05 * rng.normal(size=(4000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cl, dist = kmeans.assign(x, kmeans.fit_centroids(x, 8, niter=20, seed=0, nredo=3))
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(labels, cl) > 0.99
    assert dist.min() >= 0


@needs_cuda
def test_local_gpu_cluster_runs_the_flow(tmp_path: Path, prefect_server: str) -> None:
    corpus = write_tiny_corpus(tmp_path / "corpus")
    cfg = tiny_config(corpus, tmp_path / "out", **{"compute.gpus": 1, "compute.n_workers": 1})
    summary = run_mix(cfg)
    assert summary["computed"]["embed"] == 6
    stored = list((tmp_path / "out" / "store" / "embed").glob("*/_done.json"))
    assert stored and all('"device": "cuda"' in p.read_text() for p in stored)
