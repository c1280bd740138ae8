"""The arms evaluate.controls plant (flows.evaluate.control_arms), without running them."""

from __future__ import annotations

import pytest

from flows.compare import variants
from flows.evaluate import control_arms
from samplemix.config import ConfigError, load_config

DOMAINS = ["books", "code", "web"]


def config(controls: list[str], **extra: object):  # noqa: ANN201 - a Config
    return load_config(
        None,
        {"corpus.input": "c", "output.path": "out", "evaluate.controls": controls, **extra},
    )


def test_each_kind_of_control() -> None:
    cfg = config(
        ["one-domain:code", "repeat:20", "fixed"],
        **{"mixing.domain_weights": {"books": 0, "code": 1, "web": 0}},
    )
    configs = variants(cfg, ["vanilla", "fixed"], [])
    planted, repeats, names = control_arms(cfg, configs, "vanilla", DOMAINS)
    assert names == ["control-one-domain-code", "control-repeat-20", "fixed"]
    one = planted["control-one-domain-code"].mixing
    assert one.method == "fixed" and one.domain_weights == {"books": 0.0, "code": 1.0, "web": 0.0}
    assert one.max_repeats is None  # a cap would move the budget to the other domains
    assert planted["control-one-domain-code"].output.path == "out/control-one-domain-code"
    assert planted["control-one-domain-code"].output.store == "out/store"  # shared
    assert repeats == {"control-repeat-20": ("vanilla", 20)}
    assert "fixed" not in planted  # a variant of the run is its own control


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("one-domain:gov", "no domain 'gov'"),
        ("temperature", "not a variant of this run"),
    ],
)
def test_a_control_the_run_cannot_plant_is_a_config_error(spec: str, message: str) -> None:
    cfg = config([spec])
    with pytest.raises(ConfigError, match=message):
        control_arms(cfg, variants(cfg, ["vanilla"], []), "vanilla", DOMAINS)


@pytest.mark.parametrize("spec", ["one-domain:", "repeat:x", "repeat:0", "half:code"])
def test_malformed_specs_fail_when_the_config_loads(spec: str) -> None:
    with pytest.raises(ValueError, match="control"):
        config([spec])
