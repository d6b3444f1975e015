"""Re-read a finished experiment run and print, against its pollution flags, the
ROC-AUC per pollution type and source, and the selection every threshold rule would
have made from the same scores (the scores and anchor scores come from the run's
outputs; the flags are rebuilt from its run-config and seed).

    python benchmarks/threshold_rules.py outputs/<run-name>
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from clues_fl.config import parse_config
from clues_fl.metrics import confusion_counts, per_type_auc, roc_auc, selection_metrics
from clues_fl.scenario import build_scenario
from clues_fl.selection import global_threshold, mixture_threshold


def read_run(out: Path):
    """(metrics, anchor scores, scores, polluted flags, kinds, site index) of a finished
    experiment run, pooled over sites in site order."""
    metrics = json.loads((out / "metrics.json").read_text())
    anchors = np.asarray(json.loads((out / "thresholds.json").read_text())["anchor-scores"])
    cfg = parse_config(metrics["config"])
    data = build_scenario(cfg, len(cfg.list("pollution.ratios")))
    scores, polluted, kinds, sites = [], [], [], []
    for i, samples in enumerate(data.clients):
        with open(out / "manifest" / f"client-{i}.csv") as fh:
            by_id = {row["id"]: float(row["score"]) for row in csv.DictReader(fh)}
        for s in samples:
            scores.append(by_id[s.id])
            polluted.append(s.polluted)
            kinds.append(f"{s.pollution}:{s.domain}" if s.polluted else "")
            sites.append(i)
    return metrics, anchors, np.asarray(scores), np.asarray(polluted), kinds, np.asarray(sites)


def main(run_dir: str) -> None:
    out = Path(run_dir)
    metrics, anchors, scores, polluted, kinds, _ = read_run(out)
    if metrics["threshold"].get("standardised"):
        print("merging-mode runs standardise per site; this report reads federated runs only")
        return
    print(f"{out.name}: {len(scores)} samples, {polluted.mean():.0%} polluted")
    print(f"ROC-AUC clean vs polluted: {roc_auc(scores, ~polluted):.3f}")
    for kind, auc in sorted(per_type_auc(scores, kinds).items()):
        print(f"  vs {kind:<28} {auc:.3f}  (n={kinds.count(kind)})")
    print(f"{'rule':<24}{'threshold':>12}{'precision':>10}{'recall':>8}{'F1':>7}{'acc':>7}")
    rules = [("anchor-mean", {}), ("anchor-quantile q=0.05", {"quantile": 0.05}),
             ("anchor-quantile q=0.1", {"quantile": 0.1}), ("anchor-quantile q=0.2", {"quantile": 0.2}),
             ("mixture", {})]
    for name, kwargs in rules:
        t = global_threshold(name.split()[0], anchors, scores, **kwargs)
        m = selection_metrics(confusion_counts(scores >= t, polluted))
        print(f"{name:<24}{t:>12.4g}{m['precision']:>10.3f}{m['recall']:>8.3f}{m['f1']:>7.3f}{m['accuracy']:>7.3f}")
    _, alpha = mixture_threshold(anchors, scores)
    print(f"mixture: estimated clean share {alpha:.3f}, true {1 - polluted.mean():.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
