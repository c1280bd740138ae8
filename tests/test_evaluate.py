"""Proxy evaluation and parameter search through the real flows, on the tiny corpus.

Tiny proxies (width 32, 8k tokens) and a 300-token BPE keep it to seconds per proxy;
what is checked is the wiring: held-out documents never reach a mixture, the evaluation
sets are exactly those documents' first tokens, each result equals a proxy trained here
by hand on the same mixture, reruns train nothing, and search writes a config that
reproduces its chosen mixture."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_config, write_tiny_corpus

from flows.evaluate import run_evaluate, run_search
from samplemix.config import load_config
from samplemix.evaluation import stages as ev
from samplemix.evaluation.ngram import fit_ngram, ngram_loss
from samplemix.evaluation.proxy import train_proxy
from samplemix.io.store import Key
from samplemix.mixing import weights as mixing
from samplemix.pipeline import keys as pipeline_keys

pytestmark = pytest.mark.slow
HELDOUT = 0.25
PROXY = {
    "evaluate.heldout_fraction": HELDOUT,
    "evaluate.eval_tokens": 400,
    "evaluate.vocab_size": 300,
    "evaluate.tokenizer_docs": 30,
    "evaluate.seeds": [0, 1],
    "evaluate.controls": ["repeat:3"],
    "evaluate.proxy.n_layer": 1,
    "evaluate.proxy.n_head": 2,
    "evaluate.proxy.d_model": 32,
    "evaluate.proxy.seq_len": 32,
    "evaluate.proxy.batch_size": 4,
    "evaluate.proxy.tokens": 4096,
    "evaluate.proxy.device": "cpu",
    "compute.torch_threads": 1,
    "compute.n_workers": 1,  # one worker starts fastest; tiny tasks need no more
}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, cluster: dict) -> dict:
    root = tmp_path_factory.mktemp("evaluate")
    write_tiny_corpus(root / "corpus")
    cfg = tiny_config(root / "corpus", root / "out", **(PROXY | cluster))
    first = run_evaluate(cfg, ["vanilla"], [0.8, 0.0])
    again = run_evaluate(cfg, ["vanilla"], [0.8, 0.0])  # every mix and proxy from the store
    return {"root": root, "cfg": cfg, "first": first, "again": again, "cluster": cluster}


def only_key(root: Path, stage: str) -> Key:
    """The one artifact of ``stage`` in the test's store."""
    (kid,) = [p.name for p in (root / "out" / "store" / stage).iterdir() if p.name[0] != "_"]
    return Key(stage, kid, {})


def read_plan(out: Path) -> pa.Table:
    return pq.read_table(sorted((out / "plan").glob("*.parquet")))


def test_heldout_documents_are_in_no_mixture(evaluated: dict) -> None:
    root, cfg = evaluated["root"], evaluated["cfg"]
    for name in ["vanilla", "samplemix-a0.8", "samplemix-a0"]:
        plan = read_plan(root / "out" / name)
        held = mixing.heldout_mask(plan.column("id").to_pylist(), HELDOUT, cfg.mixing.seed)
        assert 0 < held.sum() < plan.num_rows
        assert (plan.column("weight").to_numpy()[held] == 0).all(), name
        assert (plan.column("count").to_numpy()[held] == 0).all(), name
        mixture = pq.read_table(sorted((root / "out" / name / "mixture").glob("*.parquet")))
        assert not set(mixture.column("id").to_pylist()) & set(
            np.array(plan.column("id").to_pylist())[held]
        )
        # Every domain keeps some held-out documents to be scored on.
        domains = plan.column("domain").to_numpy(zero_copy_only=False)
        assert set(domains[held]) == set(domains)


