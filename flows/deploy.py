"""The entry flow of samplemix's Prefect deployments (deployments/prefect.yaml).

A deployment's parameters must be JSON: a config file and ``--set``-style overrides
(dotted field -> value), the same two things ``samplemix run CONFIG --set F=V`` takes.
This flow resolves them (``resolve_config``) and runs the ``mix`` flow as a subflow
with its Dask task runner (``run_mix``): the subflow run carries the task runs, the
progress and report artifacts, and is named from the config like any ``mix`` run.

The worker starts this flow in the folder the deployment's pull step names (the
repository root), so a relative ``config_path`` is read from there. Where the work
runs is the worker's business, not the deployment's: a worker whose environment has
Dask's own ``DASK_SCHEDULER_ADDRESS`` sends the tasks to that scheduler unless the
config names one (infra/compose.yaml and infra/k8s/ set it).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from typing import Any

from prefect import flow, get_run_logger

from flows.mix import run_mix
from flows.mix import run_name as mix_run_name
from samplemix.config import Config, ConfigError, load_config

# StorageConfig's secret fields: refused as overrides (see resolve_config).
_SECRET_FIELDS = ("storage.key", "storage.secret", "storage.token")


def resolve_config(config_path: str | None, overrides: Mapping[str, Any] | None) -> Config:
    """The run's Config: ``config_path`` (YAML; None or "" for none) with ``overrides``
    applied, then ``compute.scheduler_address`` from ``DASK_SCHEDULER_ADDRESS`` when
    neither sets it.

    Raises ConfigError naming the field and the fix: a missing file, an invalid
    field, or credentials given as overrides (deployment parameters are stored and
    shown in plain text).
    """
    given = dict(overrides or {})
    if isinstance(given.get("storage"), dict):  # a whole section as one override
        given |= {f"storage.{k}": v for k, v in given.pop("storage").items()}
    secrets = sorted(k for k, v in given.items() if k in _SECRET_FIELDS and v is not None)
    if secrets:
        raise ConfigError(
            f"overrides {secrets}: credentials do not belong in deployment parameters, which "
            "the Prefect server stores and shows in plain text; give the worker AWS_* "
            "environment variables or name a Prefect AwsCredentials block in "
            "storage.aws_credentials_block"
        )
    if config_path and not os.path.isfile(config_path):
        raise ConfigError(
            f"config_path {config_path!r} is not a file under {os.getcwd()}; the deployment's "
            "pull step sets this folder: deploy from the repository root, or pass an "
            "absolute path in the run's parameters"
        )
    cfg = load_config(config_path or None, given)
    address = os.environ.get("DASK_SCHEDULER_ADDRESS")
    if address and not cfg.compute.scheduler_address:
        compute = cfg.compute.model_copy(update={"scheduler_address": address})
        cfg = cfg.model_copy(update={"compute": compute})
    return cfg


def _run_name() -> str:
    """``<deployment>: <the mix run's name>``, e.g. ``mix: mix-corpus-samplemix-a0.8-x0.5``.

    An invalid config must fail the run with its own message, from the flow body, so
    naming never raises: it falls back to ``<deployment>: invalid config``.
    """
    from prefect.runtime import deployment, flow_run

    params = flow_run.parameters
    prefix = deployment.name or "samplemix"
    try:
        cfg = resolve_config(params.get("config_path"), params.get("overrides"))
    except Exception:  # noqa: BLE001 - the flow body reports it, with the field named
        return f"{prefix}: invalid config"
    return f"{prefix}: {mix_run_name(cfg)}"


@flow(name="samplemix", flow_run_name=_run_name)
def mix_deployment(config_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Build the mixture that ``config_path`` with ``overrides`` describes; returns the
    ``mix`` run's summary (budget figures, files written, tasks computed and cached).

    Raises ConfigError naming the bad field when the two do not make a valid config,
    and whatever the ``mix`` run raised when it failed (its message names the stage
    and shard).

    Args:
        config_path: A samplemix YAML config, relative to the repository root (the
            worker's working folder) or absolute; empty: overrides alone.
        overrides: Dotted field -> value, as `samplemix run --set FIELD=VALUE` takes
            them, e.g. {"mixing.budget": "2M", "output.path": "s3://mixes/nightly"}.
    """
    log = get_run_logger()
    cfg = resolve_config(config_path, overrides)
    log.info(
        "config %s with %d overrides: corpus %s -> %s on %s",
        config_path or "(none)",
        len(overrides or {}),
        cfg.corpus.input,
        cfg.output.path,
        cfg.compute.scheduler_address or "a local Dask cluster",
    )
    summary = run_mix(cfg)
    log.info(
        "done: %d of %d target tokens; %d tasks computed, %d from the store",
        summary["realised_tokens"],
        summary["target_tokens"],
        sum(summary["computed"].values()),
        sum(summary["cached"].values()),
    )
    return summary


def _evaluate_run_name() -> str:
    """``<deployment>: evaluate-<n>-mixtures-<corpus folder>``."""
    from prefect.runtime import deployment, flow_run

    params = flow_run.parameters
    n = len(params.get("methods") or []) + len(params.get("alphas") or [])
    prefix = deployment.name or "samplemix-evaluate"
    try:
        cfg = resolve_config(params.get("config_path"), params.get("overrides"))
    except Exception:  # noqa: BLE001 - the flow body reports it, with the field named
        return f"{prefix}: invalid config"
    corpus = posixpath.basename(cfg.corpus.input.rstrip("/*")) or "corpus"
    return f"{prefix}: evaluate-{n}-mixtures-{corpus}"


@flow(name="samplemix-evaluate", flow_run_name=_evaluate_run_name)
def evaluate_deployment(
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    methods: list[str] | None = None,
    alphas: list[float] | None = None,
) -> dict:
    """Mix each method (and SampleMix at each α) of ``config_path`` with ``overrides``
    and compare the mixtures by training proxy LMs on them (``flows/evaluate.py``);
    the report goes to OUT/evaluate/. The config must hold documents out
    (``evaluate.heldout_fraction`` > 0).

    Args:
        config_path: A samplemix YAML config, relative to the repository root (the
            worker's working folder) or absolute; empty: overrides alone.
        overrides: Dotted field -> value, as `samplemix run --set FIELD=VALUE` takes
            them, e.g. {"evaluate.heldout_fraction": 0.05, "evaluate.seeds": [0, 1]}.
        methods: Mixing methods to compare, each one mixture (default: vanilla).
        alphas: SampleMix α values, each one mixture (default: 0.8, 0 and 1).
    """
    from flows.evaluate import run_evaluate  # the proxy-LM stack loads only when used

    cfg = resolve_config(config_path, overrides)
    return run_evaluate(
        cfg,
        ["vanilla"] if methods is None else list(methods),
        [0.8, 0.0, 1.0] if alphas is None else list(alphas),
    )
