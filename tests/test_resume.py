"""Resumption: the server dies at a chosen point of an in-process run (the grid raises
out of send_and_receive), the same run-name is run again, and the second run must skip
what was completed and end with what an uninterrupted run gives."""

from __future__ import annotations

import csv
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from safetensors.torch import load_file
from test_flower_inprocess import NODES, run_config

from clues_fl import client_app as client_module
from clues_fl.config import parse_config
from clues_fl.federation.inmemory_grid import InMemoryGrid
from clues_fl.federation.resume import ResumeError, RunState
from clues_fl.server_app import run_protocol
from clues_fl.federation.site_ids import read_id_map

# The same two sites under other node ids, in the other order (a restarted simulation).
NEW_NODES = {404: NODES[101], 303: NODES[202]}
MODES = {
    "federated": {"retrain.rounds": 2},
    "merging": {"mode": "merging", "retrain.mode": "merge", "merge.rule": "weighted"},
    "histogram": {"retrain.rounds": 2, "privacy.report": "histogram", "privacy.bins": 16},
}


class Interrupted(Exception):
    """The server process dies here."""


@dataclass
class CrashingGrid(InMemoryGrid):
    crash: Callable[[Message], bool] | None = None  # raise before delivering a batch with such a message
    sent: Counter = field(default_factory=Counter)  # kind() of each delivered message, taken when sent
    # (FedAvg sends every round the same ConfigRecord, whose "server-round" it then updates)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if self.crash is not None and any(self.crash(m) for m in messages):
            raise Interrupted(f"server killed before sending {kind(messages[0])}")
        self.sent.update(kind(m) for m in messages)
        return super().send_and_receive(messages, timeout=timeout)


def kind(message: Message) -> str:
    """'trace r2' for a FedAvg round, 'trace' for a local run, else the query."""
    name = message.metadata.message_type
    if name.startswith("train"):
        config = message.content["config"]
        return str(config["phase"]) + (f" r{config['server-round']}" if "server-round" in config else "")
    return name.removeprefix("query.")


def at(what: str) -> Callable[[Message], bool]:
    return lambda message: kind(message) == what


def run(raw: dict, *, crash=None, nodes=None):
    grid = CrashingGrid(client_module.app, nodes or NODES, raw, crash=crash)
    if crash is not None:
        with pytest.raises(Interrupted):
            run_protocol(grid, parse_config(raw))
        return grid, None, None
    finished, metrics = run_protocol(grid, parse_config(raw))
    return grid, finished, metrics


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory, one_thread):
    """An uninterrupted run per mode (computed when first asked for): its output folder
    and the messages it sent."""
    runs = {}

    def get(mode: str) -> tuple[Path, Counter]:
        if mode not in runs:
            out = tmp_path_factory.mktemp(f"reference-{mode}")
            grid, _, _ = run(run_config(tiny_model_dir, out, **MODES[mode]))
            runs[mode] = (out / "inprocess", grid.sent)
        return runs[mode]

    return get


