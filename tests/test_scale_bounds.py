"""Bounds that hold at any corpus size (issue 28, items 1 and 2): mixture parts sized in
bytes (``output.max_part_bytes``), and a k-means fit on a sample bounded whatever N
(``kmeans.max_sample``), read row by row; both the same however the corpus is sharded."""

from __future__ import annotations

import ctypes
import gc
import math
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import save_tiny_encoder
from s3 import KEY, REGION, SECRET

from samplemix.config import Config, ConfigError, load_config, parse_bytes
from samplemix.io.mixture_shards import bucket_count
from samplemix.io.store import Key, Output, Store, artifact_key
from samplemix.mixing.kmeans import auto_k, fit_sample_rows
from samplemix.mixing.weights import doc_uniforms
from samplemix.pipeline import keys, stages
from samplemix.pipeline.walk import run_in_process

# ---- sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "size"),
    [
        (4_000_000, 4_000_000),
        ("4MB", 4_000_000),
        (" 4 mb ", 4_000_000),
        ("4M", 4_000_000),
        ("256 MiB", 256 * 2**20),
        ("1GB", 10**9),
        ("1.5GiB", 3 * 2**29),
        ("64KiB", 65_536),
        ("2kB", 2_000),
        ("512", 512),
        ("512B", 512),
        ("1TB", 10**12),
        (2.5e6, 2_500_000),
    ],
)
def test_sizes_parse_to_bytes(given: int | float | str, size: int) -> None:
    assert parse_bytes(given) == size


@pytest.mark.parametrize("bad", ["4XB", "MB", "", "-1MB", "0", 0, 0.5, "4 M B", "1e3MB", True, [4]])
def test_a_bad_size_names_output_max_part_bytes(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"output\.max_part_bytes"):
        load_config(None, {"corpus.input": "x", "output.max_part_bytes": bad})


def test_parts_default_to_256_mib_and_rows_are_not_bounded() -> None:
    out = load_config(None, {"corpus.input": "x"}).output
    assert out.max_part_bytes == 256 * 2**20
    assert out.rows_per_shard is None
    assert (
        load_config(
            None, {"corpus.input": "x", "output.max_part_bytes": "4MB"}
        ).output.max_part_bytes
        == 4_000_000
    )


@pytest.mark.parametrize(
    ("nbytes", "limit", "rows", "rows_per_part", "parts"),
    [
        (0, 100, 0, None, 1),  # an empty mixture still has one (empty) part
        (100, 100, 1, None, 1),  # an exact multiple adds no part
        (101, 100, 1, None, 2),
        (250.5, 100, 3, None, 3),
        (250.5, 100, 3, 2, 3),  # the bytes bound decides
        (250.5, 1_000, 7, 2, 4),  # the rows bound decides
        (4e12, 256 * 2**20, 1e9, None, 14_902),  # 10^9 copies of 4 kB
    ],
)
def test_bucket_count_from_bytes_and_rows(
    nbytes: float, limit: int, rows: float, rows_per_part: int | None, parts: int
) -> None:
    assert bucket_count(nbytes, limit, rows, rows_per_part) == parts


# ---- a mix in process: parts bounded in bytes --------------------------------------------

DOMAINS = ("news", "forum", "wiki")
DOCS_PER_DOMAIN = 160
LIMIT = 24_000  # bytes: about 6 parts of this corpus at its own size
# A copy's fixed-width bytes in a part as a worker holds it (Arrow): the offsets of id,
# domain and text (3 x 4), copy (int32), quality, diversity, weight (3 x float64) and
# the shuffle key (uint64).
ROW_FIXED = 3 * 4 + 4 + 3 * 8 + 8


