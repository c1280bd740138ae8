"""Tests for samplemix.io.mixture_shards: the bucketed shuffle that writes the mixture.

Four documents with counts [0, 1, 3, 2] make 0 + 1 + 3 + 2 = 6 rows:
b once (copy 0), c three times (copies 0, 1, 2), d twice (copies 0, 1); a never.
"""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from samplemix.io import mixture_shards as materialise
from samplemix.io.mixture_shards import (
    MIXTURE_SCHEMA,
    bucket_count,
    copy_keys,
    gather,
    part_bytes,
    scatter,
)

COUNTS = np.array([0, 1, 3, 2], dtype=np.int64)
EXPECTED = Counter({("b", 0): 1, ("c", 0): 1, ("c", 1): 1, ("c", 2): 1, ("d", 0): 1, ("d", 1): 1})


def docs_table(n: int = 4) -> pa.Table:
    ids = [chr(ord("a") + i) for i in range(n)]
    return pa.table(
        {
            "id": ids,
            "domain": ["web" if i % 2 else "code" for i in range(n)],
            "text": [f"text of {i}" for i in ids],
            "quality": [float(i) for i in range(n)],
            "diversity": [0.5 * i for i in range(n)],
            "weight": [0.25 * i for i in range(n)],
        }
    )


def shuffle(tables: list[tuple[pa.Table, np.ndarray]], n_buckets: int, seed: int) -> list[pa.Table]:
    """scatter every (docs, counts) source shard, then gather bucket by bucket."""
    scattered = [scatter(docs, counts, n_buckets, seed) for docs, counts in tables]
    return [part([s[b] for s in scattered if b in s]) for b in range(n_buckets)]


def part(pieces: list[pa.Table]) -> pa.Table:
    """The output shard ``gather`` gives for ``pieces``, read back from its bytes."""
    data, rows = part_bytes(gather(pieces))
    table = pq.read_table(io.BytesIO(data))
    assert table.num_rows == rows
    return table


def rows(tables: list[pa.Table]) -> list[dict]:
    return [r for t in tables for r in t.to_pylist()]


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


@pytest.mark.parametrize("n_buckets", [1, 2, 3, 8])
def test_each_document_repeated_count_times(n_buckets: int) -> None:
    buckets = shuffle([(docs_table(), COUNTS)], n_buckets, seed=0)
    for t in buckets:
        assert t.schema == MIXTURE_SCHEMA
    out = rows(buckets)
    assert len(out) == 6
    assert Counter((r["id"], r["copy"]) for r in out) == EXPECTED
    # Every copy carries its own document's columns.
    src = {r["id"]: r for r in docs_table().to_pylist()}
    for r in out:
        assert {k: v for k, v in r.items() if k != "copy"} == src[r["id"]]


def test_scatter_buckets_by_key() -> None:
    parts = scatter(docs_table(), COUNTS, 3, seed=0)
    assert sum(t.num_rows for t in parts.values()) == 6
    for b, t in parts.items():
        assert 0 <= b < 3 and t.num_rows > 0  # empty buckets are omitted
        assert t.column("key").type == pa.uint64()
        keys = np.array(t.column("key").to_pylist(), dtype=np.uint64)
        assert np.all(keys % np.uint64(3) == b)
        ids = t.column("id").to_pylist()
        copies = np.array(t.column("copy").to_pylist())
        np.testing.assert_array_equal(keys, copy_keys(ids, copies, 0))


def test_gather_sorts_by_key_and_seed_changes_order() -> None:
    # Many copies in one bucket so that the order is informative.
    docs = docs_table(26)
    counts = np.arange(26) % 4
    orders = {}
    for seed in (0, 1):
        (t,) = shuffle([(docs, counts)], 1, seed)
        ids = t.column("id").to_pylist()
        copies = np.array(t.column("copy").to_pylist())
        keys = copy_keys(ids, copies, seed)
        assert np.all(keys[:-1] <= keys[1:])
        orders[seed] = list(zip(ids, copies.tolist(), strict=True))
    assert sorted(orders[0]) == sorted(orders[1])
    assert orders[0] != orders[1]
    # A shuffle, not source order.
    assert orders[0] != sorted(orders[0])


