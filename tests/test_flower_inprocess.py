"""Drive the real ServerApp strategy and ClientApp through every phase in memory,
with a tiny random Llama saved as a local model folder, and check what the
messages carry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from clues_fl import client_app as client_module
from clues_fl.config import parse_config
from clues_fl.federation import messages as msg
from clues_fl.federation.inmemory_grid import InMemoryGrid
from clues_fl.data.scenario import build_scenario
from clues_fl.scoring.scorers import Scorer
from clues_fl.server_app import run_protocol
from clues_fl.federation.site_ids import read_id_map
from clues_fl.selection.rules import NothingKept
from clues_fl.server.sites import SitesFailed


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
        # the pipeline's tests run CLUES with the mixture rule, named (clues+ and anchor-f1
        # have their own tests in tests/test_signals.py and tests/test_selection.py)
        "selection.method": "clues",
        "selection.threshold": "mixture",
    }
    cfg.update(overrides)
    return cfg


NODES = {101: {"partition-id": 0, "num-partitions": 2}, 202: {"partition-id": 1, "num-partitions": 2}}


def drive(raw_cfg: dict, fail=None, nodes=None):
    """server_app.main (its run_protocol) over an in-memory grid of two sites."""
    cfg = parse_config(raw_cfg)
    grid = InMemoryGrid(client_module.app, nodes or NODES, raw_cfg, fail=fail or {})
    run, metrics = run_protocol(grid, cfg)
    return cfg, grid, run, metrics


def _strings_in(record) -> list[str]:
    out = []
    if isinstance(record, ConfigRecord):
        for value in record.values():
            values = value if isinstance(value, list) else [value]
            out += [v for v in values if isinstance(v, str)]
    return out


def assert_no_real_ids(grid, real_ids: set[str], private: tuple[str, ...] = ()) -> None:
    """No sample id of any site appears in any message, either way (hashes only), error
    replies included; nor any of the `private` strings (texts, paths) in an error reply."""
    for ex in grid.log:
        for message in (ex.sent, ex.reply):
            if message.has_error():
                reason = message.error.reason
                assert not any(i in reason for i in (*real_ids, *private)), (ex.message_type, reason)
                continue
            for name, record in message.content.items():
                for s in _strings_in(record) + list(record.keys()) + [name]:
                    assert not any(i in s for i in real_ids), (ex.message_type, name, s)


REQUESTS = {c.message_type: c for c in (msg.TrainRequest, msg.LocalTrainRequest, msg.ScoreRequest, msg.SelectRequest,
                                        msg.IdentifyRequest, msg.DescribeRequest)}
REPLIES = {"train": msg.TrainReply, "train.local": msg.LocalTrainReply, "query.score": msg.ScoreReply,
           "query.select": msg.SelectReply, "query.identify": msg.IdentifyReply, "query.site": msg.SiteDescription}


def _layout(content: RecordDict) -> dict:
    """A message's records and, for config and metric records, their keys."""
    return {name: set(record.keys()) if isinstance(record, (ConfigRecord, MetricRecord)) else type(record).__name__
            for name, record in content.items()}


def assert_typed_views_cover_the_wire(grid) -> None:
    """Every message of the run is one of the protocol's typed messages, and a reply
    parsed and packed again has the very records and keys it had (besides the SiteCost
    record every good reply carries): nothing travels that messages.py does not name.
    (A train request is Flower's strategy's own message: its config carries what the
    strategy adds; the typed view reads it.)"""
    for ex in grid.log:
        request = REQUESTS[ex.message_type].from_record(ex.sent.content)
        if ex.message_type != "train":
            assert _layout(request.to_record()) == _layout(ex.sent.content), ex.message_type
        if not ex.reply.has_error():
            content = RecordDict({k: v for k, v in ex.reply.content.items() if k != msg.SITE_COST})
            reply = REPLIES[ex.message_type].from_record(content)
            assert _layout(reply.to_record()) == _layout(content), ex.message_type
            cost = msg.SiteCost.from_record(ex.reply.content[msg.SITE_COST])
            assert _layout(RecordDict({msg.SITE_COST: cost.to_record()})) == {
                msg.SITE_COST: set(ex.reply.content[msg.SITE_COST].keys())}


