"""Selection quality: confusion counts, precision/recall/F1 and score AUCs.

Positive class = clean sample; a prediction of "positive" = the sample was kept.
Counts are plain ints so they can be summed over clients (``add_counts``) and sent
through Flower metrics dicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

COUNT_KEYS = ("tp", "fp", "fn", "tn")


def _bool_array(values, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype != bool:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{what} must be boolean (or 0/1)")
        arr = arr.astype(bool)
    return arr.ravel()


def confusion_counts(kept, polluted) -> dict[str, int]:
    """tp = clean & kept, fp = polluted & kept, fn = clean & dropped, tn = polluted & dropped."""
    kept = _bool_array(kept, "kept")
    polluted = _bool_array(polluted, "polluted")
    if kept.shape != polluted.shape:
        raise ValueError(f"kept has {kept.size} entries but polluted has {polluted.size}")
    clean = ~polluted
    return {
        "tp": int(np.sum(clean & kept)),
        "fp": int(np.sum(polluted & kept)),
        "fn": int(np.sum(clean & ~kept)),
        "tn": int(np.sum(polluted & ~kept)),
    }


def add_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Pool confusion counts (e.g. over clients); an empty list gives all zeros."""
    total = dict.fromkeys(COUNT_KEYS, 0)
    for c in counts:
        for key in COUNT_KEYS:
            total[key] += int(c[key])
    return total


def _ratio(num: float, den: float) -> float:
    return float(num) / den if den > 0 else 0.0


def selection_metrics(counts: dict[str, int]) -> dict[str, float | int]:
    """precision, recall, f1, accuracy, n (samples) and kept (samples kept).

    A ratio whose denominator is 0 is reported as 0.0 rather than NaN so that the
    values stay plottable and averageable: precision when nothing was kept, recall
    when there is no clean sample, F1 when precision + recall == 0, accuracy when
    n == 0. (``kept`` and ``n`` tell these cases apart.)
    """
    tp, fp, fn, tn = (int(counts[k]) for k in COUNT_KEYS)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    n = tp + fp + fn + tn
    return {
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, n),
        "n": n,
        "kept": tp + fp,
    }


def roc_auc(scores, clean) -> float:
    """ROC AUC of the scores for separating clean (positive) from polluted samples.

    NaN when only one class is present. NaN scores (unscorable samples) rank below
    every other score, as :func:`clues_fl.selection.rules.keep_mask` never keeps them.
    """
    s = np.asarray(scores, dtype=float).ravel()
    y = _bool_array(clean, "clean")
    if s.shape != y.shape:
        raise ValueError(f"scores has {s.size} entries but clean has {y.size}")
    if y.all() or not y.any():
        return float("nan")
    # AUC depends on the ordering only; ranks make +-inf and NaN acceptable to sklearn.
    ranks = rankdata(np.where(np.isnan(s), -np.inf, s))
    return float(roc_auc_score(y, ranks))


def per_type_auc(scores, pollution_types: Sequence[str]) -> dict[str, float]:
    """AUC of clean samples (type "") against the samples of each pollution type alone."""
    s = np.asarray(scores, dtype=float).ravel()
    types = np.asarray(list(pollution_types), dtype=object)
    if s.shape != types.shape:
        raise ValueError(f"scores has {s.size} entries but pollution_types has {types.size}")
    clean = types == ""
    out: dict[str, float] = {}
    for kind in sorted({t for t in types.tolist() if t != ""}):
        subset = clean | (types == kind)
        out[kind] = roc_auc(s[subset], clean[subset])
    return out
