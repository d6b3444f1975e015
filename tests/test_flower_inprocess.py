"""Drive the real ServerApp strategy and ClientApp through every phase in memory,
with a tiny random Llama saved as a local model folder, and check what the
messages carry."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from clues_fl import client_app as client_module
from clues_fl.config import parse_config
from clues_fl.inprocess import InMemoryGrid
from clues_fl.scenario import build_scenario
from clues_fl.scorers import Scorer
from clues_fl.server_app import run_protocol


def run_config(model_dir: str, out_dir, **overrides) -> dict:
    cfg = {
        "run-name": "inprocess",
        "output-dir": str(out_dir),
        "model.name": model_dir,
        "lora.r": 4,
        "lora.alpha": 8,
        "lora.layers": "2-3",
        "data.anchor-size": 4,
        "data.val-size": 6,
        "data.test-size": 3,
        "eval.max-samples": 2,
        "eval.max-new-tokens": 4,
        "eval.mc-items": 3,
        "data.samples-per-client": 8,
        "data.max-length": 48,
        "pollution.ratios": "0.5,0.25",
        "trace.rounds": 2,
        "retrain.rounds": 1,
        "fed.min-nodes": 2,
        "scoring.prefix-cache": True,
    }
    cfg.update(overrides)
    return cfg


NODES = {101: {"partition-id": 0, "num-partitions": 2}, 202: {"partition-id": 1, "num-partitions": 2}}


def drive(raw_cfg: dict, fail=None, nodes=None):
    """server_app.main (its run_protocol) over an in-memory grid of two sites."""
    cfg = parse_config(raw_cfg)
    grid = InMemoryGrid(client_module.app, nodes or NODES, raw_cfg, fail=fail or {})
    clues, metrics = run_protocol(grid, cfg)
    return cfg, grid, clues, metrics


def _strings_in(record) -> list[str]:
    out = []
    if isinstance(record, ConfigRecord):
        for value in record.values():
            values = value if isinstance(value, list) else [value]
            out += [v for v in values if isinstance(v, str)]
    return out


@pytest.mark.parametrize("mode,aggregation", [("federated", "fedavg"), ("merging", "weighted")])
def test_all_phases_and_what_leaves_a_site(tiny_model_dir, tmp_path, mode, aggregation):
    raw = run_config(tiny_model_dir, tmp_path, mode=mode, aggregation=aggregation)
    cfg, grid, clues, metrics = drive(raw)

    phases = {e.message_type for e in grid.log}
    expected = {"train", "query.score", "query.select"} if mode == "federated" else {"train.local", "query.score", "query.select"}
    assert expected <= phases

    # The private texts of each site: none of them may appear in any reply.
    data = build_scenario(cfg, 2)
    texts = {s.question for c in data.clients for s in c} | {s.answer for c in data.clients for s in c}
    n_params = sum(v.numel() for v in clues.bench.initial_state.values())
    for ex in grid.log:
        assert not ex.reply.has_error(), ex.reply.error
        content = ex.reply.content
        for name, record in content.items():
            assert isinstance(record, (ArrayRecord, ConfigRecord, MetricRecord)), name
            for s in _strings_in(record):
                assert s not in texts and len(s) < 64
            if isinstance(record, ArrayRecord):
                # adapter tensors (and moments) only: the adapter's shapes, never per-sample rows
                arrays = record.to_torch_state_dict()
                assert sum(a.numel() for a in arrays.values()) <= 3 * n_params
                assert all(a.dtype.is_floating_point for a in arrays.values())
        if ex.message_type == "query.score":
            scores = content["scores"]
            assert set(scores.keys()) == {"ids", "scores"}
            assert np.isfinite(np.asarray(scores["scores"])).all()
        if ex.message_type == "query.select":
            assert set(content["metrics"].keys()) >= {"kept", "tp", "fp", "fn", "tn"}

    out = tmp_path / "inprocess"
    written = json.loads((out / "metrics.json").read_text())
    assert written["selection"]["per-client"].keys() == {"client-0", "client-1"}
    assert written["selection"]["per-client"]["client-0"]["skipped-rows"] == 0
    for key in ("precision", "recall", "f1", "accuracy"):
        assert 0.0 <= written["selection"][key] <= 1.0
    assert set(written["validation-loss"]) >= {"base", "all-data", "selected"}
    if mode == "federated":  # the all-data reference is retrained at the selection's budget
        assert "last-trace-checkpoint" in written["validation-loss"]
        assert len(written["round-losses"]["retrain-all"]) == cfg["retrain.rounds"]
    quality = written["model-quality"]
    assert quality["answered"] == 2 and 0 <= quality["rouge-l"] <= 1 and 0 <= quality["token-f1"] <= 1
    assert 0 <= quality["mc-accuracy"] <= 1
    assert (out / "adapter" / "adapter_config.json").exists() or any((out / "adapter").rglob("adapter_config.json"))
    manifests = sorted(p.name for p in (out / "manifest").glob("*.csv"))
    assert manifests == ["client-0.csv", "client-1.csv"]
    lines = (out / "manifest" / "client-0.csv").read_text().splitlines()
    assert lines[0] == "id,score,kept,score-z" and len(lines) == 9
    # counts reported by the sites agree with the kept flags of the manifest
    kept = sum(int(l.split(",")[2]) for l in lines[1:])
    assert kept == written["selection"]["per-client"]["client-0"]["kept"]


def test_site_failing_in_fedavg_rounds_is_reported_and_the_others_go_on(tiny_model_dir, tmp_path):
    raw = run_config(tiny_model_dir, tmp_path, **{"fed.min-nodes": 1})
    cfg, grid, clues, metrics = drive(raw, fail={(202, "train"): RuntimeError("out of memory")})
    phases = [m["phase"] for m in metrics["missing-sites"] if m["node"] == 202]
    assert phases == ["trace round 1", "trace round 2", "retrain round 1", "retrain-all round 1"]
    assert all(m["reason"] == "out of memory" for m in metrics["missing-sites"])
    assert len(clues.checkpoints) == 2 and "selected" in metrics["validation-loss"]


def test_failed_site_does_not_stop_the_run(tiny_model_dir, tmp_path):
    raw = run_config(tiny_model_dir, tmp_path, **{"fed.min-nodes": 1})
    cfg, grid, clues, metrics = drive(raw, fail={(202, "query.score"): RuntimeError("disk full")})
    assert metrics["missing-sites"] and metrics["missing-sites"][0]["phase"] == "score"
    assert list(metrics["selection"]["per-client"]) == ["client-0"]


class LengthScorer(Scorer):  # a user's scorer, named in the run-config
    name = "length"

    def score(self, site, payload):
        return np.array([len(s.question) + len(s.answer) / 1e4 for s in site.samples])


@pytest.mark.parametrize("method", ["less", "datainf", "ppl", "ifd", "random", "all", "oracle",
                                    "test_flower_inprocess:LengthScorer"])
def test_every_selection_method_runs_through_the_same_messages(tiny_model_dir, tmp_path, method):
    raw = run_config(tiny_model_dir, tmp_path, **{"selection.method": method, "selection.ratio": 0.5})
    cfg, grid, clues, metrics = drive(raw)
    sel = metrics["selection"]
    n = sum(m["tp"] + m["fp"] + m["fn"] + m["tn"] for m in sel["per-client"].values())
    kept = sum(m["kept"] for m in sel["per-client"].values())
    traced = any(e.message_type == "train" and not e.sent.content["config"].get("phase") == "retrain" for e in grid.log)
    assert traced == (method in ("less", "datainf"))
    if method == "oracle":
        assert sel["precision"] == 1.0 and sel["recall"] == 1.0
    elif method == "all":
        assert kept == n and sel["recall"] == 1.0
    else:  # one global threshold keeping the top half of all pooled scores
        assert kept == 8, kept
    assert metrics["threshold"]["method"] == method


def test_suite_lab_shares_one_trace_across_methods(tiny_model_dir, tmp_path):
    from clues_fl.suite import Lab, _table

    raw = run_config(tiny_model_dir, tmp_path)
    lab = Lab({k: v for k, v in raw.items() if k not in ("run-name", "output-dir")}, tmp_path)
    first = lab.run("clues")
    second = lab.run("less", **{"selection.method": "less", "selection.ratio": 0.5})
    assert len(lab.traces) == 1  # LESS reused the CLUES trace
    assert first.scores.shape == first.polluted.shape == (16,)
    assert second.polluted.sum() == first.polluted.sum() == 6  # 0.5*8 + 0.25*8 polluted
    assert (tmp_path / "runs" / "less" / "metrics.json").exists()
    assert "| clues |" in _table(["m"], [["clues"]])


def test_suite_reuses_a_finished_run_and_reruns_a_changed_one(tiny_model_dir, tmp_path, monkeypatch):
    import clues_fl.suite as suite

    raw = run_config(tiny_model_dir, tmp_path)
    base = {k: v for k, v in raw.items() if k not in ("run-name", "output-dir")}
    first = suite.Lab(base, tmp_path).run("clues")

    calls = []
    real_grid = suite.InMemoryGrid
    monkeypatch.setattr(suite, "InMemoryGrid", lambda *a, **k: calls.append(a) or real_grid(*a, **k))
    again = suite.Lab(base, tmp_path).run("clues")  # an interrupted suite started again
    assert calls == []
    assert again.metrics == first.metrics and again.kinds == first.kinds
    for a, b in zip((again.scores, again.polluted, again.kept), (first.scores, first.polluted, first.kept)):
        assert np.array_equal(a, b)

    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "runs").rename(moved / "runs")
    assert suite.Lab(base, moved).run("clues").metrics == first.metrics and calls == []  # a moved suite folder

    changed = suite.Lab({**base, "selection.threshold": "anchor-mean"}, tmp_path).run("clues")
    assert len(calls) == 1 and changed.metrics["threshold"]["rule"] == "anchor-mean"
    suite.Lab({**base, "selection.threshold": "anchor-mean"}, tmp_path, fresh=True).run("clues")
    assert len(calls) == 2