PHASE_OF_TYPE = {"query.score": "score", "query.select": "select", "query.site": "connect", "query.identify": "connect"}


def assert_cost_counts_what_was_sent(grid, cost: dict) -> None:
    """metrics.json's cost per phase: the messages the grid carried and the sum of
    wire_bytes of their contents each way (the phase read off each message)."""
    expected: dict[str, list[int]] = {}
    for ex in grid.log:
        phase = PHASE_OF_TYPE.get(ex.message_type) or str(ex.sent.content["config"]["phase"])
        counts = expected.setdefault(phase, [0, 0, 0])
        counts[0] += 1
        counts[1] += msg.wire_bytes(ex.sent.content)
        counts[2] += 0 if ex.reply.has_error() else msg.wire_bytes(ex.reply.content)
    counted = {p: [c["messages"], c["bytes-sent"], c["bytes-received"]] for p, c in cost["phases"].items()
               if c["messages"]}
    assert counted == expected
    assert cost["total"]["bytes-sent"] == sum(c[1] for c in expected.values())


@pytest.mark.parametrize("mode,retrain", [("federated", "rounds"), ("merging", "merge")])
def test_all_phases_and_what_leaves_a_site(tiny_model_dir, tmp_path, mode, retrain):
    raw = run_config(tiny_model_dir, tmp_path, mode=mode, **{"retrain.mode": retrain})
    cfg, grid, run, metrics = drive(raw)

    phases = {e.message_type for e in grid.log}
    expected = {"train", "query.score", "query.select"} if mode == "federated" else {"train.local", "query.score", "query.select"}
    assert expected <= phases

    # The private texts of each site: none of them may appear in any reply.
    data = build_scenario(cfg, 2)
    texts = {s.question for c in data.clients for s in c} | {s.answer for c in data.clients for s in c}
    real_ids = {s.id for c in data.clients for s in c}
    assert_no_real_ids(grid, real_ids)
    assert_typed_views_cover_the_wire(grid)
    n_params = sum(v.numel() for v in run.bench.initial_state.values())
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
            reply = msg.ScoreReply.from_record(content)
            assert np.isfinite(np.asarray(reply.scores)).all() and reply.histogram is None
            # keyed hashes (32 hex digits), which the site maps back in its own folder only
            assert all(len(i) == 32 and int(i, 16) >= 0 for i in reply.ids)
            site = tmp_path / "inprocess" / "sites" / f"client-{NODES[ex.node]['partition-id']}"
            mapped = read_id_map(site)
            assert [mapped[i] for i in reply.ids] == [s.id for s in data.clients[NODES[ex.node]["partition-id"]]]
            request = msg.ScoreRequest.from_record(ex.sent.content)
            assert request.method == "clues" and request.privacy is None
            assert len(request.checkpoints) == len(request.anchor_gradients) == cfg["trace.rounds"]
        if ex.message_type == "query.select":
            assert set(content["metrics"].keys()) >= {"kept", "tp", "fp", "fn", "tn"}
            reply = msg.SelectReply.from_record(content)
            assert reply.labelled and set(reply.counts) == {"tp", "fp", "fn", "tn"} and reply.num_examples == 8
            request = msg.SelectRequest.from_record(ex.sent.content)
            assert (request.anchor_mean is not None) == (mode == "merging")  # scores standardised per site
            assert request.scores is not None  # exact scores go back (a resumed run's sites lost theirs)

    out = tmp_path / "inprocess"
    written = json.loads((out / "metrics.json").read_text())
    assert written["selection"]["per-client"].keys() == {"client-0", "client-1"}
    assert written["selection"]["per-client"]["client-0"]["skipped-rows"] == 0
    for key in ("precision", "recall", "f1", "accuracy"):
        assert 0.0 <= written["selection"][key] <= 1.0
    assert set(written["validation-loss"]) >= {"base", "all-data", "selected"}
    if mode == "federated":  # the all-data reference is retrained at the selection's budget
        assert "last-trace-checkpoint" in written["validation-loss"]
        assert len(written["round-losses"]["all-data"]) == cfg["retrain.rounds"]
    quality = written["model-quality"]
    assert quality["answered"] == 2 and 0 <= quality["rouge-l"] <= 1 and 0 <= quality["token-f1"] <= 1
    assert 0 <= quality["mc-accuracy"] <= 1
    adapter = out / "adapter"  # one peft adapter folder, a one-shot merge's too
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_model_dir  # a real folder (the bundled model: its cache copy)
    card = (adapter / "README.md").read_text()
    assert "run `inprocess`" in card and "kept" in card and "[More Information Needed]" not in card
    assert "AutoPeftModelForCausalLM.from_pretrained" in card and "python -m clues_fl.export" in card
    saved = load_file(adapter / "adapter_model.safetensors")
    if mode == "federated":  # the saved adapter is the aggregate step's, not a trace checkpoint
        final = {k.replace(".default.", "."): v for k, v in run.state.final.state.items()}
        assert saved.keys() == final.keys()
        assert all(torch.equal(saved[k], final[k].to(saved[k].dtype)) for k in saved)
        for ckpt in run.state.checkpoints:
            assert any(not torch.equal(saved[k.replace(".default.", ".")], v.to(saved[k.replace(".default.", ".")].dtype))
                       for k, v in ckpt.state.items())
    else:  # the one-shot merge of the sites' adapters: rank = the sum of theirs
        assert config["r"] == 2 * cfg["lora.r"] and not (adapter / "merged").exists()
    assert_adapter_loads_with_transformers_and_peft(adapter, tmp_path / "merged" if mode == "merging" else None)
    report = (out / "report.md").read_text()
    assert "| client-0 | 8 |" in report and "![score histograms](score_histograms.png)" in report
    assert "Validation loss" in report and (out / "score_histograms.png").stat().st_size > 1000
    assert ((out / "round_losses.png").exists()) == (mode == "federated")
    manifests = sorted(p.name for p in (out / "manifest").glob("*.csv"))
    assert manifests == ["client-0.csv", "client-1.csv"]
    lines = (out / "manifest" / "client-0.csv").read_text().splitlines()
    assert lines[0] == "id-hash,score,kept,score-z" and len(lines) == 9
    assert not any(i in "\n".join(lines) for i in real_ids)
    # counts reported by the sites agree with the kept flags of the manifest
    kept = sum(int(l.split(",")[2]) for l in lines[1:])
    assert kept == written["selection"]["per-client"]["client-0"]["kept"]

    cost = written["cost"]
    assert_cost_counts_what_was_sent(grid, cost)
    assert {"connect", "trace", "score", "select", "aggregate"} <= set(cost["phases"])
    for phase in ("trace", "score", "select", "aggregate"):
        assert set(cost["phases"][phase]["site-seconds"]) == {"client-0", "client-1"}, phase
        assert cost["phases"][phase]["server-wall-seconds"] > 0
    assert cost["phases"]["threshold"]["messages"] == 0 and cost["phases"]["evaluate"]["server-cpu-seconds"] > 0
    share = cost["selection"]
    per = written["selection"]["per-client"]
    assert share["kept"] == sum(m["kept"] for m in per.values()) and share["samples"] == 16
    trace_score = sum(sum(cost["phases"][p]["site-seconds"].values()) for p in ("trace", "score"))
    assert share["selection-site-seconds"] == pytest.approx(trace_score, abs=0.01) and share["ratio"] > 0
    assert set(cost["site-peak-rss-mib"]) == {"client-0", "client-1"}
    assert all(b > 0 for b in cost["site-prefix-cache-bytes"].values())
    assert "## Cost" in report and "| trace |" in report and "| aggregate |" in report and "| total |" in report
    assert f"= {share['ratio']:.2f} x the retraining on the kept samples" in report