def test_evaluation_sets_are_the_heldout_documents(evaluated: dict) -> None:
    root, cfg = evaluated["root"], evaluated["cfg"]
    store = pipeline_keys.store_for(cfg)
    keys = {a.stage: a for a in store.artifacts()}
    assert "evalsets" not in keys  # evaluation artifacts are outside the mix stages (gc)
    tok = ev.load_proxy_tokenizer(store, only_key(root, "proxytok"), cfg)
    got = ev.load_evalsets(store, only_key(root, "evalsets"))
    # By hand: held-out ids per domain, in the seeded order, their texts from the source
    # Parquet files, tokenized and cut at eval_tokens.
    plan = read_plan(root / "out" / "vanilla")
    ids = plan.column("id").to_pylist()
    held = mixing.heldout_mask(ids, HELDOUT, cfg.mixing.seed)
    texts = {}
    for path in sorted((root / "corpus").rglob("*.parquet")):
        t = pq.read_table(path)
        texts.update(zip(t.column("id").to_pylist(), t.column("text").to_pylist(), strict=True))
    domains = plan.column("domain").to_pylist()
    for domain in sorted(set(domains)):
        mine = [i for i, d, h in zip(ids, domains, held, strict=True) if h and d == domain]
        u = mixing.doc_uniforms(mine, cfg.mixing.seed, "evalset")
        ordered = [mine[j] for j in np.argsort(u, kind="stable")]
        flat = np.concatenate([tok.encode(texts[i]) for i in ordered])[:400]
        assert np.array_equal(np.concatenate(got[f"domain/{domain}"]), flat), domain
    assert tok.vocab_size == 300


def test_a_result_equals_a_proxy_trained_by_hand(evaluated: dict) -> None:
    root, cfg = evaluated["root"], evaluated["cfg"]
    runs = evaluated["first"]["runs"]
    assert [(r["variant"], r["seed"]) for r in runs] == [
        (v, s)
        for v in ["vanilla", "samplemix-a0.8", "samplemix-a0", "control-repeat-3"]
        for s in (0, 1)
    ]
    store = pipeline_keys.store_for(cfg)
    tok = ev.load_proxy_tokenizer(store, only_key(root, "proxytok"), cfg)
    sets = ev.load_evalsets(store, only_key(root, "evalsets"))
    train = ev.mixture_token_ids(str(root / "out" / "samplemix-a0.8"), tok)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Dask worker ran it
    try:
        proxy = cfg.evaluate.proxy.model_copy(update={"seed": 1})
        res = train_proxy(train, proxy, tok.vocab_size, tok.eot_id, sets, log_every=1)
    finally:
        torch.set_num_threads(before)
    run = next(r for r in runs if r["variant"] == "samplemix-a0.8" and r["seed"] == 1)
    for domain, loss in run["losses"].items():
        assert loss == pytest.approx(res.eval_losses[f"domain/{domain}"], rel=1e-5), domain
    assert run["heldout"] == pytest.approx(np.mean(list(run["losses"].values())))
    assert run["objective"] == run["heldout"]  # no target set
    assert run["target"] is None


def test_the_ngram_instrument_equals_a_fit_by_hand(evaluated: dict) -> None:
    root, cfg = evaluated["root"], evaluated["cfg"]
    store = pipeline_keys.store_for(cfg)
    tok = ev.load_proxy_tokenizer(store, only_key(root, "proxytok"), cfg)
    sets_key = only_key(root, "evalsets")
    sets = ev.load_evalsets(store, sets_key)
    p = cfg.evaluate.proxy
    tokens = p.steps * p.tokens_per_step  # the proxy's training tokens: 4,096
    mix = evaluated["first"]["mixes"]["samplemix-a0"]
    train = ev.mixture_token_ids(str(root / "out" / "samplemix-a0"), tok)
    # The mixture's documents in row order, cut at the proxy's tokens, never cycled.
    flat = np.concatenate(train)[:tokens]
    stream = ev.training_stream(train, tokens)
    assert np.array_equal(np.concatenate(stream), flat)
    assert np.array_equal(np.concatenate(ev.training_stream(train, 10**9)), np.concatenate(train))
    summary = store.summary(ev.ngram_key(mix["mixture_key"], sets_key, tokens, 4, None))
    assert summary["tokens_trained"] == len(flat)
    for order in (1, 2, 4):
        lm = fit_ngram(stream, order, tok.vocab_size)
        for name, docs in sets.items():
            got = summary["losses"][str(order)][name.removeprefix("domain/")]
            assert got == pytest.approx(ngram_loss(lm, docs), rel=1e-12), (order, name)
    report = evaluated["first"]["report"]
    assert report["vanilla"]["ngram"]["versus"] is None  # the reference
    versus = report["samplemix-a0"]["ngram"]["versus"]
    assert versus["reference"] == "vanilla"
    own = report["samplemix-a0"]["ngram"]["objective"]
    assert versus["mean"] == pytest.approx(own - report["vanilla"]["ngram"]["objective"])
    text = (root / "out" / "evaluate" / "evaluate.md").read_text()
    assert "## Instruments" in text and "Spearman" in text


