"""The sites' scores as the server holds them: pooled across sites, in anchor units, or
stand-ins reproducing the histograms the sites sent (privacy.report = histogram), and
what the sites need to report privately (bin edges, a clipping range)."""

from __future__ import annotations

import numpy as np

from clues_fl.config import RunConfig
from clues_fl.federation.messages import PrivacySettings
from clues_fl.selection import privacy
from clues_fl.selection.rules import standardise
from clues_fl.server.state import ProtocolState, SiteRecord


def holds_exact_scores(cfg: RunConfig) -> bool:
    """Whether the scores the sites report are their exact scores (no privacy mode):
    only then can a resumed run hand them back to the sites for selection."""
    return cfg.privacy.report == "scores" and not privacy.dp_enabled(cfg.privacy.epsilon)


def privacy_settings(cfg: RunConfig, anchor_scores: np.ndarray, anchor_threshold: bool) -> dict:
    """What sites need to report binned counts and/or noised scores: bin edges and a
    clipping range, both derived from the public anchor scores only ({} when neither)."""
    histogram, dp = cfg.privacy.report == "histogram", privacy.dp_enabled(cfg.privacy.epsilon)
    if not (histogram or dp):
        return {}
    if not anchor_threshold:
        raise ValueError(f"privacy.report='histogram' and privacy.epsilon > 0 need an anchor-threshold "
                         f"method such as 'clues', not '{cfg['selection.method']}'")
    settings = PrivacySettings(cfg.privacy.report)
    if histogram:
        edges = privacy.histogram_edges(anchor_scores, bins=cfg.privacy.bins)
        settings.edges = [float(e) for e in edges[1:-1]]  # the outer edges are -inf, +inf
    if dp:
        lo, hi = privacy.clip_range(anchor_scores)
        settings.epsilon, settings.delta = float(cfg.privacy.epsilon), float(cfg.privacy.delta)
        settings.clip_lo, settings.clip_hi = float(lo), float(hi)
    return settings.to_config()


def histogram_edges(state: ProtocolState, cfg: RunConfig) -> np.ndarray:
    """The bins the sites counted in (privacy.report = histogram), from the anchor scores."""
    return privacy.histogram_edges(np.asarray(state.anchor["scores"]), bins=cfg.privacy.bins)


def site_scores(state: ProtocolState, site: SiteRecord, cfg: RunConfig) -> np.ndarray:
    """One site's scores, or stand-ins reproducing its histogram (its plot in the report)."""
    if site.histogram is None:
        return site.scores
    return privacy.pseudo_scores(site.histogram, histogram_edges(state, cfg))


def pooled_scores(state: ProtocolState, sites: list[SiteRecord], cfg: RunConfig) -> np.ndarray:
    """The sites' scores pooled, or (privacy.report = histogram) stand-ins reproducing
    their summed histograms, as privacy.threshold_from_histograms computes them."""
    if all(s.histogram is None for s in sites):
        return np.concatenate([s.scores for s in sites])
    if any(s.histogram is None for s in sites):
        raise RuntimeError("some sites reported scores and others histograms: privacy.report differs between them")
    return privacy.pooled_pseudo_scores([s.histogram for s in sites], histogram_edges(state, cfg))


def anchor_and_pooled(state: ProtocolState, sites: list[SiteRecord], cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """(anchor scores, pooled site scores) on one scale: as reported (federated mode: one
    shared set of checkpoints), or in units of each site's anchor-score spread (merging
    mode: local checkpoints give each site its own scale)."""
    if cfg.run.mode == "federated":
        return np.asarray(state.anchor["scores"]), pooled_scores(state, sites, cfg)
    return (np.concatenate([standardise(s.anchor_scores, s.anchor_scores) for s in sites]),
            np.concatenate([standardise(s.scores, s.anchor_scores) for s in sites]))