def assert_adapter_loads_with_transformers_and_peft(adapter, merged=None) -> None:
    """The README's lines: the adapter folder loads with transformers and peft alone (the
    base model from base_model_name_or_path) and generates; `merged`: the exported merged
    model (python -m clues_fl.export) loads with transformers alone and computes the same."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is a stock split?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    if merged is None:
        return
    from clues_fl.export import main as export_main

    assert export_main([str(adapter.parent), "--merged", str(merged)]) == 0
    assert not (merged / "adapter_config.json").exists() and (merged / "config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(str(merged))
    with torch.no_grad():
        torch.testing.assert_close(plain(**ids).logits, model(**ids).logits, rtol=1e-4, atol=1e-4)
    assert plain.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]
    assert export_main([str(adapter.parent), "--merged", str(merged)]) == 2  # not over a folder in use


def test_a_selection_that_keeps_nothing_stops_before_aggregation(tiny_model_dir, tmp_path):
    """It published the adapter loaded last (the last trace checkpoint, trained on all
    the rejected data) as the result, exit 0."""
    raw = run_config(tiny_model_dir, tmp_path, **{"selection.threshold": "static", "selection.static": 1e9,
                                                   "eval.max-samples": 0, "eval.mc-items": 0})
    grid = InMemoryGrid(client_module.app, NODES, raw)
    with pytest.raises(NothingKept) as err:
        run_protocol(grid, parse_config(raw))
    assert str(err.value).startswith("the selection kept too little to retrain on: no site kept at least "
                                     "selection.min-kept=1 sample(s) (kept: client-0 0, client-1 0; threshold "
                                     "static = 1e+09); stopping before aggregation, no adapter saved.")
    assert "\n" not in str(err.value)
    assert not any(e.sent.content["config"].get("phase") == "aggregate" for e in grid.log if e.message_type == "train")
    out = tmp_path / "inprocess"
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()


def test_a_run_that_stops_says_why_in_one_line_and_flower_logs_no_traceback(tiny_model_dir, tmp_path, caplog):
    """The ServerApp (`flwr run .`): one line naming the cause; Flower's own record of the
    exception that ended the app keeps its message and drops the traceback; the run's
    lock is released."""
    import logging

    from flwr.app import Context

    import clues_fl.server_app as server

    raw = run_config(tiny_model_dir, tmp_path, **{"selection.threshold": "static", "selection.static": 1e9,
                                                   "eval.max-samples": 0, "eval.mc-items": 0})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=raw)
    caplog.set_level(logging.INFO)
    with pytest.raises(NothingKept) as err:
        server.main(InMemoryGrid(client_module.app, NODES, raw), context)
    stops = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run stopped: ")]
    assert stops == [f"run stopped: {err.value}"]
    caplog.clear()
    logging.getLogger("flwr").error("ServerApp raised an exception", exc_info=err.value)  # as Flower logs it
    assert [(r.getMessage(), r.exc_info) for r in caplog.records] == [("ServerApp raised an exception", None)]
    assert not (tmp_path / "inprocess" / ".lock").exists()


def test_a_site_below_selection_min_kept_sits_out_of_retraining(tiny_model_dir, tmp_path):
    """The oracle keeps the clean samples: 4 of 8 at client-0 (50% polluted), 6 at client-1."""
    raw = run_config(tiny_model_dir, tmp_path, **{"selection.method": "oracle", "selection.min-kept": 5,
                                                   "eval.max-samples": 0, "eval.mc-items": 0, "fed.min-nodes": 1})
    cfg, grid, clues, metrics = drive(raw)
    assert {n: m["kept"] for n, m in metrics["selection"]["per-client"].items()} == {"client-0": 4, "client-1": 6}
    retrained = {e.node for e in grid.log if e.message_type == "train" and e.sent.content["config"]["phase"] == "aggregate"}
    assert retrained == {202}
    with pytest.raises(NothingKept, match="selection.min-kept=7"):
        drive({**raw, "selection.min-kept": 7, "output-dir": str(tmp_path / "seven")})


def test_an_error_reply_carries_its_type_and_no_sample_id_or_path(tiny_model_dir, tmp_path):
    """A duplicate id in a site's file sent `duplicate id 'SECRETID-0003'` and the file's
    full path to the server; the full text stays in the site's own log."""
    folder = tmp_path / "hospital-secret-folder"
    folder.mkdir()
    rows = [{"id": f"SECRETID-{i:04d}", "question": f"Question {i}?", "answer": f"Answer {i}."} for i in range(1, 9)]
    bad = folder / "site0.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows[:3] + [rows[2]] + rows[3:]))
    good = folder / "site1.jsonl"
    good.write_text("".join(json.dumps({**r, "id": r["id"].replace("SECRETID", "OTHERID")}) + "\n" for r in rows))
    raw = run_config(tiny_model_dir, tmp_path, **{"pollution.ratios": "", "eval.max-samples": 0, "eval.mc-items": 0})
    nodes = {101: {"partition-id": 0, "data-file": str(bad)}, 202: {"partition-id": 1, "data-file": str(good)}}
    grid = InMemoryGrid(client_module.app, nodes, raw)
    with pytest.raises(SitesFailed) as err:
        run_protocol(grid, parse_config(raw))
    reasons = [e.reply.error.reason for e in grid.log if e.reply.has_error()]
    assert reasons and reasons[0] == ("[client-0] DataError: site0.jsonl line 4: field 'id': duplicate id '…' "
                                      "(first at site0.jsonl line 3)")
    private = (str(folder), "hospital-secret-folder", "Question 3", "Answer 3")
    assert_no_real_ids(grid, {r["id"] for r in rows}, private)
    assert "SECRETID" not in str(err.value) and "hospital-secret-folder" not in str(err.value)
    site_log = (tmp_path / "inprocess" / "site-reports" / "client-0" / "errors.log").read_text()
    assert "duplicate id 'SECRETID-0003'" in site_log and str(bad) in site_log  # the site's own record


