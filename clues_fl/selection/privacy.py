"""Privacy modes for what a site reports to the server during selection.

By default a site reports one score per private sample. Two modes reduce what
those reports reveal:

1. **Histogram** (``privacy.report = "histogram"``): a site reports only binned
   counts of its scores. The bin edges are derived by the *server* from the public
   anchor scores alone (:func:`histogram_edges`), so they carry no site data; the
   server turns the pooled counts into a threshold with the same rules as
   :func:`clues_fl.selection.rules.global_threshold` (:func:`threshold_from_histograms`).

2. **Differential privacy** (``privacy.epsilon > 0``, ``privacy.delta``): the
   Gaussian mechanism on the reported values, either the per-sample scores clipped
   to a public range (:func:`clip_range`, :func:`privatise_scores`) or the histogram
   counts (:func:`privatise_counts`). ``privacy.epsilon <= 0`` (or ``inf``) turns DP
   off.

Scope of the guarantee (research grade, not a hardened DP library):

- It covers the *selection reports* only. The LoRA adapters a site sends during
  tracing and retraining are trained on the same samples and need their own DP
  (e.g. Flower's differential-privacy strategy/mod wrappers); the two guarantees
  compose (basic composition: epsilons and deltas add).
- Scores are computed with a model that is fixed at scoring time; "given that
  model" is the conditioning under which one sample's report depends on that
  sample only. The model's own dependence on the data is the adapters' business.
- The noise comes from numpy's PRNG with floating-point Gaussian sampling, which
  is fine for measuring utility but not hardened against floating-point attacks
  (Mironov 2012).

numpy/scipy only; no Flower imports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.special import log_ndtr, ndtr

from clues_fl.selection.metrics import confusion_counts, selection_metrics
from clues_fl.selection.rules import global_threshold, keep, threshold_rule

REPORT_MODES = ("scores", "histogram")

# MAD -> standard deviation for Gaussian data.
_MAD_TO_SD = 1.4826


# -- robust centre / spread of the public anchors ------------------------------------
def _anchor_array(anchor_scores) -> np.ndarray:
    arr = np.asarray(anchor_scores, dtype=float).ravel()
    arr = arr[np.isfinite(arr)]
    if arr.size < 2:
        raise ValueError(f"anchor_scores needs at least 2 finite values, got {arr.size}")
    return arr


def robust_centre_spread(anchor_scores) -> tuple[float, float]:
    """``(median, spread)`` of the anchor scores, used for bin edges and clip ranges.

    ``spread`` is the larger of ``1.4826 * MAD`` (the standard deviation for Gaussian
    data, not inflated by an outlying anchor) and the sample std (ddof=1); 1.0 if
    both are 0. Why the larger: with ~16 anchors the MAD alone underestimates the
    spread by half in ~5% of draws (simulated, N(0,1) anchors: 5% quantile 0.53,
    1% quantile 0.40; the max: 0.72 and 0.61), and a grid or clip range that is too
    narrow loses the clean lower tail, where thresholds land, while one that is too
    wide (e.g. an outlying anchor inflating the std) only costs resolution or noise.
    """
    anchors = _anchor_array(anchor_scores)
    centre = float(np.median(anchors))
    spread = max(_MAD_TO_SD * float(np.median(np.abs(anchors - centre))), float(anchors.std(ddof=1)))
    if not (spread > 0 and math.isfinite(spread)):
        spread = 1.0
    return centre, spread


def _check_span(span: float, key: str) -> float:
    span = float(span)
    if not (span > 0 and math.isfinite(span)):
        raise ValueError(f"{key} must be a positive finite number, got {span}")
    return span


# -- 1. histogram mode ------------------------------------------------------------
def histogram_edges(anchor_scores, bins: int = 64, span: float = 6.0) -> np.ndarray:
    """Bin edges derived by the server from the public anchor scores only.

    With ``m, s = robust_centre_spread(anchor_scores)`` the finite edges are a uniform
    grid of ``bins - 1`` points over ``[m - span*s, m + span*s]`` (so ``bins - 2``
    finite bins of width ``2*span*s / (bins - 2)``), and ``-inf`` / ``+inf`` are
    added as outer edges: ``bins`` bins in all (the length of a site's count vector),
    and every score lands in one. Bins are half-open ``[e_k, e_k+1)``, matching
    ``keep = score >= threshold``: a threshold at an edge keeps whole bins.

    ``span = 6`` keeps clean scores (anchor-like) well inside the finite grid, so
    the part of the distribution where a threshold can land is resolved to
    ``12 s / 62 ~ 0.19 s`` with the default 64 bins; polluted scores far below only
    fill the lower outer bin, which is fine as no rule puts a threshold there.
    """
    if isinstance(bins, bool) or int(bins) != bins or bins < 3:
        raise ValueError(f"privacy.bins must be an integer >= 3 (two outer bins + one finite), got {bins}")
    span = _check_span(span, "privacy.span")
    centre, spread = robust_centre_spread(anchor_scores)
    grid = np.linspace(centre - span * spread, centre + span * spread, int(bins) - 1)
    return np.concatenate([[-np.inf], grid, [np.inf]])


def _check_edges(edges) -> np.ndarray:
    e = np.asarray(edges, dtype=float).ravel()
    if e.size < 4 or e[0] != -np.inf or e[-1] != np.inf or not np.isfinite(e[1:-1]).all():
        raise ValueError("edges must be -inf, at least two finite values, +inf (see histogram_edges)")
    if not (np.diff(e[1:-1]) > 0).all():
        raise ValueError("histogram edges must be strictly increasing")
    return e


def histogram_counts(scores, edges) -> np.ndarray:
    """Site side: how many of this site's scores fall in each bin ``[e_k, e_k+1)``.

    Non-finite scores (NaN = unscorable) are not counted: no threshold keeps them and
    :func:`clues_fl.selection.rules.global_threshold` ignores them too, so the counts sum
    to the number of finite scores.
    """
    e = _check_edges(edges)
    s = np.asarray(scores, dtype=float).ravel()
    s = s[np.isfinite(s)]
    idx = np.searchsorted(e, s, side="right") - 1  # bin k: e[k] <= s < e[k+1]
    return np.bincount(idx, minlength=e.size - 1).astype(np.int64)


def pseudo_scores(counts, edges) -> np.ndarray:
    """Stand-in scores reproducing a histogram, for rules that need pooled scores.

    A finite bin ``[a, b)`` holding ``c`` samples becomes the ``c`` midpoints of ``c``
    equal sub-intervals, ``a + (j + 1/2)(b - a)/c`` (one sample -> the bin centre):
    their empirical CDF is the histogram's piecewise-linear CDF, so the mixture rule
    sees neither a spike per bin nor a lost within-bin spread, and its threshold is
    not restricted to edges or centres. The outer bins collapse onto the nearest
    finite edge (the lower one onto the largest float below ``e_1``, so that every
    point stays in its bin: ``histogram_counts(pseudo_scores(c, e), e) == c``).
    Negative counts (not produced by :func:`privatise_counts`) raise.
    """
    e = _check_edges(edges)
    c = np.rint(np.asarray(counts, dtype=float).ravel()).astype(np.int64)
    if c.size != e.size - 1:
        raise ValueError(f"counts has {c.size} bins but edges define {e.size - 1}")
    if (c < 0).any():
        raise ValueError("histogram counts must be non-negative")
    parts = [np.full(c[0], np.nextafter(e[1], -np.inf))]
    for k in range(1, c.size - 1):
        if c[k]:
            parts.append(e[k] + (np.arange(c[k]) + 0.5) * ((e[k + 1] - e[k]) / c[k]))
    parts.append(np.full(c[-1], e[-2]))
    return np.concatenate(parts)


def threshold_from_histograms(
    rule: str,
    anchor_scores,
    counts_per_site: Sequence[np.ndarray],
    edges,
    *,
    quantile: float = 0.1,
    static: float = 0.0,
) -> float:
    """Server side: :func:`clues_fl.selection.rules.global_threshold` from sites' histograms.

    The sites' counts are summed; a rule that needs the pooled scores (``mixture``, ``anchor-f1``)
    gets :func:`pseudo_scores` of the pooled histogram in their place. Anchor-only
    rules (``anchor-mean``, ``anchor-quantile``) and ``static`` ignore the counts,
    and ``ratio`` raises exactly as in ``global_threshold``.
    """
    e = _check_edges(edges)
    if rule == "ratio" or not threshold_rule(rule).uses_pool:
        return global_threshold(rule, anchor_scores, None, quantile=quantile, static=static)
    if not counts_per_site:
        raise ValueError(f"threshold rule '{rule}' needs at least one site's histogram counts")
    return global_threshold(rule, anchor_scores, pooled_pseudo_scores(counts_per_site, e),
                            quantile=quantile, static=static)


def pooled_pseudo_scores(counts_per_site: Sequence[np.ndarray], edges) -> np.ndarray:
    """:func:`pseudo_scores` of the sites' summed counts: the one way the server turns
    histograms into pooled scores (threshold rules, clean-share estimate). Spreading each
    site's bin on its own instead would place the same counts at other points."""
    e = _check_edges(edges)
    pooled = np.zeros(e.size - 1, dtype=np.int64)
    for counts in counts_per_site:
        c = np.asarray(counts).ravel()
        if c.size != pooled.size:
            raise ValueError(f"a site reported {c.size} bins but edges define {pooled.size}")
        pooled += np.rint(c).astype(np.int64)
    return pseudo_scores(pooled, e)


# -- 2. differential privacy: the Gaussian mechanism ------------------------------
def clip_range(anchor_scores, span: float = 3.0) -> tuple[float, float]:
    """Public clipping range ``(m - span*s, m + span*s)`` from the anchor scores.

    ``m, s = robust_centre_spread(anchor_scores)``; the server sends it to sites.
    The noise scales with ``hi - lo = 2*span*s``, so the range is kept narrow: with
    the default ``span = 3`` almost all clean (anchor-like) scores are unclipped and
    polluted scores far below are clipped to ``lo``, which is still far below any
    threshold. (The keep decision itself uses a site's unclipped scores.)
    """
    span = _check_span(span, "privacy.clip-span")
    centre, spread = robust_centre_spread(anchor_scores)
    return centre - span * spread, centre + span * spread


def dp_enabled(epsilon: float) -> bool:
    """``privacy.epsilon`` in ``(0, inf)`` turns DP on; ``<= 0`` or ``inf`` means off."""
    epsilon = float(epsilon)
    if math.isnan(epsilon):
        raise ValueError("privacy.epsilon is NaN")
    return 0.0 < epsilon < math.inf


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"privacy.delta must be in (0, 1) when privacy.epsilon > 0, got {delta}")
    return delta


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    """Smallest ``delta`` for which ``N(0, sigma^2)`` noise is ``(epsilon, delta)``-DP.

    Balle & Wang (2018), Theorem 8: with ``a = sensitivity / (2 sigma)`` and
    ``b = epsilon sigma / sensitivity``,
    ``delta = Phi(a - b) - exp(epsilon) Phi(-a - b)`` (exact, for every epsilon).
    The second term is computed in log space so large epsilons do not overflow.
    """
    if not (sigma > 0 and sensitivity > 0):
        raise ValueError(f"sigma and sensitivity must be positive, got {sigma}, {sensitivity}")
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    return float(ndtr(a - b) - math.exp(epsilon + float(log_ndtr(-a - b))))


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float, *, method: str = "analytic") -> float:
    """Noise standard deviation of the Gaussian mechanism for ``(epsilon, delta)``-DP.

    - ``analytic`` (default, any epsilon > 0): the *smallest* sigma with
      ``gaussian_delta(sigma, epsilon, sensitivity) <= delta`` (the analytic Gaussian
      mechanism, Balle & Wang 2018), found by bisection on ``log sigma`` (delta is
      decreasing in sigma). Always <= the classic value where that one is valid.
    - ``classic``: ``sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon`` (Dwork & Roth,
      Thm A.1), only valid for ``epsilon <= 1``.

    DP off (``epsilon <= 0`` or ``inf``, see :func:`dp_enabled`) returns 0.
    """
    if not dp_enabled(epsilon):
        return 0.0
    delta = _check_delta(delta)
    sensitivity = float(sensitivity)
    if not (sensitivity > 0 and math.isfinite(sensitivity)):
        raise ValueError(f"sensitivity must be positive and finite, got {sensitivity}")
    if method == "classic":
        if epsilon > 1.0:
            raise ValueError(f"the classic Gaussian calibration needs privacy.epsilon <= 1, got {epsilon}")
        return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon
    if method != "analytic":
        raise ValueError(f"unknown sigma calibration '{method}': expected 'analytic' or 'classic'")
    # Bracket in units of the sensitivity: delta(sigma) -> 1 as sigma -> 0, -> 0 as sigma -> inf.
    lo, hi = math.log(1e-3), math.log(1.0)
    while gaussian_delta(math.exp(lo), epsilon) <= delta:
        lo -= 2.0
    while gaussian_delta(math.exp(hi), epsilon) > delta:
        hi += 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gaussian_delta(math.exp(mid), epsilon) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    return sensitivity * math.exp(hi)  # hi side: delta(sigma) <= target


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def privatise_scores(scores, lo: float, hi: float, epsilon: float, delta: float, rng) -> np.ndarray:
    """Site side: clip each score to ``[lo, hi]`` and add ``N(0, sigma^2)`` noise.

    Accounting (per sample, per run): each reported score is one release about one
    sample. Replacing that sample moves its clipped score by at most ``hi - lo`` (the
    sensitivity), and, given the fixed scoring model, the other entries of the vector
    do not depend on it; the samples are disjoint, so every sample gets
    ``(epsilon, delta)``-DP for this report (parallel composition). Scoring again
    (another run or round) composes. Not covered: the number of reported scores (the
    site's size), which samples are NaN (unscorable, reported as NaN), and the
    adapter updates, which need their own DP (Flower's DP wrappers). ``sigma`` is
    :func:`gaussian_sigma` (analytic). ``lo``/``hi`` must be public (:func:`clip_range`),
    not derived from the site's scores.

    DP off (``epsilon <= 0`` or ``inf``) returns the scores unchanged (as a float
    array copy, without clipping). ``rng``: a ``np.random.Generator`` or a seed.
    """
    arr = np.array(scores, dtype=float)
    if not dp_enabled(epsilon):
        return arr
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"the clip range must be finite with lo < hi, got ({lo}, {hi}); "
                         "derive it from the anchor scores with clip_range (privacy.clip-span)")
    sigma = gaussian_sigma(epsilon, delta, hi - lo)
    return np.clip(arr, lo, hi) + _rng(rng).normal(0.0, sigma, size=arr.shape)