def assert_same_results(resumed: Path, reference: Path) -> None:
    """Selection, threshold, round losses, manifests and final adapter equal (1e-6)."""
    a, b = (json.loads((p / "metrics.json").read_text()) for p in (resumed, reference))
    assert a["selection"] == b["selection"]
    assert a["missing-sites"] == b["missing-sites"] == []
    for key in ("trace", "aggregate"):
        np.testing.assert_allclose(a["round-losses"].get(key, []), b["round-losses"].get(key, []), atol=1e-6)
    for key, value in b["validation-loss"].items():
        assert a["validation-loss"][key] == pytest.approx(value, abs=1e-6)
    ta, tb = (json.loads((p / "thresholds.json").read_text()) for p in (resumed, reference))
    assert ta.keys() == tb.keys()
    for key in tb:
        if isinstance(tb[key], (int, float)) and not isinstance(tb[key], bool):
            assert ta[key] == pytest.approx(tb[key], abs=1e-6), key
        elif key == "anchor-scores":
            np.testing.assert_allclose(ta[key], tb[key], atol=1e-6)
        elif key == "merge-weights":
            assert ta[key].keys() == tb[key].keys()
            np.testing.assert_allclose(list(ta[key].values()), [tb[key][k] for k in ta[key]], atol=1e-6)
        else:
            assert ta[key] == tb[key], key
    manifests = sorted(p.name for p in (reference / "manifest").glob("*.csv"))
    assert sorted(p.name for p in (resumed / "manifest").glob("*.csv")) == manifests  # none: histograms
    for name in manifests:
        rows_a, rows_b = (list(csv.DictReader((p / "manifest" / name).read_text().splitlines()))
                          for p in (resumed, reference))
        # the two runs' sites drew their own id keys: compare the ids their own maps give back
        ids_a, ids_b = (read_id_map(p / "sites" / Path(name).stem) for p in (resumed, reference))
        assert [(ids_a[r["id-hash"]], r["kept"]) for r in rows_a] == [(ids_b[r["id-hash"]], r["kept"]) for r in rows_b]
        np.testing.assert_allclose([float(r["score"]) for r in rows_a], [float(r["score"]) for r in rows_b], atol=1e-6)
    (fa,), (fb,) = (list((p / "adapter").rglob("adapter_model.safetensors")) for p in (resumed, reference))
    wa, wb = load_file(str(fa)), load_file(str(fb))
    assert wa.keys() == wb.keys() and wa
    for key in wb:
        np.testing.assert_allclose(wa[key].float().numpy(), wb[key].float().numpy(), atol=1e-6, err_msg=key)


@pytest.mark.parametrize(
    "mode,crash,nodes,redone,resumed_from",
    [
        ("federated", "trace r2", None, {"trace r2", "score", "select", "aggregate r1", "aggregate r2", "all-data r1", "all-data r2"}, "trace round 2 of 2"),
        ("federated", "select", None, {"select", "aggregate r1", "aggregate r2", "all-data r1", "all-data r2"}, "select"),
        ("federated", "aggregate r2", None, {"select", "aggregate r2", "all-data r1", "all-data r2"}, "aggregate round 2 of 2"),
        ("merging", "score", NEW_NODES, {"identify", "score", "select", "aggregate"}, "score"),
        ("merging", "select", NEW_NODES, {"identify", "select", "aggregate"}, "select"),
        ("merging", "aggregate", None, {"select", "aggregate"}, "aggregate"),
        # The server holds binned counts only, not the sites' scores to hand back: they score again.
        ("histogram", "aggregate r2", None, {"score", "select", "aggregate r1", "aggregate r2", "all-data r1", "all-data r2"}, "score"),
    ],
    ids=["federated-trace-round-2", "federated-select", "federated-aggregate-round-2",
         "merging-score-new-node-ids", "merging-select-new-node-ids", "merging-aggregate",
         "histogram-aggregate-round-2"],
)
def test_an_interrupted_run_resumes_where_it_stopped(
    tiny_model_dir, tmp_path, reference, mode, crash, nodes, redone, resumed_from, caplog  # noqa: F811
):
    ref_out, ref_sent = reference(mode)
    raw = run_config(tiny_model_dir, tmp_path, **MODES[mode])
    run(raw, crash=at(crash))
    out = tmp_path / "inprocess"
    assert not (out / "metrics.json").exists()

    caplog.set_level(logging.INFO, logger="clues_fl")
    grid, finished, metrics = run(raw, nodes=nodes)
    assert f"resuming run 'inprocess' from step {resumed_from} (done: " in caplog.text  # the log says so

    # Only what was not completed is sent again (select: the new run's sites lost their kept rows;
    # the equal-budget all-data reference, all-data, is not saved and is redone).
    # (every start asks the sites who they are: query.site)
    assert grid.sent == Counter({k: ref_sent.get(k, len(NODES)) for k in redone | {"site"}})
    assert metrics["resumed-from"] == resumed_from
    if nodes is not None:
        assert set(finished.state.sites) == set(nodes)
    assert (out / "metrics.json").exists()
    assert_same_results(out, ref_out)
    # the cost of what ran before the interruption is kept (saved with the state), the
    # sites named as before under their new node ids
    cost, ref_cost = metrics["cost"], json.loads((ref_out / "metrics.json").read_text())["cost"]
    for phase in ("trace", "score", "select", "aggregate"):
        assert set(cost["phases"][phase]["site-seconds"]) == {"client-0", "client-1"}, phase
        assert cost["phases"][phase]["messages"] >= ref_cost["phases"][phase]["messages"], phase
        assert cost["phases"][phase]["bytes-sent"] >= ref_cost["phases"][phase]["bytes-sent"], phase
    assert cost["selection"]["ratio"] > 0
    index = json.loads((out / "state" / "run.json").read_text())
    assert index["completed"][-1] == "report"


