"""Comparing mixtures by training proxy LMs on them (method.md §4): data and stages.

Every candidate mixture (a ``mix`` run's output) trains the same small GPT
(``samplemix.evaluation.proxy``) with the same tokenizer, schedule and number of training tokens,
once per seed, and is scored by its mean next-token loss (nats per token) on:

- one held-out set per domain: the documents ``evaluate.heldout_fraction`` holds out of
  every mixture before sampling (``mixing.heldout_mask``), taken in a seeded order and
  cut at ``evaluate.eval_tokens`` proxy tokens;
- optionally a target set: the texts of ``evaluate.target`` (Parquet/JSONL, read like a
  corpus), cut the same way.

A run's ``objective`` is its target loss when a target is given, else ``heldout``: the
mean of the per-domain losses (every domain counts the same, whatever its size).

Artifacts live in the run's store next to the mix stages but are not among them, so
``samplemix gc`` (which removes what no mix config uses) leaves them alone:
``proxytok/{key}`` the trained tokenizer; ``evalsets/{key}`` the evaluation sets as token
ids; ``proxy/{key}`` one proxy run's losses, keyed by (mixture key, evaluation sets,
proxy config resolved on its device, with its seed: ``proxy_config``). A rerun trains
only the proxies it has not trained.

No Prefect here: flows/evaluate.py orchestrates, samplemix/reporting/evaluation_report.py presents.
"""

from __future__ import annotations

import hashlib
import posixpath
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from samplemix.config import Config, ConfigError, CorpusConfig, ProxyConfig
from samplemix.evaluation.ngram import fit_ngram, token_probs
from samplemix.evaluation.proxy import ProxyTokenizer, load_tokenizer, train_proxy, train_tokenizer
from samplemix.io.corpus import Shard, discover_shards, read_docs, read_shard
from samplemix.io.store import Key, Store, artifact_key
from samplemix.mixing import weights as mixing
from samplemix.pipeline import keys
from samplemix.pipeline.graph import Stage, made_by_runner
from samplemix.reporting.compare import read_plan
from samplemix.scoring.models import model_fingerprint, set_torch_threads

# proxy 2: device presets (ProxyConfig.resolved), untied head, Muon. ngram 2: never cycled.
VERSIONS = {"proxytok": "1", "evalsets": "1", "proxy": "2", "ngram": "2"}
#: Evaluation set names: ``domain/<name>`` per domain, and ``target``.
DOMAIN = "domain/"
TARGET = "target"
PLAN_COLUMNS = ("id", "domain", "tokens", "quality", "shard", "row")


# ---- which documents --------------------------------------------------------------------


def require_heldout(cfg: Config) -> None:
    """Raise ConfigError unless ``evaluate.heldout_fraction`` holds documents out."""
    if cfg.evaluate.heldout_fraction <= 0:
        raise ConfigError(
            "evaluate.heldout_fraction is 0: no documents are held out to evaluate on; "
            "set it (e.g. --set evaluate.heldout_fraction=0.05) and rerun"
        )


def heldout_rows(plan: pa.Table, cfg: Config) -> pa.Table:
    """The plan rows held out for evaluation (``PLAN_COLUMNS``), in a seeded order
    within each domain, domains sorted; with ``evaluate.heldout_quality`` > 0 only those
    whose quality reaches that quantile of their domain's held-out documents. Raises
    ConfigError when nothing is held out."""
    require_heldout(cfg)
    frac = cfg.evaluate.heldout_fraction
    ids = plan.column("id").to_pylist()
    held = plan.filter(pa.array(mixing.heldout_mask(ids, frac, cfg.mixing.seed)))
    domains = held.column("domain").to_numpy(zero_copy_only=False).astype(str)
    if cfg.evaluate.heldout_quality > 0:
        q = held.column("quality").to_numpy()
        keep = np.zeros(len(q), dtype=bool)
        for d in np.unique(domains):
            mine = domains == d
            keep[mine] = q[mine] >= np.quantile(q[mine], cfg.evaluate.heldout_quality)
        held, domains = held.filter(pa.array(keep)), domains[keep]
    u = mixing.doc_uniforms(held.column("id").to_pylist(), cfg.mixing.seed, "evalset")
    return held.take(pa.array(np.lexsort((u, domains))))


