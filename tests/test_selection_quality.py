"""CLUES on the real SmolLM2 and real FiQA data with known cross-domain pollution:
the scores must separate clean from polluted samples far better than chance, and the
selection at the global threshold must beat a random selection of the same size."""

from __future__ import annotations

import numpy as np
import pytest

from clues_fl.config import parse_config
from clues_fl.selection.metrics import confusion_counts, roc_auc, selection_metrics
from clues_fl.data.scenario import build_scenario
from clues_fl.selection.rules import global_threshold, keep_mask
from clues_fl.model.runtime import workbench

pytestmark = pytest.mark.slow


def test_clues_scores_beat_random_on_polluted_fiqa():
    cfg = parse_config({
        "lora.r": 8, "lora.alpha": 16, "lora.layers": "26-29",
        "data.anchor-size": 8, "data.val-size": 0, "data.test-size": 0,
        "data.samples-per-client": 32, "data.max-length": 64,
        "pollution.ratios": "0.5", "pollution.types": "cross-domain",
        "train.lr": 5e-4, "trace.rounds": 2,
    })
    data = build_scenario(cfg, 1)
    samples = data.clients[0]
    polluted = np.array([s.polluted for s in samples])
    assert polluted.sum() == 16

    bench = workbench(cfg)
    encoded, anchors = bench.encode(samples, cfg), bench.encode(data.anchor, cfg)
    cache, anchor_cache = bench.cache(encoded, cfg), bench.cache(anchors, cfg)
    trace = bench.train(encoded, cfg, epochs=2, num_checkpoints=2, cache=cache)
    assert len(trace.checkpoints) == 2
    anchor = bench.anchor_scores(anchors, trace.checkpoints, cfg, cache=anchor_cache)
    result = bench.score(encoded, trace.checkpoints, anchor.gradients, cfg, cache=cache)

    auc = roc_auc(result.scores, ~polluted)
    assert auc > 0.8, auc

    threshold = global_threshold("anchor-quantile", anchor.scores, result.scores, quantile=0.1)
    kept = keep_mask(result.scores, threshold=threshold)
    f1 = selection_metrics(confusion_counts(kept, polluted))["f1"]
    rng = np.random.default_rng(0)
    random_f1 = np.mean([
        selection_metrics(confusion_counts(rng.permutation(kept), polluted))["f1"] for _ in range(200)
    ])
    assert f1 > random_f1 + 0.15, (f1, random_f1)
