"""Planted control arms through the real evaluate flow (issue 27's acceptance).

A 60-documents-per-domain slice of the shared corpus; vanilla against a one-domain
control (every token from ``code``) with the ``cpu`` proxy preset, 100k training
tokens, seeds 0, 1, 2. A proxy that saw only code must score clearly worse on the other
six domains' held-out text, and the evaluation must resolve it, paired, by more than 3 SE
(measured on the 2-core Xeon: +1.04 nats/token, paired SE 0.021, t = 49)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pyarrow.json as pj
import pyarrow.parquet as pq
import pytest
from conftest import SHARED, tiny_config

from flows.evaluate import run_evaluate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/corpus is not beside the repo"),
]
DOCS = 60


def write_slice(root: Path) -> Path:
    """The first ``DOCS`` documents of every shared domain, one Parquet shard each."""
    for domain in sorted(p.name for p in SHARED.iterdir() if p.is_dir()):
        first = sorted((SHARED / domain).glob("part-000.*"))[0]
        table = pj.read_json(first) if first.name.endswith(".jsonl.gz") else pq.read_table(first)
        (root / domain).mkdir(parents=True)
        pq.write_table(
            table.select(["id", "text"]).slice(0, DOCS), root / domain / "part-000.parquet"
        )
    return root


def test_a_one_domain_control_is_resolved_by_more_than_three_paired_se(
    tmp_path: Path, cluster: dict
) -> None:
    cfg = tiny_config(
        write_slice(tmp_path / "corpus"),
        tmp_path / "out",
        **{
            "evaluate.heldout_fraction": 0.2,
            "evaluate.seeds": [0, 1, 2],
            "evaluate.proxy.tokens": 100_000,
            "evaluate.proxy.device": "cpu",
            "evaluate.controls": ["one-domain:code"],
            "evaluate.tokenizer_docs": 300,
            "compute.torch_threads": 1,
            **cluster,
        },
    )
    result = run_evaluate(cfg, ["vanilla"], [])
    report = result["report"]
    control = report["control-one-domain-code"]["paired"]
    assert control["reference"] == "vanilla"
    # Worse than vanilla at every seed, by more than 3 paired standard errors.
    assert all(d > 0 for d in control["diffs"]) and len(control["diffs"]) == 3
    assert control["mean"] > 3 * control["se"] and control["resolved"]
    assert not any(line.startswith("Inconclusive") for line in report["verdict"])
    # The one-domain control's mixture is code only.
    mixture = pq.read_table(
        sorted((tmp_path / "out" / "control-one-domain-code" / "mixture").glob("*.parquet"))
    )
    assert set(mixture.column("domain").to_pylist()) == {"code"}
    # results.csv carries the same paired figures, row by row.
    rows = list(
        csv.DictReader(io.StringIO((tmp_path / "out" / "evaluate" / "results.csv").read_text()))
    )
    diffs = [float(r["diff"]) for r in rows if r["variant"] == "control-one-domain-code"]
    assert diffs == pytest.approx(control["diffs"])
    md = (tmp_path / "out" / "evaluate" / "evaluate.md").read_text()
    assert "paired" in md and "minimum detectable" in md and "(control)" in md
