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
    PIECE_SCHEMA,
    bucket_count,
    copy_keys,
    gather,
    header_bytes,
    index_bytes,
    piece_bytes,
    piece_span,
    pieces_file,
    scatter,
    slice_count,
    slice_of,
    write_part,
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


def shuffle(
    tables: list[tuple[pa.Table, np.ndarray]], n_buckets: int, seed: int, n_slices: int = 3
) -> list[pa.Table]:
    """scatter every (docs, counts) source shard, then gather bucket by bucket."""
    scattered = [scatter(docs, counts, n_buckets, seed) for docs, counts in tables]
    encoded = [{b: piece_bytes(t, n_slices) for b, t in s.items()} for s in scattered]
    return [part([e[b] for e in encoded if b in e], n_slices) for b in range(n_buckets)]


def reader(pieces: list[bytes], calls: list | None = None):
    """``gather``'s read_ranges over pieces held in memory; each call's ranges are
    appended to ``calls``."""

    def read_ranges(ranges: list[tuple[int, int, int]]) -> list[bytes]:
        if calls is not None:
            calls.append(ranges)
        return [pieces[p][a:b] for p, a, b in ranges]

    return read_ranges


def part_file(pieces: list[bytes], n_slices: int) -> tuple[bytes, int]:
    """The part file ``gather`` and ``write_part`` make of encoded ``pieces``, and its rows."""
    buf = io.BytesIO()
    names = [f"piece-{i}" for i in range(len(pieces))]
    rows = write_part(gather(names, n_slices, reader(pieces)), buf)
    return buf.getvalue(), rows


def part(pieces: list[bytes], n_slices: int) -> pa.Table:
    """The output shard for encoded ``pieces``, read back from its bytes."""
    data, rows = part_file(pieces, n_slices)
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
        assert t.schema == PIECE_SCHEMA
        keys = np.array(t.column("key").to_pylist(), dtype=np.uint64)
        assert np.all(keys % np.uint64(3) == b)
        assert np.all(keys[:-1] <= keys[1:])  # in the part's order already
        ids = t.column("id").to_pylist()
        copies = np.array(t.column("copy").to_pylist())
        np.testing.assert_array_equal(keys, copy_keys(ids, copies, 0))


