"""Run-config: pyproject defaults match the code, bad values get clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from flwr.common.config import flatten_dict

from clues_fl.config import DEFAULTS, ConfigError, parse_config
from clues_fl.pollution import parse_ratios

REPO = Path(__file__).resolve().parent.parent


def test_pyproject_run_config_matches_defaults():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert flatten_dict(data["tool"]["flwr"]["app"]["config"]) == DEFAULTS


@pytest.mark.parametrize("scenario", sorted((REPO / "scenarios").glob("*.toml")), ids=lambda p: p.name)
def test_every_scenario_is_a_valid_run_config(scenario):
    values = flatten_dict(tomllib.loads(scenario.read_text()))
    assert set(values) <= set(DEFAULTS), set(values) - set(DEFAULTS)
    parse_config(values)


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"selection.threshold": "median"}, "selection.threshold: 'median' is not one of anchor-f1"),
        ({"lora.r": 0}, "lora.r: must be >= 1"),
        ({"train.lr": "fast"}, "train.lr: expected float"),
        ({"lora.rank": 8}, "unknown run-config key(s) ['lora.rank']"),
        ({"data.anchor-size": 1}, "at least 2 samples"),
        ({"scoring.prefix-cache": "maybe"}, "scoring.prefix-cache: expected bool"),
    ],
)
def test_bad_values_name_the_key_and_allowed_values(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert message in str(err.value)


def test_lists_are_comma_separated_strings():
    cfg = parse_config({"pollution.ratios": "0.8, 0.2,0.1,0.5", "lora.target-modules": "q_proj, v_proj"})
    assert parse_ratios(cfg["pollution.ratios"]) == [0.8, 0.2, 0.1, 0.5]
    assert cfg.list("lora.target-modules") == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="item 2 'x' is not a number"):
        parse_ratios(parse_config({"pollution.ratios": "0.8,x"})["pollution.ratios"])
