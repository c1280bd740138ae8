"""Mixture shards: each selected document repeated n(x) times, globally shuffled.

A bucketed shuffle that never holds the mixture, nor one part of it, in one place:
every copy of a document gets a 64-bit key from (seed, id, copy); ``scatter`` sends it
to bucket key mod B from its source shard, sorted by key; ``piece_bytes`` stores each
bucket's piece in slices (ranges of the key's top bits), and ``pieces_file`` all of a
shard's pieces in one file (one file per shard, not per shard and part: 7,400 parts at
10^9 documents); ``gather`` reads slice r of every shard's piece of a bucket, sorts it
and writes it as the part's row group r. Memory per
worker is one slice of a part (about ``SLICE_BYTES``), and the order is the same
whatever the sharding or worker count. B comes from the bytes the copies will weigh
(``bucket_count``), so a part's size is bounded in bytes whatever the corpus's size or
its documents' lengths.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc  # noqa: F401 - pa.ipc
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


#: The order of a part's rows: by shuffle key, then id and copy, which break a tie
#: between two (id, copy) whose 64-bit keys collide. (id, copy) is unique: the ids
#: stage renames or drops duplicate ids.
PART_ORDER = [("key", "ascending"), ("id", "ascending"), ("copy", "ascending")]
#: A scattered piece's rows: a mixture row and its shuffle key.
PIECE_SCHEMA = MIXTURE_SCHEMA.append(pa.field("key", pa.uint64()))
#: The bytes of a part held at once while it is written: one slice of every piece.
#: A part held whole (sorted, then encoded) peaked at ~3.6x its Arrow bytes.
SLICE_BYTES = 8 << 20
#: Compressed bytes of the pieces' slices a gather holds at most ahead of the slice it
#: sorts: each piece's next slices are read in one request while they fit its share,
#: so a part of many small pieces costs a few requests per piece, not one per slice.
READ_AHEAD_BYTES = 4 * SLICE_BYTES


def slice_count(expected_bytes: float, buckets: int) -> int:
    """Slices per mixture part: the part's expected bytes (``expected_bytes`` of copies
    over ``buckets`` parts) in pieces of about ``SLICE_BYTES``. At least 1."""
    return max(1, math.ceil(expected_bytes / max(1, buckets) / SLICE_BYTES))


def slice_of(keys: np.ndarray, n_slices: int) -> np.ndarray:
    """The slice (0 .. n_slices-1) of each shuffle key: its top 32 bits scaled to
    ``n_slices``, so slices are ranges of keys and slice order is key order. int64."""
    return ((keys >> np.uint64(32)) * np.uint64(n_slices) >> np.uint64(32)).astype(np.int64)


def scatter(docs: pa.Table, counts: np.ndarray, n_buckets: int, seed: int) -> dict[int, pa.Table]:
    """Repeat row i of ``docs`` counts[i] times and split the copies into buckets.

    ``docs`` has the MIXTURE_SCHEMA columns except ``copy``. Returns bucket ->
    table with ``PIECE_SCHEMA`` (MIXTURE_SCHEMA plus ``key``), sorted by key, id, copy
    (the part's order); empty buckets omitted.
    """
    rows = np.repeat(np.arange(len(counts)), counts)
    if len(rows) == 0:
        return {}
    starts = np.cumsum(counts) - counts
    copy = (np.arange(len(rows)) - np.repeat(starts, counts)).astype(np.int32)
    expanded = docs.take(pa.array(rows))
    keys = copy_keys(expanded.column("id").to_pylist(), copy, seed)
    table = expanded.append_column("copy", pa.array(copy)).append_column("key", pa.array(keys))
    table = table.select(PIECE_SCHEMA.names).cast(PIECE_SCHEMA)
    # Sorted by bucket, then in each bucket by the part's order; sliced per bucket.
    bucket = keys % np.uint64(n_buckets)
    table = table.append_column("bucket", pa.array(bucket)).sort_by(
        [("bucket", "ascending"), *PART_ORDER]
    )
    bucket = table.column("bucket").to_numpy()
    table = table.drop_columns(["bucket"])
    present, starts = np.unique(bucket, return_index=True)
    ends = np.append(starts[1:], len(bucket))
    return {
        int(b): table.slice(int(start), int(end - start))
        for b, start, end in zip(present, starts, ends, strict=True)
    }


def header_bytes(n_slices: int) -> int:
    """The length of an encoded piece's header: its slices' n_slices + 1 offsets."""
    return 8 * (n_slices + 1)


def piece_bytes(piece: pa.Table, n_slices: int) -> bytes:
    """``piece`` (a ``scatter`` bucket, sorted by key) as a file whose slices can be
    read alone: a header of n_slices + 1 little-endian uint64 byte offsets, then an
    Arrow IPC stream (zstd) whose record batches from offset r to offset r + 1 hold the
    piece's rows of slice r (``slice_of``); an empty slice is an empty range."""
    keys = piece.column("key").to_numpy()
    if np.any(keys[1:] < keys[:-1]):
        raise ValueError("a mixture piece must be sorted by key (scatter sorts it)")
    edges = np.searchsorted(slice_of(keys, n_slices), np.arange(n_slices + 1))
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    offsets = [0] * (n_slices + 1)
    with pa.ipc.new_stream(sink, PIECE_SCHEMA, options=options) as writer:
        # The stream's schema goes out with its first batch: an empty one, before slice 0.
        writer.write_batch(pa.RecordBatch.from_pylist([], schema=PIECE_SCHEMA))
        offsets[0] = sink.tell()
        for r in range(n_slices):
            if edges[r + 1] > edges[r]:
                writer.write_table(piece.slice(int(edges[r]), int(edges[r + 1] - edges[r])))
            offsets[r + 1] = sink.tell()
    head = header_bytes(n_slices)
    header = (np.array(offsets, dtype="<u8") + np.uint64(head)).tobytes()
    return header + sink.getvalue().to_pybytes()


def index_bytes(n_buckets: int) -> int:
    """The length of a shard's pieces file's index: n_buckets + 1 offsets."""
    return 8 * (n_buckets + 1)


def pieces_file(pieces: dict[int, bytes], n_buckets: int) -> bytes:
    """A shard's pieces (bucket -> ``piece_bytes``) as one file: an index of n_buckets + 1
    little-endian uint64 byte offsets, then the pieces in bucket order; bucket b's piece
    is the bytes from offset b to offset b + 1 (an empty range where it has none)."""
    sizes = np.zeros(n_buckets, np.int64)
    for b, data in pieces.items():
        sizes[b] = len(data)
    offsets = index_bytes(n_buckets) + np.concatenate([[0], np.cumsum(sizes)])
    return b"".join([offsets.astype("<u8").tobytes(), *(pieces[b] for b in sorted(pieces))])


def piece_span(name: str, entry: bytes, n_buckets: int) -> tuple[int, int]:
    """(start, end) of a bucket's piece in the pieces file ``name``, from its index
    entry ``entry`` (16 bytes: offsets b and b + 1). Raises ValueError, naming the file,
    when the entry cannot be one of an index of ``n_buckets`` buckets."""
    if len(entry) == 16:
        start, end = (int(x) for x in np.frombuffer(entry, dtype="<u8"))
        if index_bytes(n_buckets) <= start <= end:
            return start, end
    raise ValueError(
        f"{name} is not a pieces file of {n_buckets} mixture parts (an index entry: "
        f"{entry.hex()}): delete its counts artifact folder and rerun"
    )


def slice_offsets(name: str, header: bytes, n_slices: int) -> np.ndarray:
    """The n_slices + 1 byte offsets in the header of piece ``name``, int64. Raises
    ValueError, naming the piece, when the header cannot be one of n_slices slices."""
    head = header_bytes(n_slices)
    offsets = np.frombuffer(header[: len(header) // 8 * 8], dtype="<u8").astype(np.int64)
    if len(header) != head or offsets[0] < head or np.any(np.diff(offsets) < 0):
        raise ValueError(
            f"{name} is not a mixture piece of {n_slices} slices (its header: "
            f"{offsets[:4].tolist()}...): delete its counts artifact folder and rerun"
        )
    return offsets


def slice_rows(name: str, data: pa.Buffer) -> list[pa.RecordBatch]:
    """The record batches (PIECE_SCHEMA) in ``data``, one slice of piece ``name``.
    Raises ValueError, naming the piece, when they cannot be read."""
    reader = pa.ipc.MessageReader.open_stream(data)
    batches = []
    try:
        while True:
            batches.append(pa.ipc.read_record_batch(reader.read_next_message(), PIECE_SCHEMA))
    except StopIteration:
        return batches
    # Parsing bytes in memory: ArrowInvalid, or a plain OSError for a bad length.
    except (pa.ArrowException, OSError) as e:
        raise ValueError(
            f"{name}: a slice cannot be read ({e}): delete its counts artifact folder and rerun"
        ) from e


def gather(
    names: Sequence[str],
    n_slices: int,
    read_ranges: Callable[[list[tuple[int, int, int]]], list[bytes]],
) -> Iterator[pa.Table]:
    """One output shard from the encoded pieces ``names`` (``piece_bytes``), slice by
    slice: slice r of every piece, sorted by ``PART_ORDER``, key dropped; each yielded
    table has MIXTURE_SCHEMA and at least one row. Together they are every piece's rows
    in the part's order, since a slice is a range of keys.

    ``read_ranges`` takes (piece index, start, end) triples and returns those byte
    ranges, in order. Memory holds one slice of every piece (about SLICE_BYTES) plus
    what was read ahead (at most ``READ_AHEAD_BYTES``, or one slice of a piece larger
    than its share), never the part."""
    heads = read_ranges([(p, 0, header_bytes(n_slices)) for p in range(len(names))])
    offsets = [slice_offsets(n, h, n_slices) for n, h in zip(names, heads, strict=True)]
    share = max(1, READ_AHEAD_BYTES // max(1, len(names)))
    held: list[tuple[int, pa.Buffer]] = [(0, pa.py_buffer(b""))] * len(names)  # (from, bytes)
    held_to = [0] * len(names)  # slices below this index are in held[p]
    for r in range(n_slices):
        wanted = []  # (piece, first slice, end slice) to read now
        for p, o in enumerate(offsets):
            if o[r + 1] > o[r] and held_to[p] <= r:
                end = r + 1
                while end < n_slices and o[end + 1] - o[r] <= share:
                    end += 1
                wanted.append((p, r, end))
        ranges = [(p, int(offsets[p][a]), int(offsets[p][b])) for p, a, b in wanted]
        for (p, a, b), data in zip(wanted, read_ranges(ranges) if ranges else [], strict=True):
            held[p], held_to[p] = (int(offsets[p][a]), pa.py_buffer(data)), b
        batches = []
        for p, o in enumerate(offsets):
            if o[r + 1] > o[r]:
                start, data = held[p]
                batches += slice_rows(names[p], data.slice(o[r] - start, o[r + 1] - o[r]))
        if batches:
            table = pa.Table.from_batches(batches, PIECE_SCHEMA).sort_by(PART_ORDER)
            yield table.drop_columns(["key"]).combine_chunks()


def write_part(slices: Iterable[pa.Table], sink: BinaryIO) -> int:
    """Write ``slices`` (``gather``) to ``sink`` as one Parquet file, a row group per
    slice; return its rows. A part with no rows is a file with MIXTURE_SCHEMA and no
    rows."""
    rows = 0
    with pq.ParquetWriter(sink, MIXTURE_SCHEMA) as writer:
        for piece in slices:
            writer.write_table(piece, row_group_size=piece.num_rows)
            rows += piece.num_rows
    return rows
