"""Duplicate document ids across the whole corpus, resolved by ``corpus.duplicate_ids``.

Ids key the per-document randomness (k-means sample, rounding, shuffle) and let
users join the mixture back to their data, so the output must hold each id once.
Documents are ordered by (shard order, row); among the documents sharing an id:

``disambiguate`` (default): the first keeps its id, every later one is renamed
``<id>#<shard>:<row>`` (nothing is lost; the renames are counted).
``keep_first``: the first is kept, the later ones are rejected (``duplicate_id``).
``reject``: all of them are rejected, as no copy can be trusted over another.

Ids are compared exactly; 64-bit hashes only find the candidates, so memory is
8 bytes per document plus the candidates' ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

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


def id_hashes(ids: Sequence[str]) -> np.ndarray:
    """A 64-bit hash per id: uint64 (len(ids),)."""
    raw = b"".join(hashlib.blake2b(i.encode(), digest_size=8).digest() for i in ids)
    return np.frombuffer(raw, dtype="<u8")


def duplicates(
    shards: Sequence[str],
    hashes: Sequence[np.ndarray],
    rows_of: Callable[[int, np.ndarray], tuple[list[str], np.ndarray]],
    policy: str,
) -> pa.Table:
    """The documents ``policy`` drops or renames, in (shard, position) order.

    ``hashes[i]`` are ``id_hashes`` of shard ``shards[i]``'s accepted documents;
    ``rows_of(i, positions)`` returns those documents' (ids, file rows). Returns a
    DUPLICATES_SCHEMA table; empty when every id is unique.
    """
    if not hashes or not sum(len(h) for h in hashes):
        return DUPLICATES_SCHEMA.empty_table()
    flat = np.concatenate(hashes)
    _, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    candidate = counts[inverse] > 1
    if not candidate.any():
        return DUPLICATES_SCHEMA.empty_table()
    bounds = np.cumsum([0, *map(len, hashes)])
    members: dict[str, list[tuple[int, int, int]]] = {}  # id -> [(shard, position, row)]
    for s in range(len(shards)):
        positions = np.flatnonzero(candidate[bounds[s] : bounds[s + 1]])
        if not len(positions):
            continue
        ids, rows = rows_of(s, positions)
        for i, p, r in zip(ids, positions.tolist(), rows.tolist(), strict=True):
            members.setdefault(i, []).append((s, p, r))
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
