"""What a site does, as plain functions (no Flower): one round of local training, a
merging-mode local run, scoring, what of the scores is reported (privacy), selection
with its counts, and the site-local report of the dropped samples.

client_app.py's handlers unpack a typed request (messages.py), call one of these and
pack the typed reply; the site's Flower state (context.state) and its per-process cache
stay there.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clues_fl.outputs import output_dir
from clues_fl.model.loading import lora_state
from clues_fl.scoring.scorers import ScorePayload, SiteData, site_clusters
from clues_fl.selection import privacy
from clues_fl.selection.metrics import confusion_counts
from clues_fl.selection.rules import keep


# -- training -----------------------------------------------------------------------
def steps_before(server_round: int, n: int, batch_size: int, local_epochs: float) -> int:
    """Adam steps this site took before this round (for the bias correction of the
    averaged moments it continues from)."""
    per_round = math.ceil(math.ceil(n / batch_size) * local_epochs)
    return (server_round - 1) * per_round


def equal_budget_epochs(kept: int, n: int, batch_size: int, local_epochs: float) -> float:
    """'all-data' (the all-data reference) trains on all `n` samples for as many steps
    per round as the selection's retraining takes on this site (its `kept` samples):
    equal budgets."""
    per_round = math.ceil(kept / batch_size)
    return local_epochs * per_round / max(1, math.ceil(n / batch_size))


def retrain_epochs(phase: str, kept: int, n: int, cfg) -> float:
    """Local epochs of one round after selection ('aggregate': over the site's `kept`
    samples; 'all-data': over all its `n`) under `retrain.budget`. `trace-steps`: a round
    takes as many optimiser steps as a trace round on all `n` samples (train.local-epochs
    over them): the kept samples are revisited, and the all-data reference trains like
    the trace. `epochs`: train.local-epochs over the kept samples, and the all-data
    reference as many steps (equal_budget_epochs)."""
    batch, epochs = cfg.train.batch_size, cfg.train.local_epochs
    if cfg.retrain.budget == "trace-steps":
        if phase == "all-data" or kept <= 0:
            return epochs
        return epochs * math.ceil(n / batch) / math.ceil(kept / batch)
    return equal_budget_epochs(kept, n, batch, epochs) if phase == "all-data" else epochs


def subset_cache(cache, rows):
    """The prefix cache indexes rows of the full pool; a subset needs a row map."""
    return None if cache is None else cache.subset(rows)


@dataclass
class RoundResult:
    """One round of local training: the adapter after it and what the reply reports."""

    state: dict
    moments: object  # AdamMoments after the round (None when none were given)
    num_examples: int
    loss: float
    steps: int
    seconds: float


def train_round(bench, cfg, encoded, cache, rows: list[int], state, moments, *, phase: str, server_round: int,
                proximal_mu: float, partition_id: int, kept: int | None = None) -> RoundResult:
    """One round of fed.strategy on `rows` of this site's samples, from the global
    adapter `state` (and, while tracing, the global Adam `moments`, continued at this
    site's step count). After selection ('aggregate' on the kept `rows` of the site's
    samples, 'all-data' on all of them given its `kept` count) a round takes the
    steps `retrain.budget` says (retrain_epochs)."""
    t0 = time.time()
    epochs = None
    if phase == "all-data":
        epochs = retrain_epochs(phase, kept, len(rows), cfg)
    elif phase == "aggregate":
        epochs = retrain_epochs(phase, len(rows), len(encoded), cfg)
    result = bench.train(
        [encoded[i] for i in rows], cfg, state, moments=moments, epochs=epochs,
        start_step=(steps_before(server_round, len(rows), cfg.train.batch_size, cfg.train.local_epochs)
                    if moments is not None else 0),
        cache=subset_cache(cache, rows),
        seed_offset=server_round * 101 + partition_id,
        desc=f"{phase} round {server_round}", proximal_mu=proximal_mu,
    )
    return RoundResult(lora_state(bench.model), result.moments, len(rows), result.mean_loss,
                       len(result.step_losses), time.time() - t0)


@dataclass
class LocalRun:
    """A merging-mode local run: the final adapter, its checkpoints (tracing), the loss."""

    state: dict
    checkpoints: list
    num_examples: int
    loss: float


def local_run(bench, cfg, encoded, cache, rows: list[int], *, phase: str, partition_id: int) -> LocalRun:
    """Merging mode: trace.rounds (tracing, with one checkpoint per round) or
    retrain.rounds rounds on `rows`, each as long as `retrain.budget` says (retrain_epochs)."""
    rounds = cfg.trace.rounds if phase == "trace" else cfg.retrain.rounds
    per_round = cfg.train.local_epochs if phase == "trace" else retrain_epochs("aggregate", len(rows), len(encoded), cfg)
    result = bench.train(
        [encoded[i] for i in rows], cfg, None, epochs=rounds * per_round,
        num_checkpoints=rounds if phase == "trace" else 0, cache=subset_cache(cache, rows),
        seed_offset=partition_id, desc=f"local {phase}",
    )
    return LocalRun(lora_state(bench.model), list(result.checkpoints), len(rows), result.mean_loss)


# -- scoring -----------------------------------------------------------------------
@dataclass
class Scored:
    """A site's exact scores (they stay on the site) and the scorer's metrics."""

    values: np.ndarray
    seconds: float
    extras: dict = field(default_factory=dict)
    details: dict | None = None  # a multi-signal scorer's per-signal values (the site's report)


def score_samples(scorer, site: SiteData, payload: ScorePayload) -> Scored:
    """The scorer's score of every sample of the site, checked: one finite value each."""
    t0 = time.time()
    values = np.asarray(scorer.score(site, payload), dtype=float)
    n = len(site.encoded)
    if values.shape != (n,) or not np.isfinite(values).all():
        raise ValueError(f"scorer '{scorer.name}' returned {values.shape} scores (finite: "
                         f"{bool(np.isfinite(values).all())}) for {n} samples")
    return Scored(values, time.time() - t0, dict(scorer.extras()), getattr(scorer, "details", None) or None)


