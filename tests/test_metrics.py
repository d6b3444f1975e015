"""Selection metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clues_fl.selection.metrics import (
    add_counts,
    confusion_counts,
    per_type_auc,
    roc_auc,
    selection_metrics,
)

KEPT = [True, True, False, False, True, False]
POLLUTED = [False, True, False, True, False, False]
# clean & kept: 0, 4 -> tp 2; polluted & kept: 1 -> fp 1;
# clean & dropped: 2, 5 -> fn 2; polluted & dropped: 3 -> tn 1


def test_confusion_counts():
    assert confusion_counts(np.array(KEPT), np.array(POLLUTED)) == {"tp": 2, "fp": 1, "fn": 2, "tn": 1}
    assert confusion_counts([1, 0], [0, 0]) == {"tp": 1, "fp": 0, "fn": 1, "tn": 0}
    counts = confusion_counts(KEPT, POLLUTED)
    assert all(type(v) is int for v in counts.values())  # JSON / Flower friendly
    with pytest.raises(ValueError, match="entries"):
        confusion_counts([True], [True, False])
    with pytest.raises(ValueError, match="boolean"):
        confusion_counts([0.3], [True])


def test_selection_metrics():
    m = selection_metrics({"tp": 2, "fp": 1, "fn": 2, "tn": 1})
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))  # = 2PR/(P+R) = 4/7
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["n"] == 6 and m["kept"] == 3


def test_selection_metrics_empty_denominators_are_zero():
    nothing_kept = selection_metrics({"tp": 0, "fp": 0, "fn": 3, "tn": 2})
    assert nothing_kept["precision"] == 0.0 and nothing_kept["recall"] == 0.0
    assert nothing_kept["f1"] == 0.0 and nothing_kept["accuracy"] == pytest.approx(2 / 5)
    assert nothing_kept["kept"] == 0
    no_clean = selection_metrics({"tp": 0, "fp": 2, "fn": 0, "tn": 1})
    assert no_clean["recall"] == 0.0 and no_clean["precision"] == 0.0
    empty = selection_metrics(add_counts([]))
    assert empty == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 0.0, "n": 0, "kept": 0}
    perfect = selection_metrics({"tp": 4, "fp": 0, "fn": 0, "tn": 3})
    assert perfect["f1"] == 1.0 and perfect["accuracy"] == 1.0


def test_add_counts_pools_clients():
    a = {"tp": 2, "fp": 1, "fn": 2, "tn": 1}
    b = {"tp": 5, "fp": 0, "fn": 1, "tn": 7}
    assert add_counts([a, b]) == {"tp": 7, "fp": 1, "fn": 3, "tn": 8}
    assert add_counts([]) == {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    # pooled F1 is not the mean of per-client F1s
    assert selection_metrics(add_counts([a, b]))["f1"] == pytest.approx(14 / (14 + 1 + 3))


def test_roc_auc_hand_computed():
    # pairs (clean, polluted): (.9,.8) (.9,.1) (.3,.1) ordered right, (.3,.8) wrong -> 3/4
    assert roc_auc([0.9, 0.8, 0.3, 0.1], [True, False, True, False]) == pytest.approx(0.75)
    # a tie counts one half: pairs (.5,.5) tie, (.5,.2) right -> (0.5 + 1) / 2
    assert roc_auc([0.5, 0.5, 0.2], [True, False, False]) == pytest.approx(0.75)
    assert roc_auc([1.0, 2.0], [True, False]) == 0.0
    assert math.isnan(roc_auc([1.0, 2.0], [True, True]))
    assert math.isnan(roc_auc([1.0, 2.0], [False, False]))


def test_roc_auc_nan_scores_rank_lowest():
    # the NaN (polluted) sample ranks below the clean one; the inf (clean) above everything
    assert roc_auc([np.nan, 0.0, np.inf], [False, True, True]) == 1.0
    assert roc_auc([np.nan, 0.0], [True, False]) == 0.0


def test_per_type_auc():
    scores = [0.9, 0.5, 0.1, 0.7, 0.95]
    types = ["", "", "noise", "noise", "flip"]
    # noise: clean {.9,.5} vs {.1,.7}: 3 of 4 pairs right; flip: .95 beats both clean
    out = per_type_auc(scores, types)
    assert out == {"flip": pytest.approx(0.0), "noise": pytest.approx(0.75)}
    no_clean = per_type_auc([0.1, 0.2], ["noise", "flip"])
    assert set(no_clean) == {"noise", "flip"} and all(math.isnan(v) for v in no_clean.values())
    assert per_type_auc([0.1, 0.2], ["", ""]) == {}
    with pytest.raises(ValueError, match="entries"):
        per_type_auc([0.1], ["", "noise"])