def privatise_counts(counts, epsilon: float, delta: float, rng) -> np.ndarray:
    """Site side: Gaussian noise on histogram counts, rounded and clipped at 0.

    Adding or removing one sample changes one bin by 1 (L2 sensitivity 1), so the
    whole count vector is one ``(epsilon, delta)``-DP release per run under add/remove
    adjacency (replace-one adjacency would be sensitivity sqrt(2)); rounding and
    clipping are post-processing. Unlike per-sample scores, the site's size is
    protected too (the noisy total). DP off returns the counts unchanged.
    """
    c = np.asarray(counts)
    if not dp_enabled(epsilon):
        return c.copy()
    sigma = gaussian_sigma(epsilon, delta, 1.0)
    noisy = c.astype(float) + _rng(rng).normal(0.0, sigma, size=c.shape)
    return np.maximum(np.rint(noisy), 0).astype(np.int64)


# -- 3. offline F1-vs-epsilon curve --------------------------------------------------
def _f1(scores: np.ndarray, polluted: np.ndarray, threshold: float) -> float:
    kept = keep(scores, {"threshold": threshold})
    return float(selection_metrics(confusion_counts(kept, polluted))["f1"])


def selection_f1_under_noise(
    scores,
    polluted_flags,
    anchor_scores,
    epsilons: Sequence[float],
    delta: float,
    rule: str,
    seeds: Sequence[int],
    *,
    quantile: float = 0.1,
    static: float = 0.0,
    report: str = "scores",
    clip_span: float = 3.0,
    bins: int = 64,
    span: float = 6.0,
    site_ids=None,
) -> list[dict]:
    """Selection F1 when the sites' reports are made (epsilon, delta)-DP, per epsilon.

    ``scores``: every sample's score (clean and polluted, e.g. from a run's manifest);
    ``polluted_flags``: which are polluted; ``anchor_scores``: the server's public
    anchor scores, never noised. For each epsilon and seed the reports are
    privatised (``report="scores"``: :func:`privatise_scores` with :func:`clip_range`;
    ``"histogram"``: :func:`privatise_counts` of :func:`histogram_counts`, one
    histogram per site given by ``site_ids``, one site if None), the server's
    threshold is derived from them, and, as on a real site, the keep decision
    applies that threshold to the *true* scores. Hence anchor-only rules and
    ``static`` are unaffected by the noise (flat curve); ``mixture`` is the rule the
    curve is about.

    Returns one dict per epsilon: ``epsilon``, ``sigma`` (noise std per reported
    value), ``f1_mean``, ``f1_std``, ``threshold_mean``, ``threshold_std`` (over
    ``seeds``), ``n_seeds``, and two references that do not depend on epsilon:
    ``f1_noiseless`` / ``threshold_noiseless``, the same report without noise (scores
    clipped to the clip range, or the noiseless histogram), which large epsilons
    approach, and ``f1_raw`` / ``threshold_raw``, raw per-sample scores (no privacy
    mode at all). An epsilon that turns DP off (``<= 0`` or ``inf``) gives the
    noiseless values.
    """
    s = np.asarray(scores, dtype=float).ravel()
    polluted = np.asarray(polluted_flags).ravel()
    if polluted.shape != s.shape:
        raise ValueError(f"scores has {s.size} entries but polluted_flags has {polluted.size}")
    if report not in REPORT_MODES:
        raise ValueError(f"unknown privacy.report '{report}': expected one of {', '.join(REPORT_MODES)}")
    if not len(seeds):
        raise ValueError("seeds must not be empty")
    kw = {"quantile": quantile, "static": static}

    if report == "scores":
        lo, hi = clip_range(anchor_scores, clip_span)
        sensitivity = hi - lo

        def threshold(eps: float, rng) -> float:
            reported = privatise_scores(s, lo, hi, eps, delta, rng) if rng is not None else np.clip(s, lo, hi)
            return global_threshold(rule, anchor_scores, reported, **kw)
    else:
        edges = histogram_edges(anchor_scores, bins, span)
        sensitivity = 1.0
        sites = np.zeros(s.size, dtype=int) if site_ids is None else np.asarray(site_ids).ravel()
        if sites.shape != s.shape:
            raise ValueError(f"scores has {s.size} entries but site_ids has {sites.size}")
        counts = [histogram_counts(s[sites == k], edges) for k in np.unique(sites)]

        def threshold(eps: float, rng) -> float:
            reported = [privatise_counts(c, eps, delta, rng) for c in counts] if rng is not None else counts
            return threshold_from_histograms(rule, anchor_scores, reported, edges, **kw)

    t_raw = global_threshold(rule, anchor_scores, s, **kw)
    t0 = threshold(0.0, None)
    refs = {
        "f1_noiseless": _f1(s, polluted, t0), "threshold_noiseless": float(t0),
        "f1_raw": _f1(s, polluted, t_raw), "threshold_raw": float(t_raw),
    }
    out = []
    for eps in epsilons:
        eps = float(eps)
        if dp_enabled(eps):
            ts = [threshold(eps, np.random.default_rng(seed)) for seed in seeds]
        else:
            ts = [t0] * len(seeds)
        f1s = [_f1(s, polluted, t) for t in ts]
        out.append({
            "epsilon": eps,
            "sigma": gaussian_sigma(eps, delta, sensitivity),
            "f1_mean": float(np.mean(f1s)),
            "f1_std": float(np.std(f1s)),
            "threshold_mean": float(np.mean(ts)),
            "threshold_std": float(np.std(ts)),
            "n_seeds": len(seeds),
            **refs,
        })
    return out
