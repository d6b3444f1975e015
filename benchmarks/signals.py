"""Per-signal ROC-AUC by pollution type, and the calibrated score, on a quick in-process pool.

Builds a pool (sites x samples, every pollution type mixed), traces centrally (one
LoRA run over the union with `trace.rounds` checkpoints, which stands in for FedAvg
with one local epoch), computes every signal of clues_fl/scoring/signals.py for the sites and
the anchors, saves them (npz) and prints the AUC table.

    python benchmarks/signals.py --out outputs/signals-quick.npz            # measure + table
    python benchmarks/signals.py --out outputs/signals-quick.npz --table    # table from a saved file
    python benchmarks/signals.py --out outputs/signals-quick.npz --table --grid   # + the threshold-rule grid
    python benchmarks/signals.py --from-run outputs/fiqa-quality-heterogeneity --out outputs/sig-demo.npz
    python benchmarks/signals.py --out outputs/sig-a64.npz --anchors 64 --anchor-counts 16,32,48,64
                                            # a pool with 64 anchors, then the threshold with fewer

`--from-run` takes a finished (or scored) run's saved state instead: its run-config and
its FedAvg trace checkpoints, so the signals are those of the real federated run
(e.g. `make demo`'s), not of a central trace.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from clues_fl.scoring import signals as sg
from clues_fl.selection.metrics import per_type_auc, roc_auc

TYPES = "cross-domain,exchange,cut,delete,near-duplicate"


def measure(args) -> dict:
    from clues_fl.config import parse_config
    from clues_fl.data.scenario import build_scenario
    from clues_fl.runtime import workbench

    cfg = parse_config({
        "data.samples-per-client": args.per_site, "pollution.ratios": ",".join([str(args.ratio)] * args.sites),
        "pollution.types": args.types, "trace.rounds": args.rounds, "seed": args.seed,
        "data.max-length": args.max_length, "data.anchor-size": args.anchors,
    })
    data = build_scenario(cfg, args.sites)
    bench = workbench(cfg)
    t0 = time.time()
    enc_all = [e for samples in data.clients for e in bench.encode(samples, cfg)]
    trace = bench.train(enc_all, cfg, None, epochs=args.rounds, num_checkpoints=args.rounds,
                        cache=bench.cache(enc_all, cfg))
    print(f"trace {time.time() - t0:.0f}s", flush=True)
    return _signals(cfg, bench, data, trace.checkpoints)


def measure_run(run_dir: Path) -> dict:
    """Every signal of a saved run's sites and anchors at the run's own trace checkpoints
    (read from the folder itself, which may have been moved since the run)."""
    import json

    from clues_fl.config import parse_config
    from clues_fl.data.scenario import build_scenario
    from clues_fl.federation.state import arrays_checkpoint
    from clues_fl.runtime import workbench
    from safetensors.torch import load_file

    state = run_dir / "state"
    index = json.loads((state / "run.json").read_text())
    saved = index["clues"]
    if not saved or "checkpoint-lrs" not in saved["values"]:
        raise SystemExit(f"{state}: no trace checkpoints saved (has the run traced?)")
    cfg = parse_config(index["config"])
    arrays = {n: load_file(str(state / p)) for n, p in saved["arrays"].items() if n.startswith("checkpoint-")}
    checkpoints = [arrays_checkpoint(arrays, f"checkpoint-{k}", lr)
                   for k, lr in enumerate(saved["values"]["checkpoint-lrs"])]
    data = build_scenario(cfg, len(cfg.pollution.list("ratios")))
    return _signals(cfg, workbench(cfg), data, checkpoints)


def _signals(cfg, bench, data, checkpoints) -> dict:
    """Every signal (not only the default's) of the anchors, as the server computes them,
    and of each site's samples, as the site does."""
    from clues_fl.runtime import score_settings
    from clues_fl.scoring.scorers import CluesPlusScorer

    t0 = time.time()
    scorer = CluesPlusScorer(score_settings(cfg))
    anchors = bench.encode(data.anchor, cfg)
    a_cache = bench.cache(anchors, cfg)
    side = bench.anchor_scores(anchors, checkpoints, cfg, cache=a_cache, settings=scorer.settings)
    a_sig = scorer.anchor_signals(bench, anchors, checkpoints, cfg, side.scores, data.anchor, a_cache,
                                  names=tuple(sg.SIGNALS))
    out = {f"anchor/{k}": v for k, v in a_sig.items()}
    site_sig: dict[str, list] = {k: [] for k in sg.SIGNALS}
    for i, samples in enumerate(data.clients):
        enc = bench.encode(samples, cfg)
        cache = bench.cache(enc, cfg)
        res = bench.score(enc, checkpoints, side.gradients, cfg, cache=cache, settings=scorer.settings)
        sig = sg.compute_signals(bench, samples, enc, cfg, clues_scores=res.scores, losses=res.losses, cache=cache)
        for k, v in sig.items():
            site_sig[k].append(v)
        print(f"site {i + 1}/{len(data.clients)} signals {time.time() - t0:.0f}s", flush=True)
    out.update({f"site/{k}": np.concatenate(v) for k, v in site_sig.items()})
    samples = [s for site in data.clients for s in site]
    out["kinds"] = np.array([s.pollution for s in samples])
    out["site"] = np.concatenate([np.full(len(s), i) for i, s in enumerate(data.clients)])
    return out


def load(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def split(d: dict, names) -> tuple[dict, dict]:
    return ({n: d[f"anchor/{n}"] for n in names}, {n: d[f"site/{n}"] for n in names})


def site_scores(anchors: dict, sites: dict, site_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(combined scores, per-signal z) of every pooled sample, each site refining the
    anchors' clean model with its own samples (signals.calibrated_scores), as the sites do."""
    cal = sg.calibrate(anchors)
    score, z = np.zeros(len(site_of)), np.zeros((len(cal.names), len(site_of)))
    for site in np.unique(site_of):
        at = np.flatnonzero(site_of == site)
        score[at], z[:, at], _ = sg.calibrated_scores({k: v[at] for k, v in sites.items()}, cal)
    return score, z


def combined(d: dict, names) -> tuple[np.ndarray, np.ndarray]:
    """(site scores, the threshold rules' clean reference) of the calibrated score on `names`."""
    anchors, sites = split(d, names)
    return site_scores(anchors, sites, d["site"])[0], sg.clean_reference(len(next(iter(anchors.values()))))


def table(d: dict) -> None:
    kinds = [str(k) for k in d["kinds"]]
    types = sorted({k for k in kinds if k})
    clean = np.array([k == "" for k in kinds])
    print(f"{len(kinds)} samples, {clean.mean():.0%} clean; n per type: "
          + ", ".join(f"{t} {kinds.count(t)}" for t in types))
    head = f"{'signal':<44}{'all':>7}" + "".join(f"{t[:12]:>14}" for t in types)
    print(head)

    def row(name, score):
        per = per_type_auc(score, kinds)
        print(f"{name:<44}{roc_auc(score, clean):>7.3f}" + "".join(f"{per[t]:>14.3f}" for t in types))

    for n in sg.SIGNALS:
        s = d[f"site/{n}"]
        row(f"{n} (raw, oriented)", sg.SIGNALS[n][0] * np.nan_to_num(s, nan=np.nanmedian(s)))
    default = sg.DEFAULT_SIGNALS  # then the default without each of its signals, and with each other one
    combos = [("calibrated: clues", ("clues",)), ("clues+ (default signals)", default),
              *[(f"clues+ without {n}", tuple(m for m in default if m != n)) for n in default[1:]],
              *[(f"clues+ with {n}", default + (n,)) for n in sg.SIGNALS if n not in default]]
    for label, names in combos:
        row(label, combined(d, names)[0])


EXPECTED_REASON = {"cross-domain": "off-domain", "exchange": "answer unrelated to question", "cut": "truncated",
                   "delete": "garbled", "near-duplicate": "duplicate"}


def reason_table(d: dict) -> None:
    """How often the site report's reason (clues_fl.scoring.signals.reasons)
    names a dropped bad sample's pollution kind, with the default signals and the
    anchor-f1 threshold."""
    from clues_fl.selection.rules import CALIBRATED_SHARE_QUANTILES, global_threshold

    names = sg.DEFAULT_SIGNALS
    anchors, sites = split(d, names)
    score, z = site_scores(anchors, sites, d["site"])
    threshold = global_threshold("anchor-f1", sg.clean_reference(len(next(iter(anchors.values())))), score,
                                 share_quantiles=CALIBRATED_SHARE_QUANTILES)
    named = np.array([sg.reason_text(r) for r in sg.reasons(z, names, sg.shortfall_threshold(threshold, len(names)))],
                     dtype=object)
    kinds = np.array([str(k) for k in d["kinds"]])
    dropped = score < threshold
    print("\nreasons of the dropped samples (anchor-f1 threshold), share naming the pollution kind:")
    for kind, expected in EXPECTED_REASON.items():
        at = dropped & (kinds == kind)
        if at.any():
            counts = dict(zip(*np.unique(named[at].astype(str), return_counts=True)))
            print(f"  {kind:<15} {np.mean([expected in r.split('; ') for r in named[at]]):.2f} of {at.sum()}: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    at = dropped & (kinds == "")
    if at.any():
        counts = dict(zip(*np.unique(named[at].astype(str), return_counts=True)))
        print(f"  {'clean (dropped)':<15} {at.sum()}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def grid(d: dict, method: str, **kw) -> list[dict]:
    """The threshold-rule grid (clues_fl.experiments.suite.threshold_grid) on this pool's scores."""
    from clues_fl.experiments.suite import threshold_grid

    if method == "clues+":
        scores, anchors = combined(d, sg.DEFAULT_SIGNALS)
    else:
        scores, anchors = d["site/clues"], d["anchor/clues"]
    return threshold_grid(scores, anchors, [str(k) for k in d["kinds"]], **kw)


def print_grid(rows: list[dict], method: str) -> None:
    from clues_fl.experiments.suite import grid_table

    print(f"\n{method}: mean F1 over resampled pools")
    print(grid_table(rows))


def combined_grid(d: dict, draws: int = 20) -> str:
    """One markdown table of both methods' grids: the default candidates side by side, keep-all
    and the best threshold (an oracle) beside them, and clues+'s clean-share estimate."""
    from clues_fl.experiments.suite import _table

    rows = {m: grid(d, m, draws=draws, intervals=draws) for m in ("clues", "clues+")}
    cols = [("clues", "mixture"), ("clues", "anchor-f1"), ("clues", "best threshold"), ("clues+", "anchor-f1"),
            ("clues+", "mixture"), ("clues+", "anchor-quantile q=0.1"), ("clues+", "anchor-mean"),
            ("clues+", "best threshold"), ("clues+", "keep-all")]
    body = []
    for i, r in enumerate(rows["clues+"]):
        share = r["bad"] if isinstance(r["bad"], str) else f"{r['bad']:.0%}"
        cov = f"{round(r['covered'] * r['intervals'])}/{r['intervals']}"
        body.append([r["type"], share, *[rows[m][i][c] for m, c in cols],
                     f"{r['true']:.2f} / {r['estimated']:.2f} ({cov})"])
    body.append(["worst cell", "", *[min(x[c] for x in rows[m]) for m, c in cols], ""])
    covered = {m: sum(round(x["covered"] * x["intervals"]) for x in rows[m]) for m in rows}
    total = sum(x["intervals"] for x in rows["clues+"])
    body.append(["mean", "", *[float(np.mean([x[c] for x in rows[m]])) for m, c in cols],
                 f"covered {covered['clues+']}/{total} (CLUES: {covered['clues']}/{total})"])
    return _table(["pollution", "bad share", *[f"{m}, {c}" for m, c in cols],
                   "clues+ clean share: true / estimated (90% interval covers)"], body)


def anchor_count_table(d: dict, counts, subsets: int = 20, draws: int = 5) -> str:
    """How the default's threshold depends on the number of anchors: for each count, `subsets`
    random subsets of this pool's anchors calibrate the default signals (the signals themselves,
    CLUES's gradient alignment included, stay those computed with all the pool's anchors), and
    the anchor-f1 rule runs on the pool and on the threshold grid (`draws` pools per cell).
    Printed beside it: the clean-share estimate's error, anchor-f1 told the true share, and the
    best threshold."""
    from clues_fl.experiments.suite import _best_f1, _f1, _table, threshold_grid
    from clues_fl.selection.rules import anchor_f1_threshold

    kinds = np.array([str(k) for k in d["kinds"]])
    clean = kinds == ""
    anchors, sites = split(d, sg.DEFAULT_SIGNALS)
    total = len(next(iter(anchors.values())))
    wrong = [n for n in counts if not 2 <= n <= total]
    if wrong:
        raise SystemExit(f"--anchor-counts: {wrong} not between 2 and the pool's {total} anchors")
    rng = np.random.default_rng(0)
    body = []
    for n in counts:
        rows = []
        for r in range(subsets if n < total else 1):
            pick = rng.choice(total, n, replace=False)
            sub = {k: v[pick] for k, v in anchors.items()}
            score, _ = site_scores(sub, sites, d["site"])
            reference = sg.clean_reference(n)
            threshold, share = anchor_f1_threshold(reference, score)
            known, _ = anchor_f1_threshold(reference, score, share=clean.mean())
            cells = threshold_grid(score, reference, kinds, draws=draws, intervals=0, seed=r, rules=(("anchor-f1", {}),))
            grid_f1 = np.array([c["anchor-f1"] for c in cells])
            rows.append([share - clean.mean(), _f1(score >= threshold, clean), _f1(score >= known, clean),
                         _best_f1(score, clean), grid_f1.mean(), grid_f1.min(),
                         float(np.sum(grid_f1 >= 0.85)), np.mean([c["anchor-f1, true share"] for c in cells]),
                         np.mean([c["best threshold"] for c in cells])])
        m = np.array(rows)
        body.append([n, len(rows), f"{m[:, 0].mean():+.3f} / {np.sqrt(np.mean(m[:, 0] ** 2)):.3f}",
                     *m[:, 1:4].mean(axis=0), f"{m[:, 4].mean():.3f} / {m[:, 5].mean():.3f}",
                     f"{m[:, 6].mean():.1f} of {len(cells)}", *m[:, 7:].mean(axis=0)])
    return _table(["anchors", "subsets", "clean share error: mean / rms", "pool F1, anchor-f1",
                   "pool F1, true share", "pool F1, best threshold", "grid anchor-f1: mean / worst",
                   "grid cells >= 0.85", "grid, true share", "grid, best threshold"], body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="outputs/signals-quick.npz")
    ap.add_argument("--from-run", type=Path, help="a saved run's output folder: its config and trace checkpoints")
    ap.add_argument("--table", action="store_true", help="only print the table of a saved file")
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--per-site", type=int, default=40)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--anchors", type=int, default=16, help="anchor-set size (data.anchor-size)")
    ap.add_argument("--grid", action="store_true", help="also the threshold-rule grid (resampled pools)")
    ap.add_argument("--draws", type=int, default=20, help="pools drawn per grid cell")
    ap.add_argument("--anchor-counts", help="comma-separated anchor counts: the threshold with that many of the "
                    "pool's anchors (random subsets; see anchor_count_table)")
    ap.add_argument("--subsets", type=int, default=20, help="anchor subsets per count (--anchor-counts)")
    args = ap.parse_args()
    if not args.table:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.out, **(measure_run(args.from_run) if args.from_run else measure(args)))
    table(load(args.out))
    reason_table(load(args.out))
    if args.grid:
        print(f"\nThreshold rules, mean F1 over {args.draws} pools of 100 per cell (docs/selection.md):")
        print(combined_grid(load(args.out), args.draws))
    if args.anchor_counts:
        counts = [int(x) for x in args.anchor_counts.split(",")]
        print(f"\nThe anchor-f1 threshold with fewer anchors ({args.subsets} random subsets per count, 5 pools per grid cell):")
        print(anchor_count_table(load(args.out), counts, args.subsets))


if __name__ == "__main__":
    main()