def tokenizer_sample(plan: pa.Table, cfg: Config) -> pa.Table:
    """``evaluate.tokenizer_docs`` documents that are not held out, chosen by a seeded
    hash of their id (the same whatever the sharding)."""
    ids = plan.column("id").to_pylist()
    free = ~mixing.heldout_mask(ids, cfg.evaluate.heldout_fraction, cfg.mixing.seed)
    rows = plan.filter(pa.array(free))
    u = mixing.doc_uniforms(rows.column("id").to_pylist(), cfg.mixing.seed, "tokenizer")
    return rows.take(pa.array(np.argsort(u, kind="stable")[: cfg.evaluate.tokenizer_docs]))


def read_texts(rows: pa.Table, shards: Mapping[str, Shard], cfg: Config) -> list[str]:
    """The source text of each (shard, row) of ``rows``, in order; each shard read once.
    Raises ValueError naming the shard when a row is no longer there."""
    texts: list[str | None] = [None] * rows.num_rows
    where: dict[str, list[tuple[int, int]]] = {}
    for i, (shard, row) in enumerate(
        zip(rows.column("shard").to_pylist(), rows.column("row").to_pylist(), strict=True)
    ):
        where.setdefault(shard, []).append((i, row))
    for shard, wanted in where.items():
        if shard not in shards:
            raise ValueError(
                f"shard {shard} of the plan is gone from {cfg.corpus.input}; rerun mix"
            )
        docs = read_docs(shards[shard], cfg).docs
        by_row = dict(
            zip(docs.column("row").to_pylist(), docs.column("text").to_pylist(), strict=True)
        )
        for i, row in wanted:
            if row not in by_row:
                raise ValueError(
                    f"row {row} of shard {shard} is in the plan but not in the file: the shard "
                    "changed since the mix run; rerun mix"
                )
            texts[i] = by_row[row]
    return texts  # type: ignore[return-value]


def cut(ids_per_doc: Sequence[Sequence[int]], max_tokens: int) -> list[np.ndarray]:
    """Whole documents in order until ``max_tokens`` tokens, the last one cut to fit.
    Empty documents are skipped. Returns int32 arrays summing to min(max_tokens, total)."""
    out: list[np.ndarray] = []
    left = max_tokens
    for ids in ids_per_doc:
        if left <= 0:
            break
        if len(ids):
            out.append(np.asarray(ids[:left], dtype=np.int32))
            left -= len(out[-1])
    return out


# ---- tokenizer --------------------------------------------------------------------------


def tokenizer_key(ids: Key, cfg: Config) -> Key:
    """``ids``: the ids stage key (it names every shard's tokens key, so the corpus)."""
    e = cfg.evaluate
    if e.tokenizer == "train":
        parts = {
            "train": {"vocab_size": e.vocab_size, "docs": e.tokenizer_docs},
            "ids": ids.id,
            "heldout": keys.heldout_part(cfg),
        }
    else:
        parts = {"name": e.tokenizer, "fingerprint": model_fingerprint(e.tokenizer)}
    return artifact_key("proxytok", VERSIONS["proxytok"], tokenizer=parts)