def corpus_docs() -> dict[str, pa.Table]:
    """Per domain, documents of 20-120 words drawn from a small vocabulary (seeded)."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i:03d}" for i in range(300)] + ["the", "a", "of", "and", "to", "in"]
    out = {}
    for d in DOMAINS:
        texts = [
            " ".join(rng.choice(vocab, size=int(rng.integers(20, 120)))).capitalize() + "."
            for _ in range(DOCS_PER_DOMAIN)
        ]
        out[d] = pa.table({"id": [f"{d}-{i}" for i in range(DOCS_PER_DOMAIN)], "text": texts})
    return out


def write_corpus(root: Path, per_shard: int) -> Path:
    """``corpus_docs`` under ``root/{domain}/part-*.parquet``, ``per_shard`` to a shard."""
    for d, table in corpus_docs().items():
        (root / d).mkdir(parents=True)
        for i, start in enumerate(range(0, table.num_rows, per_shard)):
            pq.write_table(table.slice(start, per_shard), root / d / f"part-{i:03d}.parquet")
    return root


@pytest.fixture(scope="module")
def mixes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Config, dict]]:
    """One corpus mixed three times, each into its own store and output: sharded by 40
    documents, the same again (a rerun from nothing), and sharded by 64."""
    root = tmp_path_factory.mktemp("scale")
    encoder = save_tiny_encoder(root / "encoder")
    runs = {}
    for name, per_shard in (("by40", 40), ("by40-again", 40), ("by64", 64)):
        corpus = write_corpus(root / f"corpus-{name}", per_shard)
        settings = {
            "corpus.input": str(corpus),
            "output.path": str(root / f"out-{name}"),
            "output.max_part_bytes": LIMIT,
            "embed.model": encoder,
            "embed.max_length": 32,
            "kmeans.k": 3,
            "kmeans.max_sample": 50,  # < the 480 documents, < 64 · K
        }
        cfg = load_config(None, settings)
        runs[name] = (cfg, run_in_process(cfg))
    return runs


def parts_of(cfg: Config) -> list[pa.Table]:
    return [pq.read_table(p) for p in sorted(Path(cfg.output.path, "mixture").glob("*.parquet"))]


def copy_sizes(table: pa.Table) -> np.ndarray:
    """Bytes of each row of a table with id, domain and text, as a worker holds it."""
    variable = sum(
        np.array([len(v.encode()) for v in table.column(c).to_pylist()])
        for c in ("id", "domain", "text")
    )
    return variable + ROW_FIXED


def test_parts_are_bounded_in_bytes_and_counted_from_the_plan(mixes: dict) -> None:
    cfg, summary = mixes["by40"]
    plan = pq.read_table(sorted(Path(cfg.output.path, "plan").glob("*.parquet")))
    docs = pa.concat_tables(
        t.append_column("domain", pa.array([d] * t.num_rows)) for d, t in corpus_docs().items()
    )
    size = dict(zip(docs.column("id").to_pylist(), copy_sizes(docs).tolist(), strict=True))
    expected = sum(
        c * size[i]
        for i, c in zip(
            plan.column("id").to_pylist(), plan.column("expected_count").to_pylist(), strict=True
        )
    )
    parts = parts_of(cfg)
    assert summary["mixture_parts"] == len(parts) == math.ceil(expected / LIMIT) >= 4
    part_bytes = [int(copy_sizes(p).sum()) for p in parts]
    realised = sum(part_bytes)
    assert realised == pytest.approx(expected, rel=0.05)  # n(x) = c(x) rounded at random
    # The hash sends each copy to a part at random: parts spread around their mean
    # (at most LIMIT) by about 1/sqrt(rows per part), ~13% at the ~60 rows here.
    assert max(part_bytes) <= 1.35 * realised / len(parts)
    assert max(part_bytes) <= 1.35 * LIMIT
    # All of it, gathered in one part, would be several times the limit.
    assert realised > 4 * LIMIT


def test_a_rerun_writes_the_same_bytes(mixes: dict) -> None:
    first, again = (
        [p.read_bytes() for p in sorted(Path(mixes[n][0].output.path, "mixture").iterdir())]
        for n in ("by40", "by40-again")
    )
    assert len(first) > 1
    assert first == again


def test_another_sharding_puts_the_same_copies_in_the_same_parts_in_order(mixes: dict) -> None:
    by40, by64 = parts_of(mixes["by40"][0]), parts_of(mixes["by64"][0])
    assert len(by40) == len(by64) > 1
    for p, q in zip(by40, by64, strict=True):
        for column in ("id", "copy", "domain", "text", "quality"):
            assert p.column(column).equals(q.column(column))
        # Cluster statistics are sums over shards: equal up to rounding.
        for column in ("diversity", "weight"):
            np.testing.assert_allclose(p.column(column), q.column(column), rtol=1e-12)


# ---- k-means: a bounded sample, the same however the corpus is sharded ----------------


def test_the_fit_sample_is_capped_and_the_same_whatever_the_sharding(mixes: dict) -> None:
    centroids = []
    for name in ("by40", "by64"):
        cfg, summary = mixes[name]
        store = keys.store_for(cfg)
        (kid,) = [a.split("/", 1)[1] for a in summary["artifacts"] if a.startswith("kmeans/")]
        km = Key("kmeans", kid, {})
        assert store.summary(km) == {"k": 3, "sample": 50}
        centroids.append(store.get_array(km, "centroids.npy"))
    np.testing.assert_array_equal(*centroids)


def sampled_ids(shards: list[list[str]], size: int, seed: int = 0) -> list[str]:
    picks = fit_sample_rows(iter(shards), size, sum(map(len, shards)), seed)
    sample: list[str | None] = [None] * sum(len(rows) for rows, _ in picks)
    for ids, (rows, slots) in zip(shards, picks, strict=True):
        for row, slot in zip(rows.tolist(), slots.tolist(), strict=True):
            sample[slot] = ids[row]
    assert None not in sample
    return sample  # type: ignore[return-value]


def test_fit_sample_rows_take_the_smallest_uniforms_in_their_order() -> None:
    ids = [f"doc-{i}" for i in range(5_000)]
    smallest = [ids[i] for i in np.argsort(doc_uniforms(ids, 7, "kmeans"))[:300]]
    assert sampled_ids([ids], 300, seed=7) == smallest
    resharded = [ids[i : i + 333] for i in range(0, len(ids), 333)][::-1]
    assert sampled_ids(resharded, 300, seed=7) == smallest
    assert sampled_ids([ids[:10], ids[10:20]], 300) == sorted(
        ids[:20], key=lambda i: doc_uniforms([i], 0, "kmeans")[0]
    )  # a corpus smaller than the sample: all of it


def write_embedded_shards(
    store: Store, ids: list[str], per_shard: int, dim: int
) -> list[tuple[Key, Key]]:
    """(tokens key, embed key) per shard of ``ids``: an index with their ids and unit
    embeddings that depend on the id alone (so on no sharding)."""
    parts = []
    for s, start in enumerate(range(0, len(ids), per_shard)):
        chunk = ids[start : start + per_shard]
        tok = artifact_key("tokens", "t", f"s{s}", index=s, per_shard=per_shard)
        emb = artifact_key("embed", "t", f"s{s}", index=s, per_shard=per_shard)
        store.put_table(tok, "index.parquet", pa.table({"id": chunk}))
        e = np.stack([np.random.default_rng(int(i.split("-")[1])).normal(size=dim) for i in chunk])
        store.put_array(
            emb, "embeddings.npy", (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)
        )
        parts.append((tok, emb))
    return parts


def test_the_fit_reads_only_its_sample_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,000 documents, K = 4, max_sample 60: the fit reads 60 embeddings, by rows, never
    a whole embeddings file; another sharding gives the same centroids."""
    ids = [f"doc-{i}" for i in range(2_000)]
    cfg = load_config(None, {"corpus.input": "x", "kmeans.k": 4, "kmeans.max_sample": 60})
    read: list[int] = []
    get_rows = Store.get_rows

    def counted(self: Store, key: Key, name: str, rows: np.ndarray) -> np.ndarray:
        read.append(len(rows))
        return get_rows(self, key, name, rows)

    def whole(self: Store, key: Key, name: str) -> np.ndarray:
        raise AssertionError(f"the fit read all of {key}/{name}")

    monkeypatch.setattr(Store, "get_rows", counted)
    monkeypatch.setattr(Store, "get_array", whole)
    centroids = []
    for per_shard in (250, 170):
        store = Store(str(tmp_path / f"store-{per_shard}"))
        parts = write_embedded_shards(store, ids, per_shard, dim=16)
        key = artifact_key("kmeans", "t", per_shard=per_shard)
        read.clear()
        assert stages.run_kmeans(parts, len(ids), cfg, store, key) == {"k": 4, "sample": 60}
        assert sum(read) == 60
        centroids.append(
            np.load(tmp_path / f"store-{per_shard}" / "kmeans" / key.id / "centroids.npy")
        )
    np.testing.assert_array_equal(*centroids)