def test_the_server_waits_for_its_sites_before_loading_the_model(tiny_model_dir, tmp_path, monkeypatch):
    """The wait began after the model loaded (a 30 s wait took 90 s)."""
    import clues_fl.strategies.clues as strategy

    raw = run_config(tiny_model_dir, tmp_path, **{"fed.wait-for-nodes": 0.5})
    monkeypatch.setattr(strategy, "workbench", lambda cfg: pytest.fail("the model loaded before the sites connected"))
    with pytest.raises(TimeoutError, match=r"fed.min-nodes=2: only 0 site\(s\) connected"):
        run_protocol(InMemoryGrid(client_module.app, {}, raw), parse_config(raw))


@pytest.mark.slow
def test_the_smoke_scenario_drops_exchanged_answers(tmp_path):
    """The recommended first run kept 8 of 8 at both sites in every trial: it never showed
    selection working. Now it drops exchanged answers (docs/outputs.md: seeds 0-3)."""
    import tomllib
    from pathlib import Path

    from flwr.common.config import flatten_dict

    raw = flatten_dict(tomllib.loads((Path(__file__).parent.parent / "scenarios" / "smoke.toml").read_text()))
    raw.update({"output-dir": str(tmp_path), "eval.validation": False, "eval.max-samples": 0, "eval.mc-items": 0})
    cfg, grid, clues, metrics = drive(raw)
    per = metrics["selection"]["per-client"]
    kept = sum(m["kept"] for m in per.values())
    polluted_dropped, clean_dropped = sum(m["tn"] for m in per.values()), sum(m["fn"] for m in per.values())
    print(f"smoke: kept {kept}/16, dropped {polluted_dropped} of 6 exchanged and {clean_dropped} of 10 clean answers")
    assert 0 < kept < 16 and polluted_dropped >= 3 and polluted_dropped > clean_dropped


