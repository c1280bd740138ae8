"""The ``samplemix`` commands' options and the config they hand to their flow.

The flows themselves are replaced (``cli._run_flow``), so nothing here imports Prefect or
starts a server: these tests pin the option plumbing that ``_config_command`` shares.
"""

from __future__ import annotations

from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from samplemix import cli
from samplemix.config import Config

#: Every command's parameters in the order its --help lists them.
OPTIONS = {
    "run": [
        "config",
        "input",
        "output",
        "budget",
        "budget_ratio",
        "alpha",
        "seed",
        "workers",
        "set_",
    ],
    "compare": ["config", "methods", "alpha", "input", "output", "workers", "set_"],
    "evaluate": [
        "config",
        "methods",
        "alpha",
        "controls",
        "seeds",
        "heldout",
        "input",
        "output",
        "workers",
        "set_",
    ],
    "search": [
        "config",
        "space",
        "instrument",
        "draws",
        "validation",
        "candidates",
        "top",
        "seeds",
        "heldout",
        "input",
        "output",
        "workers",
        "set_",
    ],
    "plan": ["config", "input", "output", "shards", "set_"],
    "config": ["config", "show", "input", "set_"],
}


def parameters(command: str) -> dict[str, Any]:
    """The click parameters of ``command``, by name, in --help order."""
    group = typer.main.get_command(cli.app)  # an app with several commands is a group
    return {p.name: p for p in group.commands[command].params}  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_each_command_lists_its_own_options_between_the_shared_ones(command: str) -> None:
    assert list(parameters(command)) == OPTIONS[command]


def test_shared_options_keep_their_help_and_flags() -> None:
    params = parameters("search")
    assert params["input"].opts == ["--input"]
    assert params["input"].help == "Corpus folder, glob or s3:// URL"
    assert params["heldout"].help == "Share of each domain held out (evaluate.heldout_fraction)"
    assert params["set_"].opts == ["--set"] and params["set_"].multiple
    assert params["config"].required is False


@pytest.fixture
def flow_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, tuple[Any, ...]]]:
    """The (module, flow, args) of every flow a command runs; each returns ``RESULTS``."""
    calls: list[tuple[str, str, tuple[Any, ...]]] = []

    def run_flow(module: str, name: str, *args: Any) -> Any:
        calls.append((module, name, args))
        return RESULTS[name]

    monkeypatch.setattr(cli, "_run_flow", run_flow)
    return calls


RESULTS: dict[str, Any] = {
    "run_mix": {
        "target_tokens": 100,
        "realised_tokens": 98,
        "sigma_tokens": 2.0,
        "mixture_rows": 10,
        "mixture_parts": 1,
        "output": "out",
        "warnings": [],
    },
    "run_compare": {"runs": {}},
    "run_evaluate": {"report": {"verdict": ["v"]}, "output": "out"},
    "run_search": {
        "mae": None,
        "theta": 0.5,
        "predicted": 1.0,
        "observed": 1.0,
        "base": 1.0,
        "best_draw": 1.0,
        "config": "c",
        "output": "out",
    },
}


def test_run_sets_each_option_s_field_and_set_overrides(flow_calls: list) -> None:
    args = ["run", "--input", "X", "--output", "O", "--budget", "2M", "--alpha", "0.3"]
    args += ["--seed", "4", "--workers", "2", "--set", "mixing.alpha=0.5"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    [(module, name, (cfg,))] = flow_calls
    assert (module, name) == ("mix", "run_mix")
    assert isinstance(cfg, Config)
    assert (cfg.corpus.input, cfg.output.path, cfg.compute.n_workers) == ("X", "O", 2)
    assert (cfg.mixing.budget, cfg.mixing.seed, cfg.mixing.alpha) == (2_000_000, 4, 0.5)


def test_compare_parses_methods_and_alphas(flow_calls: list) -> None:
    args = ["compare", "--input", "X", "--methods", "samplemix, vanilla,", "--alpha", "0,0.5"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    [(_, name, (cfg, names, alphas))] = flow_calls
    assert name == "run_compare" and cfg.corpus.input == "X"
    assert (names, alphas) == (["samplemix", "vanilla"], [0.0, 0.5])


@pytest.mark.parametrize(
    ("extra", "heldout"),
    [
        ([], 0.05),  # no share anywhere: 5%
        (["--heldout", "0"], 0.0),  # asked for
        (["--set", "evaluate.heldout_fraction=0.2"], 0.2),
    ],
)
def test_evaluate_and_search_hold_out_five_percent_unless_told(
    flow_calls: list, extra: list[str], heldout: float
) -> None:
    for command in ("evaluate", "search"):
        args = [command, "--input", "X", "--seeds", "0,1", *extra]
        assert CliRunner().invoke(cli.app, args).exit_code == 0
    for _, _, (cfg, *_) in flow_calls:
        assert cfg.evaluate.heldout_fraction == heldout
        assert cfg.evaluate.seeds == [0, 1]
    assert [name for _, name, _ in flow_calls] == ["run_evaluate", "run_search"]


def test_an_invalid_config_exits_2_before_any_flow(flow_calls: list) -> None:
    result = CliRunner().invoke(cli.app, ["compare", "--input", "X", "--set", "mixing.alpha=7"])
    assert result.exit_code == 2
    assert "mixing.alpha" in result.output
    assert flow_calls == []