@pytest.mark.parametrize("n_buckets", [1, 2, 5])
def test_same_output_whatever_the_source_sharding(n_buckets: int) -> None:
    docs = docs_table(12)
    counts = np.array([0, 1, 3, 2, 1, 0, 4, 1, 2, 2, 0, 3])
    whole = shuffle([(docs, counts)], n_buckets, seed=7)
    split = shuffle([(docs.slice(0, 5), counts[:5]), (docs.slice(5), counts[5:])], n_buckets, 7)
    # The second source first: gather's order must not depend on the parts' order.
    swapped = shuffle([(docs.slice(5), counts[5:]), (docs.slice(0, 5), counts[:5])], n_buckets, 7)
    for a, b, c in zip(whole, split, swapped, strict=True):
        assert a.equals(b) and a.equals(c)
        assert parquet_bytes(a) == parquet_bytes(b)


def test_bucket_count_only_changes_the_split() -> None:
    docs = docs_table(12)
    counts = np.array([0, 1, 3, 2, 1, 0, 4, 1, 2, 2, 0, 3])
    multisets = []
    for n_buckets in (1, 2, 3, 7, 50):
        out = rows(shuffle([(docs, counts)], n_buckets, seed=3))
        assert len(out) == int(counts.sum())
        multisets.append(Counter(tuple(sorted(r.items())) for r in out))
    assert all(m == multisets[0] for m in multisets)


def test_rerun_gives_identical_parquet() -> None:
    a = shuffle([(docs_table(), COUNTS)], 2, seed=11)
    b = shuffle([(docs_table(), COUNTS)], 2, seed=11)
    for x, y in zip(a, b, strict=True):
        assert parquet_bytes(x) == parquet_bytes(y)
    pieces = [scatter(docs_table(), COUNTS, 1, seed=11)[0]]
    assert part_bytes(gather(pieces)) == part_bytes(gather(pieces))


def test_nothing_selected() -> None:
    assert scatter(docs_table(), np.zeros(4, np.int64), 3, seed=0) == {}
    assert list(gather([])) == []
    empty = part([])
    assert empty.num_rows == 0 and empty.schema == MIXTURE_SCHEMA


def test_a_part_written_in_slices_is_the_part_sorted_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each slice is a row group; together they are the bucket sorted by key, id, copy."""
    counts = np.array([3, 1, 4, 2, 5, 1, 2, 3, 1, 2])
    (whole,) = shuffle([(docs_table(10), counts)], 1, seed=5)
    assert whole.num_rows == counts.sum() == 24
    monkeypatch.setattr(materialise, "SLICE_BYTES", 100)  # a few rows per slice
    scattered = scatter(docs_table(10), counts, 1, seed=5)[0]
    slices = list(gather([scattered.slice(0, 10), scattered.slice(10)]))
    assert len(slices) > 3
    data, rows = part_bytes(slices)
    assert pq.ParquetFile(io.BytesIO(data)).metadata.num_row_groups == len(slices)
    assert pq.read_table(io.BytesIO(data)).equals(whole)
    # The order, derived here: by key, then id, then copy.
    sort = scattered.sort_by([("key", "ascending"), ("id", "ascending"), ("copy", "ascending")])
    assert whole.column("id").to_pylist() == sort.column("id").to_pylist()


@pytest.mark.parametrize(
    ("expected_rows", "rows_per_shard", "buckets"),
    [
        (0, 100, 1),  # nothing to write still makes one (empty) shard
        (0.4, 100, 1),
        (100, 100, 1),  # an exact multiple adds no extra shard
        (101, 100, 2),
        (200, 100, 2),
        (250.5, 100, 3),
        (1, 1, 1),
        (7, 1, 7),
    ],
)
def test_bucket_count_by_rows(expected_rows: float, rows_per_shard: int, buckets: int) -> None:
    # The optional rows bound (output.rows_per_shard) alone: no bytes to hold.
    assert bucket_count(0.0, 1, expected_rows, rows_per_shard) == buckets
