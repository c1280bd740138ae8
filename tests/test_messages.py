"""Honest counts and messages (issue 29, item 6).

A shard skipped as unreadable counts the rows its file holds (or says "unknown"),
files under the corpus that are not shards are listed with the reason, a realised
total far off its target is a warning that names the cause and the fix, and the
output's lease outlives a store outage without taking the place of the stage's error.

Real parts throughout: Parquet and JSONL files written into tmp_path (every expected
count comes from what a test wrote), moto's S3 server behind a proxy that can be cut,
and, for the one flow test, a real Prefect server and Dask cluster.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import tiny_config, wait_for, write_tiny_corpus
from s3 import FlakyProxy, MotoServer, s3_storage_options

from samplemix.config import CorpusConfig, load_config
from samplemix.io.corpus import CorpusError, discover, discover_shards, passed_over_lines
from samplemix.io.duplicate_ids import DUPLICATES_SCHEMA
from samplemix.io.store import Output, Store, StoreError, artifact_key
from samplemix.pipeline import keys as pipeline_keys
from samplemix.pipeline import stages
from samplemix.pipeline.summary import report_inputs, shard_accounting
from samplemix.reporting import run_report as report
from samplemix.reporting.run_report import ReportInputs


def write_parquet(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def minimal_inputs(**changes: object) -> ReportInputs:
    """Report inputs of one document met exactly, with ``changes`` applied."""
    base = ReportInputs(
        target_tokens=1_000,
        source_tokens=1_000,
        expected_tokens=1_000.0,
        realised_tokens=1_000,
        sigma_tokens=0.0,
        docs_before={"web": 1},
        docs_after={"web": 1},
        tokens_before={"web": 1_000},
        tokens_after={"web": 1_000},
        quality_by_domain={},
        diversity_by_domain={},
        count_histogram={1: 1},
        overlap_domains=[],
        overlap=np.zeros((0, 0)),
        cluster_sizes=np.array([1]),
        rejects={},
        settings={},
    )
    return dataclasses.replace(base, **changes)


# ---- (a) skipped shards count their rows -------------------------------------------------


def test_skipped_shards_count_the_rows_their_files_hold_or_say_unknown(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    good_texts = ["a first document", "a second one", "and a third"]
    write_parquet(corpus / "web" / "good.parquet", pa.table({"text": good_texts}))
    # Readable files the run cannot use (no text column): their rows are known.
    no_text = pa.table({"body": ["x", "y"]})
    write_parquet(corpus / "web" / "no_text.parquet", no_text)
    lines = [json.dumps({"body": f"line {i}"}) for i in range(50)]
    (corpus / "books").mkdir()
    (corpus / "books" / "no_text.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    # A Parquet file cut in half has no footer: its rows cannot be known.
    whole = write_parquet(tmp_path / "whole.parquet", pa.table({"text": ["t"] * 40}))
    (corpus / "books" / "cut.parquet").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    cfg = load_config(None, {"corpus.input": str(corpus), "corpus.on_bad_shard": "skip"})
    store = Store(str(tmp_path / "store"), stages=pipeline_keys.STAGES)
    shards = discover_shards(cfg.corpus)
    keys = [pipeline_keys.tokens_key(s, cfg) for s in shards]
    tok = [stages.run_tokens(s, cfg, store, k) for s, k in zip(shards, keys, strict=True)]
    ids = {"dropped": {}, "renamed": {}, "dropped_tokens": {}}
    rows = {r["shard"]: r for r in shard_accounting([s.shard_id for s in shards], tok, ids)}

    known = {"web/no_text.parquet": no_text.num_rows, "books/no_text.jsonl.gz": len(lines)}
    assert {s: r["skipped_rows"] for s, r in rows.items()} == {
        **known,
        "books/cut.parquet": "unknown",
        "web/good.parquet": None,
    }
    assert rows["web/good.parquet"]["read"] == rows["web/good.parquet"]["accepted"] == 3
    for shard in (*known, "books/cut.parquet"):  # no row was read, none is invented
        assert rows[shard]["read"] == rows[shard]["accepted"] == rows[shard]["rejected"] == 0

    # Each skipped file keeps one record in its rejects: row -1, the error naming it.
    for s, k in zip(shards, keys, strict=True):
        if s.shard_id in rows and rows[s.shard_id]["skipped_rows"] is not None:
            (record,) = store.get_table(k, "rejects.parquet").to_pylist()
            assert (record["row"], record["reason"]) == (-1, "unreadable_shard")
            assert s.path in record["detail"]

    line = report.skipped_shards_line(list(rows.values()))
    assert line is not None
    assert "3 unreadable shards skipped" in line
    assert f"{sum(known.values()):,} rows in skipped shards; 1 shard unknown" in line

    inputs = minimal_inputs(shards=list(rows.values()))
    md = report.report_markdown(inputs)
    assert line in md and "| books/cut.parquet | unknown |" in md
    assert line in report.run_warnings(inputs)
    table = {
        r["shard"]: r["skipped_rows"]
        for r in csv.DictReader(io.StringIO(report.shards_csv(inputs)))
    }
    assert table == {s: str(n) for s, n in known.items()} | {
        "books/cut.parquet": "unknown",
        "web/good.parquet": "",
    }


# ---- (b) files that are not shards are listed --------------------------------------------


def test_files_that_are_not_shards_are_listed_with_the_reason(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write_parquet(corpus / "web" / "a.parquet", pa.table({"text": ["a"]}))
    (corpus / "books").mkdir()
    (corpus / "books" / "b.jsonl").write_text(json.dumps({"text": "b"}) + "\n")
    others = {
        "web/notes.txt": "extension .txt",
        "books/records.json": "extension .json",
        "web/c.parq": "extension .parq",
        "web/table.csv.gz": "extension .csv.gz",
        "books/_SUCCESS": "no extension",
    }
    for rel in others:
        (corpus / rel).write_text("not a shard")

    found = discover(CorpusConfig(input=str(corpus)))
    assert [s.shard_id for s in found.shards] == ["books/b.jsonl", "web/a.parquet"]
    assert discover_shards(CorpusConfig(input=str(corpus))) == found.shards
    reasons = {f.path: f.reason for f in found.passed_over}
    assert set(reasons) == {str(corpus / rel) for rel in others}
    for rel, ext in others.items():
        assert reasons[str(corpus / rel)].startswith(f"not a shard: {ext}; expected .parquet")

    log = passed_over_lines(found.passed_over)
    assert log[0].startswith(f"{len(others)} paths under corpus.input are not shards")
    for path, reason in reasons.items():  # every file, with its reason, in the log
        assert any(path in line and reason in line for line in log[1:])

    inputs = minimal_inputs(passed_over=[dataclasses.asdict(f) for f in found.passed_over])
    md = report.report_markdown(inputs)
    for path, reason in reasons.items():
        assert f"| {path} | {reason} |" in md
    report.write_report(inputs, str(tmp_path / "report"))
    with open(tmp_path / "report" / "passed_over.csv") as f:
        assert {r["path"]: r["reason"] for r in csv.DictReader(f)} == reasons
    assert str(len(others)) in report.passed_over_line(inputs.passed_over)

    # A glob that matches the domain folders instead of the files in them.
    with pytest.raises(CorpusError) as e:
        discover(CorpusConfig(input=f"{corpus}/*"))
    assert f"{corpus}/books: a folder matched by the glob" in str(e.value)


# ---- (c) a realised total far off its target ---------------------------------------------


def test_a_budget_missed_by_one_huge_document_is_a_warning_naming_it(tmp_path: Path) -> None:
    """Five documents expected 2 copies each (whole: they do not round) and one of a
    million tokens expected 0.9 copies: whichever it draws, the total misses the
    target by far more than 5%, and that document holds all of the rounding spread."""
    doc_ids = [f"small-{i}" for i in range(5)] + ["huge"]
    n_tok = np.array([100] * 5 + [1_000_000])
    expected = np.array([2.0] * 5 + [0.9])
    path = write_parquet(tmp_path / "corpus" / "web" / "p.parquet", pa.table({"text": doc_ids}))
    cfg = load_config(None, {"corpus.input": str(path)})
    (shard,) = discover_shards(cfg.corpus)
    store = Store(str(tmp_path / "store"), stages=pipeline_keys.STAGES)
    tok, ids, qual, assign, weights, budget, counts = (
        artifact_key(stage, "test", shard.shard_id)
        for stage in ("tokens", "ids", "quality", "assign", "weights", "budget", "counts")
    )
    index = {"row": range(6), "id": doc_ids, "domain": ["web"] * 6, "tokens": n_tok}
    store.put_table(tok, "index.parquet", pa.table(index))
    store.put_table(ids, "duplicates.parquet", DUPLICATES_SCHEMA.empty_table())
    store.put_array(qual, "quality.npy", np.zeros(6))
    store.put_table(assign, "assign.parquet", pa.table({"cluster": [0] * 6, "distance": [0.0] * 6}))
    store.put_arrays(weights, "weights.npz", diversity=np.zeros(6), weight=expected)  # scale 1
    store.commit(budget, {"scale": 1.0, "buckets": 1, "slices": 1})
    summary = stages.run_counts(
        shard, tok, ids, qual, assign, weights, budget, {}, cfg, store, counts
    )

    plan = store.get_table(counts, "plan.parquet").to_pydict()
    drawn = dict(zip(plan["id"], plan["count"], strict=True))
    realised = sum(n * t for n, t in zip(plan["count"], plan["tokens"], strict=True))
    target = int(np.dot(expected, n_tok))
    tokens = {
        "read": 6,
        "docs": 6,
        "tokens": int(n_tok.sum()),
        "rejects": {},
        "skipped": False,
        "skipped_rows": None,
    }
    inputs = report_inputs(
        [shard.shard_id],
        [tokens],
        {"dropped": {}, "renamed": {}, "dropped_tokens": {}},
        {},
        [summary],
        {"overlap_domains": ["web"], "overlap": [[1.0]], "cluster_sizes": [6]},
        target,
        {},
    )
    assert inputs.realised_tokens == realised

    warning = report.budget_warning(inputs)
    assert warning is not None
    assert f"realised {realised:,} tokens, {100 * (realised - target) / target:+.1f}%" in warning
    assert "1 document holds 100% of the rounding spread" in warning
    assert f"'huge' in {shard.shard_id}, 1,000,000 tokens, expected 0.90 copies" in warning
    assert f"drew {drawn['huge']})" in warning
    assert "split documents of 1,000,000+ tokens" in warning and "mixing.budget" in warning
    assert "max_repeats" not in warning  # a cap cannot make a count below 1 whole
    assert f"**Warning:** {warning}." in report.report_markdown(inputs)
    assert report.run_warnings(inputs) == [warning]


# ---- (d) the output's lease in a store outage --------------------------------------------


def one_try(endpoint: str) -> dict:
    """s3fs options with botocore's own retries off: the code under test retries."""
    return s3_storage_options(endpoint) | {"config_kwargs": {"retries": {"total_max_attempts": 1}}}


