"""Cost accounting (server/cost.py, federation/site_cost.py) on hand-made messages, no
model: the metered grid counts exactly wire_bytes of what went each way, takes the
sites' cost record off the replies, and the ledger survives a save and a new node id."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from clues_fl.federation.inmemory_grid import InMemoryGrid
from clues_fl.federation.messages import SITE_COST, SiteCost, wire_bytes
from clues_fl.federation.site_cost import site_cost_mod
from clues_fl.federation.state import dump, load
from clues_fl.reporting.run_report import cost_lines
from clues_fl.server.cost import CONNECT, CostLedger, MeteredGrid, cost_section, selection_line, selection_share


def _handler(message: Message, context) -> Message:
    if message.content["config"]["fail"]:
        raise RuntimeError("broken site")
    n = int(message.content["config"]["rows"])
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict={"w": torch.ones(n, 3)}),
                          "metrics": MetricRecord({"num-examples": n})})
    return Message(content=content, reply_to=message)


def _site(message: Message, context) -> Message:
    """A site: the cost mod around the handler, an exception as an error reply (as report_site_errors does)."""
    from flwr.app import Error

    try:
        return site_cost_mod(lambda m, c: 1234)(message, context, _handler)
    except RuntimeError as err:
        return Message(Error(code=2, reason=str(err)), reply_to=message)


def _messages(rows: dict[int, int], fail=()) -> list[Message]:
    return [Message(content=RecordDict({"arrays": ArrayRecord(torch_state_dict={"x": torch.randn(r, 5)}),
                                        "config": ConfigRecord({"rows": r, "fail": node in fail})}),
                    message_type="query.test", dst_node_id=node) for node, r in rows.items()]


@pytest.fixture
def metered():
    inner = InMemoryGrid(_site, {1: {}, 2: {}, 3: {}}, {})
    ledger = CostLedger()
    return inner, ledger, MeteredGrid(inner, lambda: ledger)


def test_the_grid_counts_wire_bytes_each_way_per_phase_and_strips_the_cost_record(metered):
    inner, ledger, grid = metered
    grid.phase = "score"
    sent = _messages({1: 10, 2: 200, 3: 7}, fail={3})
    expected_sent = sum(wire_bytes(m.content) for m in sent)
    replies = list(grid.send_and_receive(sent, timeout=5))
    grid.phase = "aggregate"
    more = _messages({1: 50})
    grid.send_and_receive(more)

    score, aggregate = ledger.phases["score"], ledger.phases["aggregate"]
    assert (score.messages, score.replies, aggregate.messages, aggregate.replies) == (3, 2, 1, 1)
    assert score.bytes_sent == expected_sent and aggregate.bytes_sent == wire_bytes(more[0].content)
    # what came back: the replies as the sites sent them (their cost record included)
    came = {ex.node: ex.reply for ex in inner.log}
    assert SITE_COST in came[1].content and came[3].has_error()
    assert score.bytes_received == wire_bytes(inner.log[0].reply.content) + wire_bytes(inner.log[1].reply.content)
    assert aggregate.bytes_received == wire_bytes(inner.log[3].reply.content)
    assert score.bytes_received > 200 * 3 * 4  # site 2's adapter-sized array
    # the caller gets the replies without the cost record, otherwise intact
    assert all(SITE_COST not in r.content for r in replies if not r.has_error())
    assert [r.has_error() for r in replies] == [False, False, True]
    assert torch.equal(replies[1].content["arrays"].to_torch_state_dict()["w"], torch.ones(200, 3))
    # the sites' seconds and peaks, per node; a failed message adds none
    assert set(score.site_wall_seconds) == {1, 2} and set(aggregate.site_wall_seconds) == {1}
    assert all(v >= 0 for v in score.site_cpu_seconds.values())
    cost = SiteCost.from_record(came[2].content[SITE_COST])
    assert score.site_wall_seconds[2] == cost.wall_seconds and cost.cache_bytes == 1234
    assert ledger.site_peak_rss_mib[1] > 10 and ledger.site_cache_bytes == {1: 1234, 2: 1234}


def test_push_and_pull_are_counted_and_everything_else_is_the_wrapped_grids(metered):
    inner, ledger, grid = metered

    class PushPull(InMemoryGrid):
        def push_messages(self, messages):
            self.pending = self.send_and_receive(messages)
            return [r.metadata.reply_to_message_id for r in self.pending]

        def pull_messages(self, message_ids):
            return self.pending

    inner = PushPull(_site, {1: {}}, {})
    grid = MeteredGrid(inner, lambda: ledger)
    sent = _messages({1: 4})
    ids = grid.push_messages(sent)
    replies = list(grid.pull_messages(ids))
    entry = ledger.phases[CONNECT]
    assert entry.bytes_sent == wire_bytes(sent[0].content)
    assert entry.bytes_received == wire_bytes(inner.log[0].reply.content)
    assert SITE_COST not in replies[0].content
    assert grid.get_node_ids() == [1] and grid.log is inner.log and grid.node_configs == {1: {}}


def test_the_ledger_survives_the_saved_state_and_a_resumed_runs_new_node_ids():
    ledger = CostLedger()
    ledger.add_reply("trace", 7, SiteCost(2.0, 1.5, 300.0, 10))
    ledger.add_reply("connect", 7, SiteCost(0.5, 0.5, 310.0))
    ledger.add_reply("connect", 9, SiteCost(0.25, 0.25, 200.0))  # node 9: node 7 after the resume
    ledger.add_server("trace", 3.0, 2.0)
    values, arrays = dump(ledger)
    back = load(json.loads(json.dumps(values)), arrays)
    assert back == ledger
    back.renumber({7: 9})
    assert back.phases["trace"].site_wall_seconds == {9: 2.0}
    assert back.phases["connect"].site_wall_seconds == {9: 0.75}
    assert back.site_peak_rss_mib == {9: 310.0} and back.site_cache_bytes == {9: 10}


def _ledger(trace: float, score: float, aggregate: float) -> CostLedger:
    ledger = CostLedger()
    for phase, seconds in (("trace", trace), ("score", score), ("aggregate", aggregate)):
        for node in (1, 2):
            if seconds:
                ledger.add_reply(phase, node, SiteCost(seconds, seconds / 2, 100.0))
        ledger.phase(phase).bytes_sent += 1000
    return ledger


def test_the_selection_share_is_trace_plus_score_over_retraining_or_says_why_not():
    share = selection_share(_ledger(3.0, 1.0, 2.0), kept=12, total=16, phases_run=["trace", "score", "aggregate"])
    assert share["selection-site-seconds"] == 8.0 and share["training-site-seconds"] == 4.0 and share["ratio"] == 2.0
    assert selection_line(share) == ("selection cost: 8.0 site-seconds (trace + score) = 2.00 x the retraining on "
                                     "the kept samples (4.0 site-seconds); kept 12 of 16 (75%)")
    # a method without a trace: score alone
    assert selection_share(_ledger(0, 1.0, 2.0), 12, 16, ["score", "aggregate"])["ratio"] == 0.5
    # the trace ran before this run counted (a shared trace, an older saved state): no ratio
    missing = selection_share(_ledger(0, 1.0, 2.0), 12, 16, ["trace", "score", "aggregate"])
    assert missing["ratio"] is None and "trace" in missing["why"]
    assert selection_line(missing).startswith("selection cost: not stated (no site seconds counted for trace")


def test_the_cost_section_names_sites_and_the_report_table_has_every_phase():
    ledger = _ledger(3.0, 1.0, 2.0)
    ledger.add_server("score", 1.25, 1.0)
    section = cost_section(ledger, {1: "client-0", 2: "client-1"}.get, 12, 16, ["trace", "score", "aggregate"])
    assert section["phases"]["score"]["site-seconds"] == {"client-0": 1.0, "client-1": 1.0}
    assert section["phases"]["score"]["server-wall-seconds"] == 1.25
    assert section["phases"]["trace"]["server-cpu-seconds"] is None  # not measured: not made up
    assert section["total"]["bytes-sent"] == 3000 and section["site-peak-rss-mib"] == {"client-0": 100.0,
                                                                                        "client-1": 100.0}
    text = "\n".join(cost_lines(json.loads(json.dumps(section))))
    assert "## Cost" in text and "| score | 0 | 1.0 kB | 0 B | 2.0 | 1.0 | 1.2 | 1.0 |" in text
    assert "| total | 0 | 3.0 kB | 0 B |" in text and "selection cost: 8.0 site-seconds" in text
    assert np.isclose(section["selection"]["ratio"], 2.0)