def run_tokenizer(
    plan: pa.Table, shards: Mapping[str, Shard], cfg: Config, store: Store, key: Key
) -> dict:
    """Train a byte-level BPE on ``tokenizer_sample`` (``evaluate.tokenizer: train``) and
    store tokenizer.json, or check that the named tokenizer loads. Summary: vocab_size,
    eot_id, docs (trained on; 0 for a named tokenizer)."""
    e = cfg.evaluate
    docs = 0
    if e.tokenizer == "train":
        texts = read_texts(tokenizer_sample(plan, cfg), shards, cfg)
        docs = len(texts)
        with tempfile.TemporaryDirectory() as tmp:
            train_tokenizer(texts, e.vocab_size, tmp)
            store.put_bytes(key, "tokenizer.json", (Path(tmp) / "tokenizer.json").read_bytes())
    tok = load_proxy_tokenizer(store, key, cfg)
    return store.commit(key, {"vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "docs": docs})


def load_proxy_tokenizer(store: Store, key: Key, cfg: Config) -> ProxyTokenizer:
    """The tokenizer ``run_tokenizer`` stored (or the named one)."""
    if cfg.evaluate.tokenizer != "train":
        return load_tokenizer(cfg.evaluate.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_bytes(store.get_bytes(key, "tokenizer.json"))
        return load_tokenizer(tmp)


# ---- evaluation sets --------------------------------------------------------------------


def target_shards(cfg: Config) -> list[Shard]:
    """The shard files of ``evaluate.target`` (a file, folder or glob), read with the
    corpus's text column."""
    target = cfg.evaluate.target
    assert target is not None
    corpus = _target_corpus(cfg)
    return discover_shards(corpus, cfg.storage.fsspec_options(target))


def _target_corpus(cfg: Config) -> CorpusConfig:
    return CorpusConfig(
        input=cfg.evaluate.target,
        text_column=cfg.corpus.text_column,
        id_column=None,
        domain_column=None,
    )


def evalsets_key(ids: Key, tokenizer: Key, cfg: Config, plan: pa.Table) -> Key:
    """``plan``: the mix plan the sets are cut from (``plan_for_evaluation``)."""
    e = cfg.evaluate
    target = [[s.shard_id, s.fingerprint] for s in target_shards(cfg)] if e.target else None
    # A quality-filtered set is named by the documents it kept (whatever scorer chose
    # them); an unfiltered one adds nothing, so its key (and its proxies') stays.
    filtered = {}
    if e.heldout_quality > 0:
        kept = "\n".join(heldout_rows(plan, cfg).column("id").to_pylist())
        filtered = {"kept": hashlib.sha256(kept.encode()).hexdigest()[:16]}
    return artifact_key(
        "evalsets",
        VERSIONS["evalsets"],
        ids=ids.id,
        tokenizer=tokenizer.id,
        heldout=keys.heldout_part(cfg),
        eval_tokens=e.eval_tokens,
        target=target,
        **filtered,
    )


def run_evalsets(
    plan: pa.Table,
    shards: Mapping[str, Shard],
    tokenizer: Key,
    cfg: Config,
    store: Store,
    key: Key,
) -> dict:
    """Token ids of every evaluation set, stored as sets.npz (``<i>`` the ids of set i
    concatenated, ``<i>_offsets`` its document boundaries). Summary: names (in order),
    docs and tokens per set.

    A domain's set reads only as many held-out documents as its ``tokens`` in the plan
    (the budget tokenizer's count) suggest are needed: twice ``eval_tokens``."""
    tok = load_proxy_tokenizer(store, tokenizer, cfg)
    want = cfg.evaluate.eval_tokens
    held = heldout_rows(plan, cfg)
    sets: dict[str, list[np.ndarray]] = {}
    for domain in sorted(set(plan.column("domain").to_pylist())):
        rows = held.filter(pc.equal(held.column("domain"), domain))
        if rows.num_rows == 0:
            raise ConfigError(
                f"domain {domain!r} has no held-out documents at evaluate.heldout_fraction = "
                f"{cfg.evaluate.heldout_fraction}; raise it"
            )
        enough = np.cumsum(rows.column("tokens").to_numpy()) < 2 * want
        rows = rows.slice(0, int(enough.sum()) + 1)
        sets[DOMAIN + domain] = cut(tok.encode_batch(read_texts(rows, shards, cfg)), want)
    if cfg.evaluate.target:
        texts = [
            t
            for s in target_shards(cfg)
            for t in read_shard(s, _target_corpus(cfg), cfg.storage.fsspec_options(s.path))
            .docs.column("text")
            .to_pylist()
        ]
        sets[TARGET] = cut(tok.encode_batch(texts), want)
        if not sets[TARGET]:
            raise ConfigError(f"evaluate.target {cfg.evaluate.target} holds no text")
    arrays = {}
    for i, docs in enumerate(sets.values()):
        arrays[str(i)] = np.concatenate(docs) if docs else np.empty(0, dtype=np.int32)
        arrays[f"{i}_offsets"] = np.cumsum([0] + [len(d) for d in docs])
    store.put_arrays(key, "sets.npz", **arrays)
    summary = {
        "names": list(sets),
        "docs": {n: len(d) for n, d in sets.items()},
        "tokens": {n: int(sum(len(x) for x in d)) for n, d in sets.items()},
    }
    return store.commit(key, summary)


def load_evalsets(store: Store, key: Key) -> dict[str, list[np.ndarray]]:
    """{set name: token ids per document} as ``run_evalsets`` stored them."""
    names = store.summary(key)["names"]  # type: ignore[index]
    arrays = store.get_arrays(key, "sets.npz")
    out = {}
    for i, name in enumerate(names):
        flat, offsets = arrays[str(i)], arrays[f"{i}_offsets"]
        out[name] = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return out


# ---- proxy runs -------------------------------------------------------------------------


def mixture_token_ids(
    output: str, tok: ProxyTokenizer, storage_options: dict | None = None
) -> list[np.ndarray]:
    """Token ids of every row (every copy) of ``<output>/mixture/part-*.parquet``; each
    distinct document is tokenized once. Raises ValueError when there is no mixture."""
    fs, root = fsspec.core.url_to_fs(output, **(storage_options or {}))
    parts = sorted(fs.glob(posixpath.join(root.rstrip("/"), "mixture", "part-*.parquet")))
    if not parts:
        raise ValueError(f"no mixture parts {output.rstrip('/')}/mixture/part-*.parquet")
    tables = []
    for part in parts:
        with fs.open(part, "rb") as f:
            tables.append(pq.read_table(f, columns=["id", "text"]))
    table = pa.concat_tables(tables)
    ids = table.column("id").to_pylist()
    first: dict[str, int] = {}
    for i, doc in enumerate(ids):
        first.setdefault(doc, i)
    texts = table.column("text")
    unique = tok.encode_batch([texts[i].as_py() for i in first.values()])
    encoded = {doc: np.asarray(u, dtype=np.int32) for doc, u in zip(first, unique, strict=True)}
    return [encoded[doc] for doc in ids]


def proxy_device(cfg: Config) -> str:
    """The device the evaluate flow trains proxies on: ``evaluate.proxy.device``, or for
    'auto' CUDA when ``compute.gpus`` > 0 (the proxy stage then runs on a GPU worker,
    one proxy per GPU) and the CPU otherwise."""
    device = cfg.evaluate.proxy.device
    if device != "auto":
        return device
    return "cuda" if cfg.compute.gpus > 0 else "cpu"


def proxy_config(cfg: Config) -> ProxyConfig:
    """``evaluate.proxy`` resolved on ``proxy_device``: unset fields take that device's
    preset (``ProxyConfig.resolved``). What the flow trains, keys and fits n-grams on."""
    return cfg.evaluate.proxy.resolved(proxy_device(cfg))


def proxy_key(mixture: str, evalsets: Key, proxy: ProxyConfig, docs: int | None = None) -> Key:
    """``mixture``: the mix run's ``mixture_key`` (it fixes the mixture's content);
    ``proxy``: resolved (``proxy_config``), so the key holds the preset's values and the
    device, and a CPU and a GPU run never share a result; ``docs``: train on the
    mixture's first ``docs`` rows only (a ``repeat`` control)."""
    if not proxy.is_resolved:
        raise ValueError("proxy_key needs a resolved ProxyConfig (stages.proxy_config)")
    extra = {} if docs is None else {"docs": docs}  # keys of every other run stay as they were
    return artifact_key(
        "proxy",
        VERSIONS["proxy"],
        mixture=mixture,
        evalsets=evalsets.id,
        proxy=proxy.model_dump(mode="json"),
        **extra,
    )


def objective(losses: Mapping[str, float]) -> dict[str, float | None]:
    """heldout = mean of the per-domain losses; target = the target loss or None;
    objective = target when given, else heldout."""
    domains = [v for k, v in losses.items() if k.startswith(DOMAIN)]
    heldout = float(np.mean(domains))
    target = losses.get(TARGET)
    return {
        "heldout": heldout,
        "target": target,
        "objective": heldout if target is None else target,
    }


def arm_inputs(
    output: str, tokenizer: Key, evalsets: Key, cfg: Config, docs: int | None, store: Store
) -> tuple[ProxyTokenizer, list[np.ndarray], dict[str, list[np.ndarray]]]:
    """What a proxy run and an n-gram fit start from: the tokenizer, the token ids of the
    mixture under ``output`` (its first ``docs`` rows; all with None) and the evaluation
    sets ({name: token ids per document})."""
    tok = load_proxy_tokenizer(store, tokenizer, cfg)
    train = mixture_token_ids(output, tok, cfg.storage.fsspec_options(output))[:docs]
    return tok, train, load_evalsets(store, evalsets)


def run_proxy(
    output: str,
    tokenizer: Key,
    evalsets: Key,
    proxy: ProxyConfig,
    cfg: Config,
    docs: int | None,
    store: Store,
    key: Key,
) -> dict:
    """Train one proxy on the mixture under ``output`` and score it on the evaluation sets.
    ``docs``: train on the mixture's first ``docs`` rows only, cycled for the same training
    tokens (rows are globally shuffled, so they are a seeded sample of the mixture).
    ``proxy``: resolved (``proxy_config``); a mixture with fewer tokens than its
    ``tokens_trained`` is cycled (``epochs`` > 1, logged).

    Summary: losses {domain: nats/token}, target, heldout, objective (``objective``),
    curve [(step, train loss)], steps, tokens_trained, mixture_tokens (proxy tokens in the
    mixture, copies counted), epochs, n_params, device, seconds."""
    set_torch_threads(cfg.compute.torch_threads)
    tok, train, sets = arm_inputs(output, tokenizer, evalsets, cfg, docs, store)
    res = train_proxy(
        train, proxy, tok.vocab_size, tok.eot_id, sets, log_every=max(1, proxy.steps // 50)
    )
    return store.commit(
        key,
        {
            "losses": {
                k.removeprefix(DOMAIN): v for k, v in res.eval_losses.items() if k != TARGET
            },
            **objective(res.eval_losses),
            "curve": res.loss_curve,
            "steps": res.steps,
            "tokens_trained": res.tokens_trained,
            "mixture_tokens": int(sum(len(x) for x in train)),
            "epochs": res.epochs,
            "n_params": res.n_params,
            "device": res.device,
            "seconds": res.seconds,
        },
    )


# ---- n-gram instrument ------------------------------------------------------------------

#: Orders every n-gram run fits besides ``evaluate.ngram_order``: the unigram and bigram
#: floors a proxy must beat to show it learned more than token and pair frequencies.
FLOORS = (1, 2)


def ngram_key(mixture: str, evalsets: Key, tokens: int, order: int, docs: int | None) -> Key:
    """Like ``proxy_key``, for the n-gram fit on ``tokens`` training tokens."""
    return artifact_key(
        "ngram",
        VERSIONS["ngram"],
        mixture=mixture,
        evalsets=evalsets.id,
        tokens=tokens,
        order=order,
        docs=docs,
    )


def training_stream(train: Sequence[np.ndarray], tokens: int) -> list[np.ndarray]:
    """``train``'s documents in order, cut at ``tokens`` tokens: the n-gram's training
    data. Never cycled (the proxy cycles its windows when the mixture is short): a count
    model fitted on k copies sees no singletons, so Kneser–Ney's discounts, estimated from
    the counts of counts, lose the mass they give unseen continuations; and a GPU preset's
    10^8 tokens would copy a small mixture into gigabytes."""
    if not any(len(d) for d in train):
        raise ValueError("the mixture holds no tokens to fit an n-gram model on")
    return cut(train, tokens)


def run_ngram(
    output: str,
    tokenizer: Key,
    evalsets: Key,
    tokens: int,
    cfg: Config,
    docs: int | None,
    store: Store,
    key: Key,
) -> dict:
    """Fit interpolated Kneser–Ney models of order 1, 2 and ``evaluate.ngram_order`` on
    the first ``tokens`` proxy tokens of the mixture under ``output`` (its first ``docs``
    rows, for a ``repeat`` control; all of them when it holds fewer) and score every
    evaluation set; no seed, so one run per mixture.

    Summary: ``losses`` {order: {set name without ``domain/``: nats/token}},
    ``objectives`` {order: ``objective(...)``}, ``order``, ``tokens_trained``. Stores
    ``docs.npz``: per set ``<i>_nll`` (the top order's summed NLL per document, nats) and
    ``<i>_tokens`` (tokens per document), for paired bootstraps over documents."""
    tok, train, sets = arm_inputs(output, tokenizer, evalsets, cfg, docs, store)
    stream = training_stream(train, tokens)
    order = cfg.evaluate.ngram_order
    losses, arrays = {}, {}
    for n in sorted({*FLOORS, order}):
        lm = fit_ngram(stream, n, tok.vocab_size)
        per_set = {}
        for i, (name, set_docs) in enumerate(sets.items()):
            lengths = np.array([len(d) for d in set_docs])
            nll = -np.log(token_probs(lm, set_docs))
            per_set[name] = float(nll.mean())
            if n == order:
                bounds = np.concatenate([[0], np.cumsum(lengths)])
                arrays[f"{i}_nll"] = np.add.reduceat(nll, bounds[:-1]) if len(nll) else nll
                arrays[f"{i}_tokens"] = lengths
        losses[str(n)] = per_set
    store.put_arrays(key, "docs.npz", **arrays)
    return store.commit(
        key,
        {
            "losses": {
                n: {k.removeprefix(DOMAIN): v for k, v in ls.items()} for n, ls in losses.items()
            },
            "objectives": {n: objective(ls) for n, ls in losses.items()},
            "order": order,
            "tokens_trained": int(sum(len(d) for d in stream)),
        },
    )


def load_doc_losses(
    store: Store, evalsets: Key, key: Key
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{set name: (summed NLL per document, tokens per document)} of an n-gram run."""
    names = store.summary(evalsets)["names"]  # type: ignore[index]
    arrays = store.get_arrays(key, "docs.npz")
    return {name: (arrays[f"{i}_nll"], arrays[f"{i}_tokens"]) for i, name in enumerate(names)}


def plan_for_evaluation(output: str, cfg: Config) -> pa.Table:
    """A mix run's plan with the columns evaluation reads (``PLAN_COLUMNS``)."""
    return read_plan(output, cfg.storage.fsspec_options(output), PLAN_COLUMNS)


# The proxy evaluation's stages; flows/evaluate.py makes their calls.
EVALUATION = (
    Stage("proxytok", False, (), made_by_runner, run_tokenizer),
    Stage("evalsets", False, ("proxytok",), made_by_runner, run_evalsets),
    Stage(
        "proxy",
        per_shard=False,
        inputs=("proxytok", "evalsets"),
        calls=made_by_runner,
        run=run_proxy,
        gpu=lambda cfg, args: cfg.compute.gpus > 0,  # one proxy per GPU
    ),
    Stage("ngram", False, ("proxytok", "evalsets"), made_by_runner, run_ngram),
)