def reported(values: np.ndarray, *, report: str = "scores", epsilon: float = 0.0, delta: float = 1e-5,
             edges=None, clip_lo: float | None = None, clip_hi: float | None = None,
             rng=None) -> tuple[list[float] | None, list[int] | None]:
    """What leaves the site, as (scores, None) or (None, histogram counts): per-sample
    scores, or only binned counts over the inner bin `edges` (report = histogram);
    Gaussian noise on either when epsilon > 0 (scores clipped to [clip_lo, clip_hi]).
    The noise comes from the OS's entropy (rng None), not the run seed the server knows."""
    rng = np.random.default_rng() if rng is None else rng
    if report == "histogram":
        full = np.array([-np.inf, *[float(e) for e in edges], np.inf])
        counts = privacy.privatise_counts(privacy.histogram_counts(values, full), epsilon, delta, rng)
        return None, [int(c) for c in counts]
    if privacy.dp_enabled(epsilon):
        values = privacy.privatise_scores(values, float(clip_lo), float(clip_hi), epsilon, delta, rng)
    return [float(s) for s in values], None


def check_sent_scores(ids: list[str], own: list[str]) -> None:
    """A resumed run sends a site its scores back: they must be for its own samples."""
    if ids != own:
        same = len(set(ids) & set(own))
        order = " (in another order)" if same == len(ids) == len(own) else ""
        raise ValueError(
            f"the scores sent back for selection are not this site's: {len(ids)} ids, {same} of them "
            f"among this site's {len(own)} sample ids{order}; a resumed run needs each site to hold "
            "the data it scored"
        )


# -- selection -----------------------------------------------------------------------
@dataclass
class Selection:
    """Which samples the site keeps, with the counts it reports."""

    kept: np.ndarray  # bool mask over the site's samples
    scores: np.ndarray  # the scores the decision applied to (standardised in merging mode)
    mean_kept_score: float
    counts: dict = field(default_factory=dict)  # tp/fp/fn/tn where the data carries quality labels

    @property
    def rows(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.kept)]