def test_a_repeat_control_trains_on_the_baselines_first_documents(evaluated: dict) -> None:
    root, cfg = evaluated["root"], evaluated["cfg"]
    store = pipeline_keys.store_for(cfg)
    tok = ev.load_proxy_tokenizer(store, only_key(root, "proxytok"), cfg)
    first3 = ev.mixture_token_ids(str(root / "out" / "vanilla"), tok)[:3]
    runs = [r for r in evaluated["first"]["runs"] if r["variant"] == "control-repeat-3"]
    assert [r["mixture_tokens"] for r in runs] == [sum(len(d) for d in first3)] * 2
    report = evaluated["first"]["report"]
    assert report["control-repeat-3"]["paired"]["reference"] == "vanilla"
    text = (root / "out" / "evaluate" / "evaluate.md").read_text()
    assert "Control control-repeat-3" in text and "(control)" in text


def test_second_evaluation_trains_nothing(evaluated: dict) -> None:
    first, again = evaluated["first"], evaluated["again"]
    assert not any(r["cached"] for r in first["runs"])
    assert all(r["cached"] for r in again["runs"])
    assert [r["objective"] for r in again["runs"]] == [r["objective"] for r in first["runs"]]


def test_report_files(evaluated: dict) -> None:
    out = evaluated["root"] / "out" / "evaluate"
    text = (out / "evaluate.md").read_text()
    assert "quality only" in text and "vanilla" in text
    for name in ["evaluate_methods.png", "evaluate_alpha.png", "evaluate_domains.png"]:
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    rows = list(csv.DictReader((out / "results.csv").open()))
    by = {(r["variant"], int(r["seed"])): float(r["objective"]) for r in rows}
    for r in evaluated["first"]["runs"]:
        assert by[(r["variant"], r["seed"])] == pytest.approx(r["objective"], rel=1e-6)
    assert evaluated["first"]["report"]["best"] in {"vanilla", "samplemix-a0.8", "samplemix-a0"}


def test_evaluate_without_heldout_documents_fails_clearly(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "c", tmp_path / "o")
    with pytest.raises(ValueError, match="evaluate.heldout_fraction"):
        run_evaluate(cfg, ["vanilla"], [])


