"""Quad, privacy modes and cluster coverage through the real ClientApp and strategy
(in-memory grid, tiny random Llama): what the messages carry and what the run reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from test_flower_inprocess import drive, run_config

from clues_fl.config import ConfigError, parse_config
from clues_fl.federation.messages import SITE_COST, ScoreReply, ScoreRequest


def _replies(grid, message_type):
    return [e for e in grid.log if e.message_type == message_type]


def test_quad_scores_a_fraction_and_respects_the_budget(tiny_model_dir, tmp_path):
    raw = run_config(tiny_model_dir, tmp_path, **{
        "selection.method": "quad", "lora.target-modules": "q_proj,k_proj,v_proj,o_proj",
        "data.samples-per-client": 16, "quad.clusters": 4, "quad.sampling-ratio": 0.1,
        "quad.budget": 0.5, "quad.max-scored": 0.3, "eval.coverage": True,
    })
    cfg, grid, run, metrics = drive(raw)
    score_msgs = _replies(grid, "query.score")
    sent = ScoreRequest.from_record(score_msgs[0].sent.content)
    # the server sent H^-1 G_anchor per checkpoint (adapter-shaped) and tau, budget
    assert {"tau", "budget"} <= set(sent.scorer)
    assert len(sent.anchor_gradients) == 2 and len(sent.checkpoints) == 2
    assert sum(isinstance(r, ArrayRecord) for r in score_msgs[0].sent.content.values()) == 4  # 2 checkpoints, 2 grads
    assert any("k_proj" in name for name in sent.anchor_gradients[0])  # attention projections included
    for ex in score_msgs:
        m = ScoreReply.from_record(ex.reply.content)
        assert m.scored < m.num_examples  # only a fraction was scored
        assert m.scored <= int(np.ceil(0.3 * 16)) + 2  # the cap, plus at most one draw
        assert 1 <= m.extras["clusters"] <= 4
        values = np.asarray(m.scores)
        assert set(np.unique(values)) <= {0.0, 1.0}  # selection flags, no influence values
    sel = metrics["selection"]
    for site in sel["per-client"].values():
        assert site["kept"] <= 8  # budget 0.5 of 16
        assert 0 < site["clusters-covered"] <= site["clusters-total"]
    assert 0 < sel["scored-fraction"] < 1 and 0 < sel["cluster-coverage"] <= 1
    assert metrics["threshold"]["rule"] == "fixed"


def test_histogram_mode_reports_only_counts(tiny_model_dir, tmp_path):
    raw = run_config(tiny_model_dir, tmp_path, **{"privacy.report": "histogram", "privacy.bins": 16})
    cfg, grid, run, metrics = drive(raw)
    for ex in _replies(grid, "query.score"):
        reply = ScoreReply.from_record(ex.reply.content)
        assert set(ex.reply.content.keys()) == {"histogram", "metrics", SITE_COST}  # no scores, no ids
        assert set(ex.reply.content[SITE_COST].keys()) <= {"wall-seconds", "cpu-seconds", "peak-rss-mib",
                                                           "cache-bytes"}  # the cost: seconds and sizes
        assert reply.scores is None and reply.ids == [] and reply.histogram is not None
        counts = np.asarray(reply.histogram)
        assert counts.shape == (16,) and counts.sum() == 8
        assert len(ScoreRequest.from_record(ex.sent.content).privacy.edges) == 15
    assert metrics["threshold"]["reported"] == "histogram"
    sel = metrics["selection"]
    assert set(sel["per-client"]) == {"client-0", "client-1"}
    assert all(m["kept"] >= 0 for m in sel["per-client"].values())


def test_dp_noise_on_reported_scores_only(tiny_model_dir, tmp_path):
    raw = run_config(tiny_model_dir, tmp_path, **{"privacy.epsilon": 0.5, "privacy.delta": 1e-5})
    cfg, grid, run, metrics = drive(raw)
    from clues_fl import client_app

    for ex in _replies(grid, "query.score"):
        settings = ScoreRequest.from_record(ex.sent.content).privacy
        lo, hi = settings.clip_lo, settings.clip_hi
        assert settings.epsilon == 0.5 and settings.report == "scores"
        reported = np.asarray(ScoreReply.from_record(ex.reply.content).scores)
        exact = client_app.kept_array(grid._contexts[ex.node].state, client_app.SCORES_KEY, "scores", np.float64)
        # sigma at epsilon 0.5 is several times the clip range: the noise dwarfs the signal
        assert np.abs(reported - np.clip(exact, lo, hi)).max() > (hi - lo)
    assert metrics["threshold"]["epsilon"] == 0.5


@pytest.mark.parametrize("raw,message", [
    ({"privacy.report": "histogram", "mode": "merging"}, "need mode='federated'"),
    ({"privacy.epsilon": 1.0, "privacy.delta": 0.0}, "privacy.delta"),
    ({"quad.sampling-ratio": 0.0}, "quad.sampling-ratio"),
    ({"quad.tau": "mixture"}, "quad.tau"),
])
def test_bad_privacy_and_quad_settings_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_config(raw)


def test_histogram_mode_needs_an_anchor_threshold_method(tiny_model_dir, tmp_path):
    raw = run_config(tiny_model_dir, tmp_path, **{"privacy.report": "histogram", "selection.method": "less"})
    with pytest.raises(ValueError, match="anchor-threshold method"):
        drive(raw)


def test_flower_dp_wrapper_on_adapter_updates(tiny_model_dir, tmp_path):
    plain = drive(run_config(tiny_model_dir, tmp_path / "plain"))[2]
    # the noise (Flower's DP wrapper draws it unseeded) moves the scores from run to run: a
    # threshold below every score keeps all samples, so the surviving site always retrains
    raw = run_config(tiny_model_dir, tmp_path / "dp", **{"privacy.adapter-noise": 1.0, "privacy.adapter-clip": 0.05,
                                                        "fed.min-nodes": 1, "selection.threshold": "static",
                                                        "selection.static": -1e6})
    cfg, grid, run, metrics = drive(raw, fail={(202, "train"): RuntimeError("site lost")})
    # the site that failed is named; the DP rounds went on with the other one
    assert [m["phase"] for m in metrics["missing-sites"]] == ["trace round 1", "trace round 2", "aggregate round 1",
                                                                "all-data round 1"]
    noisy, clean = run.state.checkpoints[-1].state, plain.state.checkpoints[-1].state
    assert all(torch.isfinite(noisy[k]).all() for k in noisy)
    # noise std = noise multiplier * clip / sites = 0.05 per element: far from the noiseless adapter
    diff = torch.cat([(noisy[k] - clean[k]).flatten() for k in noisy])
    assert 0.02 < float(diff.std()) < 0.2
    assert "selected" in metrics["validation-loss"]
