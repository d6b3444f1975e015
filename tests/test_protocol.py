"""The protocol as named phases (server/phases.py): the driver runs them in order and
skips what its journal has done; what a phase reads and writes are fields of the
protocol state; the state (server/state.py) goes through dump/load; server_app and the
evaluation suite run the same driver."""

from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from types import SimpleNamespace

from clues_fl.aggregation import merging
from clues_fl.aggregation.merging import FinalAdapter, plan_merge
from clues_fl.config import parse_config
from clues_fl.federation.state import dump, load
from clues_fl.model.training import AdamMoments, Checkpoint
from clues_fl.server import phases as protocol
from clues_fl.server.phases import PHASES, MemoryJournal, Phase, ProtocolRun, run_phases
from clues_fl.server.state import PhaseRounds, ProtocolState, SiteRecord


# -- the driver ----------------------------------------------------------------------------


class Step(Phase):
    def __init__(self, name, log, *, applies=True, saved=True):
        self.name, self.log, self._applies, self.saved = name, log, applies, saved

    def applies(self, run):
        return self._applies

    def plan(self, run):
        return f"plan {self.name}"

    def run(self, run):
        self.log.append(("run", self.name))

    def result(self, run):
        return f"result {self.name}"

    def resumed(self, run):
        self.log.append(("resumed", self.name))


def fake_run(journal) -> ProtocolRun:
    return ProtocolRun(cfg=parse_config({}), strategy=None, state=ProtocolState(), data=None,
                       bench=SimpleNamespace(initial_state={}), sites=None, grid=None, journal=journal)


def test_the_driver_runs_the_phases_in_order_and_skips_the_done_ones(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="clues_fl")
    log: list = []
    phases = (Step("a", log), Step("b", log), Step("off", log, applies=False), Step("c", log, saved=False),
              Step("d", log))
    journal = MemoryJournal(done={"b"})
    run = fake_run(journal)
    run_phases(run, phases)
    assert log == [("run", "a"), ("resumed", "b"), ("run", "c"), ("run", "d")]
    assert journal.completed == ["b", "a", "d"]  # c is not saved: a resumed run does it again
    assert set(run.state.timings) == {"a", "c", "d"}
    lines = [r.getMessage() for r in caplog.records]
    assert [m.split(":")[0] for m in lines] == ["a", "a", "c", "c", "d", "d"]
    assert lines[0] == "a: started (plan a)" and lines[1].startswith("a: done in ") and lines[1].endswith("(result a)")

    log.clear()
    run_phases(run, phases)  # everything saved is done now: only the unsaved phase runs again
    assert log == [("resumed", "a"), ("resumed", "b"), ("run", "c"), ("resumed", "d")]

    log.clear()
    run_phases(fake_run(MemoryJournal()), phases, until="b")
    assert log == [("run", "a"), ("run", "b")]


def test_the_phases_have_names_and_read_and_write_fields_of_the_state():
    names = [p.name for p in PHASES]
    assert names == ["trace", "score", "threshold", "select", "aggregate", "all-data", "report"]
    assert isinstance(protocol.phase("aggregate"), protocol.Aggregate)
    state_fields = {f.name for f in fields(ProtocolState)}
    site_fields = {f.name for f in fields(SiteRecord)}
    for p in PHASES:
        assert p.__doc__ and (p.reads or p.writes), p
        for name in (*p.reads, *p.writes):
            head, _, rest = name.partition(".")
            assert head in state_fields and (not rest or (head == "sites" and rest in site_fields)), (p, name)
    assert [p.name for p in PHASES if not p.saved] == ["all-data"]
    with pytest.raises(KeyError, match="no phase 'evaluate'"):
        protocol.phase("evaluate")


# -- state ---------------------------------------------------------------------------------
def tensors(seed: int, **shape) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.lora_A.default.weight": torch.randn(2, 3, generator=g),
            "layer.lora_B.default.weight": torch.randn(3, 2, generator=g)}


