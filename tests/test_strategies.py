"""The named aggregation step (fed.strategy): every built-in Flower strategy through the
whole protocol, a user's Strategy subclass from the run-config, FedProx's proximal term
in local training, and Adam moments averaged apart from the adapter (in-memory grid,
tiny random Llama)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_samples, tiny_lora_model
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg
from test_flower_inprocess import NODES, drive, run_config

from clues_fl.aggregation import fed_strategy as aggregation
from clues_fl.config import ConfigError, parse_config, parse_strategy_args
from clues_fl.federation.messages import MOMENTS_KEY, split_record
from clues_fl.model.loading import first_lora_layer, lora_state
from clues_fl.federation.preflight import PreflightError, preflight
from clues_fl.model.training import TrainSettings, train_lora
from clues_fl.names import FLOWER_STRATEGIES


def fast(tiny_model_dir, tmp_path, **overrides) -> dict:
    """The smoke federation at its smallest: 2 sites x 8 samples, 2 trace rounds, 1
    retraining round, no generation or multiple-choice evaluation."""
    return run_config(tiny_model_dir, tmp_path, **{"eval.max-samples": 0, "eval.mc-items": 0, **overrides})


def _train_rounds(grid, phase):
    return [e for e in grid.log if e.message_type == "train" and e.sent.content["config"]["phase"] == phase]


# -- names and arguments ------------------------------------------------------------------

def test_names_are_case_insensitive_and_args_are_checked():
    cls, args = aggregation.resolve({"fed.strategy": "FedProx", "fed.strategy-args": "proximal_mu=0.1"})
    assert cls.__name__ == "FedProx" and args == {"proximal_mu": 0.1}
    assert aggregation.resolve({"fed.strategy": "fedyogi"})[0].__name__ == "FedYogi"
    assert parse_strategy_args("eta=1e-3, tau = 1e-9,weighted_by_key=num-examples, x='a b', on=true") == {
        "eta": 1e-3, "tau": 1e-9, "weighted_by_key": "num-examples", "x": "a b", "on": True}
    with pytest.raises(aggregation.StrategyError, match=r"fed.strategy-args: 'mu' is not a parameter of FedProx; "
                                                        r"its parameters: .*proximal_mu"):
        aggregation.resolve({"fed.strategy": "fedprox", "fed.strategy-args": "mu=0.1"})
    with pytest.raises(aggregation.StrategyError, match="set by the run"):
        aggregation.resolve({"fed.strategy": "fedavg", "fed.strategy-args": "min_train_nodes=1"})
    with pytest.raises(ConfigError, match="is not name=value"):
        parse_config({"fed.strategy-args": "proximal_mu"})
    with pytest.raises(ConfigError, match=r"fed.strategy: 'fedsgd' is not one of FedAvg, FedProx, .*module:Class"):
        parse_config({"fed.strategy": "fedsgd"})
    with pytest.raises(ConfigError, match=r"aggregation: this key is gone"):
        parse_config({"aggregation": "fedprox"})


def test_preflight_stops_a_bad_strategy_before_anything_starts():
    with pytest.raises(PreflightError, match="fed.strategy: 'fedsgd' is not one of"):
        preflight({"fed.strategy": "fedsgd"})
    with pytest.raises(PreflightError, match="fed.strategy-args: 'eta_x' is not a parameter of FedAdam; its "
                                             "parameters: .*eta, eta_l, beta_1, beta_2, tau"):
        preflight({"fed.strategy": "FedAdam", "fed.strategy-args": "eta_x=0.1"})
    with pytest.raises(PreflightError, match="cannot import module 'no_such_pkg'"):
        preflight({"fed.strategy": "no_such_pkg:Mine"})
    with pytest.raises(PreflightError, match="needs damping in fed.strategy-args"):
        preflight({"fed.strategy": "test_strategies:DampedFedAvg"})


# -- every built-in strategy, end to end ----------------------------------------------------

# Arguments that suit a LoRA adapter (the server optimisers' default eta of 0.1 is a huge
# step for adapter weights of ~0.01) or two sites (Krum and co. count malicious ones).
ARGS = {
    "FedProx": {"proximal_mu": 0.1},
    "FedAdam": {"eta": 1e-3, "eta_l": 1e-3},
    "FedYogi": {"eta": 1e-3, "eta_l": 1e-3},
    "FedAdagrad": {"eta": 1e-3, "eta_l": 1e-3},
    "FedAvgM": {"server_momentum": 0.5},
    "FedTrimmedAvg": {"beta": 0.1},
    "QFedAvg": {"client_learning_rate": 3e-4, "train_loss_key": "train-loss"},
}


THREE = {**NODES, 303: {"partition-id": 2, "num-partitions": 3}}


@pytest.mark.parametrize("name", FLOWER_STRATEGIES)
def test_every_builtin_strategy_runs_the_federation_to_the_end(tiny_model_dir, tmp_path, name):
    args = {"fed.strategy-args": ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                                           for k, v in ARGS.get(name, {}).items())}
    sites = 3 if name == "Bulyan" else 2  # Bulyan needs n >= 4 f + 3 sites (f = 0 malicious)
    nodes = THREE if sites == 3 else NODES
    if sites == 3:
        args.update({"pollution.ratios": "0.5,0.25,0.5", "fed.min-nodes": 3})
    raw = fast(tiny_model_dir, tmp_path, **{"fed.strategy": name.lower(), **args})
    cfg, grid, run, metrics = drive(raw, nodes={n: {**c, "num-partitions": sites} for n, c in nodes.items()})
    assert not metrics["missing-sites"]
    assert len(run.state.checkpoints) == 2 and all(c.adam is not None for c in run.state.checkpoints)
    for ckpt in run.state.checkpoints:  # every round aggregated: the global adapter moved
        assert any(not torch.equal(ckpt.state[k], run.bench.initial_state[k].float()) for k in ckpt.state)
    assert len(_train_rounds(grid, "trace")) == 2 * sites and _train_rounds(grid, "aggregate")
    assert 0 <= metrics["selection"]["f1"] <= 1 and np.isfinite(metrics["validation-loss"]["selected"])
    for ex in _train_rounds(grid, "trace"):
        assert MOMENTS_KEY in ex.sent.content and MOMENTS_KEY in ex.reply.content
        assert not any(k.startswith("adam.") for k in ex.sent.content["arrays"].keys())
    for ex in _train_rounds(grid, "aggregate"):
        assert MOMENTS_KEY not in ex.sent.content and MOMENTS_KEY not in ex.reply.content
    assert metrics["config"]["fed.strategy"] == name.lower()


def _round(grid, server_round, sites=2):
    """The exchanges of one trace round (Flower's strategies reuse one config record for
    every round, so the messages' "server-round" reads the last one)."""
    return _train_rounds(grid, "trace")[(server_round - 1) * sites:server_round * sites]


def _sites_moments(grid, server_round):
    replies = [e.reply for e in _round(grid, server_round)]
    assert len(replies) == 2
    weights = [float(r.content["metrics"]["num-examples"]) for r in replies]
    moments = [split_record(r.content[MOMENTS_KEY])[1] for r in replies]
    adapters = [split_record(r.content["arrays"])[0] for r in replies]
    return [w / sum(weights) for w in weights], moments, adapters


def test_fedadam_steps_the_adapter_and_not_the_adam_moments(tiny_model_dir, tmp_path):
    raw = fast(tiny_model_dir, tmp_path, **{"fed.strategy": "FedAdam", "fed.strategy-args": "eta=1e-3",
                                            "selection.method": "less", "selection.ratio": 0.5})
    cfg, grid, run, metrics = drive(raw)
    for k, ckpt in enumerate(run.state.checkpoints, 1):
        w, moments, adapters = _sites_moments(grid, k)
        for name in ckpt.adam.m:  # the plain weighted mean of the sites' moments
            for got, parts in ((ckpt.adam.m[name], [m.m[name] for m in moments]),
                               (ckpt.adam.v[name], [m.v[name] for m in moments])):
                want = sum(wi * p for wi, p in zip(w, parts))  # float32 sums: another order than the server's
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
        mean = {n: sum(wi * a[n] for wi, a in zip(w, adapters)) for n in ckpt.state}
        # FedAdam moved the adapter by its own step (eta * m / (sqrt(v) + tau)), not to the mean
        assert max(float((ckpt.state[n] - mean[n]).abs().max()) for n in mean) > 1e-4
    # the next round's sites started from those moments
    sent = _round(grid, 2)[0].sent
    started = split_record(sent.content[MOMENTS_KEY])[1]
    assert all(torch.equal(started.m[n], run.state.checkpoints[0].adam.m[n]) for n in started.m)


# -- a user's Strategy subclass -----------------------------------------------------------

class DampedFedAvg(FedAvg):
    """A user's strategy: moves the global adapter only `damping` of the way to FedAvg's mean."""

    calls = 0

    def __init__(self, damping: float, **kwargs):
        super().__init__(**kwargs)
        self.damping = damping
        self.current: ArrayRecord | None = None

    def configure_train(self, server_round, arrays, config, grid):
        self.current = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        DampedFedAvg.calls += 1
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None:
            return None, metrics
        old, new = self.current.to_torch_state_dict(), mean.to_torch_state_dict()
        return ArrayRecord(torch_state_dict={k: old[k] + self.damping * (new[k] - old[k]) for k in new}), metrics


def test_a_users_strategy_from_the_run_config(tiny_model_dir, tmp_path):
    DampedFedAvg.calls = 0
    raw = fast(tiny_model_dir, tmp_path, **{"fed.strategy": "test_strategies:DampedFedAvg",
                                            "fed.strategy-args": "damping=0.5"})
    cfg, grid, run, metrics = drive(raw)
    assert DampedFedAvg.calls == 4  # 2 trace rounds, 1 retraining round, 1 round of the all-data reference
    w, _, adapters = _sites_moments(grid, 1)
    initial, ckpt = run.bench.initial_state, run.state.checkpoints[0].state
    for n in ckpt:
        expected = initial[n].float() + 0.5 * (sum(wi * a[n] for wi, a in zip(w, adapters)) - initial[n].float())
        assert torch.allclose(ckpt[n], expected, atol=1e-6)
    assert "selected" in metrics["validation-loss"]


def test_dp_wrapper_around_a_chosen_strategy(tiny_model_dir, tmp_path):
    raw = fast(tiny_model_dir, tmp_path, **{"fed.strategy": "fedmedian", "privacy.adapter-noise": 1.0,
                                            "privacy.adapter-clip": 0.05})
    cfg, grid, run, metrics = drive(raw)
    assert not metrics["missing-sites"] and len(run.state.checkpoints) == 2
    assert all(bool((c.adam.v[n] >= 0).all()) for c in run.state.checkpoints for n in c.adam.v)
    assert "selected" in metrics["validation-loss"]


# -- FedProx: the proximal term in local training ------------------------------------------

def _train(mu=None, seed=0):
    model = tiny_lora_model(seed)
    encoded = make_samples(12, seed=3)
    start = {k: v.clone() for k, v in lora_state(model).items()}
    kwargs = {} if mu is None else {"proximal_mu": mu}
    result = train_lora(model, encoded, TrainSettings(lr=5e-2, epochs=3, batch_size=4), first_lora_layer(model),
                        pad_id=0, **kwargs)
    end = lora_state(model)
    distance = float(sum(((end[k] - start[k]) ** 2).sum() for k in end))
    return end, result, distance


def test_proximal_term_zero_equals_plain_training_and_positive_pulls_towards_the_start():
    plain, plain_result, plain_distance = _train()
    zero, zero_result, _ = _train(0.0)
    assert all(torch.equal(plain[k], zero[k]) for k in plain) and plain_result.step_losses == zero_result.step_losses
    _, _, near = _train(50.0)
    assert near < 0.5 * plain_distance  # measurably closer to the global adapter it started from


def test_fedprox_sends_mu_and_mu_zero_is_fedavg(tiny_model_dir, tmp_path):
    steps = {"train.batch-size": 2}  # 4 local steps a round (the term is 0 at a round's first step)
    _, _, avg, m_avg = drive(fast(tiny_model_dir, tmp_path / "avg", **steps))
    _, grid, prox0, m_prox0 = drive(fast(tiny_model_dir, tmp_path / "prox0", **{"fed.strategy": "fedprox", **steps}))
    assert all(e.sent.content["config"]["proximal-mu"] == 0.0 for e in _train_rounds(grid, "trace"))
    for a, b in zip(avg.state.checkpoints, prox0.state.checkpoints, strict=True):
        assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
        assert all(torch.equal(a.adam.v[k], b.adam.v[k]) for k in a.adam.v)
    assert m_avg["selection"] == m_prox0["selection"] and m_avg["threshold"] == m_prox0["threshold"]
    _, grid, prox, _ = drive(fast(tiny_model_dir, tmp_path / "prox", **{"fed.strategy": "fedprox", **steps,
                                                                         "fed.strategy-args": "proximal_mu=100.0"}))
    assert all(e.sent.content["config"]["proximal-mu"] == 100.0 for e in _train_rounds(grid, "trace"))
    moved = [float(sum(((c.state[k] - avg.bench.initial_state[k]) ** 2).sum() for k in c.state))
             for c in (avg.state.checkpoints[-1], prox.state.checkpoints[-1])]
    assert moved[1] < 0.9 * moved[0], moved


@pytest.mark.slow
def test_the_smoke_scenario_on_the_real_model_with_fedprox(tmp_path):
    """The smoke scenario on the real SmolLM2-135M, in-process, through FedProx rounds."""
    import tomllib
    from pathlib import Path

    from flwr.common.config import flatten_dict

    raw = flatten_dict(tomllib.loads((Path(__file__).parent.parent / "scenarios" / "smoke.toml").read_text()))
    raw.update({"output-dir": str(tmp_path), "eval.max-samples": 0, "eval.mc-items": 0,
                "fed.strategy": "FedProx", "fed.strategy-args": "proximal_mu=0.01"})
    cfg, grid, run, metrics = drive(raw)
    assert not metrics["missing-sites"] and len(run.state.checkpoints) == 2
    assert all(e.sent.content["config"]["proximal-mu"] == 0.01 for e in _train_rounds(grid, "trace"))
    assert 0 <= metrics["selection"]["f1"] <= 1 and np.isfinite(metrics["validation-loss"]["selected"])