def test_a_changed_run_config_refuses_to_resume(tiny_model_dir, tmp_path):  # noqa: F811
    raw = run_config(tiny_model_dir, tmp_path)
    run(raw, crash=at("trace r2"))  # trace round 1 is saved
    index = json.loads((tmp_path / "inprocess" / "state" / "run.json").read_text())
    assert index["completed"] == [] and index["rounds"]["trace"]["done"] == 1

    with pytest.raises(ResumeError) as err:
        run({**raw, "train.lr": 1e-3, "selection.quantile": 0.2})
    message = str(err.value)
    assert "run 'inprocess'" in message and "train.lr: 0.0003 -> 0.001" in message
    assert "selection.quantile: 0.1 -> 0.2" in message
    assert "another run-name" in message and "delete" in message and "resume=false" in message
    # Keys that do not change results may differ.
    RunState(parse_config({**raw, "fed.timeout": 60.0}))


def test_resume_false_starts_over_and_a_finished_run_is_not_redone(tiny_model_dir, tmp_path, reference):  # noqa: F811
    ref_out, ref_sent = reference("federated")
    raw = run_config(tiny_model_dir, tmp_path, **MODES["federated"])
    run(raw, crash=at("select"))

    grid, _, metrics = run({**raw, "resume": False})
    assert grid.sent == ref_sent  # everything again
    assert "resumed-from" not in metrics
    assert_same_results(tmp_path / "inprocess", ref_out)

    grid, finished, again = run(raw)  # finished: nothing to do
    assert not grid.log and finished is None and again == metrics


def test_select_takes_back_the_sites_own_scores_only(tiny_model_dir, tmp_path):  # noqa: F811
    """A resumed run's sites have lost their scores: the select message brings them back,
    and a site refuses scores whose ids are not its own samples."""
    raw = run_config(tiny_model_dir, tmp_path)
    grid = InMemoryGrid(client_module.app, NODES, raw)
    _, _, _, encoded, _, _ = client_module._load(grid._contexts[101])
    ids = client_module._wire_ids(grid._contexts[101])  # the keyed hashes it sent when scoring

    def select(ids, node=101):
        content = RecordDict({"config": ConfigRecord({"ratio": 0.5}),
                              "scores": ConfigRecord({"ids": ids, "scores": [float(i) for i in range(len(ids))]})})
        (reply,) = grid.send_and_receive([Message(content=content, message_type="query.select", dst_node_id=node)])
        return reply

    # (the site's error comes back as an error reply naming the site: site_errors.report_site_errors)
    refused = select(ids[::-1])
    assert refused.has_error()
    assert re.search(r"^\[client-0\] ValueError: .*not this site's: 8 ids, 8 of them .* sample ids [(]in another order[)]",
                     refused.error.reason), refused.error.reason
    assert "not this site's: 3 ids" in select(ids[:3]).error.reason
    assert "not this site's: 8 ids, 0 of them" in select([e.id for e in encoded]).error.reason  # the raw ids are not what it sent
    reply = select(ids)
    assert not reply.has_error(), reply.error
    assert reply.content["metrics"]["kept"] == len(ids) // 2
    assert client_module._kept_rows(grid._contexts[101]) == list(range(len(ids) // 2, len(ids)))
