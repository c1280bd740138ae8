"""Duplicate ids resolved by policy: hand-built shards, expected rows written out."""

from __future__ import annotations

import numpy as np
import pytest

from samplemix.io.duplicate_ids import duplicates, id_hashes

SHARDS = ["a.jsonl", "b.jsonl", "c.jsonl"]
IDS = [["x", "y", "x", "z"], ["w", "y"], ["x", "v"]]  # x three times, y twice
ROWS = [[0, 1, 3, 4], [0, 2], [7, 8]]  # file rows (a blank line or a reject skipped some)


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
    assert resolve("keep_first", [id_hashes(["p", "q"]), id_hashes(["r"]), id_hashes([])]) == []
    # Equal hashes for different ids (forced here) are compared by the ids themselves.
    collide = [np.zeros(4, np.uint64), np.zeros(2, np.uint64), np.zeros(2, np.uint64)]
    unique_ids = [["a", "b", "c", "d"], ["e", "f"], ["g", "h"]]

    def rows_of(i: int, positions: np.ndarray) -> tuple[list[str], np.ndarray]:
        return [unique_ids[i][p] for p in positions], positions

    assert duplicates(SHARDS, collide, rows_of, "keep_first").num_rows == 0


@pytest.mark.parametrize("policy", ["keep_first", "reject", "disambiguate"])
def test_empty_corpus(policy: str) -> None:
    assert duplicates([], [], lambda i, p: ([], p), policy).num_rows == 0