def test_auto_k_keeps_points_per_centroid_under_a_capped_sample() -> None:
    """K = N/200, at most 4,096 and at most max_sample / max_points_per_centroid."""
    cfg = load_config(None, {"corpus.input": "x"})
    assert stages.cluster_count(8_400, cfg) == 42
    assert stages.cluster_count(10**9, cfg) == 4_096
    small = load_config(None, {"corpus.input": "x", "kmeans.max_sample": 6_400})
    assert stages.cluster_count(10**9, small) == 6_400 // 64 == 100
    assert auto_k(10**9, max_k=1) == 2


def test_a_k_larger_than_the_sample_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max_sample"):
        load_config(None, {"corpus.input": "x", "kmeans.k": 100, "kmeans.max_sample": 50})


# ---- reading rows of a stored array ---------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.002, 0.05, 0.5, 1.0])
def test_get_rows_reads_the_rows_asked_for_and_little_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rate: float
) -> None:
    store = Store(str(tmp_path))
    key = artifact_key("embed", "t", "s0")
    x = np.random.default_rng(1).normal(size=(20_000, 64)).astype(np.float32)  # 5 MiB
    store.put_array(key, "embeddings.npy", x)
    rows = np.flatnonzero(np.random.default_rng(2).random(len(x)) < rate)
    fetched: list[int] = []
    cat_ranges = store.fs.cat_ranges

    def counted(paths: list[str], starts: list[int], ends: list[int], **kw: object) -> list[bytes]:
        fetched.append(sum(e - s for s, e in zip(starts, ends, strict=True)))
        return cat_ranges(paths, starts, ends, **kw)

    monkeypatch.setattr(store.fs, "cat_ranges", counted)
    got = store.get_rows(key, "embeddings.npy", rows)
    np.testing.assert_array_equal(got, x[rows])
    assert got.dtype == np.float32 and got.shape == (len(rows), 64)
    # Gaps under 64 KiB are read through: at most 64 KiB more per wanted row, and never
    # more than the file.
    assert sum(fetched) <= min(len(rows) * (256 + 65_536), x.nbytes)


