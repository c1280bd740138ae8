"""Which held-out documents the evaluation scores (samplemix.evaluation.stages)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from samplemix.config import load_config
from samplemix.evaluation import stages as ev
from samplemix.io.store import artifact_key
from samplemix.mixing import weights as mixing


def plan(n: int = 400) -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.table(
        {
            "id": [f"doc-{i}" for i in range(n)],
            "domain": ["web" if i % 3 else "code" for i in range(n)],
            "tokens": rng.integers(10, 100, n),
            "quality": rng.random(n),
            "shard": ["s"] * n,
            "row": list(range(n)),
        }
    )


def config(**extra: object):  # noqa: ANN201 - a Config
    return load_config(None, {"corpus.input": "x", "evaluate.heldout_fraction": 0.3, **extra})


def test_quality_filter_keeps_each_domains_better_heldout_documents() -> None:
    p = plan()
    everything = ev.heldout_rows(p, config())
    better = ev.heldout_rows(p, config(**{"evaluate.heldout_quality": 0.5}))
    # By hand: the held-out mask, then per domain q >= the median of its held-out q.
    held = mixing.heldout_mask(p.column("id").to_pylist(), 0.3, 0)
    q = p.column("quality").to_numpy()
    dom = np.array(p.column("domain").to_pylist())
    want = set()
    for d in ("web", "code"):
        mine = held & (dom == d)
        want |= {f"doc-{i}" for i in np.flatnonzero(mine & (q >= np.median(q[mine])))}
    assert set(better.column("id").to_pylist()) == want
    assert set(everything.column("id").to_pylist()) == {f"doc-{i}" for i in np.flatnonzero(held)}
    # Still grouped by domain (sorted), so every domain keeps documents to score.
    assert better.column("domain").to_pylist() == sorted(better.column("domain").to_pylist())
    assert 0 < better.num_rows < everything.num_rows


def test_an_unfiltered_sets_key_is_unchanged_and_a_filtered_one_names_its_documents() -> None:
    ids, tok = artifact_key("ids", "1", x=1), artifact_key("proxytok", "1", y=2)
    cfg, p = config(), plan()
    key = ev.evalsets_key(ids, tok, cfg, p)
    assert "kept" not in key.parts
    half = ev.evalsets_key(ids, tok, config(**{"evaluate.heldout_quality": 0.5}), p)
    other = p.set_column(3, "quality", pa.array(1 - p.column("quality").to_numpy()))
    assert half.id != key.id
    assert (
        ev.evalsets_key(ids, tok, config(**{"evaluate.heldout_quality": 0.5}), other).id != half.id
    )