def test_slices_are_ranges_of_keys() -> None:
    keys = np.array([0, 2**63 - 1, 2**63, 2**64 - 1, 2**62], dtype=np.uint64)
    np.testing.assert_array_equal(slice_of(keys, 1), [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(slice_of(keys, 2), [0, 0, 1, 1, 0])
    np.testing.assert_array_equal(slice_of(keys, 4), [0, 1, 2, 3, 1])
    # Slices per part: the part's expected bytes over SLICE_BYTES, at least one.
    assert slice_count(0.0, 1) == 1
    assert slice_count(3 * materialise.SLICE_BYTES + 1, 1) == 4
    assert slice_count(8 * materialise.SLICE_BYTES, 4) == 2


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
    # The part files themselves, row groups included, with several slices a part.
    files = []
    for sources in (
        [(docs, counts)],
        [(docs.slice(0, 5), counts[:5]), (docs.slice(5), counts[5:])],
    ):
        scattered = [scatter(d, c, n_buckets, 7) for d, c in sources]
        encoded = [{b: piece_bytes(t, 4) for b, t in got.items()} for got in scattered]
        files.append([part_file([e[b] for e in encoded if b in e], 4) for b in range(n_buckets)])
    assert files[0] == files[1]


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
    pieces = [piece_bytes(scatter(docs_table(), COUNTS, 1, seed=11)[0], 2)]
    assert part_file(pieces, 2) == part_file(pieces, 2)


def test_nothing_selected() -> None:
    assert scatter(docs_table(), np.zeros(4, np.int64), 3, seed=0) == {}
    assert list(gather([], 3, reader([]))) == []
    empty = part([], 3)
    assert empty.num_rows == 0 and empty.schema == MIXTURE_SCHEMA


@pytest.mark.parametrize("n_slices", [1, 4, 50])
def test_a_part_written_in_slices_is_the_part_sorted_at_once(n_slices: int) -> None:
    """Row group r is slice r, sorted; together they are the bucket sorted by key, id,
    copy, with as many slices as asked (50 for 24 rows: most of them empty)."""
    counts = np.array([3, 1, 4, 2, 5, 1, 2, 3, 1, 2])
    docs = docs_table(10)
    scattered = [
        scatter(docs.slice(0, 4), counts[:4], 1, seed=5)[0],
        scatter(docs.slice(4), counts[4:], 1, seed=5)[0],
    ]
    data, rows = part_file([piece_bytes(t, n_slices) for t in scattered], n_slices)
    assert rows == counts.sum() == 24
    whole = pq.read_table(io.BytesIO(data))
    # The order, derived here: by key, then id, then copy.
    expected = pa.concat_tables(scattered).sort_by(
        [("key", "ascending"), ("id", "ascending"), ("copy", "ascending")]
    )
    assert whole.equals(expected.drop_columns(["key"]).cast(MIXTURE_SCHEMA))
    keys = expected.column("key").to_numpy()
    groups = pq.ParquetFile(io.BytesIO(data)).metadata
    assert groups.num_row_groups == len(np.unique(slice_of(keys, n_slices)))
    first = 0
    for g in range(groups.num_row_groups):
        n = groups.row_group(g).num_rows
        assert len(np.unique(slice_of(keys[first : first + n], n_slices))) == 1
        first += n


def two_pieces(n_slices: int) -> list[bytes]:
    """26 documents, 8 copies each, in two source shards: one bucket's two pieces."""
    docs, counts = docs_table(26), np.full(26, 8)
    return [
        piece_bytes(scatter(docs.slice(i, 13), counts[i : i + 13], 1, seed=2)[0], n_slices)
        for i in (0, 13)
    ]


def test_gather_holds_one_slice_of_every_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no read-ahead, each read after the headers asks for one slice of each piece:
    about 1 / n_slices of the part's bytes, never the part."""
    monkeypatch.setattr(materialise, "READ_AHEAD_BYTES", 0)
    n_slices = 8
    pieces = two_pieces(n_slices)
    calls: list = []
    rows = sum(t.num_rows for t in gather(["a", "b"], n_slices, reader(pieces, calls)))
    assert rows == 26 * 8
    heads, *slices = calls
    assert heads == [(p, 0, header_bytes(n_slices)) for p in range(2)]
    assert len(slices) == n_slices  # 208 rows: no slice is empty
    body = sum(len(p) - header_bytes(n_slices) for p in pieces)
    read = [sum(b - a for _, a, b in ranges) for ranges in slices]
    assert sum(read) < body  # every row once (the stream's schema is never read)
    assert max(read) < body / 2


def test_gather_reads_small_pieces_ahead_within_its_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each piece's next slices come in one request while they fit its share of
    READ_AHEAD_BYTES: all of them at the default (one read per piece); with a share of
    about three slices, fewer reads than slices and none above the share but a single
    slice. The part is the same either way."""
    n_slices = 8
    pieces = two_pieces(n_slices)
    whole = part_file(pieces, n_slices)
    calls: list = []
    list(gather(["a", "b"], n_slices, reader(pieces, calls)))
    assert len(calls) == 2 and len(calls[1]) == 2  # the headers, then each piece once
    slice_sizes = [
        np.diff(np.frombuffer(p[: header_bytes(n_slices)], "<u8").astype(np.int64)) for p in pieces
    ]
    share = int(3 * max(s.mean() for s in slice_sizes))
    monkeypatch.setattr(materialise, "READ_AHEAD_BYTES", 2 * share)
    calls = []
    assert part_file(pieces, n_slices) == whole
    list(gather(["a", "b"], n_slices, reader(pieces, calls)))
    reads = [(p, b - a) for ranges in calls[1:] for p, a, b in ranges]
    assert len(reads) < 2 * n_slices
    assert all(n <= max(share, slice_sizes[p].max()) for p, n in reads)


def test_a_damaged_piece_is_named() -> None:
    (piece,) = two_pieces(4)[:1]
    name = "s3://x/counts/k/bucket-00000.arrows"
    scrambled = np.array([900, 50, 0, 0, 0], "<u8").tobytes() + piece[header_bytes(4) :]
    with pytest.raises(ValueError, match=f"{name} is not a mixture piece of 4 slices"):
        list(gather([name], 4, reader([scrambled])))
    cut = piece[: header_bytes(4)] + b"\xff" * (len(piece) - header_bytes(4))
    with pytest.raises(ValueError, match="p0: a slice cannot be read"):
        list(gather(["p0"], 4, reader([cut])))


def test_a_shards_pieces_file_holds_each_bucket_at_its_span() -> None:
    """One file per shard: bucket b's piece is the range its index entry names, an
    empty range where the shard has no copies in b."""
    counts = np.arange(40) % 4  # 60 copies in 64 buckets: some hold none
    pieces = {b: piece_bytes(t, 2) for b, t in scatter(docs_table(40), counts, 64, 3).items()}
    assert 1 < len(pieces) < 64
    data = pieces_file(pieces, 64)
    assert len(data) == index_bytes(64) + sum(len(p) for p in pieces.values())
    for b in range(64):
        start, end = piece_span("f", data[8 * b : 8 * b + 16], 64)
        assert data[start:end] == pieces.get(b, b"")
    empty = pieces_file({}, 3)
    assert [piece_span("f", empty[8 * b : 8 * b + 16], 3) for b in range(3)] == [(32, 32)] * 3


def test_a_damaged_pieces_index_is_named() -> None:
    name = "s3://x/counts/k/pieces.arrows"
    inside, backwards = np.array([8, 100], "<u8").tobytes(), np.array([200, 100], "<u8").tobytes()
    for entry in (inside, backwards, inside[:12]):  # the last: a file cut in its index
        with pytest.raises(ValueError, match=f"{name} is not a pieces file of 4 mixture parts"):
            piece_span(name, entry, 4)


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


def test_a_part_is_written_from_each_shards_span_and_a_damaged_one_is_named(tmp_path) -> None:  # noqa: ANN001
    """run_gather reads each shard's piece of the part from its pieces file; an index
    entry that cuts a piece short fails naming the file instead of reading the next one."""
    from samplemix.io.store import Output, Store, artifact_key
    from samplemix.pipeline.stages import PIECES, run_gather

    store, out = Store(str(tmp_path / "store")), Output(str(tmp_path / "out"))
    docs, counts = docs_table(40), np.arange(40) % 4
    shards = [(docs.slice(0, 25), counts[:25]), (docs.slice(25), counts[25:])]
    keys, files = [], []
    for i, (d, c) in enumerate(shards):
        pieces = {b: piece_bytes(t, 2) for b, t in scatter(d, c, 3, seed=5).items()}
        keys.append(artifact_key("counts", "6", f"s{i}", rows=d.num_rows, first=i * 25))
        files.append(pieces_file(pieces, 3))
        store.put_bytes(keys[-1], PIECES, files[-1])
    whole = shuffle(shards, 3, seed=5, n_slices=2)
    out_key = artifact_key("output", "2")
    for b in range(3):
        assert run_gather(b, keys, 3, 2, out, store, out_key) == {"rows": whole[b].num_rows}
        got = pq.read_table(tmp_path / "out" / "mixture" / f"part-{b:05d}.parquet")
        assert got.equals(whole[b])
    index = np.frombuffer(files[1][: index_bytes(3)], "<u8").copy()
    index[1] -= 10  # shard 1's piece of part 0 ends 10 bytes short (part 1's starts there)
    damaged = index.tobytes() + files[1][index_bytes(3) :]
    store.put_bytes(keys[1], PIECES, damaged)
    with pytest.raises(ValueError, match=f"{store.url(keys[1], PIECES)}: the piece of part 0 ends"):
        run_gather(0, keys, 3, 2, out, store, out_key)