def test_get_rows_refuses_rows_out_of_order_or_range(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    key = artifact_key("embed", "t", "s0")
    store.put_array(key, "embeddings.npy", np.zeros((5, 2), np.float32))
    for rows in ([3, 2], [1, 1], [5], [-1]):
        with pytest.raises(ValueError, match="ascending and within"):
            store.get_rows(key, "embeddings.npy", np.array(rows))


def test_get_rows_on_s3(moto) -> None:  # noqa: ANN001 - s3.MotoServer
    store = Store("s3://mix/rows", moto.storage_options())
    key = artifact_key("embed", "t", "s0")
    x = np.arange(3_000 * 8, dtype=np.float32).reshape(3_000, 8)
    store.put_array(key, "embeddings.npy", x)
    rows = np.array([0, 1, 2, 999, 1_000, 2_999])
    np.testing.assert_array_equal(store.get_rows(key, "embeddings.npy", rows), x[rows])


def test_get_ranges_reads_byte_ranges_of_many_files_in_order(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    a, b = (artifact_key("counts", "t", s, source=s) for s in ("s0", "s1"))
    store.put_bytes(a, "x.bin", b"0123456789")
    store.put_bytes(b, "x.bin", b"abcdefghij")
    got = store.get_ranges([(b, "x.bin", 2, 5), (a, "x.bin", 0, 1), (a, "x.bin", 9, 10)])
    assert got == [b"cde", b"0", b"9"]
    assert store.get_ranges([]) == []


class Planted(RuntimeError):
    pass


def streamed_write_is_whole_or_nothing(
    out: Output, listed: Callable[[], list[str]], read: Callable[[str], bytes]
) -> None:
    """A part streamed to ``out`` in 1 MiB writes (9 MiB: more than one S3 upload part)
    is there whole when the writer returns, and absent, leftovers included, when it
    raises; what the writer raised is raised as it is (it is not the output's fault)."""
    chunk = bytes(range(256)) * 4096

    def fill(f: BinaryIO, fail: bool = False) -> int:
        for _ in range(9):
            f.write(chunk)
        if fail:
            raise Planted("the gather failed half way")
        return 9

    assert out.put_stream("mixture/part-00000.parquet", fill) == 9
    with pytest.raises(Planted, match="the gather failed half way"):
        out.put_stream("mixture/part-00001.parquet", lambda f: fill(f, fail=True))
    assert listed() == ["mixture/part-00000.parquet"]
    assert read("mixture/part-00000.parquet") == chunk * 9


def test_a_streamed_part_is_published_whole_or_not_at_all(tmp_path: Path) -> None:
    out = Output(str(tmp_path / "out"))
    root = tmp_path / "out"
    streamed_write_is_whole_or_nothing(
        out,
        lambda: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()),
        lambda name: (root / name).read_bytes(),
    )


def s3_client(moto):  # noqa: ANN001, ANN201 - s3.MotoServer, a boto3 S3 client
    return boto3.client(
        "s3",
        endpoint_url=moto.endpoint,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name=REGION,
    )


def test_a_streamed_part_is_published_whole_or_not_at_all_on_s3(moto) -> None:  # noqa: ANN001
    out = Output("s3://mix/streamed", moto.storage_options())
    uploads = s3_client(moto)

    def listed() -> list[str]:
        out.fs.invalidate_cache()
        # An aborted multipart upload leaves no part behind either.
        assert not uploads.list_multipart_uploads(Bucket="mix").get("Uploads")
        return sorted(p.removeprefix("mix/streamed/") for p in out.fs.find("mix/streamed"))

    streamed_write_is_whole_or_nothing(
        out, listed, lambda name: out.fs.cat_file(f"mix/streamed/{name}")
    )


def test_a_failed_abort_publishes_nothing_either(moto, monkeypatch) -> None:  # noqa: ANN001
    """When the upload's abort fails too (the network is down), the file object is not
    completed when collected: no truncated part appears, and the writer's own error is
    the one raised."""
    out = Output("s3://mix/aborts", moto.storage_options())

    def abort_fails(*args: object, **kwargs: object) -> None:
        raise ConnectionResetError("the network went away")

    monkeypatch.setattr(out.fs, "abort_mpu", abort_fails)

    def fill(f: BinaryIO) -> int:
        f.write(b"x" * (9 << 20))  # one 8 MiB upload part sent
        raise Planted("the gather failed half way")

    with pytest.raises(Planted):
        out.put_stream("mixture/part-00000.parquet", fill)
    gc.collect()
    out.fs.invalidate_cache()
    assert out.fs.find("mix/aborts") == []
    client = s3_client(moto)
    for upload in client.list_multipart_uploads(Bucket="mix").get("Uploads", []):
        client.abort_multipart_upload(Bucket="mix", Key=upload["Key"], UploadId=upload["UploadId"])


# ---- the report's sample: the same few documents whatever the corpus's sharding --------


def test_the_report_samples_each_domain_at_a_rate_by_id_whatever_the_sharding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flow gathers raw q and d for the report's plots from every shard: about
    REPORT_SAMPLE per domain in all, so what it holds does not grow with the corpus."""
    monkeypatch.setattr(stages, "REPORT_SAMPLE", 40)  # of 160 documents per domain
    encoder = save_tiny_encoder(tmp_path / "encoder")
    sampled = {}
    for per_shard in (40, 64):
        cfg = load_config(
            None,
            {
                "corpus.input": str(write_corpus(tmp_path / f"corpus{per_shard}", per_shard)),
                "output.path": str(tmp_path / f"out{per_shard}"),
                "embed.model": encoder,
                "embed.max_length": 32,
                "kmeans.k": 3,
            },
        )
        summary = run_in_process(cfg)
        store = keys.store_for(cfg)
        counts = [a.split("/", 1)[1] for a in summary["artifacts"] if a.startswith("counts/")]
        quality: dict[str, list[float]] = {d: [] for d in DOMAINS}
        for cid in counts:
            for d, v in store.summary(Key("counts", cid, {}))["domains"].items():
                quality[d] += v["quality"]
        sampled[per_shard] = {d: sorted(q) for d, q in quality.items()}
    assert sampled[40] == sampled[64]
    for d in DOMAINS:  # the ids whose uniform falls below 40 / 160, counted here
        ids = [f"{d}-{i}" for i in range(DOCS_PER_DOMAIN)]
        expected = int((doc_uniforms(ids, 0, "report") < 40 / DOCS_PER_DOMAIN).sum())
        assert len(sampled[40][d]) == expected
        assert 15 <= expected <= 65  # Binomial(160, 0.25): mean 40, sd 5.5


def test_report_rates_keep_about_report_sample_per_domain() -> None:
    tokens = [{"domain_docs": {"a": 10**6, "b": 50}}, {"domain_docs": {"a": 10**6}}]
    rates = stages.report_rates(tokens)
    assert rates == {"a": pytest.approx(stages.REPORT_SAMPLE / 2e6, rel=1e-5), "b": 1.0}


def test_the_scheduler_keeps_no_history_of_the_tasks_it_sent(cluster: dict) -> None:
    """Dask's BatchedSend keeps its last ``distributed.admin.low-level-log-length``
    batches whole: at Dask's 1000, the scheduler's stream to a worker kept every task's
    run_spec (~150 KB) long after the task, and the flow's process (which hosts a local
    cluster's scheduler) grew with the task runs. flows/runtime.py sets 10."""
    from distributed import Client

    with Client(cluster["compute.scheduler_address"]) as client:
        for i in range(40):  # one batch each: the next is sent after the last finished
            assert client.submit(int, i, pure=False).result() == i
        kept = client.run_on_scheduler(
            lambda dask_scheduler: {
                w: len(c.recent_message_log) for w, c in dask_scheduler.stream_comms.items()
            }
        )
    assert kept and max(kept.values()) <= 10, kept


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "malloc_trim"), reason="glibc only")
def test_free_memory_left_in_the_heap_is_handed_back() -> None:
    """What earlier tasks freed stays in glibc's heap (small blocks, the heap's top held
    by a block still in use) until release_free_memory hands it back."""
    blocks = [bytearray(48 << 10) for _ in range(4096)]  # 192 MiB in heap-sized blocks
    top = bytearray(48 << 10)  # allocated last: the heap cannot shrink past it
    before = _rss_mib()
    del blocks
    gc.collect()
    held = _rss_mib()
    stages.release_free_memory()
    after = _rss_mib()
    assert held > before - 32  # freed, yet still held by the process
    assert after < held - 128  # most of the 192 MiB handed back
    del top
