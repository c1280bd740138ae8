"""Mixture shards: each selected document repeated n(x) times, globally shuffled.

A bucketed shuffle that never holds the mixture in one place: every copy of a
document gets a 64-bit key from (seed, id, copy); ``scatter`` sends it to bucket
key mod B from its source shard; ``gather`` reads one bucket from every source
shard and sorts it by key. Each output shard is one bucket, so memory per worker is
one bucket, and the order is the same whatever the sharding or worker count.
B comes from the bytes the copies will weigh (``bucket_count``), so a part's size is
bounded in bytes whatever the corpus's size or its documents' lengths.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MIXTURE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("domain", pa.string()),
        ("text", pa.string()),
        ("copy", pa.int32()),
        ("quality", pa.float64()),
        ("diversity", pa.float64()),
        ("weight", pa.float64()),
    ]
)


# The fixed-width bytes of a mixture row in Arrow: the offsets of id, domain and text
# (4 each), copy (4), quality, diversity and weight (8 each), and the shuffle key (8)
# that the row carries from scatter until its part is written.
ROW_OVERHEAD = 3 * 4 + 4 + 3 * 8 + 8


def copy_bytes(docs: pa.Table) -> pa.Array:
    """What one copy of each document of ``docs`` (columns id, domain, text) weighs in
    a mixture part as a worker holds it: its UTF-8 id, domain and text plus
    ``ROW_OVERHEAD``. int64 (n,). Renamed duplicate ids add the few bytes of their
    suffix, which this leaves out."""
    total = pa.scalar(ROW_OVERHEAD, pa.int64())
    for name in ("id", "domain", "text"):
        total = pc.add(total, pc.binary_length(docs.column(name)).cast(pa.int64()))
    return total.combine_chunks() if isinstance(total, pa.ChunkedArray) else total


def bucket_count(
    expected_bytes: float,
    max_part_bytes: int,
    expected_rows: float = 0.0,
    rows_per_part: int | None = None,
) -> int:
    """Mixture parts (shuffle buckets) for copies of ``expected_bytes`` bytes in all
    (Σ c(x) · copy_bytes(x)), so that a part holds ``max_part_bytes`` at most on
    average; and, given ``rows_per_part``, ``expected_rows`` rows (Σ c(x)) at most that
    many each on average. At least 1."""
    parts = math.ceil(expected_bytes / max_part_bytes)
    if rows_per_part is not None:
        parts = max(parts, math.ceil(expected_rows / rows_per_part))
    return max(1, parts)


def copy_keys(ids: list[str], copies: np.ndarray, seed: int) -> np.ndarray:
    """A 64-bit shuffle key per (id, copy index): uint64 (len(ids),)."""
    prefix = f"{seed}\x1fshuffle\x1f".encode()
    raw = b"".join(
        hashlib.blake2b(prefix + f"{i}\x1f{c}".encode(), digest_size=8).digest()
        for i, c in zip(ids, copies.tolist(), strict=True)
    )
    return np.frombuffer(raw, dtype="<u8")


def scatter(docs: pa.Table, counts: np.ndarray, n_buckets: int, seed: int) -> dict[int, pa.Table]:
    """Repeat row i of ``docs`` counts[i] times and split the copies into buckets.

    ``docs`` has the MIXTURE_SCHEMA columns except ``copy``. Returns bucket ->
    table with MIXTURE_SCHEMA plus a ``key`` column (uint64); empty buckets omitted.
    """
    rows = np.repeat(np.arange(len(counts)), counts)
    if len(rows) == 0:
        return {}
    starts = np.cumsum(counts) - counts
    copy = (np.arange(len(rows)) - np.repeat(starts, counts)).astype(np.int32)
    expanded = docs.take(pa.array(rows))
    keys = copy_keys(expanded.column("id").to_pylist(), copy, seed)
    table = expanded.append_column("copy", pa.array(copy)).append_column("key", pa.array(keys))
    table = table.select([*MIXTURE_SCHEMA.names, "key"])
    # Sorting by bucket and slicing is O(rows log rows), whatever the bucket count.
    bucket = keys % np.uint64(n_buckets)
    order = np.argsort(bucket, kind="stable")
    table = table.take(pa.array(order))
    present, starts = np.unique(bucket[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    return {
        int(b): table.slice(int(start), int(end - start))
        for b, start, end in zip(present, starts, ends, strict=True)
    }


#: Rows of a part taken and written at once: the part's row groups. The whole part
#: reordered at once, then encoded, peaked at ~3.6x its Arrow bytes in the worker;
#: slices keep that to the part as read plus its encoded bytes.
SLICE_BYTES = 8 << 20


def gather(parts: list[pa.Table]) -> Iterator[pa.Table]:
    """One output shard, in slices of about ``SLICE_BYTES``: all parts of a bucket,
    sorted by key (then id, copy, so that equal keys from duplicate ids still order
    deterministically), key dropped; each slice has MIXTURE_SCHEMA. Nothing (no
    slice) when the parts hold no rows."""
    parts = [p for p in parts if p.num_rows]
    if not parts:
        return
    table = pa.concat_tables(parts)
    order = (
        pc.sort_indices(
            table, sort_keys=[("key", "ascending"), ("id", "ascending"), ("copy", "ascending")]
        )
        .to_numpy()
        .astype(np.int64)
    )
    # Arrow's take on a table of many chunks joins each column's chunks first (a copy of
    # the whole part per slice): take each slice's rows piece by piece instead.
    sizes = np.array([p.num_rows for p in parts])
    piece_of = np.repeat(np.arange(len(parts)), sizes)
    first_row = np.cumsum(sizes) - sizes
    rows = max(1, table.num_rows * SLICE_BYTES // max(1, table.nbytes))
    for start in range(0, len(order), rows):
        wanted = order[start : start + rows]
        by_piece = np.argsort(piece_of[wanted], kind="stable")
        grouped = wanted[by_piece]
        bounds = np.flatnonzero(np.diff(piece_of[grouped])) + 1
        taken = [
            parts[piece_of[g[0]]].take(pa.array(g - first_row[piece_of[g[0]]]))
            for g in np.split(grouped, bounds)
        ]
        # Back from piece order to sorted order: row j of ``taken`` is slice row by_piece[j].
        piece = pa.concat_tables(taken).combine_chunks().take(pa.array(np.argsort(by_piece)))
        yield piece.drop_columns(["key"]).cast(MIXTURE_SCHEMA)


def part_bytes(slices: Iterable[pa.Table]) -> tuple[bytes, int]:
    """``slices`` (``gather``) as one Parquet file, a row group per slice, and its rows.
    A part with no rows is a file with MIXTURE_SCHEMA and no rows."""
    buf, rows = io.BytesIO(), 0
    with pq.ParquetWriter(buf, MIXTURE_SCHEMA) as writer:
        for piece in slices:
            writer.write_table(piece, row_group_size=piece.num_rows)
            rows += piece.num_rows
    return buf.getvalue(), rows
