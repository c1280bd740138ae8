"""Duplicate ids resolved by policy: hand-built shards, expected rows written out; the
same answer in one pass or several (the reduce's memory bound)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from samplemix.io import duplicate_ids
from samplemix.io.duplicate_ids import ENTRY_BYTES, id_hashes, pass_count

# x three times, y twice; e.jsonl has no document (skipped, or every row rejected).
SHARDS = ["a.jsonl", "b.jsonl", "e.jsonl", "c.jsonl"]
IDS = [["x", "y", "x", "z"], ["w", "y"], [], ["x", "v"]]
ROWS = [[0, 1, 3, 4], [0, 2], [], [7, 8]]  # file rows (a blank line or a reject skipped some)


def duplicates(
    shards: list[str],
    hashes: list[np.ndarray],
    rows_of: Callable[[int, np.ndarray], tuple[list[str], np.ndarray]],
    policy: str,
):  # noqa: ANN201 - pa.Table
    """``duplicate_ids.duplicates`` over hashes held in a list."""
    n_docs = sum(len(h) for h in hashes)
    return duplicate_ids.duplicates(shards, hashes.__getitem__, n_docs, rows_of, policy)


@pytest.fixture(params=[1, 3], ids=["one pass", "three passes"], autouse=True)
def passes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Every test in one pass, then in three (8 documents: 3 entries' bytes a pass),
    spilled to files."""
    if request.param > 1:
        monkeypatch.setattr(duplicate_ids, "PASS_BYTES", 3 * ENTRY_BYTES)
    return request.param


def resolve(policy: str, hashes: list[np.ndarray] | None = None) -> list[tuple]:
    def rows_of(i: int, positions: np.ndarray) -> tuple[list[str], np.ndarray]:
        return [IDS[i][p] for p in positions], np.array(ROWS[i])[positions]

    hashes = hashes if hashes is not None else [id_hashes(ids) for ids in IDS]
    t = duplicates(SHARDS, hashes, rows_of, policy).to_pydict()
    return list(zip(t["shard"], t["position"], t["row"], t["action"], t["new_id"], strict=True))


def test_keep_first_drops_every_later_copy() -> None:
    assert resolve("keep_first") == [
        ("a.jsonl", 2, 3, "drop", None),
        ("b.jsonl", 1, 2, "drop", None),
        ("c.jsonl", 0, 7, "drop", None),
    ]


def test_reject_drops_every_copy() -> None:
    assert resolve("reject") == [
        ("a.jsonl", 0, 0, "drop", None),
        ("a.jsonl", 1, 1, "drop", None),
        ("a.jsonl", 2, 3, "drop", None),
        ("b.jsonl", 1, 2, "drop", None),
        ("c.jsonl", 0, 7, "drop", None),
    ]


def test_disambiguate_renames_later_copies_by_shard_and_row() -> None:
    assert resolve("disambiguate") == [
        ("a.jsonl", 2, 3, "rename", "x#a.jsonl:3"),
        ("b.jsonl", 1, 2, "rename", "y#b.jsonl:2"),
        ("c.jsonl", 0, 7, "rename", "x#c.jsonl:7"),
    ]


def test_detail_points_at_another_copy() -> None:
    def rows_of(i: int, positions: np.ndarray) -> tuple[list[str], np.ndarray]:
        return [IDS[i][p] for p in positions], np.array(ROWS[i])[positions]

    t = duplicates(SHARDS, [id_hashes(i) for i in IDS], rows_of, "reject").to_pydict()
    # The first copy of x points at the second, every other copy at the first.
    assert t["other"] == ["a.jsonl:3", "b.jsonl:2", "a.jsonl:0", "a.jsonl:1", "a.jsonl:0"]


def test_unique_ids_and_hash_collisions_give_nothing() -> None:
    unique = [id_hashes(["p", "q"]), id_hashes(["r"]), id_hashes([]), id_hashes(["s"])]
    assert resolve("keep_first", unique) == []
    # Equal hashes for different ids (forced here) are compared by the ids themselves.
    collide = [np.zeros(n, np.uint64) for n in (4, 2, 0, 2)]
    unique_ids = [["a", "b", "c", "d"], ["e", "f"], [], ["g", "h"]]

    def rows_of(i: int, positions: np.ndarray) -> tuple[list[str], np.ndarray]:
        return [unique_ids[i][p] for p in positions], positions

    assert duplicates(SHARDS, collide, rows_of, "keep_first").num_rows == 0


@pytest.mark.parametrize("policy", ["keep_first", "reject", "disambiguate"])
def test_empty_corpus(policy: str) -> None:
    assert duplicates([], [], lambda i, p: ([], p), policy).num_rows == 0


def test_passes_split_the_hashes_and_change_nothing(
    passes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,000 documents in 7 shards with planted repeats: keep_first drops every copy after
    the first in (shard, position) order, derived here with a dict; every shard's hashes
    are read once, however many passes."""
    rng = np.random.default_rng(0)
    ids = [f"d{i}" for i in range(1_700)] + [f"d{i}" for i in rng.integers(0, 1_700, 300)]
    order = rng.permutation(len(ids))
    shard_ids = [[ids[j] for j in part] for part in np.array_split(order, 7)]
    shards = [f"s{i}" for i in range(7)]
    if passes > 1:
        monkeypatch.setattr(duplicate_ids, "PASS_BYTES", 200 * ENTRY_BYTES)
    n_passes = pass_count(2_000)
    assert n_passes == (1 if passes == 1 else 10)
    reads: list[int] = []

    def hashes_of(i: int) -> np.ndarray:
        reads.append(i)
        return id_hashes(shard_ids[i])

    def rows_of(i: int, positions: np.ndarray) -> tuple[list[str], np.ndarray]:
        return [shard_ids[i][p] for p in positions], positions

    t = duplicate_ids.duplicates(shards, hashes_of, 2_000, rows_of, "keep_first").to_pydict()
    seen: set[str] = set()
    expected = []
    for s, names in enumerate(shard_ids):
        for p, name in enumerate(names):
            if name in seen:
                expected.append((shards[s], p, name))
            seen.add(name)
    assert list(zip(t["shard"], t["position"], t["id"], strict=True)) == expected
    assert len(expected) == 2_000 - len(set(ids))
    assert reads == list(range(7))
