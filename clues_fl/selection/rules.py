"""Which samples to keep, given their scores and the anchors' leave-one-out scores.

Every sample has a score (higher = better aligned with the clean anchor set); the
server also knows the leave-one-out scores of the anchor samples themselves, i.e. a
small sample from the score distribution of *clean* data. A threshold rule turns
these into one global threshold (``keep = score >= threshold``); the ``ratio`` rule
instead keeps the top fraction of each client's own scores.

Ties, one rule everywhere (:func:`keep_mask`): a sample is kept when its score is at or
above the cut, so a sample scoring exactly the threshold is kept, and equal scores always
get the same decision. The data-derived rules (``anchor-f1``, ``mixture``, the global
ratio) put the threshold on the lowest score they keep; ``ratio`` cuts at its
``ceil(ratio * n)``-th best score and keeps every sample tied with it.

Positive class everywhere: "clean" / "kept".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.stats import norm

from clues_fl import plugins
from clues_fl.names import THRESHOLD_RULES

# Anchor quantiles at which the clean share is read off (clean_share_estimate): at each,
# the pooled share scoring at least that high over the anchors' share doing so bounds the
# clean share from above; the smallest of these ratios is the estimate. On the threshold
# grid of the seed-0 signal pool (docs/selection.md "Threshold rules on a grid of pools": 25 cells x 20
# pools, clues+) the middle quantiles 0.3-0.7 had a mean error of +0.02 (rmse 0.12); a single
# cut at 0.5 +0.10, at 0.7 +0.22 (anchors are few, and polluted samples that look clean
# push the higher cuts up).
SHARE_QUANTILES = (0.3, 0.4, 0.5, 0.6, 0.7)
# The same for a calibrated score whose clean reference is its model's law, not the anchors'
# scores (clues+: signals.clean_reference, clean scores log10 of a uniform number): every
# quantile is exact, so the cuts can sit in the lower half, where clean samples are many
# and the bad ones few. The upper half is where a clean model fitted a little wide or
# narrow for the anchors drawn bunches or spreads the clean scores, and the middle cuts
# then read the share up to 0.17 off: over five draws of 16 anchors on suite-11 and the
# demo (benchmarks/selection_draws.py) the estimates were 0.44-0.67 (true 0.50) and
# 0.52-0.72 (0.60) with the middle cuts, 0.41-0.62 and 0.52-0.65 with these, 0.47-0.61
# and 0.54-0.64 once the site's refinement counted each anchor 0.3
# (signals.REFINE_ANCHOR_WEIGHT)
# (docs/selection.md, "The combined score over anchor draws").
CALIBRATED_SHARE_QUANTILES = (0.15, 0.25, 0.35, 0.45)
# Bandwidth of the anchors' kernel density (anchor-f1), as a fraction of Scott's rule
# (sd * n^-1/5). 0.25, 0.5 and 1.0 gave the same grid F1 within 0.006.
KDE_BANDWIDTH = 0.5

# Anchor quantiles used as censoring points by the mixture rule: polluted data is
# assumed to rarely score above them. Simulated over several polluted-score shapes
# (Gaussian far/near/wide, bimodal, skewed, uniform; 16 anchors, N=500), cuts at
# (0.3, 0.4, 0.5) gave a better F1 everywhere and a smaller alpha error than cuts in
# the upper half (0.5, 0.6, 0.7): more points above the cut pin down the clean
# component better than the little contamination from polluted data costs.
MIXTURE_QUANTILES = (0.3, 0.4, 0.5)


def _finite(values, what: str, minimum: int) -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    arr = arr[np.isfinite(arr)]
    if arr.size < minimum:
        raise ValueError(
            f"{what} needs at least {minimum} finite value{'s' if minimum > 1 else ''}, "
            f"got {arr.size}"
        )
    return arr


def _anchors(anchor_scores) -> np.ndarray:
    return _finite(anchor_scores, "anchor_scores", 2)


@dataclass(frozen=True)
class ThresholdSettings:
    """The run-config values the rules read (selection.quantile, .static, .ratio)."""

    quantile: float = 0.1
    static: float = 0.0
    ratio: float = 0.5
    # where anchor-f1 reads the clean share off the clean reference (the scorer's: Scorer.share_quantiles)
    share_quantiles: tuple[float, ...] = SHARE_QUANTILES


class ThresholdRule:
    """A threshold policy: from the anchors' leave-one-out scores and the pooled scores of
    all samples, the decision every site applies with :func:`keep`, as a dict with
    ``threshold`` (keep ``score >= threshold``) or ``ratio`` (keep the top fraction of
    each site's own scores). Chosen by name (:func:`threshold_rule`)."""

    name = ""
    uses_pool = False  # reads the pooled scores of all samples (histogram privacy mode: pseudo-scores)

    def decide(self, anchor_scores, all_scores, settings: ThresholdSettings) -> dict:
        raise NotImplementedError


class AnchorF1(ThresholdRule):
    """Expected-F1-optimal threshold with the clean share estimated from the pool
    (:func:`clean_share_estimate`) and the clean score distribution from the anchors
    (kernel-smoothed): :func:`anchor_f1_threshold`. Strict when most of the pool looks
    polluted, loose when little does; assumes nothing about the polluted scores' shape."""

    name = "anchor-f1"
    uses_pool = True

    def decide(self, anchor_scores, all_scores, settings):
        if all_scores is None:
            raise ValueError("threshold rule 'anchor-f1' needs all_scores (the scores of all samples)")
        return {"threshold": anchor_f1_threshold(_anchors(anchor_scores), all_scores,
                                                 quantiles=settings.share_quantiles)[0]}


class AnchorMean(ThresholdRule):
    """Mean of the anchors' scores (keeps roughly half of the clean data: precision over recall)."""

    name = "anchor-mean"

    def decide(self, anchor_scores, all_scores, settings):
        return {"threshold": float(_anchors(anchor_scores).mean())}


class AnchorQuantile(ThresholdRule):
    """The ``quantile`` of the anchors' scores: about ``1 - quantile`` of clean data is kept."""

    name = "anchor-quantile"

    def decide(self, anchor_scores, all_scores, settings):
        anchors = _anchors(anchor_scores)
        if not 0.0 <= settings.quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {settings.quantile}")
        return {"threshold": float(np.quantile(anchors, settings.quantile))}


class Mixture(ThresholdRule):
    """Expected-F1-optimal threshold under a clean/polluted mixture (:func:`mixture_threshold`)."""

    name = "mixture"
    uses_pool = True

    def decide(self, anchor_scores, all_scores, settings):
        anchors = _anchors(anchor_scores)
        if all_scores is None:
            raise ValueError("threshold rule 'mixture' needs all_scores (the scores of all samples)")
        return {"threshold": mixture_threshold(anchors, all_scores)[0]}


class Static(ThresholdRule):
    """The value selection.static."""

    name = "static"

    def decide(self, anchor_scores, all_scores, settings):
        return {"threshold": float(settings.static)}


class SiteRatio(ThresholdRule):
    """No global threshold: every site keeps the top selection.ratio of its own scores."""

    name = "ratio"

    def decide(self, anchor_scores, all_scores, settings):
        return {"ratio": settings.ratio}


class GlobalRatio(ThresholdRule):
    """One global threshold keeping the top selection.ratio of all pooled scores
    (the methods without anchor scores: less, datainf, ppl, ifd, random, ...)."""

    name = "global-ratio"

    def decide(self, anchor_scores, all_scores, settings):
        pooled = np.sort(np.asarray(all_scores, dtype=float))[::-1]
        count = max(1, int(np.ceil(settings.ratio * len(pooled) - 1e-9)))
        return {"ratio": settings.ratio, "threshold": float(pooled[count - 1])}


class Fixed(ThresholdRule):
    """Scores that are selection flags (Quad, all, oracle): keep the 1s."""

    name = "fixed"

    def decide(self, anchor_scores, all_scores, settings):
        return {"threshold": 0.5}


RULES: dict[str, ThresholdRule] = {r.name: r for r in (AnchorF1(), AnchorMean(), AnchorQuantile(), Mixture(), Static(),
                                                        SiteRatio(), GlobalRatio(), Fixed())}


def threshold_rule(name: str) -> ThresholdRule:
    """The rule `name` stands for: a built-in, or your ThresholdRule subclass (module:Class)."""
    if name in RULES:
        return RULES[name]
    if plugins.is_reference(name):
        return plugins.load(name, "selection.threshold", accepts=plugins.subclass_of(ThresholdRule),
                            expected="a clues_fl.selection.rules.ThresholdRule subclass")()
    raise ValueError(f"unknown threshold rule '{name}': expected one of {', '.join(THRESHOLD_RULES)} or module:Class")


def rule_name(rule) -> str:
    """The selection.threshold value of a rule (a name, a built-in rule or your rule)."""
    if isinstance(rule, str):
        return rule
    builtin = RULES.get(rule.name)
    return rule.name if builtin is not None and type(builtin) is type(rule) else plugins.reference(type(rule))


def global_threshold(
    rule: str,
    anchor_scores: np.ndarray,
    all_scores: np.ndarray | None = None,
    *,
    quantile: float = 0.1,
    static: float = 0.0,
    share_quantiles: tuple[float, ...] = SHARE_QUANTILES,
) -> float:
    """One threshold for every client (keep samples with ``score >= threshold``).

    - ``anchor-f1``: expected-F1-optimal threshold from the estimated clean share and
      the anchors' smoothed score distribution (see :func:`anchor_f1_threshold`).
    - ``anchor-mean``: mean of the anchors' scores (keeps roughly half of the clean
      data, so it trades recall for precision).
    - ``anchor-quantile``: the ``quantile`` of the anchors' scores, so about
      ``1 - quantile`` of clean data is kept whatever the pollution.
    - ``mixture``: expected-F1-optimal threshold under a clean/polluted mixture model
      fitted to ``all_scores`` (see :func:`mixture_threshold`).
    - ``static``: the value ``static``.
    - ``ratio`` has no global threshold; it is applied per client with
      ``keep_mask(scores, ratio=...)``.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule '{rule}': expected one of {', '.join(THRESHOLD_RULES)}")
    if rule == "ratio":
        raise ValueError(
            "threshold rule 'ratio' has no global threshold: it keeps the top fraction of "
            "each client's own scores; use keep_mask(scores, ratio=...)"
        )
    settings = ThresholdSettings(quantile=quantile, static=static, share_quantiles=tuple(share_quantiles))
    return threshold_rule(rule).decide(anchor_scores, all_scores, settings)["threshold"]


# Floor on the clean component's sd in standardised units (anchor sd = 1), so that
# tied anchors cannot drive the likelihood to a degenerate spike.
_LOG_SD_MIN = math.log(1e-3)


def _fit_good(z_anchor: np.ndarray, z_all: np.ndarray, cut: float,
              anchor_weight: float = 1.0) -> tuple[float, float, float]:
    """Censored fit of the clean-score Gaussian; returns (mu, sd, alpha) in z units.

    Model: the all-data density above ``cut`` is ``alpha * N(mu, sd)`` (polluted data
    rarely scores above a lowish clean quantile); below ``cut`` it is left unmodelled, so
    no assumption is made about the shape of the polluted scores. The likelihood of
    the anchors (full Gaussian) plus that of the all-data points above ``cut`` is
    maximised with ``alpha`` profiled out, which gives
    ``alpha = P_all(s >= cut) / P_good(s >= cut)`` and leaves a truncated-normal
    likelihood for the upper points: they pin down the location of the clean
    component far better than 16 anchors alone could. Each anchor's log-likelihood counts
    ``anchor_weight`` times (signals.refine counts them less than the site's own values).
    """
    upper = z_all[z_all >= cut]
    if upper.size == 0:
        return float(z_anchor.mean()), float(max(z_anchor.std(ddof=1), math.exp(_LOG_SD_MIN))), 0.0

    def nll(params: np.ndarray) -> float:
        mu, log_sd = params
        sd = math.exp(min(max(log_sd, _LOG_SD_MIN), 10.0))
        log_tail = norm.logsf(cut, mu, sd)
        return -(
            anchor_weight * norm.logpdf(z_anchor, mu, sd).sum()
            + norm.logpdf(upper, mu, sd).sum()
            - upper.size * log_tail
        )

    start = np.array([z_anchor.mean(), max(math.log(max(z_anchor.std(ddof=1), 1e-300)), _LOG_SD_MIN)])
    simplex = start + np.array([[0.0, 0.0], [0.5, 0.0], [0.0, 0.5]])
    res = minimize(
        nll, start, method="Nelder-Mead",
        options={"initial_simplex": simplex, "xatol": 1e-7, "fatol": 1e-10, "maxiter": 1000},
    )
    mu, sd = float(res.x[0]), float(math.exp(min(max(res.x[1], _LOG_SD_MIN), 10.0)))
    tail = float(norm.sf(cut, mu, sd))
    alpha = upper.size / z_all.size / tail if tail > 0 else 1.0
    return mu, sd, float(min(max(alpha, 0.0), 1.0))


def mixture_threshold(
    anchor_scores: np.ndarray,
    all_scores: np.ndarray,
    *,
    quantiles: tuple[float, ...] = MIXTURE_QUANTILES,
) -> tuple[float, float]:
    """Expected-F1-optimal threshold under ``p_all = alpha p_good + (1-alpha) p_bad``.

    Returns ``(threshold, alpha)``; ``alpha`` is the estimated clean fraction.

    - ``p_good`` is a Gaussian. With ~16 anchors an empirical CDF is a coarse step
      function with nothing beyond the extreme anchors, exactly where the threshold
      lands; a two-parameter fit is smoother and can also borrow strength from the
      all-data scores (below).
    - ``alpha``: the simple estimator ``P_all(s >= Q_good(q)) / (1-q)`` relies only
      on "polluted data rarely scores above the clean median", but with anchors-only
      quantiles its error is dominated by the anchors' sampling noise (simulated:
      mean |error| ~0.13 with 16 anchors). Here ``p_good`` is fitted jointly to the
      anchors and to the all-data scores above the cut (:func:`_fit_good`), which
      keeps the same kind of assumption and roughly halves the error. Estimates for
      cuts at the anchor ``quantiles`` (default ``MIXTURE_QUANTILES``) are averaged.
    - The threshold is the candidate ``t`` (every finite score) maximising the
      expected F1 of keeping clean data: ``TP = alpha N (1 - F_good(t))``,
      ``FP = max(0, N P_all(s >= t) - TP)``, ``FN = alpha N - TP``; ties go to the
      lowest threshold (keep more). ``alpha == 0`` gives ``inf`` (keep nothing).

    Scores are standardised by the anchors' mean and std first, so the result is
    equivariant under ``s -> a s + b`` (a > 0).
    """
    anchors = _anchors(anchor_scores)
    scores = _finite(all_scores, "all_scores", 1)
    centre = anchors.mean()
    scale = anchors.std(ddof=1)
    if not scale > 0:
        scale = max(float(np.std(scores)), 1e-12)
    z_anchor = (anchors - centre) / scale
    z_all = (scores - centre) / scale

    if not quantiles or not all(0.0 < q < 1.0 for q in quantiles):
        raise ValueError(f"mixture quantiles must be in (0, 1), got {quantiles}")
    fits = [_fit_good(z_anchor, z_all, float(np.quantile(z_anchor, q))) for q in quantiles]
    mu = float(np.mean([f[0] for f in fits]))
    sd = float(np.mean([f[1] for f in fits]))
    alpha = float(np.mean([f[2] for f in fits]))
    if alpha <= 0.0:
        return math.inf, 0.0

    return _expected_f1_threshold(scores, alpha, lambda t: norm.sf((t - centre) / scale, mu, sd)), alpha


def _expected_f1_threshold(scores: np.ndarray, alpha: float, clean_sf) -> float:
    """The pooled score ``t`` maximising the expected F1 of keeping clean data, given the
    clean share ``alpha`` and the clean scores' survival function ``clean_sf(t)``:
    ``TP = alpha N clean_sf(t)``, ``FP = max(0, #(s >= t) - TP)``, ``FN = alpha N - TP``;
    ties go to the lowest threshold (keep more). Candidates are the original score
    values (not round-tripped through float arithmetic), so keep_mask(scores,
    threshold=t) keeps the sample scoring t."""
    n = scores.size
    candidates = np.unique(scores)  # sorted
    kept = n - np.searchsorted(np.sort(scores), candidates, side="left")  # #(s >= t)
    tp = alpha * n * clean_sf(candidates)
    fp = np.maximum(0.0, kept - tp)
    fn = alpha * n - tp
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1e-300)
    return float(candidates[int(np.argmax(f1))])


def clean_share_estimate(anchor_scores, all_scores, *, quantiles: tuple[float, ...] = SHARE_QUANTILES,
                         upper: bool = False) -> float:
    """The clean share of the pooled scores, from the anchors alone as the picture of clean data.

    At a cut ``t``, clean pooled samples score ``>= t`` about as often as the anchors do,
    and polluted ones can only add to the pooled count, so
    ``P_pool(s >= t) / P_anchor(s >= t)`` is at least the clean share. The estimate is
    the smallest of these ratios over cuts at the anchors' ``quantiles`` (the middle
    ones: the anchors' share above a cut is a count out of ~16), capped at 1: mixture
    proportion estimation (Blanchard, Lee & Scott 2010) with no model of either score
    distribution. Polluted samples that score like clean ones (undetectable by this
    score) make it an overestimate; sampling noise of the few anchors makes the
    minimum lean low. ``upper=True``: the mean of the ratios instead, which leans high
    (the interval's upper end, :func:`clean_share`). Equivariant under ``s -> a s + b`` (a > 0).
    """
    anchors = _anchors(anchor_scores)
    scores = _finite(all_scores, "all_scores", 1)
    if not quantiles or not all(0.0 < q < 1.0 for q in quantiles):
        raise ValueError(f"clean-share quantiles must be in (0, 1), got {quantiles}")
    ratios = []
    for q in quantiles:
        cut = np.quantile(anchors, q)
        ratios.append(np.mean(scores >= cut) / np.mean(anchors >= cut))  # >= 1 anchor is >= its quantile
    return float(min(1.0, np.mean(ratios) if upper else min(ratios)))


def _anchor_sf(anchors: np.ndarray, scale: float):
    """P(clean score >= t): a Gaussian kernel density on the anchors (bandwidth
    KDE_BANDWIDTH x Scott's rule), smooth where 16 anchors leave a coarse step."""
    width = KDE_BANDWIDTH * scale * anchors.size ** (-0.2)
    if not width > 0:
        width = 1e-12
    return lambda t: norm.sf((np.asarray(t, dtype=float)[:, None] - anchors[None, :]) / width).mean(axis=1)


def anchor_f1_threshold(anchor_scores, all_scores, share: float | None = None, *,
                        quantiles: tuple[float, ...] = SHARE_QUANTILES) -> tuple[float, float]:
    """``(threshold, clean share)`` of the ``anchor-f1`` rule.

    The clean share ``alpha`` is :func:`clean_share_estimate` (at the reference's
    `quantiles`), or ``share`` where given (a
    known share: the benchmarks' reference for what the estimate costs); the clean scores'
    survival function ``G(t)`` is a kernel density on the anchors. Every pooled score
    is a candidate ``t``: ``TP = alpha N G(t)``, ``FP = #(s >= t) - TP`` (at least 0),
    ``FN = alpha N - TP``; the threshold maximises ``F1 = 2TP / (2TP + FP + FN)``, ties
    to the lowest (keep more). Unlike ``mixture`` it fits no shape to either score
    distribution: what is not clean is simply the pool minus the clean share's
    expected count above ``t``. ``alpha == 0`` gives ``inf`` (keep nothing).
    Equivariant under ``s -> a s + b`` (a > 0).
    """
    anchors = _anchors(anchor_scores)
    scores = _finite(all_scores, "all_scores", 1)
    alpha = clean_share_estimate(anchors, scores, quantiles=quantiles) if share is None else float(share)
    if alpha <= 0.0:
        return math.inf, 0.0
    scale = float(anchors.std(ddof=1))
    if not scale > 0:
        scale = float(np.std(scores))
    return _expected_f1_threshold(scores, alpha, _anchor_sf(anchors, scale)), alpha


def keep_mask(scores, *, threshold: float | None = None, ratio: float | None = None) -> np.ndarray:
    """Boolean mask of kept samples: ``score >= threshold``, or this client's top ``ratio``.

    The tie rule (the one rule of every party's decision): a score equal to the cut is
    kept, and equal scores get the same decision. With ``threshold`` the cut is the
    threshold (a sample scoring exactly it is kept). With ``ratio`` the cut is the
    ``ceil(ratio * n)``-th highest score, and every sample tied with it is kept too (so
    ties can keep a few more than ``ratio``; ratio 0 keeps none). NaN scores (unscorable
    samples) are never kept. Exactly one of the two must be given.
    """
    if (threshold is None) == (ratio is None):
        raise ValueError("keep_mask needs exactly one of threshold= or ratio=")
    arr = np.asarray(scores, dtype=float).ravel()
    if threshold is not None:
        if math.isnan(threshold):
            raise ValueError("threshold is NaN")
        with np.errstate(invalid="ignore"):
            return arr >= threshold
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    # guard against 0.3 * 10 = 3.0000000000000004 -> 4
    k = min(arr.size, math.ceil(ratio * arr.size - 1e-9))
    finite = np.sort(arr[~np.isnan(arr)])[::-1]
    if k == 0 or finite.size == 0:
        return np.zeros(arr.size, dtype=bool)
    cut = finite[min(k, finite.size) - 1]
    with np.errstate(invalid="ignore"):
        return arr >= cut


def keep(scores, decision: Mapping) -> np.ndarray:
    """The keep rule, the one place every party applies the run's decision to a site's
    scores (the site when selecting, the server's manifests and report): ``score >=
    decision["threshold"]`` when the decision has a threshold, else the site's top
    ``decision["ratio"]`` (rule ``ratio``); ties as :func:`keep_mask` says (a score at the
    cut is kept). Scores are already standardised where the decision is (merging mode)."""
    if "threshold" in decision:
        return keep_mask(scores, threshold=float(decision["threshold"]))
    return keep_mask(scores, ratio=float(decision["ratio"]))


class NothingKept(RuntimeError):
    """No site kept enough samples to retrain on: the run stops before aggregation."""


def retraining_sites(kept: Mapping[str, int], min_kept: int = 1, threshold: str = "") -> list[str]:
    """The sites that retrain: those that kept at least `min_kept` samples
    (selection.min-kept; a site below it has too little to train on and sits out).
    NothingKept, naming every site's count, when no site did: a run must not publish
    an adapter that was not trained on kept data."""
    chosen = sorted(name for name, count in kept.items() if count >= min_kept)
    if not chosen:
        counts = ", ".join(f"{name} {count}" for name, count in sorted(kept.items())) or "no site answered"
        raise NothingKept(
            f"the selection kept too little to retrain on: no site kept at least selection.min-kept={min_kept} "
            f"sample(s) (kept: {counts}{'; ' + threshold if threshold else ''}); stopping before aggregation, "
            "no adapter saved. Lower the threshold (selection.threshold, selection.static) or selection.min-kept, "
            "or check the anchors (data.anchor-file) against your data"
        )
    return chosen


def standardise(scores, anchor_scores) -> np.ndarray:
    """``(s - mean(anchor)) / std(anchor)`` (ddof=1).

    In merging mode every client scores against its own local checkpoint, so raw
    scores from different clients live on different scales; expressing them in
    units of the client's own anchor spread makes one global threshold meaningful.
    If the anchors have zero spread the scores are only centred.
    """
    anchors = _anchors(anchor_scores)
    std = anchors.std(ddof=1)
    arr = np.asarray(scores, dtype=float)
    out = arr - anchors.mean()
    return out / std if std > 0 else out


def clean_share(anchor_scores, all_scores, *, reps: int = 200, level: float = 0.9, seed: int = 0,
                quantiles: tuple[float, ...] = SHARE_QUANTILES) -> dict:
    """The estimated clean share of the pooled scores (:func:`clean_share_estimate` at the
    reference's `quantiles`) with a
    bootstrap interval: ``{"estimate", "low", "high", "level", "method"}``. Anchors and pooled
    scores are resampled together `reps` times; the low end is the lower percentile of the
    estimate (the minimum of the ratios, which leans low), the high end the upper percentile
    of the mean of the ratios (which leans high). Needs no quality labels.

    Measured (docs/selection.md "Threshold rules on a grid of pools"): the 90% interval covered the
    true share in 500, 493, 459 and 331 of 500, 500, 500 and 420 resampled pools of the
    clues+ grids of four pools (width about 0.4: 16 anchors say little more) and in 43 of
    50 simulated pools. It misses where the anchors happen to score above the pool's clean
    samples (the full-size pool: the estimate is then too low in every cell, 11-20 of 20
    covered); for plain CLUES, whose scores do not see pollution in the right domain
    (exchanged, cut, garbled answers), the estimate is about 1 whatever the truth (309 and
    104 of 500 on seeds 0 and 1)."""
    anchors = _anchors(anchor_scores)
    scores = _finite(all_scores, "all_scores", 1)
    alpha = clean_share_estimate(anchors, scores, quantiles=quantiles)
    rng = np.random.default_rng(seed)
    lows, highs = [], []
    for _ in range(reps):
        a = rng.choice(anchors, anchors.size)
        if np.ptp(a) == 0:
            continue
        pool = rng.choice(scores, scores.size)
        lows.append(clean_share_estimate(a, pool, quantiles=quantiles))
        highs.append(clean_share_estimate(a, pool, quantiles=quantiles, upper=True))
    tail = (1 - level) / 2
    low, high = ((np.quantile(lows, tail), np.quantile(highs, 1 - tail)) if lows else (alpha, alpha))
    return {"estimate": float(alpha), "low": float(min(low, alpha)), "high": float(max(high, alpha)),
            "level": level, "method": "anchor-quantile ratios, bootstrap"}


def score_distribution(scores) -> dict:
    """Quantiles of a set of scores (for reports without labels)."""
    arr = np.asarray(scores, dtype=float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return {}
    qs = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
    return {f"q{int(q * 100):02d}": float(v) for q, v in zip(qs, np.quantile(arr, qs))}
