"""One stage graph, three walkers: the flow, the plan and the in-process runner agree.

The in-process runner (no Prefect, no Dask) and the flow (a real Prefect server and
Dask cluster) each compute the example corpus into a store of their own; their outputs
must be the same bytes, and the plan of either config must find every task cached.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.mix import run_mix
from samplemix.config import Config, load_config
from samplemix.pipeline import keys
from samplemix.pipeline.graph import GRAPH
from samplemix.pipeline.plan import plan_steps
from samplemix.pipeline.walk import run_in_process

EXAMPLE = Path(__file__).resolve().parents[1] / "examples"


def example_config(out: Path, **overrides: object) -> Config:
    """examples/mix.yaml, made quick: MiniLM at 32 tokens, K = 4."""
    settings = {"output.path": str(out), "embed.max_length": 32, "kmeans.k": 4}
    cfg = load_config(EXAMPLE / "mix.yaml", {**settings, **overrides})
    corpus = cfg.corpus.model_copy(update={"input": str(EXAMPLE / "corpus")})
    return cfg.model_copy(update={"corpus": corpus})


def output_bytes(out: Path) -> dict[str, bytes]:
    """Every file of the mixture, the per-document plan and the rejects, by path."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for folder in ("mixture", "plan", "rejects")
        for p in sorted((out / folder).rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("method", ["samplemix", "ce"])
def test_in_process_runner_writes_the_flows_bytes(
    tmp_path: Path, cluster: dict, method: str
) -> None:
    flow_cfg = example_config(tmp_path / "flow", **{"mixing.method": method}, **cluster)
    direct_cfg = example_config(tmp_path / "direct", **{"mixing.method": method})
    by_flow = run_mix(flow_cfg)
    direct = run_in_process(direct_cfg)
    assert set(direct["cached"].values()) == {0}  # its own store: everything computed
    assert direct["computed"] == by_flow["computed"]
    assert direct["mixture_key"] == by_flow["mixture_key"]
    flow_files = output_bytes(tmp_path / "flow")
    assert len(flow_files) >= 3 + 14  # a mixture part, the rejects, a plan part per shard
    assert output_bytes(tmp_path / "direct") == flow_files
    # The plan walks the same graph: every task of either config is in its store.
    for cfg in (flow_cfg, direct_cfg):
        steps = plan_steps(cfg, keys.store_for(cfg), keys.output_for(cfg))
        assert [s for s in steps if not s.cached] == []
        assert {s.stage for s in steps} == set(direct["computed"])


def test_a_rerun_in_process_reuses_the_flows_store(tmp_path: Path, cluster: dict) -> None:
    cfg = example_config(tmp_path / "out", **cluster)
    first = run_mix(cfg)
    again = run_in_process(cfg)
    assert set(again["computed"].values()) == {0}
    assert again["mixture_key"] == first["mixture_key"]
    assert sum(again["cached"].values()) == sum(first["computed"].values())


def test_the_plan_of_a_new_store_says_what_each_stage_waits_for(tmp_path: Path) -> None:
    cfg = example_config(tmp_path / "out")
    steps = plan_steps(cfg, keys.store_for(cfg), keys.output_for(cfg))
    reasons = {s.stage: s.reason for s in steps}
    # Keys known from the shard files alone: new shards.
    assert {reasons[s] for s in ("tokens", "embed", "quality")} == {"new shard"}
    # q's corpus-wide range needs every quality score: the weights wait for them, and
    # everything after them says so.
    for stage in ("weights", "budget", "counts", "materialise"):
        assert reasons[stage] == "after quality"
    per_stage = {g.name: sum(s.stage == g.name for s in steps) for g in GRAPH if g.applies(cfg)}
    assert per_stage["weights"] == per_stage["tokens"] == 14