def test_site_failing_in_fedavg_rounds_is_reported_and_the_others_go_on(tiny_model_dir, tmp_path):
    raw = run_config(tiny_model_dir, tmp_path, **{"fed.min-nodes": 1})
    cfg, grid, run, metrics = drive(raw, fail={(202, "train"): RuntimeError("out of memory")})
    phases = [m["phase"] for m in metrics["missing-sites"] if m["node"] == 202]
    assert phases == ["trace round 1", "trace round 2", "aggregate round 1", "all-data round 1"]
    assert all(m["reason"] == "out of memory" for m in metrics["missing-sites"])
    # the site by its partition (known before it ever replied: query.site), and the round
    assert [(m["site"], m["partition-id"], m["round"]) for m in metrics["missing-sites"]] == [
        ("client-1", 1, 1), ("client-1", 1, 2), ("client-1", 1, 1), ("client-1", 1, 1)]  # last: all-data
    assert len(run.state.checkpoints) == 2 and "selected" in metrics["validation-loss"]


def test_failed_site_does_not_stop_the_run(tiny_model_dir, tmp_path):
    raw = run_config(tiny_model_dir, tmp_path, **{"fed.min-nodes": 1})
    cfg, grid, run, metrics = drive(raw, fail={(202, "query.score"): RuntimeError("disk full")})
    assert metrics["missing-sites"] and metrics["missing-sites"][0]["phase"] == "score"
    assert metrics["missing-sites"][0]["site"] == "client-1" and metrics["missing-sites"][0]["round"] is None
    assert list(metrics["selection"]["per-client"]) == ["client-0"]


