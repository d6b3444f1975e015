"""Re-read a finished experiment run and print, against its pollution flags, the
ROC-AUC per pollution type and source, and the selection every threshold rule would
have made from the same scores (the scores and anchor scores come from the run's
outputs; the flags are rebuilt from its run-config and seed), with two references that
need the flags: anchor-f1 told the true clean share, and the best threshold.

    python benchmarks/threshold_rules.py outputs/<run-name>
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clues_fl.selection.metrics import confusion_counts, per_type_auc, roc_auc, selection_metrics
from clues_fl.reporting.results import read_run
from clues_fl.selection.rules import (SHARE_QUANTILES, anchor_f1_threshold, clean_share, global_threshold,
                                     mixture_threshold)


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
             ("mixture", {}), ("anchor-f1", {})]
    def f1(t: float) -> float:
        return selection_metrics(confusion_counts(scores >= t, polluted))["f1"]

    cuts = tuple(metrics["threshold"].get("share-quantiles", SHARE_QUANTILES))  # where the run's rule read the share
    thresholds = [(name, global_threshold(name.split()[0], anchors, scores, share_quantiles=cuts, **kwargs))
                  for name, kwargs in rules]
    thresholds += [("anchor-f1, true share",  # what estimating the clean share costs
                    anchor_f1_threshold(anchors, scores, share=1 - polluted.mean())[0]),
                   ("best threshold", max(np.unique(scores), key=f1))]
    for name, t in thresholds:
        m = selection_metrics(confusion_counts(scores >= t, polluted))
        print(f"{name:<24}{t:>12.4g}{m['precision']:>10.3f}{m['recall']:>8.3f}{m['f1']:>7.3f}{m['accuracy']:>7.3f}")
    _, alpha = mixture_threshold(anchors, scores)
    print(f"mixture: estimated clean share {alpha:.3f}, true {1 - polluted.mean():.3f}")
    share = clean_share(anchors, scores, quantiles=cuts)
    print(f"clean_share (metrics.json): {share['estimate']:.3f}, 90% interval {share['low']:.3f}-{share['high']:.3f}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a finished run's output folder, e.g. outputs/<run-name>")
    main(parser.parse_args().run_dir)
