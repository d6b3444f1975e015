"""A scoring model apart from the trained one, against the trained model scoring for
itself: two finished runs of one scenario that differ only in `scoring.model`, compared
on what the selection agreed on, how well each selected (where the data carries quality
labels), the published model's clean validation loss and what the selection cost.

    # the trained model scores for itself, then a smaller one scores for it
    python -m clues_fl.launch SCENARIO --run-config "run-name='self' model.name='BIG' lora.layers='10-17'"
    python -m clues_fl.launch SCENARIO --run-config "run-name='small' model.name='BIG' lora.layers='10-17' \\
        scoring.model='smollm2-135m' scoring.model-layers='22-29'"
    python benchmarks/scoring_model.py outputs/self outputs/small

Per run: the scoring model, ROC-AUC of the scores for clean against bad samples, F1 of
the selection and the samples kept, the clean validation loss of the base model, of the
published model and of the all-data model at the same budget, and the sites' seconds of
the selection (trace + score) and of retraining (aggregate), with the wall time of the
run. Then the rank agreement of the two runs' scores (Spearman, per site and over all
samples) and the overlap of what they kept.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def site_scores(run: Path) -> dict[str, tuple[float, bool, str]]:
    """sample id -> (score, kept, site) over the run's sites, from its manifests and the
    sites' own id maps (a simulation keeps both under the run's folder)."""
    from clues_fl.federation.site_ids import read_id_map

    out = {}
    for manifest in sorted((run / "manifest").glob("*.csv")):
        ids = read_id_map(run / "sites" / manifest.stem)
        with open(manifest, newline="") as fh:
            for row in csv.DictReader(fh):
                out[ids[row["id-hash"]]] = (float(row["score"]), row["kept"] == "1", manifest.stem)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def labels(run: Path) -> dict[str, bool] | None:
    """sample id -> polluted, where the run's data was polluted on purpose (its scenario
    is rebuilt from its run-config); None for a user's own data."""
    from clues_fl.config import parse_config
    from clues_fl.data.scenario import build_scenario

    cfg = parse_config(json.loads((run / "metrics.json").read_text())["config"])
    if not str(cfg.pollution.ratios).strip() or cfg.data.pool:
        return None
    data = build_scenario(cfg, len(cfg.pollution.list("ratios")))
    return {s.id: s.polluted for site in data.clients for s in site}


def summary(run: Path, scores: dict, polluted: dict | None) -> dict:
    from clues_fl.selection.metrics import roc_auc

    metrics = json.loads((run / "metrics.json").read_text())
    cfg, cost = metrics["config"], metrics["cost"]
    phases = cost["phases"]
    seconds = {p: sum(phases.get(p, {}).get("site-seconds", {}).values()) for p in ("trace", "score", "aggregate")}
    ids = sorted(scores)
    row = {"run": run.name, "scoring model": cfg.get("scoring.model") or cfg.get("model.name"),
           "kept": sum(k for _, k, _ in scores.values()), "samples": len(scores),
           "validation loss": metrics.get("validation-loss", {}),
           "selection site-s": seconds["trace"] + seconds["score"], "retraining site-s": seconds["aggregate"],
           "ratio": cost["selection"].get("ratio"), "wall s": metrics.get("timings-seconds", {}).get("total", float("nan")),
           "trace+score wall s": sum(metrics.get("timings-seconds", {}).get(p, 0.0) for p in ("trace", "score"))}
    if polluted is not None:
        clean = np.array([not polluted[i] for i in ids])
        kept = np.array([scores[i][1] for i in ids])
        tp, fp, fn = (kept & clean).sum(), (kept & ~clean).sum(), (~kept & clean).sum()
        row["auc"] = roc_auc(np.array([scores[i][0] for i in ids]), clean)
        row["f1"] = 2 * tp / max(2 * tp + fp + fn, 1)
    return row


def compare(self_run: Path, scored_run: Path) -> None:
    """Print the comparison of the two finished runs (the module's docstring)."""
    a, b = site_scores(self_run), site_scores(scored_run)
    if set(a) != set(b):
        raise SystemExit("the two runs did not score the same samples: not one scenario")
    polluted = labels(self_run)
    rows = [summary(self_run, a, polluted), summary(scored_run, b, polluted)]
    print("| run | scoring model | ROC-AUC | F1 | kept | val loss base / selected / all-data | "
          "selection site-s | retraining site-s | selection / retraining | trace + score wall s | run wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        loss = r["validation loss"]
        losses = " / ".join(f"{loss[k]:.4f}" if k in loss else "-" for k in ("base", "selected", "all-data"))
        print(f"| {r['run']} | `{Path(str(r['scoring model'])).name}` | {r.get('auc', float('nan')):.3f} | "
              f"{r.get('f1', float('nan')):.3f} | {r['kept']}/{r['samples']} | {losses} | "
              f"{r['selection site-s']:.0f} | {r['retraining site-s']:.0f} | {r['ratio']} | {r['trace+score wall s']:.0f} | "
              f"{r['wall s']:.0f} |")
    ids = sorted(a)
    sa, sb = np.array([a[i][0] for i in ids]), np.array([b[i][0] for i in ids])
    ka, kb = np.array([a[i][1] for i in ids]), np.array([b[i][1] for i in ids])
    site_of = np.array([a[i][2] for i in ids])
    sites = {s: spearman(sa[site_of == s], sb[site_of == s]) for s in sorted(set(site_of))}
    print()
    print(f"Spearman of the scores: {spearman(sa, sb):.3f} over {len(ids)} samples; per site "
          + ", ".join(f"{s} {v:.3f}" for s, v in sites.items()))
    print(f"kept by both {int((ka & kb).sum())}, only by {rows[0]['run']} {int((ka & ~kb).sum())}, "
          f"only by {rows[1]['run']} {int((~ka & kb).sum())}, by neither {int((~ka & ~kb).sum())}")
    saved = rows[0]["selection site-s"] - rows[1]["selection site-s"]
    print(f"selection site-seconds saved: {saved:.0f} ({saved / max(rows[0]['selection site-s'], 1e-9):.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("self_run", type=Path, help="the run whose trained model scored for itself")
    parser.add_argument("scored_run", type=Path, help="the same scenario with a scoring.model")
    args = parser.parse_args()
    compare(args.self_run, args.scored_run)


if __name__ == "__main__":
    main()
