"""The ``samplemix`` command line.

Only this module and flows/ touch Prefect; ``samplemix run`` imports the flow lazily
so that ``samplemix config --show`` stays instant.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from samplemix.config import Config, ConfigError, config_to_yaml, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Sample-wise pre-training data mixtures (SampleMix).",
)

ConfigArg = Annotated[Path | None, typer.Argument(help="YAML config file (optional)")]
Set = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any field: --set mixing.alpha=0.5 (repeatable)"),
]


def _overrides(pairs: list[str] | None, **flags: Any) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected FIELD=VALUE, e.g. mixing.alpha=0.5")
        field, value = pair.split("=", 1)
        out[field.strip()] = yaml.safe_load(value)
    return out


def _load(config: Path | None, pairs: list[str] | None, **flags: Any) -> Config:
    try:
        return load_config(config, _overrides(pairs, **flags))
    except ConfigError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None


@app.command()
def run(
    config: ConfigArg = None,
    input: Annotated[str | None, typer.Option(help="Corpus folder, glob or s3:// URL")] = None,
    output: Annotated[str | None, typer.Option(help="Output folder or s3:// URL")] = None,
    budget: Annotated[str | None, typer.Option(help="Target tokens, e.g. 2M")] = None,
    budget_ratio: Annotated[float | None, typer.Option(help="Target as a ratio of T_src")] = None,
    alpha: Annotated[float | None, typer.Option(help="0 = quality only, 1 = diversity")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the count draws")] = None,
    workers: Annotated[int | None, typer.Option(help="Local Dask workers")] = None,
    set_: Set = None,
) -> None:
    """Build a mixture: score, embed, cluster, weight, count and write it."""
    flags = {
        "corpus.input": input,
        "output.path": output,
        "mixing.budget": budget,
        "mixing.budget_ratio": budget_ratio,
        "mixing.alpha": alpha,
        "mixing.seed": seed,
        "compute.n_workers": workers,
    }
    cfg = _load(config, set_, **flags)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.mix import run_mix
    from samplemix.corpus import CorpusError
    from samplemix.mixing import BudgetError

    logging.getLogger("distributed").setLevel(logging.WARNING)  # cluster chatter, not progress

    try:
        summary = run_mix(cfg)
    except (CorpusError, BudgetError, ConfigError, ValueError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(1) from None
    t, r, s = summary["target_tokens"], summary["realised_tokens"], summary["sigma_tokens"]
    typer.echo(
        f"mixture: {summary['mixture_rows']:,} rows in {summary['mixture_parts']} parts under "
        f"{summary['output']}/mixture\n"
        f"tokens: target {t:,}, realised {r:,} ({(r - t) / max(s, 1e-9):+.2f} σ, σ = {s:,.0f})\n"
        f"report: {summary['output']}/report/report.md"
    )


@app.command("config")
def config_cmd(
    config: ConfigArg = None,
    show: Annotated[bool, typer.Option("--show", help="Print the resolved config")] = True,
    input: Annotated[str | None, typer.Option(help="Corpus folder, glob or s3:// URL")] = None,
    set_: Set = None,
) -> None:
    """Validate a config and print it resolved, with every default."""
    cfg = _load(config, set_, **{"corpus.input": input})
    if show:
        typer.echo(config_to_yaml(cfg), nl=False)


@app.command()
def schema() -> None:
    """Print the config's JSON schema (every field, its type, default and description)."""
    json.dump(Config.model_json_schema(), sys.stdout, indent=2)
    typer.echo()


if __name__ == "__main__":
    app()
