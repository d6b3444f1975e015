"""Run-config: pyproject defaults match the code, bad values get clear errors."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from pathlib import Path

import pytest
import tomllib
from flwr.common.config import flatten_dict

from clues_fl.config import (
    DEFAULTS,
    KEYS,
    ConfigError,
    PrivacySection,
    QuadSection,
    RunConfig,
    RunSection,
    TrainSection,
    check_quantization_available,
    markdown_table,
    readme_with_table,
    parse_config,
    sections,
)
from clues_fl.config import main as config_main
from clues_fl.data.pollution import parse_ratios

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
        ({"scoring.cache-budget": "2"}, "scoring.cache-budget: '2' is not a share of the free disk in (0, 1]"),
        ({"scoring.cache-budget": "0"}, "a number without a unit is a share"),
        ({"scoring.cache-budget": "20XB"}, "or a size with a unit (e.g. 20GB"),
        ({"scoring.cache-budget": "half"}, "scoring.cache-budget: 'half' is not"),
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


def test_readme_key_table_is_generated_from_the_config_sections():
    """The README's table is `python -m clues_fl.config --markdown`: when a key, default,
    choice or help text changes, run `python -m clues_fl.config --update-readme README.md`."""
    text = (REPO / "README.md").read_text()
    assert readme_with_table(text) == text


def test_every_key_has_one_table_row_with_help():
    rows = [line for line in markdown_table().splitlines()[2:]]
    assert [row.split(" | ")[0].strip("|` ") for row in rows] == list(DEFAULTS)
    for cls in sections().values():
        for f in fields(cls):
            assert f.metadata["help"].strip(), cls.key(f.name)


def test_sections_and_flat_keys_are_the_same_values():
    cfg = parse_config({"train.batch-size": "4", "lora.r": 8, "aggregation": "ties", "merge.density": 0.3,
                        "run-name": "x", "quad.ekfac": "true"})
    assert (cfg.train.batch_size, cfg["train.batch-size"]) == (4, 4)
    assert (cfg.lora.r, cfg.merge.aggregation, cfg.merge.density, cfg.run.run_name) == (8, "ties", 0.3, "x")
    assert cfg.quad.ekfac is True and cfg.lora.list("target_modules") == cfg.list("lora.target-modules")
    for key, (attr, name) in KEYS.items():
        assert getattr(getattr(cfg, attr), name) == cfg[key]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0
    assert RunConfig() == parse_config({})


def test_a_section_validates_on_its_own():
    assert TrainSection(lr=1e-3).lr == 1e-3
    with pytest.raises(ConfigError, match="train.batch-size: must be >= 1, got 0"):
        TrainSection(batch_size=0)
    with pytest.raises(ConfigError, match="quad.tau: 'x' is not one of anchor-quantile"):
        QuadSection(tau="x")
    with pytest.raises(ConfigError, match="privacy.report='histogram' and privacy.epsilon > 0 need mode='federated'"):
        RunConfig(run=RunSection(mode="merging"), privacy=PrivacySection(report="histogram"))


def test_markdown_cli_prints_the_table(capsys):
    assert config_main(["--markdown"]) == 0
    assert capsys.readouterr().out == markdown_table()


def test_a_parsed_config_pickles_and_hashes():
    """Sections are frozen and hashable (the workbench caches by its model and lora
    sections); a RunConfig survives pickling with its flat view."""
    import pickle

    cfg = parse_config({"lora.r": 8, "model.device": "cpu"})
    back = pickle.loads(pickle.dumps(cfg))
    assert back == cfg and back.values == cfg.values and hash(back.lora) == hash(cfg.lora)
    assert {cfg.model: 1}[parse_config({"model.device": "cpu"}).model] == 1
    check_quantization_available(cfg.model)  # none: nothing to check
    with pytest.raises(ConfigError, match="model.quantization: 'x' is not one of none, 4bit, 8bit"):
        check_quantization_available("x")


def test_cache_budget_is_a_share_or_a_size():
    from clues_fl.config import parse_cache_budget

    assert parse_cache_budget("0.5") == (0.5, None) == parse_cache_budget(" .5 ")
    assert parse_cache_budget("1") == (1.0, None)
    assert parse_cache_budget("20GB") == (None, 20 * 10**9) == parse_cache_budget("20 gb")
    assert parse_cache_budget("1.5GiB") == (None, int(1.5 * 2**30))
    assert parse_cache_budget("0MB") == (None, 0)
    assert parse_config({"scoring.cache-budget": "300MB"}).scoring.cache_budget == "300MB"
