"""Shards grouped into task runs (compute.shards_per_task; issue 28 item 3): a stage of
N shards is ceil(N / group) task runs, caching stays per shard, and the output is the
same bytes as one shard per task."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from conftest import tiny_config, write_tiny_corpus
from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    TaskRunFilter,
    TaskRunFilterName,
)

from flows.mix import TASK_RUNS_PER_STAGE, run_mix, task_groups


def test_groups_are_consecutive_and_bounded() -> None:
    assert task_groups(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert task_groups(3, None) == [range(0, 1), range(1, 2), range(2, 3)]
    assert task_groups(0, None) == [] and task_groups(0, 4) == []
    many = task_groups(10**6, None)  # 10^9 documents in 1,000-document shards
    assert len(many) <= TASK_RUNS_PER_STAGE
    assert [i for g in many for i in g] == list(range(10**6))


def mixture_bytes(out: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((out / "mixture").glob("*.parquet"))]


def embed_task_runs(corpus: str) -> list[str]:
    """Names of the embed task runs of the flow runs on ``corpus`` (its folder name is
    in their run names and unique to the test)."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=corpus))
        )
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="embed/")),
        )
    return sorted(t.name for t in tasks)


@pytest.mark.slow
def test_grouped_tasks_give_the_same_mixture_and_fewer_task_runs(
    tmp_path: Path, cluster: dict
) -> None:
    name = f"corpus-{uuid.uuid4().hex[:8]}"
    corpus = write_tiny_corpus(tmp_path / name, shards_per_domain=2)  # 6 shards
    grouped = tiny_config(corpus, tmp_path / "grouped", **{"compute.shards_per_task": 4}, **cluster)
    first = run_mix(grouped)
    # Caching stays per shard: 6 calls computed, in 2 task runs (4 shards, then 2).
    assert first["computed"]["embed"] == 6
    assert embed_task_runs(name) == [
        "embed/books/part-000.parquet +3",
        "embed/reference/part-000.parquet +1",
    ]
    again = run_mix(grouped)
    assert again["cached"]["embed"] == 6 and again["computed"]["embed"] == 0
    one = run_mix(tiny_config(corpus, tmp_path / "one", **cluster))
    assert one["computed"]["embed"] == 6
    assert mixture_bytes(tmp_path / "grouped") == mixture_bytes(tmp_path / "one")


def test_the_ui_shard_table_is_bounded_and_keeps_the_shards_with_rejects() -> None:
    from flows.mix import SHARD_TABLE_ROWS, shard_table

    n = SHARD_TABLE_ROWS + 500
    shards = [{"shard": f"s{i}", "rejected": int(i % 700 == 0), "renamed": 0} for i in range(n)]
    few, what = shard_table(shards[:10])
    assert few == shards[:10] and what == "per shard"
    rows, what = shard_table(shards)
    assert len(rows) == SHARD_TABLE_ROWS and f"of {n:,} shards" in what
    # Every shard with a reject is in it (i = 0, 700, 1400), in shard order.
    assert {"s0", "s700", "s1400"} <= {r["shard"] for r in rows}
    assert [r["shard"] for r in rows] == sorted(
        (r["shard"] for r in rows), key=lambda s: int(s[1:])
    )


@pytest.mark.slow
def test_a_stage_submits_a_window_of_task_runs_and_refills_it(
    tmp_path: Path, cluster: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With fewer task runs in flight than shards, each finished run makes room for the
    next: every shard is computed once and the mixture is the same bytes."""
    import flows.mix

    corpus = write_tiny_corpus(tmp_path / "corpus", shards_per_domain=4)  # 12 shards
    started: list[int] = []
    start = flows.mix._start
    monkeypatch.setattr(flows.mix, "in_flight", lambda: 2)
    monkeypatch.setattr(
        flows.mix, "_start", lambda ls, n, *since: started.append(n) or start(ls, n, *since)
    )
    windowed = run_mix(tiny_config(corpus, tmp_path / "windowed", **cluster))
    assert windowed["computed"]["embed"] == 12
    # tokens, embed and quality start 2 runs each, then one more as each of 12 finishes.
    assert started.count(2) >= 3 and started.count(1) >= 3 * 12
    monkeypatch.undo()
    run_mix(tiny_config(corpus, tmp_path / "whole", **cluster))
    assert mixture_bytes(tmp_path / "windowed") == mixture_bytes(tmp_path / "whole")
