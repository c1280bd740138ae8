"""Several mixing methods (and α values) over one corpus, one store, one comparison.

Each variant is a ``mix`` run with its own output under OUT/<name>/ and the shared
store OUT/store (unless ``output.store`` is set), so scores, embeddings and clusters
are computed once and every later variant reuses them. The comparison report goes to
OUT/compare/.
"""

from __future__ import annotations

from samplemix.config import Config, ConfigError
from samplemix.mixing.methods import METHODS


def variants(cfg: Config, methods: list[str], alphas: list[float]) -> dict[str, Config]:
    """Variant name -> its config. ``alphas`` sweep SampleMix's α (names
    ``samplemix-a<α>``); every other method runs once under its own name."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods {unknown[0]!r}: not a method; choose from {list(METHODS)}")
    if not methods and not alphas:
        raise ConfigError("name at least one method (--methods) or α value (--alpha)")
    root = cfg.output.path.rstrip("/")
    store = cfg.output.store or f"{root}/store"
    wanted = [(m, {}) for m in methods if not (m == "samplemix" and alphas)]
    wanted += [("samplemix", {"alpha": a}) for a in alphas]
    out = {}
    for method, extra in wanted:
        name = f"samplemix-a{extra['alpha']:g}" if extra else method
        mixing = cfg.mixing.model_copy(update={"method": method, **extra})
        output = cfg.output.model_copy(update={"path": f"{root}/{name}", "store": store})
        out[name] = cfg.model_copy(update={"mixing": mixing, "output": output})
    return out


def run_compare(cfg: Config, methods: list[str], alphas: list[float]) -> dict:
    """Run every variant (``variants``) and write OUT/compare/ (compare.md, .csv, PNGs).
    Returns {"runs": {name: run summary}, "comparison": the comparison's summary}."""
    from flows.mix import run_mix
    from flows.runtime import check_inputs, prefect_api, shared_cluster, with_block_credentials
    from samplemix.pipeline.keys import pinned_config
    from samplemix.reporting.compare import write_comparison

    check_inputs(cfg)
    with prefect_api(), shared_cluster(with_block_credentials(cfg)) as shared:
        configs = variants(pinned_config(shared), methods, alphas)  # one commit for all
        runs = {name: run_mix(c) for name, c in configs.items()}
    targets = {r["target_tokens"] for r in runs.values()}
    comparison = write_comparison(
        {name: c.output.path for name, c in configs.items()},
        f"{cfg.output.path.rstrip('/')}/compare",
        targets.pop() if len(targets) == 1 else None,
        cfg.storage.fsspec_options(cfg.output.path),
    )
    return {"runs": runs, "comparison": comparison}
