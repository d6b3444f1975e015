"""Sites that fail: their own error messages reach the server, once, and a FedAvg round
with fewer replies than fed.min-nodes stops the run; waiting for sites is bounded."""

from __future__ import annotations

import logging

import pytest
from test_flower_inprocess import drive, run_config

from clues_fl.federation.site_errors import split_reason, summarise
from clues_fl.server.sites import SitesFailed, wait_for_nodes


def test_a_data_error_at_every_site_stops_the_first_round_with_the_sites_message(tiny_model_dir, tmp_path, caplog):
    """The sites read 3 pollution ratios for 2 sites (the server does not read them):
    every site fails in trace round 1; the run stops there, once, with their message."""
    raw = run_config(tiny_model_dir, tmp_path, **{"pollution.ratios": "0.5,0.25,0.1"})
    with caplog.at_level(logging.WARNING), pytest.raises(SitesFailed) as err:
        drive(raw)
    message = str(err.value)
    assert message.startswith("trace round 1: 0 of 2 sites replied, fewer than fed.min-nodes=2; stopping the run."), message
    assert message.endswith("client-0, client-1: ConfigError: pollution.ratios: 3 values for 2 clients"), message
    # one round only: the error is not repeated for every trace round
    assert sum("failed in phase" in r.getMessage() for r in caplog.records) == 2


def test_a_round_with_fewer_sites_than_min_nodes_stops_the_run(tiny_model_dir, tmp_path):
    raw = run_config(tiny_model_dir, tmp_path)  # fed.min-nodes = 2 of 2 sites
    with pytest.raises(SitesFailed, match=r"trace round 1: 1 of 2 sites replied.* node 202: out of memory$"):
        drive(raw, fail={(202, "train"): RuntimeError("out of memory")})


def test_summary_groups_the_same_error():
    failed = [(1, "[client-1] DataError: x.csv: bad"), (2, "[client-0] DataError: x.csv: bad"),
              (7, "no reply before the timeout")]
    assert summarise(failed) == "client-0, client-1: DataError: x.csv: bad; node 7: no reply before the timeout"
    assert split_reason(3, "<class 'ValueError'>:<'boom'>") == ("node 3", "<class 'ValueError'>:<'boom'>")


class Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def test_waiting_for_sites_is_bounded_and_says_who_is_there(caplog):
    with caplog.at_level(logging.WARNING), pytest.raises(TimeoutError) as err:
        wait_for_nodes(Grid([11]), 3, timeout=0.5, every=0.1, poll=0.05)
    assert str(err.value).startswith("fed.min-nodes=3: only 1 site(s) connected in fed.wait-for-nodes=0.5 s "
                                     "(node ids [11])")
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for sites")]
    assert said and "1 of fed.min-nodes=3 connected (node ids [11]), 2 missing" in said[0]
    assert wait_for_nodes(Grid([3, 1]), 2, timeout=0.5) == [1, 3]


def test_a_sites_error_message_is_scrubbed_before_it_leaves():
    """What could be private goes: quoted values that are not the run-config's own (a
    sample id, a field's text), paths (the file name stays); what helps stays: field
    names, run-config keys and values, hashed ids, counts."""
    from clues_fl.federation.site_errors import allowed_words, scrub

    allowed = allowed_words({"pollution.ratios": "0.5,0.25,0.1", "lora.target-modules": "q_proj,nope_proj"})
    cases = {
        "/secure/h/site0.jsonl line 4: field 'id': duplicate id 'PATIENT-0042' (first at /secure/h/site0.jsonl line 3)":
            "site0.jsonl line 4: field 'id': duplicate id '…' (first at site0.jsonl line 3)",
        "pollution.ratios: 3 values for 2 clients": "pollution.ratios: 3 values for 2 clients",
        "lora.target-modules: none of ['nope_proj'] is a linear layer": "lora.target-modules: none of ['nope_proj'] is a "
                                                                       "linear layer",
        "non-finite loss for samples ['<id 0123abcd>', 'ACCT-77']": "non-finite loss for samples ['<id 0123abcd>', '…']",
        'C:\\data\\x.csv row 2: field "answer" is null': 'x.csv row 2: field "answer" is null',
        "kept 3/8, see ./runs/a/b.log": "kept 3/8, see b.log",
        "option text before the first lettered option: 'My secret text'":
            "option text before the first lettered option: '…'",
        "the scores are not this site's: 8 ids, 8 of them among this site's 8 sample ids":
            "the scores are not this site's: 8 ids, 8 of them among this site's 8 sample ids",
        "id 'it's here' is bad": "id '…' is bad",
    }
    for text, want in cases.items():
        assert scrub(text, allowed) == want
    long = scrub("x " * 400)
    assert len(long) == 300 and long.endswith("…")
    assert scrub("two\nlines\ttabs") == "two lines tabs"
