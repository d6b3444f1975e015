"""What a site does, as plain functions (federation/site.py), without Flower."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clues_fl.data.sources import Sample
from clues_fl.federation import site
from clues_fl.selection.rules import keep


def test_adam_steps_before_a_round():
    # 10 samples, batch 4: 3 batches a local epoch; 2 epochs: 6 steps a round
    assert [site.steps_before(r, 10, 4, 2) for r in (1, 2, 3)] == [0, 6, 12]
    assert site.steps_before(2, 10, 4, 0.5) == 2  # ceil(3 * 0.5)


def test_equal_budget_epochs_give_the_kept_samples_steps():
    # 3 kept of 12 (batch 4): 1 step an epoch; all 12 take 3 steps an epoch, so a third of an epoch
    assert site.equal_budget_epochs(3, 12, 4, 1) == pytest.approx(1 / 3)
    assert site.equal_budget_epochs(12, 12, 4, 2) == 2


def test_retraining_takes_the_trace_rounds_steps_by_default():
    from clues_fl.config import parse_config

    cfg = parse_config({"train.batch-size": 4})
    assert cfg["retrain.rounds"] == cfg["trace.rounds"] and cfg["retrain.budget"] == "trace-steps"
    # 12 samples (3 steps an epoch), 3 kept (1 step an epoch): 3 epochs over the kept = 3 steps, as a trace round
    assert site.retrain_epochs("aggregate", 3, 12, cfg) == pytest.approx(3.0)
    assert site.retrain_epochs("aggregate", 12, 12, cfg) == pytest.approx(1.0)
    assert site.retrain_epochs("all-data", 3, 12, cfg) == 1.0  # all data: a trace round again
    old = parse_config({"train.batch-size": 4, "retrain.budget": "epochs"})
    assert site.retrain_epochs("aggregate", 3, 12, old) == 1.0  # fewer steps the more a site drops
    assert site.retrain_epochs("all-data", 3, 12, old) == pytest.approx(1 / 3)  # the kept samples' steps


def test_reported_exact_histogram_and_noised():
    values = np.array([-1.0, 0.5, 0.5, 2.0, 3.0])
    assert site.reported(values) == ([-1.0, 0.5, 0.5, 2.0, 3.0], None)
    scores, counts = site.reported(values, report="histogram", edges=[0.0, 1.0])
    assert scores is None and counts == [1, 2, 2]
    noised, _ = site.reported(values, epsilon=0.5, clip_lo=0.0, clip_hi=1.0, rng=np.random.default_rng(0))
    assert len(noised) == 5 and noised != list(values)


def test_select_applies_the_keep_rule_after_standardising():
    scores = np.array([1.0, 3.0, 5.0, 7.0])
    plain = site.select(scores, {"threshold": 4.0}, polluted=[True, False, False, True])
    assert plain.rows == [2, 3] and plain.mean_kept_score == 6.0
    assert plain.counts == {"tp": 1, "fp": 1, "fn": 1, "tn": 1}
    z = site.select(scores, {"threshold": 0.0}, anchor_mean=4.0, anchor_std=2.0)
    assert z.rows == [2, 3] and z.counts == {} and np.allclose(z.scores, [-1.5, -0.5, 0.5, 1.5])
    ratio = site.select(scores, {"ratio": 0.25})
    assert ratio.rows == [3] and np.array_equal(ratio.kept, keep(scores, {"ratio": 0.25}))


def test_scores_sent_back_must_be_the_sites_own():
    site.check_sent_scores(["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="in another order"):
        site.check_sent_scores(["b", "a"], ["a", "b"])
    with pytest.raises(ValueError, match="1 of them among this site's 2"):
        site.check_sent_scores(["a", "c"], ["a", "b"])


def test_site_report_lists_the_dropped_samples(tmp_path):
    samples = [Sample(f"s{i}", f"q{i}", f"a{i}") for i in range(3)]
    kept = np.array([True, False, False])
    cfg = {"selection.method": "clues"}
    site.write_site_report(cfg, tmp_path, samples, [2.0, 0.5, -1.0], kept, 1.0)
    rows = [json.loads(line) for line in (tmp_path / "dropped.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["s1", "s2"] and rows[0]["reason"] == "clues score below the threshold"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["kept"], summary["dropped"], summary["threshold"]) == (1, 2, 1.0)
    assert summary["dropped-by-reason"] == summary["dropped-by-main-reason"] == {"clues score below the threshold": 2}
