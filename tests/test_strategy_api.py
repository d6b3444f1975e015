"""CluesStrategy as a Flower Strategy: built from parts in a user's own ServerApp (a
Flower strategy, a scorer, a threshold rule, a merge rule), started the way Flower's
quickstart starts FedAvg, and the same parts named in the run-config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy
from safetensors.torch import load_file
from test_flower_inprocess import NODES, run_config

from clues_fl import client_app
from clues_fl.config import parse_config
from clues_fl.federation.inmemory_grid import InMemoryGrid
from clues_fl.scoring.scorers import CluesScorer
from clues_fl.selection.rules import AnchorMean
from clues_fl.strategies import CluesStrategy


class ShiftedClues(CluesScorer):
    """A user's scorer: CLUES plus a constant (the same ranking, a different scale)."""

    name = "shifted"

    def score(self, site, payload):
        return super().score(site, payload) + 1.0


class CountingFedAvg(FedAvg):
    """A user's strategy: FedAvg that counts the rounds it aggregates."""

    rounds = 0

    def aggregate_train(self, server_round, replies):
        type(self).rounds += 1
        return super().aggregate_train(server_round, replies)


def sign_mean(task_tensors, weights):
    """A user's merge rule (peft's merge_utils shape)."""
    stacked = torch.stack([w * t for t, w in zip(task_tensors, weights)])
    return stacked.sum(0)


def small(tiny_model_dir, tmp_path, **overrides) -> dict:
    return run_config(tiny_model_dir, tmp_path, **{"eval.max-samples": 0, "eval.mc-items": 0, **overrides})


def test_it_is_a_flower_strategy_whose_round_methods_belong_to_a_running_phase():
    strategy = CluesStrategy(parse_config({}))
    assert isinstance(strategy, Strategy)
    with pytest.raises(RuntimeError, match="only while a round phase runs"):
        strategy.configure_train(1, None, None, None)


def test_a_python_serverapp_builds_it_from_parts_and_starts_it_like_fedavg(tiny_model_dir, tmp_path):
    raw = small(tiny_model_dir, tmp_path)
    strategy = CluesStrategy(parse_config(raw), rounds=FedProx(proximal_mu=0.01), threshold=AnchorMean())
    grid = InMemoryGrid(client_app.app, NODES, raw)  # the sites get the run-config as it was given
    result = strategy.start(grid=grid)

    run = strategy.last_run
    assert strategy.cfg["fed.strategy"] == "FedProx" and strategy.cfg["selection.threshold"] == "anchor-mean"
    assert run.state.threshold["rule"] == "anchor-mean"
    assert run.metrics["aggregate"]["strategy"] == "FedProx"
    sent = [e.sent.content["config"] for e in grid.log if e.message_type == "train"]
    assert sent and all(c["proximal-mu"] == pytest.approx(0.01) for c in sent)
    (saved,) = (tmp_path / "inprocess" / "adapter").rglob("adapter_model.safetensors")
    published = load_file(str(saved))
    arrays = result.arrays.to_torch_state_dict()  # Flower's Result: the published adapter
    assert arrays.keys() == run.state.final.state.keys()
    for name, tensor in arrays.items():
        torch.testing.assert_close(tensor, run.state.final.state[name], rtol=0, atol=0)
        saved_name = name.replace(".default.", ".")
        torch.testing.assert_close(published[saved_name].float(), tensor.float(), rtol=0, atol=1e-7)


def test_a_users_strategy_scorer_and_merge_rule_from_python_and_from_the_run_config(tiny_model_dir, tmp_path):
    CountingFedAvg.rounds = 0
    raw = small(tiny_model_dir, tmp_path / "python", mode="merging")
    strategy = CluesStrategy(parse_config(raw), rounds=CountingFedAvg(), scorer=ShiftedClues, aggregator=sign_mean)
    assert (strategy.cfg["fed.strategy"], strategy.cfg["selection.method"], strategy.cfg["merge.rule"]) == (
        "test_strategy_api:CountingFedAvg", "test_strategy_api:ShiftedClues", "test_strategy_api:sign_mean")
    strategy.start(grid=InMemoryGrid(client_app.app, NODES, raw))
    from_python = strategy.last_run

    named = small(tiny_model_dir, tmp_path / "config", mode="merging", **{
        "fed.strategy": "test_strategy_api:CountingFedAvg", "selection.method": "test_strategy_api:ShiftedClues",
        "retrain.mode": "merge", "merge.rule": "test_strategy_api:sign_mean"})
    strategy = CluesStrategy(parse_config(named))
    strategy.start(grid=InMemoryGrid(client_app.app, NODES, named))
    from_config = strategy.last_run

    for run in (from_python, from_config):
        assert run.metrics["aggregate"] == {"mode": "merge", "rule": "test_strategy_api:sign_mean",
                                            "local-epochs": 1}
        assert run.state.final.rule == "test_strategy_api:sign_mean"
        scores = np.concatenate([s.scores for s in run.state.sites.values()])
        assert scores.min() > 0.5  # the user's scorer scored: CLUES scores are ~1e-4 around 0
    np.testing.assert_allclose(np.concatenate([s.scores for s in from_python.state.sites.values()]),
                               np.concatenate([s.scores for s in from_config.state.sites.values()]), rtol=1e-6)


def test_a_users_strategy_runs_the_round_phases(tiny_model_dir, tmp_path):
    CountingFedAvg.rounds = 0
    raw = small(tiny_model_dir, tmp_path)
    strategy = CluesStrategy(parse_config(raw), rounds=CountingFedAvg())
    strategy.start(grid=InMemoryGrid(client_app.app, NODES, raw))
    assert CountingFedAvg.rounds == 4  # 2 trace rounds, 1 aggregate round, 1 round of the all-data reference
    assert strategy.last_run.metrics["aggregate"]["strategy"] == "CountingFedAvg"