def select(scores, decision: dict, *, anchor_mean: float | None = None, anchor_std: float | None = None,
           polluted=None) -> Selection:
    """Apply the run's decision (selection.rules.keep) to the site's scores; in merging
    mode they are standardised by the site's anchor mean and std first. Confusion counts
    only where `polluted` flags are given (an experiment's quality labels; they never
    leave the site)."""
    scores = np.asarray(scores, dtype=float)
    if anchor_mean is not None:  # merging mode: scores from local checkpoints, standardised
        scores = (scores - float(anchor_mean)) / float(anchor_std)
    kept = keep(scores, decision)
    counts = confusion_counts(kept, np.asarray(polluted)) if polluted is not None else {}
    return Selection(kept, scores, float(scores[kept].mean()) if kept.any() else 0.0,
                     {k: int(v) for k, v in counts.items()})


def coverage(site: SiteData, kept) -> tuple[int, int]:
    """How many of this site's k-means clusters the kept set touches, of how many (diversity)."""
    labels = site_clusters(site)
    return len(set(labels[kept].tolist())), len(set(labels.tolist()))


def has_quality_labels(cfg, node_config) -> bool:
    """Whether this site's samples carry quality labels: only an experiment that
    polluted them on purpose (`pollution.ratios`) knows which are bad; a user's own
    data (`data.pool`, a node's `data-file`) does not."""
    return bool(str(cfg.pollution.ratios).strip()) and not cfg.data.pool and not node_config.get("data-file")


# -- the site's own report ----------------------------------------------------------
def site_report_dir(cfg, node_config) -> Path:
    """Where a site writes its local report: its node config's `report-dir`, else (in
    simulation) <output-dir>/<run-name>/site-reports/client-<partition-id>."""
    if node_config.get("report-dir"):
        return Path(str(node_config["report-dir"])).expanduser()
    return output_dir(cfg) / "site-reports" / f"client-{int(node_config.get('partition-id', 0))}"


def write_site_report(cfg, folder: Path, samples, scores, kept, threshold: float,
                      signal_names: list[str] | None = None, signal_z=None, score_threshold: float | None = None) -> None:
    """The data owner's audit of the drop, on this site's disk only: every dropped sample
    with its text, its score and the signals whose shortfall put it below the threshold
    (clues_fl.scoring.signals.reasons; `signal_z`: the per-signal standardised values,
    one row per name, for every sample of the site; `score_threshold`: the threshold on
    the scorer's own scale where `threshold` is on another, as in merging mode).
    `worst-signal` is the lowest of them."""
    from clues_fl.scoring.signals import reason_text, reasons, shortfall_threshold, shortfalls

    names = list(signal_names or [])
    z = None if signal_z is None else np.asarray(signal_z, dtype=float).reshape(len(names), len(samples))
    kept = np.asarray(kept, dtype=bool)
    named = None
    if z is not None:
        own = threshold if score_threshold is None else score_threshold
        if np.isfinite(own):
            cut = shortfall_threshold(own, len(names))
        else:  # a per-site ratio: the largest shortfall the site kept
            cut = float(shortfalls(z[:, kept]).max()) if kept.any() else 0.0
        named = reasons(z, names, cut)
    folder.mkdir(parents=True, exist_ok=True)
    by_reason = Counter()  # per reason word: the dropped samples whose reason names it
    by_main_reason = Counter()  # per first (worst) reason word
    with open(folder / "dropped.jsonl", "w") as fh:
        for i in np.flatnonzero(~kept):
            row = {"id": samples[i].id, "question": samples[i].question, "answer": samples[i].answer,
                   "score": float(scores[i]), "threshold": threshold}
            if z is not None:
                lowest = names[int(np.argmin(z[:, i]))]
                row["reason"] = reason_text(named[i] or [lowest])
                row["reason-signals"] = named[i] or [lowest]
                row["worst-signal"] = lowest
                row["signals"] = {n: round(float(z[j, i]), 3) for j, n in enumerate(names)}
            else:
                row["reason"] = f"{cfg['selection.method']} score below the threshold"
            words = row["reason"].split("; ")
            by_reason.update(words)
            by_main_reason[words[0]] += 1
            fh.write(json.dumps(row) + "\n")
    (folder / "summary.json").write_text(json.dumps({
        "samples": len(samples), "kept": int(np.sum(kept)), "dropped": int(len(samples) - np.sum(kept)),
        "threshold": threshold,
        "dropped-by-reason": dict(by_reason.most_common()),
        "dropped-by-main-reason": dict(by_main_reason.most_common()),
        "note": "written by this site for its own audit; nothing of it is sent to the server"}, indent=2))