class LengthScorer(Scorer):  # a user's scorer, named in the run-config
    name = "length"

    def score(self, site, payload):
        return np.array([len(s.question) + len(s.answer) / 1e4 for s in site.samples])


@pytest.mark.parametrize("method", ["less", "datainf", "ppl", "ifd", "random", "all", "oracle",
                                    "test_flower_inprocess:LengthScorer"])
def test_every_selection_method_runs_through_the_same_messages(tiny_model_dir, tmp_path, method):
    raw = run_config(tiny_model_dir, tmp_path, **{"selection.method": method, "selection.ratio": 0.5})
    cfg, grid, run, metrics = drive(raw)
    sel = metrics["selection"]
    n = sum(m["tp"] + m["fp"] + m["fn"] + m["tn"] for m in sel["per-client"].values())
    kept = sum(m["kept"] for m in sel["per-client"].values())
    traced = any(e.message_type == "train" and e.sent.content["config"].get("phase") not in ("aggregate", "all-data")
                 for e in grid.log)
    assert traced == (method in ("less", "datainf"))
    if method == "oracle":
        assert sel["precision"] == 1.0 and sel["recall"] == 1.0
    elif method == "all":
        assert kept == n and sel["recall"] == 1.0
    else:  # one global threshold keeping the top half of all pooled scores
        assert kept == 8, kept
    assert metrics["threshold"]["method"] == method


def test_suite_lab_shares_one_trace_across_methods(tiny_model_dir, tmp_path):
    from clues_fl.experiments.suite import Lab, _table

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
    import clues_fl.experiments.suite as suite

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


def test_console_status_lines_and_no_flower_banner(tiny_model_dir, tmp_path, caplog, monkeypatch):
    """One line per phase (start and end, evaluation included) and per FedAvg round;
    Flower's per-start strategy banner is dropped unless CLUES_FL_VERBOSE=1."""
    import logging

    from flwr.serverapp.strategy import FedAvg

    monkeypatch.delenv("CLUES_FL_VERBOSE", raising=False)
    caplog.set_level(logging.INFO)
    drive(run_config(tiny_model_dir, tmp_path, **{"eval.mc-items": 0, "eval.max-samples": 0}))
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("clues_fl")]
    for phase in ("trace", "score", "threshold", "select", "aggregate", "evaluate"):
        assert any(m.startswith(f"{phase}: started") for m in ours), phase
        assert any(m.startswith(f"{phase}: done in") for m in ours), phase
    assert any(m.startswith("trace round 2/2: 2 sites, mean training loss") for m in ours)
    assert any("kept client-0 " in m for m in ours if m.startswith("select: done"))
    flower = [r.getMessage() for r in caplog.records if r.name == "flwr"]
    assert flower == [], flower[:5]

    caplog.clear()
    FedAvg(fraction_evaluate=0.0)
    assert caplog.records == []
    monkeypatch.setenv("CLUES_FL_VERBOSE", "1")
    FedAvg(fraction_evaluate=0.0)
    assert any("fraction_evaluate is set to 0.0" in r.getMessage() for r in caplog.records)