def checkpoint(seed: int, lr: float = 3e-4, adam: bool = True) -> Checkpoint:
    moments = AdamMoments(tensors(seed + 1), {k: v.abs() for k, v in tensors(seed + 2).items()}) if adam else None
    return Checkpoint(tensors(seed), lr, moments)


def as_json(dumped):
    """What the state looks like after the trip through run.json."""
    values, arrays = dumped
    return json.loads(json.dumps(values)), arrays


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def assert_same_checkpoints(a: list[Checkpoint], b: list[Checkpoint]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.lr == y.lr
        assert_same_tensors(x.state, y.state)
        assert (x.adam is None) == (y.adam is None)
        if x.adam is not None:
            assert_same_tensors(x.adam.m, y.adam.m)
            assert_same_tensors(x.adam.v, y.adam.v)


def a_site() -> SiteRecord:
    return SiteRecord(7, "client-1", ids=["h1", "h2", "h3"], scores=np.array([0.5, -1.0, 2.0]),
                      counts={"tp": 1, "fp": 0, "fn": 1, "tn": 1}, kept=2, mean_kept_score=1.25,
                      checkpoints=[checkpoint(1), checkpoint(5, lr=1e-3, adam=False)], trace_state=tensors(9),
                      final_state=tensors(10), anchor_scores=np.array([0.1, 0.2]), anchor_grads=[tensors(11)],
                      num_examples=3, scored=3, method_metrics={"clusters": 2}, clusters=(1, 2),
                      histogram=np.array([1, 2], dtype=np.int64), digest="abc", selected=True)


def test_a_site_record_round_trips_through_dump_and_load():
    site = a_site()
    back = load(*as_json(dump(site)))
    for name in ("node_id", "name", "ids", "counts", "kept", "mean_kept_score", "num_examples", "scored",
                 "method_metrics", "clusters", "digest", "selected", "labelled", "skipped_rows", "truncated"):
        assert getattr(back, name) == getattr(site, name), name
    for name in ("scores", "anchor_scores", "histogram"):
        np.testing.assert_array_equal(getattr(back, name), getattr(site, name))
        assert getattr(back, name).dtype == getattr(site, name).dtype
    assert_same_checkpoints(back.checkpoints, site.checkpoints)
    assert_same_tensors(back.trace_state, site.trace_state)
    assert_same_tensors(back.final_state, site.final_state)
    assert back.anchor_grads is None  # transient: only used while scoring
    assert dump(load(*dump(SiteRecord(1, "node-1"))))[0] == dump(SiteRecord(1, "node-1"))[0]


def a_state() -> ProtocolState:
    site, other = a_site(), SiteRecord(3, "client-0", kept=1, mean_kept_score=0.5, final_state=tensors(20))
    return ProtocolState(
        missing=[{"node": 9, "site": "client-2", "phase": "trace", "round": None, "reason": "gone"}],
        timings={"trace": 1.5}, gpu_peaks={"trace": {"server": 12.0}}, round_losses={"trace": [2.0, 1.5]},
        anchor={"scores": [0.1, 0.2], "lrs": [3e-4]},
        threshold={"rule": "mixture", "threshold": np.float64(0.25), "standardised": True, "anchor-scores": [0.1, 0.2]},
        checkpoints=[checkpoint(30), checkpoint(31)], sites={7: site, 3: other},
        rounds={"trace": PhaseRounds(2, ArrayRecord(torch_state_dict=tensors(40)), True)},
        final=plan_merge("weighted", [(s.name, s.kept, s.mean_kept_score, s.final_state) for s in (site, other)]),
        all_data_state=tensors(60))


def test_the_protocol_state_round_trips_through_dump_and_load():
    state = a_state()
    values, arrays = as_json(dump(state))
    back = load(values, arrays)
    assert list(back.sites) == [7, 3] and all(isinstance(n, int) for n in back.sites)
    assert back.missing == state.missing and back.timings == state.timings and back.gpu_peaks == state.gpu_peaks
    assert back.round_losses == state.round_losses and back.anchor == state.anchor
    assert back.threshold == state.threshold
    assert_same_checkpoints(back.checkpoints, state.checkpoints)
    assert_same_checkpoints(back.sites[7].checkpoints, state.sites[7].checkpoints)
    rounds = back.rounds["trace"]
    assert (rounds.done, rounds.aggregated) == (2, True)
    assert_same_tensors(rounds.arrays.to_torch_state_dict(), tensors(40))
    assert back.final.rule == "weighted" and back.final.sites == ["client-0", "client-1"]
    assert back.final.merge_weights == pytest.approx(state.final.merge_weights)
    for a, b in zip(back.final.site_states, state.final.site_states):
        assert_same_tensors(a, b)
    assert back.all_data_state is None  # transient: the reference is redone
    again = dump(back)
    assert json.loads(json.dumps(again[0])) == values  # a second trip changes nothing
    assert again[1].keys() == arrays.keys()

    single = ProtocolState(final=FinalAdapter(state=tensors(50)))
    restored = load(*as_json(dump(single)))
    assert not restored.final.merged and restored.final.merge_weights == {}
    assert_same_tensors(restored.final.state, tensors(50))


def test_a_new_field_is_saved_without_another_edit():
    from dataclasses import dataclass, field

    from clues_fl.federation.state import state_class

    @state_class
    @dataclass
    class Extended(ProtocolState):
        notes: dict = field(default_factory=dict)

    state = Extended(notes={"budget": np.float32(2.5)}, checkpoints=[checkpoint(1)])
    back = load(*as_json(dump(state)))
    assert isinstance(back, Extended) and back.notes == {"budget": 2.5}
    assert_same_checkpoints(back.checkpoints, state.checkpoints)


def test_load_refuses_unregistered_classes():
    with pytest.raises(KeyError):
        load({"__class__": "os.system", "x": 1}, {})


class FakeRunSites:
    def __init__(self, state):
        self.state = state


def a_run(raw, state=None) -> ProtocolRun:
    from clues_fl.strategies.clues import CluesStrategy

    strategy = CluesStrategy.__new__(CluesStrategy)
    strategy.cfg, strategy.scorer = parse_config(raw), SimpleNamespace(needs_trace=True)
    state = state or ProtocolState()
    return ProtocolRun(cfg=strategy.cfg, strategy=strategy, state=state, data=SimpleNamespace(val=[]),
                       bench=SimpleNamespace(initial_state=tensors(0)), sites=FakeRunSites(state), grid=None,
                       journal=MemoryJournal())


def test_the_run_state_saves_and_restores_the_protocol_state(tmp_path):
    from clues_fl.federation.resume import RunState

    raw = {"mode": "merging", "retrain.mode": "merge", "run-name": "r", "output-dir": str(tmp_path)}
    run = a_run(raw)
    journal = RunState(parse_config(raw))
    assert journal.restore(run, protocol.saved_phases(run)) is None  # a new run
    run.state.sites = {7: a_site()}
    run.state.threshold = {"rule": "mixture", "threshold": 0.25}
    journal.begin("trace")
    journal.complete("trace")
    arrays = sorted((tmp_path / "r" / "state" / "arrays").iterdir())
    assert arrays  # the site's checkpoints and adapters, each once
    journal.complete("score")
    assert sorted((tmp_path / "r" / "state" / "arrays").iterdir()) == arrays  # nothing new: named by content

    back = a_run(raw)
    assert RunState(parse_config(raw)).restore(back, protocol.saved_phases(back)) == "threshold"
    assert back.sites.state is back.state  # the registry works on the restored state
    assert back.state.threshold == run.state.threshold and list(back.state.sites) == [7]
    np.testing.assert_array_equal(back.state.sites[7].scores, run.state.sites[7].scores)
    assert_same_checkpoints(back.state.sites[7].checkpoints, run.state.sites[7].checkpoints)
    assert_same_tensors(back.state.sites[7].final_state, run.state.sites[7].final_state)


# -- merge rules: one registration ----------------------------------------------------------
def test_a_merge_rule_is_one_registration(monkeypatch):
    def halves(task_tensors, weights):
        return sum(t * w for t, w in zip(task_tensors, weights)) / 2

    rule = merging.MergeRule("halves", halves, merging.score_weights)
    monkeypatch.setitem(merging.MERGE_RULES, "halves", rule)
    assert merging.merge_rule("halves") is rule
    from conftest import tiny_lora_model

    from clues_fl.model.loading import lora_state

    states = [lora_state(tiny_lora_model(seed)) for seed in (1, 2)]
    final = plan_merge("halves", [("client-1", 4, 0.0, states[0]), ("client-0", 4, 0.0, states[1])])
    assert final.merged and final.sites == ["client-0", "client-1"]  # merge order: by site name
    assert final.merge_weights == pytest.approx({"client-0": 0.5, "client-1": 0.5})  # the rule's own site weights
    model = tiny_lora_model(0)
    with final.active(model, lora_state(model)) as merged:  # what the report evaluates and saves
        assert merged.active_adapter == "merged"
        for module, delta in merging.lora_deltas(merged, "merged").items():
            deltas = [2.0 * s[f"{module}.lora_B.default.weight"] @ s[f"{module}.lora_A.default.weight"]
                      for s in (states[1], states[0])]
            expected = halves(deltas, torch.tensor([0.5, 0.5], dtype=torch.float64))
            torch.testing.assert_close(delta, expected.to(delta.dtype), rtol=0, atol=1e-6)
    assert set(model.peft_config) == {"default"}  # removed after


def test_the_run_config_names_a_built_in_merge_rule_or_your_function():
    from clues_fl.names import MERGE_RULES

    assert MERGE_RULES == tuple(merging.MERGE_RULES)  # the names config.py checks are the registry's
    assert parse_config({"retrain.mode": "merge", "merge.rule": "mypkg.rules:halves"})["merge.rule"] == "mypkg.rules:halves"
    with pytest.raises(ValueError, match="merge.rule: 'halves' is not one of linear, weighted, ties or module:function"):
        parse_config({"retrain.mode": "merge", "merge.rule": "halves"})
    with pytest.raises(ValueError, match="aggregation: this key is gone; use retrain.mode = 'rounds'"):
        parse_config({"aggregation": "ties"})


def test_the_key_table_names_every_registered_merge_rule():
    from clues_fl.config import MergeSection

    allowed = next(f for f in fields(MergeSection) if f.name == "rule").metadata["allowed"]
    assert all(f"`{name}`" in allowed for name in merging.MERGE_RULES)


# -- server_app and the suite: one driver --------------------------------------------------------
def test_server_app_and_the_suite_run_the_same_driver(tiny_model_dir, tmp_path, monkeypatch):
    from test_flower_inprocess import drive, run_config

    from clues_fl.experiments.suite import Lab

    ran: list[str] = []
    real = protocol.run_phase

    def spy(run, phase):
        ran.append(phase.name)
        real(run, phase)

    monkeypatch.setattr(protocol, "run_phase", spy)
    raw = run_config(tiny_model_dir, tmp_path, **{"eval.max-samples": 0, "eval.mc-items": 0})
    drive(raw)
    assert ran == ["trace", "score", "threshold", "select", "aggregate", "all-data", "report"]

    ran.clear()
    lab = Lab({k: v for k, v in raw.items() if k not in ("run-name", "output-dir")}, tmp_path / "suite")
    first = lab.run("clues")
    assert ran == ["trace", "score", "threshold", "select", "aggregate", "report"]  # no all-data reference
    ran.clear()
    lab.run("clues-mean", **{"selection.threshold": "anchor-mean"})
    assert ran == ["score", "threshold", "select", "aggregate", "report"]  # the first run's trace is shared
    assert first.metrics["round-losses"]["trace"]