@pytest.fixture
def thread_crashes(monkeypatch: pytest.MonkeyPatch) -> list:
    """Exceptions that escape any thread while the test runs."""
    crashes: list = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    return crashes


def test_lease_renewal_outlives_an_outage_and_renews_after_it(
    moto: MotoServer, proxy: FlakyProxy, thread_crashes: list
) -> None:
    out = Output("s3://mix/lease-outage", one_try(proxy.endpoint), retries=0)
    out.LEASE_TTL = 2.0  # renewed every 0.5 s, retried every 0.125 s
    direct = s3fs.S3FileSystem(skip_instance_cache=True, **moto.storage_options())
    lease = "mix/lease-outage/_lease.json"
    warned: list[str] = []
    with out.lease(0, lambda _: None, warned.append):
        before = json.loads(direct.cat_file(lease))
        proxy.down()
        # Past its expiry the thread is still there, still trying.
        wait_for(lambda: any("has expired" in w for w in warned), "the expiry told")
        assert any(t.name == f"lease {out.root}" and t.is_alive() for t in threading.enumerate())
        proxy.up()
        wait_for(lambda: any("renewed after" in w for w in warned), "a renewal after the outage")
        after = json.loads(direct.cat_file(lease))
        assert after["run"] == before["run"] and after["expires"] > before["expires"]
    assert not direct.exists(lease)  # released at the end
    assert thread_crashes == []
    assert warned[0].startswith(f"output {out.root}: cannot renew its lease _lease.json")
    assert all(w.startswith(f"output {out.root}: ") for w in warned)