def test_progress_lines_off_a_terminal(capsys, monkeypatch):
    from clues_fl import console

    monkeypatch.setenv("CLUES_FL_PROGRESS_SECONDS", "0")
    assert list(console.progress(range(3), desc="scoring")) == [0, 1, 2]  # stderr is captured: no TTY
    err = capsys.readouterr().err
    assert "scoring: 1/3" in err and "scoring: 3/3" in err and "\r" not in err
    with console.progress(total=2, desc="train", disable=True) as bar:
        bar.update(2)
    assert capsys.readouterr().err == ""


class FailingScorer(Scorer):  # an error that names a sample, as the engine's non-finite-loss error does
    name = "failing"

    def score(self, site, payload):
        raise FloatingPointError(f"non-finite loss for samples {[s.id for s in site.samples[:2]]}")


def test_a_sites_error_names_its_samples_by_hashed_ids_only(tiny_model_dir, tmp_path):
    raw = run_config(tiny_model_dir, tmp_path, **{"selection.method": "test_flower_inprocess:FailingScorer"})
    grid = InMemoryGrid(client_module.app, NODES, raw)
    context = grid._contexts[101]
    real = [s.id for s in client_module._load(context)[2][:2]]
    # the site's error comes back as an error reply (site_errors.report_site_errors): its text travels
    reply = client_module.app(Message(RecordDict({"config": ConfigRecord({"method": "test_flower_inprocess:FailingScorer"})}),
                                      dst_node_id=101, message_type="query.score"), context)
    assert reply.has_error()
    text = reply.error.reason
    assert "FloatingPointError" in text, text
    assert not any(i in text for i in real), text
    assert all(f"<id {h}>" in text for h in client_module._wire_ids(context)[:2]), text


@pytest.fixture(scope="module")
def tiny_scoring_model_dir(tiny_model_dir, tmp_path_factory):
    """A second tiny random model of another family and shape (Qwen2, hidden 48, 3
    layers) with the same tokenizer: a scoring model apart from the trained Llama."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _hidden_sizes(record) -> set[int]:
    """The LoRA A matrices' input widths in an adapter record: the model's hidden size."""
    return {int(v.shape[1]) for k, v in record.to_torch_state_dict().items() if "lora_A" in k and "moment" not in k}


@pytest.mark.parametrize("mode,retrain", [("federated", "rounds"), ("merging", "merge")])
def test_a_scoring_model_apart_selects_and_the_trained_model_is_published(
        tiny_model_dir, tiny_scoring_model_dir, tmp_path, mode, retrain):
    """scoring.model: the trace and the scores run on the scoring model (its adapters
    travel while tracing, its anchor gradients go to the sites), the aggregate step and
    the all-data reference on the trained model, which alone is evaluated and published."""
    raw = run_config(tiny_model_dir, tmp_path, mode=mode, **{
        "retrain.mode": retrain, "scoring.model": tiny_scoring_model_dir, "scoring.model-layers": "1-2"})
    cfg, grid, run, metrics = drive(raw)
    assert run.scoring_model_apart
    assert run.selection_bench.model.config.hidden_size == 48 and run.bench.model.config.hidden_size == 32
    assert_typed_views_cover_the_wire(grid)
    phase_widths: dict[str, set[int]] = {}
    for ex in grid.log:
        assert not ex.reply.has_error(), ex.reply.error
        if ex.message_type in ("train", "train.local"):
            phase = (str(ex.sent.content["config"]["phase"]) if ex.message_type == "train"
                     else msg.LocalTrainRequest.from_record(ex.sent.content).phase)
            for record in ex.reply.content.values():
                if isinstance(record, ArrayRecord):
                    phase_widths.setdefault(phase, set()).update(_hidden_sizes(record))
        if ex.message_type == "query.score":
            request = msg.ScoreRequest.from_record(ex.sent.content)
            assert {int(v.shape[1]) for g in request.anchor_gradients for k, v in g.items() if "lora_A" in k} == {48}
            assert np.isfinite(msg.ScoreReply.from_record(ex.reply.content).scores).all()
    assert phase_widths["trace"] == {48} and phase_widths["aggregate"] == {32}
    if mode == "federated":
        assert phase_widths["all-data"] == {32}

    out = tmp_path / "inprocess"
    written = json.loads((out / "metrics.json").read_text())
    # the trace trained the scoring model: no "last trace checkpoint" of the published one
    assert "last-trace-checkpoint" not in written["validation-loss"]
    assert {"base", "selected"} <= set(written["validation-loss"])
    assert ("all-data" in written["validation-loss"]) == (mode == "federated")
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert {int(v.shape[1]) for k, v in adapter.items() if "lora_A" in k} == {32}
    report = (out / "report.md").read_text()
    assert f"scoring model `{tiny_scoring_model_dir}`" in report
    assert "scored with" in (out / "adapter" / "README.md").read_text()


def test_the_selection_draws_benchmark_traces_the_model_the_selection_runs_with(
        tiny_model_dir, tiny_scoring_model_dir, tmp_path):
    """benchmarks/selection_draws.py measure: its FedAvg trace is the protocol's trace
    phase (CluesStrategy over the in-memory grid), on scoring.model where one is set."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import selection_draws

    for overrides, width in (({}, 32), ({"scoring.model": tiny_scoring_model_dir, "scoring.model-layers": "1-2"}, 48)):
        checkpoints = selection_draws.fedavg_trace(run_config(tiny_model_dir, tmp_path, **overrides))
        assert len(checkpoints) == 2  # trace.rounds
        assert {int(v.shape[1]) for c in checkpoints for k, v in c.state.items() if "lora_A" in k} == {width}


