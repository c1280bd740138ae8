"""Duplicate document ids across the whole corpus, resolved by ``corpus.duplicate_ids``.

Ids key the per-document randomness (k-means sample, rounding, shuffle) and let
users join the mixture back to their data, so the output must hold each id once.
Documents are ordered by (shard order, row); among the documents sharing an id:

``disambiguate`` (default): the first keeps its id, every later one is renamed
``<id>#<shard>:<row>`` (nothing is lost; the renames are counted).
``keep_first``: the first is kept, the later ones are rejected (``duplicate_id``).
``reject``: all of them are rejected, as no copy can be trusted over another.

Ids are compared exactly; 64-bit hashes only find the candidates. When the hashes
would hold more than ``PASS_BYTES``, they are split by value into passes
(``pass_count``): every shard's hashes are read once and spilled to one local file
per pass (16 bytes per document), then each pass compares its file's hashes alone.
Memory is one pass plus the candidates' ids, whatever the corpus's size.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

DUPLICATES_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("position", pa.int64()),  # index into the shard's accepted documents
        ("row", pa.int64()),  # row in the shard file
        ("id", pa.string()),
        ("action", pa.string()),  # "drop" | "rename"
        ("new_id", pa.string()),  # the renamed id; null when dropped
        ("other", pa.string()),  # "<shard>:<row>" of another document with this id
    ]
)


#: What one pass of ``duplicates`` may hold: its documents' entries (hash, shard and
#: position: ``ENTRY``, 16 bytes) and np.unique's copy of the hashes, its order, sorted
#: values, inverse and counts (8 bytes each): 82 bytes a document in all, measured
#: (bench/bench_ids.py). Past ``MAX_PASSES`` (one spill file open each) a pass holds
#: more instead: 3.2 GB at 10^10 documents.
PASS_BYTES = 256 << 20
ENTRY_BYTES = 82
MAX_PASSES = 256
ENTRY = np.dtype([("hash", "<u8"), ("shard", "<i4"), ("position", "<i4")])


def pass_count(n_docs: int) -> int:
    """Passes over the hashes that keep each within ``PASS_BYTES``: 1 to MAX_PASSES."""
    return min(MAX_PASSES, max(1, math.ceil(n_docs * ENTRY_BYTES / PASS_BYTES)))


def id_hashes(ids: Sequence[str]) -> np.ndarray:
    """A 64-bit hash per id: uint64 (len(ids),)."""
    raw = b"".join(hashlib.blake2b(i.encode(), digest_size=8).digest() for i in ids)
    return np.frombuffer(raw, dtype="<u8")


def duplicates(
    shards: Sequence[str],
    hashes_of: Callable[[int], np.ndarray],
    n_docs: int,
    rows_of: Callable[[int, np.ndarray], tuple[list[str], np.ndarray]],
    policy: str,
) -> pa.Table:
    """The documents ``policy`` drops or renames, in (shard, position) order.

    ``hashes_of(i)`` returns ``id_hashes`` of shard ``shards[i]``'s accepted documents
    (read once); ``n_docs`` is their total; ``rows_of(i, positions)`` returns
    those documents' (ids, file rows). Returns a DUPLICATES_SCHEMA table; empty when
    every id is unique.
    """
    passes = pass_count(n_docs)
    found: list[list[np.ndarray]] = [[] for _ in shards]  # per shard, candidate positions
    for entries in _passes(shards, hashes_of, n_docs, passes):
        if not len(entries):
            continue
        _, inverse, counts = np.unique(entries["hash"], return_inverse=True, return_counts=True)
        shared = entries[counts[inverse] > 1]
        del inverse, counts
        if not len(shared):
            continue
        # Grouped by shard: entries are in shard order, so a shard's run is contiguous.
        present, starts = np.unique(shared["shard"], return_index=True)
        runs = np.split(shared["position"], starts[1:])
        for s, run in zip(present.tolist(), runs, strict=True):
            found[s].append(run)
    members: dict[str, list[tuple[int, int, int]]] = {}  # id -> [(shard, position, row)]
    for s, pieces in enumerate(found):
        if not pieces:
            continue
        positions = np.sort(np.concatenate(pieces)).astype(np.int64)
        ids, rows = rows_of(s, positions)
        for i, p, r in zip(ids, positions.tolist(), rows.tolist(), strict=True):
            members.setdefault(i, []).append((s, p, r))
    if not members:
        return DUPLICATES_SCHEMA.empty_table()
    out: dict[str, list] = {name: [] for name in DUPLICATES_SCHEMA.names}
    for doc_id, group in members.items():
        if len(group) < 2:  # a hash collision between different ids
            continue
        first, second = (f"{shards[s]}:{r}" for s, _, r in group[:2])
        for n, (s, p, r) in enumerate(group):
            if n == 0 and policy != "reject":
                continue
            rename = policy == "disambiguate"
            out["shard"].append(shards[s])
            out["position"].append(p)
            out["row"].append(r)
            out["id"].append(doc_id)
            out["action"].append("rename" if rename else "drop")
            out["new_id"].append(f"{doc_id}#{shards[s]}:{r}" if rename else None)
            out["other"].append(second if n == 0 else first)
    table = pa.table(out, schema=DUPLICATES_SCHEMA)
    order = {name: i for i, name in enumerate(shards)}
    keys = [order[s] for s in out["shard"]]
    return table.take(np.lexsort((np.array(out["position"]), np.array(keys))))


def _entries(s: int, hashes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """ENTRY records (hash, shard s, position) of one shard's ``hashes``, in ``out`` if
    given (len(hashes) records)."""
    out = np.empty(len(hashes), dtype=ENTRY) if out is None else out
    out["hash"], out["shard"], out["position"] = hashes, s, np.arange(len(hashes))
    return out


def _passes(
    shards: Sequence[str], hashes_of: Callable[[int], np.ndarray], n_docs: int, passes: int
) -> Iterator[np.ndarray]:
    """Each pass's ENTRY records, in shard order: with one pass every shard's (``n_docs``
    in all), held at once; with more, pass p's are the hashes that are p modulo
    ``passes``, spilled to a temporary file per pass as the shards are read, then read
    back pass by pass. The passes hold about the same share each as long as most ids
    are distinct (many copies of one id all fall in one pass)."""
    if passes == 1:
        held, start = np.empty(n_docs, dtype=ENTRY), 0
        for s in range(len(shards)):
            h = hashes_of(s)
            if start + len(h) > n_docs:
                raise ValueError(
                    f"{shards[s]} has more ids than the {n_docs} documents its tokens "
                    "summaries count: delete the store's tokens artifacts and rerun"
                )
            _entries(s, h, held[start : start + len(h)])
            start += len(h)
        yield held[:start]
        return
    with tempfile.TemporaryDirectory(prefix="samplemix-ids-") as tmp:
        files = [Path(tmp) / f"pass-{p:05d}" for p in range(passes)]
        with contextlib.ExitStack() as stack:
            sinks = [stack.enter_context(f.open("wb")) for f in files]
            for s in range(len(shards)):
                entries = _entries(s, hashes_of(s))
                which = entries["hash"] % np.uint64(passes)
                order = np.argsort(which, kind="stable")
                bounds = np.searchsorted(which[order], np.arange(passes + 1))
                entries = entries[order]
                for p in np.flatnonzero(np.diff(bounds)).tolist():
                    sinks[p].write(entries[bounds[p] : bounds[p + 1]].tobytes())
        for f in files:
            yield np.fromfile(f, dtype=ENTRY)
            f.unlink()
