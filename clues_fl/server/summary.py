"""The selection as the report states it (metrics.json "selection"): with quality labels
(experiments), precision/recall/F1 overall and per site; without, kept counts only, and
in both cases the estimated clean share and the score distribution."""

from __future__ import annotations

import logging

from clues_fl.config import RunConfig
from clues_fl.selection.metrics import add_counts, selection_metrics
from clues_fl.selection.rules import SHARE_QUANTILES, clean_share, score_distribution
from clues_fl.server.scores import anchor_and_pooled
from clues_fl.server.state import ProtocolState, SiteRecord

log = logging.getLogger(__name__)


def selection_summary(state: ProtocolState, cfg: RunConfig, anchor_threshold: bool) -> dict:
    """The selection summary; `anchor_threshold`: the method's threshold comes from the
    anchors (only then is there a clean-share estimate)."""
    answered = [s for s in state.sites.values() if s.selected]
    if answered and not all(s.labelled and s.counts for s in answered):
        return unlabelled_summary(state, cfg, answered, anchor_threshold)
    sites = [s for s in state.sites.values() if s.counts]
    per_site = {}
    for s in sites:
        per_site[s.name] = {**selection_metrics(s.counts), **s.counts, "kept": s.kept,
                            "skipped-rows": s.skipped_rows, "truncated": s.truncated,
                            "scored": s.scored, **s.method_metrics}
        if s.clusters:
            per_site[s.name]["clusters-covered"], per_site[s.name]["clusters-total"] = s.clusters
    overall = selection_metrics(add_counts([s.counts for s in sites])) if sites else {}
    if sites:
        overall["scored-fraction"] = sum(s.scored for s in sites) / max(1, sum(s.num_examples for s in sites))
    if sites and all(s.clusters for s in sites):
        overall["cluster-coverage"] = sum(s.clusters[0] for s in sites) / sum(s.clusters[1] for s in sites)
    return {**overall, **share_and_distribution(state, cfg, anchor_threshold), "per-client": per_site}


def unlabelled_summary(state: ProtocolState, cfg: RunConfig, sites: list[SiteRecord], anchor_threshold: bool) -> dict:
    """Selection report for data without quality labels: kept counts per site, the
    estimated clean share and the score distribution; no precision/recall/F1 (every
    sample would count as clean and the figures would be meaningless)."""
    per_site = {s.name: {"kept": s.kept, "n": s.num_examples, "kept-share": s.kept / max(1, s.num_examples),
                         "skipped-rows": s.skipped_rows, "truncated": s.truncated, "scored": s.scored,
                         **s.method_metrics} for s in sites}
    n = sum(s.num_examples for s in sites)
    kept = sum(s.kept for s in sites)
    return {"labelled": False, "n": n, "kept": kept, "kept-share": kept / max(1, n),
            **share_and_distribution(state, cfg, anchor_threshold), "per-client": per_site}


def share_and_distribution(state: ProtocolState, cfg: RunConfig, anchor_threshold: bool) -> dict:
    """Estimated clean share (anchor-quantile ratios on the anchor-based scores,
    bootstrap interval, and how many anchors it rests on) and the score distribution
    of the sites and of the anchors."""
    reported = state.reported()
    if not reported or not anchor_threshold:
        return {}
    out: dict = {}
    try:
        anchors, pooled = anchor_and_pooled(state, reported, cfg)
        # merging mode: each site scored the same anchors against its own checkpoints
        anchor_count = anchors.size if cfg.run.mode == "federated" else len(reported[0].anchor_scores)
        quantiles = tuple(state.threshold.get("share-quantiles", SHARE_QUANTILES))  # the threshold's own
        out["estimated-clean-share"] = {**clean_share(anchors, pooled, seed=cfg.run.seed, quantiles=quantiles),
                                        "anchors": int(anchor_count)}
        out["score-distribution"] = {"sites": score_distribution(pooled), "anchors": score_distribution(anchors)}
    except ValueError as err:  # too few finite scores
        log.warning("no clean-share estimate: %s", err)
    return out