def test_the_scoring_model_benchmark_compares_two_finished_runs(tiny_model_dir, tiny_scoring_model_dir, tmp_path,
                                                                 capsys, monkeypatch):
    """benchmarks/scoring_model.py on a run whose model scored for itself and one with a
    scoring.model: the same 16 samples, their labels rebuilt from the run-config, the
    agreement of the two rankings and of what they kept."""
    import re
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import scoring_model

    drive(run_config(tiny_model_dir, tmp_path, **{"run-name": "self"}))
    drive(run_config(tiny_model_dir, tmp_path, **{"run-name": "small", "scoring.model": tiny_scoring_model_dir,
                                                   "scoring.model-layers": "1-2"}))
    for other, same in (("small", False), ("self", True)):
        monkeypatch.setattr(sys, "argv", ["scoring_model.py", str(tmp_path / "self"), str(tmp_path / other)])
        scoring_model.main()
        out = capsys.readouterr().out
        rows = [line for line in out.splitlines() if line.startswith(("| self", "| small"))]
        assert len(rows) == 2 and all(re.search(r"\| \d+/16 \|", r) for r in rows)  # kept of the 16 samples
        both = re.search(r"kept by both (\d+), only by self (\d+), only by \w+ (\d+), by neither (\d+)", out)
        assert sum(int(x) for x in both.groups()) == 16
        spearman = float(re.search(r"Spearman of the scores: (-?[0-9.]+) over 16 samples", out).group(1))
        assert (spearman == 1.0) == same
        if same:
            assert int(both.group(2)) == int(both.group(3)) == 0 and "saved: 0 (0%)" in out


def test_evaluate_fn_is_given_only_the_trained_models_arrays(tiny_model_dir, tiny_scoring_model_dir, tmp_path):
    """CluesStrategy.start(evaluate_fn=...) with a scoring.model: called after the rounds
    of the aggregate step and the all-data reference (the trained model's arrays), not
    after the trace's rounds on the scoring model."""
    from clues_fl.strategies.clues import CluesStrategy

    raw = run_config(tiny_model_dir, tmp_path, **{"scoring.model": tiny_scoring_model_dir,
                                                   "scoring.model-layers": "1-2"})
    seen = []

    def evaluate_fn(server_round, arrays):
        seen.append((server_round, _hidden_sizes(arrays)))
        return None

    CluesStrategy(parse_config(raw)).start(grid=InMemoryGrid(client_module.app, NODES, raw), evaluate_fn=evaluate_fn)
    assert seen == [(1, {32}), (1, {32})]  # retrain.rounds = 1: the aggregate step, then the all-data reference