def test_a_stage_error_in_an_outage_is_not_replaced_by_the_lease(
    proxy: FlakyProxy, thread_crashes: list
) -> None:
    """The stage's StoreError is what leaves the lease's block, not one about
    _lease.json, which cannot be removed while the store is down either."""
    out = Output("s3://mix/lease-stage", one_try(proxy.endpoint), retries=0)
    store = Store("s3://mix/lease-store", one_try(proxy.endpoint), retries=0)
    key = artifact_key("embed", "1", "books/a.parquet", x=1)
    warned: list[str] = []
    with pytest.raises(StoreError) as e, out.lease(0, lambda _: None, warned.append):
        proxy.down()
        store.put_array(key, "embeddings.npy", np.zeros(2))
    assert str(e.value).startswith(f"cannot reach {store.url(key, 'embeddings.npy')}")
    assert "_lease.json" not in str(e.value)
    assert any(w.startswith(f"output {out.root}: could not remove its lease") for w in warned)
    assert thread_crashes == []


def test_a_lease_taken_over_is_told_once_and_the_output_is_not_sealed(tmp_path: Path) -> None:
    out = Output(str(tmp_path / "out"))
    out.LEASE_TTL = 1.0
    lease = tmp_path / "out" / "_lease.json"
    other = {"run": "another-run", "host": "elsewhere", "pid": 4242, "since": 0.0}
    warned: list[str] = []

    def take_over() -> bool:
        # As a run that found this lease expired does; replaced whole, as the store does.
        tmp = lease.with_suffix(".tmp")
        tmp.write_text(json.dumps({**other, "expires": time.time() + 600}))
        os.replace(tmp, lease)
        return bool(warned)

    with out.lease(0, lambda _: None, warned.append):
        wait_for(take_over, "the lost lease told")
        with pytest.raises(StoreError) as e:
            out.seal(artifact_key("output", "1"), {})
    msg = str(e.value)
    assert msg.startswith(f"output {out.root}: this run no longer holds its lease")
    assert "host elsewhere, pid 4242 holds it now" in msg and "output.path" in msg
    assert [w for w in warned if "no longer holds" in w] == [msg]  # told once, then quiet
    assert json.loads(lease.read_text())["run"] == "another-run"  # never removed theirs
    assert not (tmp_path / "out" / Output.MANIFEST).exists()


@pytest.mark.slow
@pytest.mark.parametrize("per_task", [1, 6])
def test_a_store_error_in_a_stage_names_the_stage_and_shard_first(
    tmp_path: Path, cluster: dict, per_task: int
) -> None:
    """A StoreError raised inside a task reaches the caller as
    ``<stage>/<shard>: <what> ...``: here the tokens stage's folder is a file. With the
    6 shards in one task run (named ``tokens/<first> +5``) the shard is named once."""
    from flows.mix import run_mix

    corpus = write_tiny_corpus(tmp_path / "corpus")
    cfg = tiny_config(corpus, tmp_path / "out", **{"compute.shards_per_task": per_task}, **cluster)
    blocked = tmp_path / "out" / "store" / "tokens"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the tokens stage keeps its folder")
    with pytest.raises(StoreError) as e:
        run_mix(cfg)
    msg = str(e.value)
    tasks = [f"tokens/{s.shard_id}: {blocked}/" for s in discover_shards(cfg.corpus)]
    assert any(msg.startswith(t) for t in tasks), msg
    assert "NotADirectoryError" in msg and "_lease.json" not in msg
