"""Every row accounted for: duplicate ids under each policy, huge documents, and the
whole output independent of the worker count. Real flows on the tiny corpus."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_config, write_tiny_corpus

from flows.mix import run_mix

BOOKS, CODE, REF = "books/part-000.parquet", "code/part-000.parquet", "reference/part-001.parquet"
HUGE_ROW = 2


def _set(path: Path, column: str, row: int, value: str) -> None:
    t = pq.read_table(path)
    values = t.column(column).to_pylist()
    values[row] = value
    pq.write_table(t.set_column(t.schema.get_field_index(column), column, pa.array(values)), path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny corpus (3 domains x 2 shards x 8 documents) with the id of books row 3
    repeated at books row 5, the id of books row 0 reused at code row 0, and one
    document of 300,000 characters."""
    root = write_tiny_corpus(tmp_path_factory.mktemp("integrity") / "corpus")
    books = pq.read_table(root / BOOKS).column("id").to_pylist()
    _set(root / BOOKS, "id", 5, books[3])
    _set(root / CODE, "id", 0, books[0])
    text = pq.read_table(root / REF).column("text")[HUGE_ROW].as_py()
    _set(root / REF, "text", HUGE_ROW, (text + "\n\n") * (300_000 // len(text) + 1))
    return {"root": root, "x": books[0], "y": books[3]}


def run(corpus: dict, name: str, cluster: dict, **overrides: object) -> tuple[Path, dict]:
    out = corpus["root"].parent / name
    settings = {"output.store": str(corpus["root"].parent / "store"), **cluster, **overrides}
    return out, run_mix(tiny_config(corpus["root"], out, **settings))


def read_dir(path: Path) -> pa.Table:
    return pq.read_table(sorted(path.glob("*.parquet")))


def shard_rows(out: Path) -> dict[str, dict[str, int]]:
    with open(out / "report" / "shards.csv") as f:
        return {r.pop("shard"): {k: int(v) for k, v in r.items()} for r in csv.DictReader(f)}


EXPECTED_DROPS = {
    "keep_first": {(BOOKS, 5), (CODE, 0)},
    "reject": {(BOOKS, 0), (BOOKS, 3), (BOOKS, 5), (CODE, 0)},
    "disambiguate": set(),
}


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["keep_first", "reject", "disambiguate"])
def test_duplicate_ids_are_resolved_and_counted(corpus: dict, policy: str, cluster: dict) -> None:
    out, summary = run(corpus, f"out-{policy}", cluster, **{"corpus.duplicate_ids": policy})
    drops = EXPECTED_DROPS[policy]
    assert summary["read"] == 48
    assert summary["documents"] == 48 - len(drops)

    rejects = pq.read_table(out / "rejects" / "rejects.parquet").to_pydict()
    rows = zip(rejects["shard"], rejects["row"], rejects["reason"], strict=True)
    got = {(s, r) for s, r, why in rows if why == "duplicate_id"}
    assert got == drops

    plan = read_dir(out / "plan")
    ids = plan.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 48 - len(drops)
    if policy == "disambiguate":
        assert {f"{corpus['y']}#{BOOKS}:5", f"{corpus['x']}#{CODE}:0"} <= set(ids)
    mixture = read_dir(out / "mixture")
    copies = mixture.select(["id", "copy"]).to_pylist()
    copies = [(c["id"], c["copy"]) for c in copies]
    assert len(copies) == len(set(copies)) and set(mixture.column("id").to_pylist()) <= set(ids)

    accounting = shard_rows(out)
    assert len(accounting) == 6
    for shard, row in accounting.items():
        dropped = sum(s == shard for s, _ in drops)
        assert row["read"] == 8 == row["accepted"] + row["rejected"]
        assert row["rejected"] == dropped
        assert row["renamed"] == (policy == "disambiguate") * {BOOKS: 1, CODE: 1}.get(shard, 0)


@pytest.mark.slow
def test_huge_documents_are_kept_and_counted_as_truncated(corpus: dict, cluster: dict) -> None:
    out, _ = run(corpus, "out-disambiguate", cluster)
    plan = read_dir(out / "plan")
    where = plan.select(["shard", "row"]).to_pylist()
    huge = plan.column("tokens")[where.index({"shard": REF, "row": HUGE_ROW})].as_py()
    assert huge > 50_000  # counted whole for the budget
    # MiniLM reads 32 tokens here ([CLS] and [SEP] included); the heuristic 100,000 chars.
    long_for_embed = sum(t + 2 > 32 for t in plan.column("tokens").to_pylist())
    report = (out / "report" / "report.md").read_text()
    said = "Documents longer than the {} model reads (it used their start): {:,}."
    assert said.format("embedding", long_for_embed) in report
    assert said.format("quality", 1) in report


@pytest.mark.slow
def test_whole_output_is_identical_across_worker_counts(corpus: dict, cluster: dict) -> None:
    """Cold runs (own stores) on 1 worker of 2 torch threads, on the session's 2 workers
    of 1 thread and on 4 workers of 2 threads write the same bytes."""
    layouts = {
        "one": {"compute.n_workers": 1, "compute.torch_threads": 2},
        "two": cluster,
        "four": {"compute.n_workers": 4, "compute.torch_threads": 2},
    }
    outs = {}
    for name, compute in layouts.items():
        out = corpus["root"].parent / f"workers-{name}"
        run_mix(tiny_config(corpus["root"], out, **compute))
        outs[name] = out

    def files(out: Path) -> dict[str, bytes]:
        skip = {"_manifest.json", "store"}
        return {
            str(p.relative_to(out)): p.read_bytes()
            for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] not in skip
        }

    def embeddings(out: Path) -> dict[str, bytes]:
        """Each key's embeddings: one key, one set of bytes, on any layout."""
        return {p.parent.name: p.read_bytes() for p in (out / "store").glob("embed/*/*.npy")}

    a = files(outs["one"])
    assert len(a) > 10
    for name in ("two", "four"):
        b = files(outs[name])
        assert sorted(a) == sorted(b)
        assert [n for n in a if a[n] != b[n]] == [], f"1 worker vs {name}"
    assert embeddings(outs["one"]) == embeddings(outs["four"])
