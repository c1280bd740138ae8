"""Tests for samplemix.config (load_config, budgets, error messages, YAML round trip)
and the ``samplemix config`` command."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from samplemix.cli import app
from samplemix.config import Config, ConfigError, config_to_yaml, load_config, parse_count


def write_yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(*args: object) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(*args)
    return str(e.value)


# --- loading ---------------------------------------------------------------------------


def test_yaml_and_dotted_overrides(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        """
corpus:
  input: data/
  text_column: body
mixing:
  alpha: 0.3
  seed: 4
kmeans:
  k: 8
quality:
  scorer: perplexity
""",
    )
    cfg = load_config(path, {"mixing.alpha": 0.6, "output.path": "o", "mixing.seed": None})
    assert cfg.corpus.input == "data/"
    assert cfg.corpus.text_column == "body"
    assert cfg.mixing.alpha == 0.6  # override wins over the file
    assert cfg.mixing.seed == 4  # a None override leaves the file's value
    assert cfg.output.path == "o"  # override of a section the file does not have
    assert cfg.kmeans.k == 8
    assert cfg.quality[0].scorer == "perplexity"
    # Everything else is the default.
    assert cfg.embed.model == "minilm"
    assert cfg.corpus.on_bad_shard == "error"
    assert cfg.mixing.budget is None and cfg.mixing.budget_ratio is None


def test_overrides_alone_need_no_file() -> None:
    cfg = load_config(None, {"corpus.input": "x", "storage.options.anon": True})
    assert cfg.corpus.input == "x"
    assert cfg.storage.options == {"anon": True}


def test_empty_file_and_empty_sections_mean_defaults(tmp_path: Path) -> None:
    empty = write_yaml(tmp_path, "", "empty.yaml")
    assert load_config(empty, {"corpus.input": "x"}) == load_config(None, {"corpus.input": "x"})
    # A section with every key commented out is null in YAML; it means its defaults.
    path = write_yaml(tmp_path, "corpus:\n  input: x\nmixing:\n  # alpha: 0.5\n")
    assert load_config(path).mixing.alpha == 0.8
    assert load_config(path, {"mixing.alpha": 0.5}).mixing.alpha == 0.5


# --- budgets -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "tokens"),
    [
        ("2M", 2_000_000),
        ("2m", 2_000_000),
        ("500k", 500_000),
        ("1.5B", 1_500_000_000),
        ("1.5G", 1_500_000_000),
        ("2T", 2_000_000_000_000),
        (" 3 M ", 3_000_000),
        ("2000000", 2_000_000),
        (2_000_000, 2_000_000),
        (1234.0, 1234),
    ],
)
def test_budget_strings(given: object, tokens: int) -> None:
    assert parse_count(given) == tokens
    assert load_config(None, {"corpus.input": "x", "mixing.budget": given}).mixing.budget == tokens


def test_budget_string_in_a_yaml_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "corpus: {input: x}\nmixing:\n  budget: 1.5B\n")
    assert load_config(path).mixing.budget == 1_500_000_000


@pytest.mark.parametrize(
    "bad",
    ["2MB", "lots", "-5", "", "1e6", "2M tokens", 0, -1, 0.5, "0.0004k", True, float("inf"), [1]],
)
def test_bad_budgets_name_mixing_budget(bad: object) -> None:
    msg = error_of(None, {"corpus.input": "x", "mixing.budget": bad})
    assert "mixing.budget" in msg
    assert "2M" in msg  # shows an accepted form


def test_budget_and_budget_ratio_in_one_file_clash(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "corpus: {input: x}\nmixing:\n  budget: 2M\n  budget_ratio: 0.5\n")
    msg = error_of(path)
    assert str(path) in msg
    assert "mixing" in msg and "budget_ratio" in msg and "not both" in msg


def test_budget_and_budget_ratio_both_as_overrides_clash() -> None:
    msg = error_of(None, {"corpus.input": "x", "mixing.budget": "2M", "mixing.budget_ratio": 0.5})
    assert "not both" in msg


def test_budget_flag_replaces_the_files_budget_ratio(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "corpus: {input: x}\nmixing:\n  budget_ratio: 0.5\n")
    cfg = load_config(path, {"mixing.budget": "2M"})
    assert (cfg.mixing.budget, cfg.mixing.budget_ratio) == (2_000_000, None)
    # Without the flag the file's ratio stands.
    cfg = load_config(path, {"mixing.budget": None})
    assert (cfg.mixing.budget, cfg.mixing.budget_ratio) == (None, 0.5)


def test_budget_ratio_flag_replaces_the_files_budget(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "corpus: {input: x}\nmixing:\n  budget: 2M\n")
    cfg = load_config(path, {"mixing.budget_ratio": 0.25})
    assert (cfg.mixing.budget, cfg.mixing.budget_ratio) == (None, 0.25)


# --- errors name the field -----------------------------------------------------------


def test_missing_corpus_input_is_required(tmp_path: Path) -> None:
    for args in [
        (None, {}),
        (write_yaml(tmp_path, "mixing: {alpha: 0.5}\n", "nocorpus.yaml"), None),
        (write_yaml(tmp_path, "corpus: {text_column: body}\n", "noinput.yaml"), None),
    ]:
        msg = error_of(*args)
        assert "corpus.input" in msg and "required" in msg, msg


def test_unknown_field_is_named(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "corpus: {input: x}\nmixing:\n  alpah: 0.5\n")
    msg = error_of(path)
    assert "mixing.alpah" in msg and "not a known field" in msg
    assert str(path) in msg
    assert "mixin" in error_of(None, {"corpus.input": "x", "mixin.alpha": 0.5})


def test_alpha_out_of_range_is_named() -> None:
    msg = error_of(None, {"corpus.input": "x", "mixing.alpha": 1.5})
    assert "mixing.alpha" in msg and "1.5" in msg
    assert load_config(None, {"corpus.input": "x", "mixing.alpha": 1}).mixing.alpha == 1


def test_literal_field_lists_the_allowed_values(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "corpus: {input: x}\nquality:\n  scorer: nope\n")
    msg = error_of(path)
    assert "quality[0].scorer" in msg and "'nope'" in msg
    for allowed in ("'heuristic'", "'hf-classifier'", "'perplexity'"):
        assert allowed in msg
    msg = error_of(None, {"corpus.input": "x", "corpus.on_bad_shard": "ignore"})
    assert "corpus.on_bad_shard" in msg and "'skip'" in msg and "'error'" in msg


@pytest.mark.parametrize("k", [1, 0, -3])
def test_kmeans_k_below_two_is_rejected(k: int) -> None:
    msg = error_of(None, {"corpus.input": "x", "kmeans.k": k})
    assert "kmeans.k" in msg and ">= 2" in msg


@pytest.mark.parametrize("k", ["auto", 2, 64])
def test_kmeans_k_auto_or_at_least_two(k: object) -> None:
    assert load_config(None, {"corpus.input": "x", "kmeans.k": k}).kmeans.k == k


def test_override_into_a_non_section_is_an_error(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "corpus: {input: x}\nmixing: 5\n")
    assert "mixing.alpha" in error_of(path, {"mixing.alpha": 0.5})


# --- the file itself -----------------------------------------------------------------


def test_invalid_yaml_names_the_path(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "corpus:\n  input: [unclosed\n")
    msg = error_of(path)
    assert str(path) in msg and "not valid YAML" in msg


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    msg = error_of(path)
    assert str(path) in msg and "does not exist" in msg


def test_unreadable_files_name_the_path(tmp_path: Path) -> None:
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    for path in (tmp_path, binary):  # a folder; bytes that are not text
        assert str(path) in error_of(path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "- corpus\n- mixing\n")
    msg = error_of(path)
    assert str(path) in msg and "mapping" in msg


# --- YAML round trip -----------------------------------------------------------------


def test_config_to_yaml_round_trips(tmp_path: Path) -> None:
    for overrides in [
        {"corpus.input": "x"},
        {
            "corpus.input": "s3://bucket/data/*.parquet",
            "corpus.id_column": None,
            "storage.endpoint_url": "http://localhost:9000",
            "storage.options": {"anon": True},
            "corpus.on_bad_shard": "skip",
            "mixing.budget": "2M",
            "mixing.alpha": 0.25,
            "kmeans.k": 16,
            "diversity.form": "additive",
            "quality.scorer": "hf-classifier",
        },
    ]:
        cfg = load_config(None, overrides)
        text = config_to_yaml(cfg)
        data = yaml.safe_load(text)
        assert set(data) == set(Config.model_fields)  # every section spelled out
        path = tmp_path / "dumped.yaml"
        path.write_text(text)
        assert load_config(path) == cfg
    assert data["mixing"]["budget"] == 2_000_000
    assert data["kmeans"]["k"] == 16


# --- CLI -----------------------------------------------------------------------------


def test_cli_config_show_prints_the_resolved_yaml() -> None:
    result = CliRunner().invoke(app, ["config", "--show", "--input", "X"])
    assert result.exit_code == 0, result.output
    assert "input: X" in result.output
    data = yaml.safe_load(result.stdout)
    assert data["corpus"]["input"] == "X"
    assert data["mixing"]["alpha"] == 0.8


def test_cli_config_invalid_set_exits_2_naming_the_field() -> None:
    result = CliRunner().invoke(app, ["config", "--set", "mixing.alpha=7", "--input", "X"])
    assert result.exit_code == 2
    assert "mixing.alpha" in result.output
    assert "input: X" not in result.output  # nothing printed as if it were valid


def test_cli_config_set_applies_the_value() -> None:
    result = CliRunner().invoke(app, ["config", "--set", "mixing.budget=2M", "--input", "X"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["mixing"]["budget"] == 2_000_000