def test_search_writes_a_config_that_reproduces_its_choice(evaluated: dict, tmp_path: Path) -> None:
    root = evaluated["root"]
    settings = PROXY | {"evaluate.seeds": [0]} | evaluated["cluster"]
    cfg = tiny_config(root / "corpus", tmp_path / "out", **settings)
    result = run_search(cfg, "samplemix", draws=3, validation=1, candidates=500, top=2)
    out = tmp_path / "out" / "search"
    chosen = load_config(out / "chosen.yaml")
    assert chosen.mixing.method == "samplemix"
    assert chosen.mixing.alpha == pytest.approx(result["theta"]["alpha"])
    assert chosen.output.path == str(tmp_path / "out" / "search" / "chosen")
    rows = list(csv.DictReader((out / "draws.csv").open()))
    assert len(rows) == 3
    # The chosen mixture was built from that config: its plan's weights are the SampleMix
    # weights at the chosen α (held-out documents at 0).
    plan = read_plan(out / "chosen")
    base = read_plan(out / "base")
    assert plan.column("id").to_pylist() == base.column("id").to_pylist()
    q, d = plan.column("quality").to_numpy(), plan.column("diversity").to_numpy()
    held = mixing.heldout_mask(plan.column("id").to_pylist(), HELDOUT, cfg.mixing.seed)
    a = chosen.mixing.alpha
    qn = (q - q.min()) / (q.max() - q.min())
    dn = (d - d.min()) / (d.max() - d.min())
    w = plan.column("weight").to_numpy()
    assert np.allclose(w[~held], (a * dn + (1 - a) * qn)[~held], atol=1e-9)
    assert (w[held] == 0).all()
    assert result["instrument"] == "proxy"
    assert result["mae"] is not None and result["mae"] >= 0
    text = (out / "search.md").read_text()
    assert "Instrument: **proxy**" in text and "## Checked by proxy" in text
    constant = "Constant-predictor MAE (the training draws' mean loss for every draw)"
    assert f"{constant}: {result['constant_mae']:.4g}" in text
    # 2 training draws: the regressor can only predict their mean, the constant predictor.
    assert result["predicts"] is False and "the fit predicts nothing" in text


def test_an_ngram_search_measures_each_draw_by_the_ngram_instrument_alone(
    evaluated: dict, tmp_path: Path
) -> None:
    root = evaluated["root"]
    settings = PROXY | {"evaluate.seeds": [0]} | evaluated["cluster"]
    cfg = tiny_config(root / "corpus", tmp_path / "out", **settings)
    # Few draws: a tiny mix takes seconds here, and the default (16) would take minutes;
    # the held-out draws are left to their default, max(4, 6 // 4) = 4.
    result = run_search(cfg, "samplemix", 6, None, 500, 2, instrument="ngram")
    assert (result["instrument"], result["draws"], result["validation"]) == ("ngram", 6, 4)
    store = pipeline_keys.store_for(cfg)
    assert not (tmp_path / "out" / "store" / "proxy").exists()  # no proxy trained
    sets_key = only_key(tmp_path, "evalsets")
    p = cfg.evaluate.proxy
    tokens = p.steps * p.tokens_per_step
    out = tmp_path / "out" / "search"

    def objective(mixture: Path) -> float:
        """The n-gram objective of the mixture published at ``mixture``, from the store."""
        summary = json.loads((mixture / "_manifest.json").read_text())["summary"]
        key = ev.ngram_key(summary["mixture_key"], sets_key, tokens, 4, None)
        return store.summary(key)["objectives"]["4"]["objective"]

    rows = list(csv.DictReader((out / "draws.csv").open()))
    assert [int(r["draw"]) for r in rows] == list(range(6))
    for r in rows:
        expected = objective(out / "draws" / f"draw-{int(r['draw']):03d}")
        assert float(r["loss"]) == pytest.approx(expected, abs=5e-7), r["draw"]
    assert result["observed"] == objective(out / "chosen")
    assert result["base"] == objective(out / "base")
    text = (out / "search.md").read_text()
    assert "Instrument: **ngram**" in text and "## Checked by ngram" in text
    constant = "Constant-predictor MAE (the training draws' mean loss for every draw)"
    assert f"{constant}: {result['constant_mae']:.4g}" in text
    assert "Spearman ρ between predicted and observed losses on the 4 held-out draws" in text


def test_an_ngram_search_needs_the_ngram_instrument(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "c", tmp_path / "o", **(PROXY | {"evaluate.ngram_order": 0}))
    with pytest.raises(ValueError, match="evaluate.ngram_order > 0"):
        run_search(cfg, "samplemix", None, None, 500, 2, instrument="ngram")
    with pytest.raises(ValueError, match="instrument must be one of"):
        run_search(cfg, "samplemix", None, None, 500, 2, instrument="neural")
