"""Privacy modes for site reports: histograms from anchor-derived edges, Gaussian DP."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.stats import norm

from clues_fl.selection.privacy import (
    clip_range,
    dp_enabled,
    gaussian_delta,
    gaussian_sigma,
    histogram_counts,
    histogram_edges,
    privatise_counts,
    privatise_scores,
    pseudo_scores,
    robust_centre_spread,
    selection_f1_under_noise,
    threshold_from_histograms,
)
from clues_fl.selection.rules import global_threshold, keep_mask


def synthetic(seed: int, n: int = 400, clean_fraction: float = 0.6, n_anchor: int = 16):
    """clean ~ N(1, 0.3), polluted ~ N(-1, 0.3); anchors from the clean component."""
    rng = np.random.default_rng(seed)
    n_clean = round(clean_fraction * n)
    scores = np.concatenate([rng.normal(1.0, 0.3, n_clean), rng.normal(-1.0, 0.3, n - n_clean)])
    polluted = np.arange(n) >= n_clean
    anchors = rng.normal(1.0, 0.3, n_anchor)
    return anchors, scores, polluted


# -- histogram mode ---------------------------------------------------------------
def test_edges_are_a_uniform_grid_around_the_anchor_median():
    anchors, _, _ = synthetic(0)
    edges = histogram_edges(anchors, bins=64, span=6.0)
    centre, spread = robust_centre_spread(anchors)
    assert edges.size == 65  # 64 bins, the two open-ended outer bins included
    assert edges[0] == -np.inf and edges[-1] == np.inf
    finite = edges[1:-1]
    np.testing.assert_allclose(np.diff(finite), 12 * spread / 62)
    np.testing.assert_allclose([finite[0], finite[-1]], [centre - 6 * spread, centre + 6 * spread])
    assert centre == pytest.approx(np.median(anchors))


def test_edges_depend_only_on_the_anchors():
    anchors, _, _ = synthetic(1)
    edges = histogram_edges(anchors)
    # the function sees nothing but the anchors: order does not matter, and a shift or
    # positive rescaling of the anchors moves the grid with them
    np.testing.assert_array_equal(histogram_edges(anchors[::-1]), edges)
    np.testing.assert_allclose(histogram_edges(2.0 * anchors + 3.0)[1:-1], 2.0 * edges[1:-1] + 3.0)
    # the same anchors give the same edges whatever the sites hold
    other_anchors, _, _ = synthetic(2)
    assert not np.allclose(histogram_edges(other_anchors)[1:-1], edges[1:-1])


def test_spread_fallbacks():
    # MAD 0 (most anchors tied): the std is used; all tied: 1.0
    tied = np.array([1.0] * 10 + [2.0, 4.0])
    assert robust_centre_spread(tied) == (1.0, pytest.approx(np.std(tied, ddof=1)))
    assert robust_centre_spread([0.5] * 8) == (0.5, 1.0)
    edges = histogram_edges([0.5] * 8, bins=8, span=3.0)
    np.testing.assert_allclose(edges[1:-1], np.linspace(-2.5, 3.5, 7))
    with pytest.raises(ValueError, match="anchor_scores"):
        histogram_edges([1.0, np.nan])


def test_counts_sum_to_n_and_bins_are_half_open():
    anchors, scores, _ = synthetic(3)
    edges = histogram_edges(anchors)
    counts = histogram_counts(scores, edges)
    assert counts.dtype.kind == "i" and counts.size == 64
    assert counts.sum() == scores.size
    np.testing.assert_array_equal(counts, np.histogram(scores, edges)[0])
    # a score on an edge goes to the bin above it (keep = score >= threshold)
    on_edge = histogram_counts([edges[10]], edges)
    assert on_edge[10] == 1 and on_edge.sum() == 1
    # far-out scores land in the outer bins; NaN (unscorable) is not counted
    out = histogram_counts([-1e9, 1e9, np.nan], edges)
    assert out[0] == 1 and out[-1] == 1 and out.sum() == 2


def test_pseudo_scores_reproduce_the_histogram():
    anchors, scores, _ = synthetic(4)
    edges = histogram_edges(anchors, bins=16)
    counts = histogram_counts(scores, edges)
    pseudo = pseudo_scores(counts, edges)
    assert pseudo.size == scores.size
    np.testing.assert_array_equal(histogram_counts(pseudo, edges), counts)
    one = np.zeros(16, dtype=int)
    one[5] = 1
    assert pseudo_scores(one, edges)[0] == pytest.approx((edges[5] + edges[6]) / 2)
    with pytest.raises(ValueError, match="non-negative"):
        pseudo_scores(-one, edges)
    with pytest.raises(ValueError, match="bins"):
        pseudo_scores(one[:-1], edges)


def test_histogram_threshold_matches_the_raw_threshold():
    """64 bins: thresholds within one bin width, keep decisions agree on >= 98%.

    Anchor-only rules and ``static`` ignore the counts, so they agree exactly. The
    mixture rule's argmax of expected F1 is ill-conditioned when the objective is
    flat (in the gap between clean and polluted scores, or with a poorly estimated
    clean fraction): in seed 3 (anchors drawn high, clean fraction estimated 0.38
    instead of 0.6) binning moves that estimate by 0.007 and the threshold jumps from
    0.77 to 0.96. So the criterion is required on most seeds (40 seeds simulated:
    80% within one bin, 97.5% with >= 98% agreement, seed 3 the only one below 95%).
    """
    good, good_f1 = [], []
    for seed in range(8):
        anchors, scores, _ = synthetic(seed)
        edges = histogram_edges(anchors, bins=64)
        width = edges[2] - edges[1]
        # two sites: the server only sees their counts
        counts = [histogram_counts(scores[::2], edges), histogram_counts(scores[1::2], edges)]
        assert sum(c.sum() for c in counts) == scores.size
        for rule in ("anchor-mean", "anchor-quantile", "static"):
            raw = global_threshold(rule, anchors, scores, quantile=0.1, static=0.25)
            hist = threshold_from_histograms(rule, anchors, counts, edges, quantile=0.1, static=0.25)
            assert hist == raw
        raw = global_threshold("mixture", anchors, scores)
        hist = threshold_from_histograms("mixture", anchors, counts, edges)
        agree = np.mean(keep_mask(scores, threshold=raw) == keep_mask(scores, threshold=hist))
        good.append(abs(hist - raw) <= width and agree >= 0.98)
        # anchor-f1 reads the pooled scores too (pseudo-scores from the counts)
        raw = global_threshold("anchor-f1", anchors, scores)
        hist = threshold_from_histograms("anchor-f1", anchors, counts, edges)
        good_f1.append(np.mean(keep_mask(scores, threshold=raw) == keep_mask(scores, threshold=hist)) >= 0.95)
    assert sum(good) >= 6, good
    assert sum(good_f1) >= 6, good_f1


def test_histogram_threshold_checks_its_inputs():
    anchors, scores, _ = synthetic(5)
    edges = histogram_edges(anchors)
    counts = [histogram_counts(scores, edges)]
    with pytest.raises(ValueError, match="ratio"):
        threshold_from_histograms("ratio", anchors, counts, edges)
    with pytest.raises(ValueError, match="bins"):
        threshold_from_histograms("mixture", anchors, [counts[0][:-1]], edges)
    with pytest.raises(ValueError, match="at least one site"):
        threshold_from_histograms("mixture", anchors, [], edges)
    with pytest.raises(ValueError, match="privacy.bins"):
        histogram_edges(anchors, bins=2)
    with pytest.raises(ValueError, match="privacy.span"):
        histogram_edges(anchors, span=0.0)
    with pytest.raises(ValueError, match="edges"):
        histogram_counts(scores, edges[1:])


# -- Gaussian mechanism -------------------------------------------------------------
def test_classic_sigma_formula():
    assert gaussian_sigma(0.5, 1e-5, 2.0, method="classic") == pytest.approx(
        2.0 * math.sqrt(2 * math.log(1.25e5)) / 0.5
    )
    assert gaussian_sigma(1.0, 1e-5, 1.0, method="classic") == pytest.approx(4.8448052626)
    with pytest.raises(ValueError, match="privacy.epsilon <= 1"):
        gaussian_sigma(2.0, 1e-5, 1.0, method="classic")


@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-8])
@pytest.mark.parametrize("epsilon", [0.01, 0.1, 0.5, 1.0, 2.0, 8.0, 50.0])
def test_analytic_sigma_achieves_the_target_delta(epsilon, delta):
    sigma = gaussian_sigma(epsilon, delta, 1.0)
    achieved = gaussian_delta(sigma, epsilon)
    assert achieved <= delta
    assert achieved == pytest.approx(delta, rel=1e-6, abs=1e-12)
    # the smallest such sigma: a little less noise breaks the target
    assert gaussian_delta(sigma * (1 - 1e-6), epsilon) > delta
    if epsilon < 1:
        assert sigma < gaussian_sigma(epsilon, delta, 1.0, method="classic")
    # linear in the sensitivity
    assert gaussian_sigma(epsilon, delta, 3.5) == pytest.approx(3.5 * sigma, rel=1e-9)


@pytest.mark.parametrize(("epsilon", "sigma"), [(0.5, 2.0), (1.0, 3.73), (4.0, 0.6)])
def test_gaussian_delta_matches_the_hockey_stick_divergence(epsilon, sigma):
    """Independent check: delta = integral of max(0, p - e^eps q), p = N(0, s^2), q = N(1, s^2)."""
    crossing = 0.5 - epsilon * sigma**2  # p >= e^eps q left of this point
    integral, _ = quad(lambda x: norm.pdf(x, 0, sigma) - math.exp(epsilon) * norm.pdf(x, 1, sigma),
                       -np.inf, crossing, epsabs=1e-13)
    assert gaussian_delta(sigma, epsilon) == pytest.approx(integral, rel=1e-6, abs=1e-12)


def test_known_analytic_value_and_monotone_in_epsilon():
    assert gaussian_sigma(1.0, 1e-5, 1.0) == pytest.approx(3.7306, abs=1e-4)
    sigmas = [gaussian_sigma(e, 1e-5, 1.0) for e in (0.05, 0.1, 0.5, 1, 2, 5, 10, 100, 1e4)]
    assert all(a > b > 0 for a, b in itertools.pairwise(sigmas))


def test_noise_std_matches_sigma():
    rng = np.random.default_rng(7)
    lo, hi = 0.0, 1.0
    scores = np.full(20_000, 0.5)  # inside the clip range: only the noise moves them
    sigma = gaussian_sigma(1.0, 1e-5, hi - lo)
    noise = privatise_scores(scores, lo, hi, 1.0, 1e-5, rng) - scores
    assert abs(noise.mean()) < 0.05 * sigma
    assert noise.std() == pytest.approx(sigma, rel=0.03)

    counts = np.full(20_000, 1000)
    noisy = privatise_counts(counts, 1.0, 1e-5, np.random.default_rng(8))
    assert noisy.dtype.kind == "i"
    assert (noisy - counts).std() == pytest.approx(gaussian_sigma(1.0, 1e-5, 1.0), rel=0.03)


def test_seeded_noise_is_reproducible():
    scores = np.linspace(-1, 1, 50)
    a = privatise_scores(scores, -1, 1, 1.0, 1e-5, 3)
    b = privatise_scores(scores, -1, 1, 1.0, 1e-5, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


def test_counts_are_rounded_and_clipped_at_zero():
    noisy = privatise_counts(np.zeros(5000, dtype=int), 0.5, 1e-5, np.random.default_rng(0))
    assert noisy.dtype.kind == "i" and noisy.min() == 0 and noisy.max() > 0


@pytest.mark.parametrize("epsilon", [0.0, -1.0, math.inf])
def test_dp_off_is_the_identity(epsilon):
    assert not dp_enabled(epsilon)
    scores = np.array([-5.0, 0.3, 7.0, np.nan])  # outside the clip range: not clipped either
    out = privatise_scores(scores, 0.0, 1.0, epsilon, 1e-5, 0)
    np.testing.assert_array_equal(out, scores)
    assert out is not scores
    counts = np.array([0, 3, 10])
    np.testing.assert_array_equal(privatise_counts(counts, epsilon, 1e-5, 0), counts)
    assert gaussian_sigma(epsilon, 1e-5, 1.0) == 0.0
    # delta only matters when DP is on
    np.testing.assert_array_equal(privatise_scores(scores, 0.0, 1.0, epsilon, 0.0, 0), scores)


def test_clipping_is_applied():
    scores = np.array([-100.0, 0.2, 0.8, 100.0])
    out = privatise_scores(scores, 0.0, 1.0, 1e4, 1e-5, np.random.default_rng(0))
    sigma = gaussian_sigma(1e4, 1e-5, 1.0)
    assert sigma < 0.01
    np.testing.assert_allclose(out, [0.0, 0.2, 0.8, 1.0], atol=6 * sigma)


def test_clip_range_is_public_and_anchor_derived():
    anchors, _, _ = synthetic(6)
    centre, spread = robust_centre_spread(anchors)
    lo, hi = clip_range(anchors, span=3.0)
    assert (lo, hi) == (pytest.approx(centre - 3 * spread), pytest.approx(centre + 3 * spread))
    with pytest.raises(ValueError, match="privacy.clip-span"):
        clip_range(anchors, span=-1.0)


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.1, 1.5])
def test_invalid_delta_names_the_config_key(delta):
    with pytest.raises(ValueError, match=r"privacy\.delta"):
        privatise_scores([0.5], 0.0, 1.0, 1.0, delta, 0)
    with pytest.raises(ValueError, match=r"privacy\.delta"):
        privatise_counts([3], 1.0, delta, 0)


def test_invalid_clip_range_and_epsilon():
    with pytest.raises(ValueError, match=r"lo < hi.*privacy\.clip-span"):
        privatise_scores([0.5], 1.0, 1.0, 1.0, 1e-5, 0)
    with pytest.raises(ValueError, match=r"lo < hi"):
        privatise_scores([0.5], 2.0, 1.0, 1.0, 1e-5, 0)
    with pytest.raises(ValueError, match=r"privacy\.epsilon"):
        privatise_scores([0.5], 0.0, 1.0, math.nan, 1e-5, 0)


# -- F1 against epsilon -------------------------------------------------------------
def test_f1_improves_with_epsilon_and_reaches_the_noiseless_f1():
    anchors, scores, polluted = synthetic(11)
    epsilons = [0.05, 1.0, 1e4, 0.0]
    rows = selection_f1_under_noise(scores, polluted, anchors, epsilons, 1e-5, "mixture", seeds=range(3))
    assert [r["epsilon"] for r in rows] == epsilons
    first, last, off = rows[0], rows[2], rows[3]
    assert first["sigma"] > rows[1]["sigma"] > last["sigma"] > 0 and off["sigma"] == 0
    assert first["f1_mean"] <= last["f1_mean"]
    assert first["f1_mean"] < first["f1_noiseless"] - 0.05  # heavy noise hurts
    assert last["f1_mean"] == pytest.approx(last["f1_noiseless"], abs=0.01)
    assert off["f1_mean"] == off["f1_noiseless"] and off["f1_std"] == 0.0
    assert last["f1_raw"] == pytest.approx(last["f1_noiseless"], abs=0.02)  # clipping costs little


def test_f1_curve_histogram_mode_and_anchor_rules():
    anchors, scores, polluted = synthetic(12)
    sites = np.arange(scores.size) % 3
    rows = selection_f1_under_noise(scores, polluted, anchors, [1e4], 1e-5, "mixture", seeds=range(2),
                                    report="histogram", site_ids=sites)
    assert rows[0]["f1_mean"] == pytest.approx(rows[0]["f1_noiseless"], abs=0.01)
    # anchor-only rules: the keep decision uses the true scores and the (public, exact)
    # anchors, so noise on the reports cannot change it
    rows = selection_f1_under_noise(scores, polluted, anchors, [0.1, 10.0], 1e-5, "anchor-quantile", seeds=range(2))
    assert all(r["f1_mean"] == r["f1_raw"] and r["f1_std"] == 0.0 for r in rows)
    with pytest.raises(ValueError, match="privacy.report"):
        selection_f1_under_noise(scores, polluted, anchors, [1.0], 1e-5, "mixture", [0], report="bins")


def test_the_server_pools_histograms_once_as_threshold_from_histograms_does():
    """Two sites' histograms give the server's pooled scores exactly as the offline path
    pools them (summed counts, spread once), not each site's bins spread on their own."""
    from types import SimpleNamespace

    from clues_fl.config import parse_config
    from clues_fl.selection import privacy
    from clues_fl.server.scores import pooled_scores
    from clues_fl.server.state import ProtocolState

    rng = np.random.default_rng(3)
    anchors = rng.normal(0.5, 0.1, 16)
    edges = privacy.histogram_edges(anchors, bins=16)
    counts = [privacy.histogram_counts(rng.normal(0.4, 0.2, n), edges) for n in (7, 13)]
    cfg = parse_config({"privacy.report": "histogram", "privacy.bins": 16})
    state = ProtocolState(anchor={"scores": anchors.tolist()})
    sites = [SimpleNamespace(histogram=c, scores=np.array([])) for c in counts]
    pooled = pooled_scores(state, sites, cfg)
    np.testing.assert_array_equal(pooled, privacy.pooled_pseudo_scores(counts, edges))
    assert privacy.histogram_counts(pooled, edges).tolist() == (counts[0] + counts[1]).tolist()
    for rule in ("mixture", "anchor-f1"):
        expected = privacy.threshold_from_histograms(rule, anchors, counts, edges)
        assert global_threshold(rule, anchors, pooled) == expected
