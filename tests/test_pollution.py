from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clues_fl.data.sources import Sample
from clues_fl.data.pollution import (
    DEFAULT_KINDS,
    KINDS,
    LOW_QUALITY_KINDS,
    parse_ratios,
    pollute,
)

TEXT_KINDS = ["exchange", "cut", "delete"]

words = st.text(alphabet="abcxyz", min_size=1, max_size=6)
answers = st.lists(words, min_size=1, max_size=12).map(" ".join)


@st.composite
def pools(draw, min_size=1):
    n = draw(st.integers(min_size, 30))
    ans = draw(st.lists(answers, min_size=n, max_size=n))
    return [Sample(f"id{i}", f"question {i}?", a, domain="med") for i, a in enumerate(ans)]


def donors(n=5):
    return [Sample(f"d{i}", f"donor question {i}?", f"donor answer {i}", domain="fin") for i in range(n)]


kind_lists = st.lists(st.sampled_from(KINDS), min_size=1, max_size=5, unique=True)


@settings(max_examples=60, deadline=None)
@given(pool=pools(min_size=2), ratio=st.floats(0, 1), kinds=kind_lists, seed=st.integers(0, 2**32))
def test_pollute_properties(pool, ratio, kinds, seed):
    out = pollute(pool, ratio, kinds, donors=donors(), seed=seed)
    assert [s.id for s in out] == [s.id for s in pool]
    polluted = [s for s in out if s.polluted]
    assert len(polluted) == round(ratio * len(pool))
    assert all(s.pollution in kinds for s in polluted)
    # round-robin: kind counts differ by at most one
    counts = [sum(s.pollution == k for s in polluted) for k in kinds]
    assert max(counts) - min(counts) <= 1
    for before, after in zip(pool, out):
        if not after.polluted:
            assert after == before and after is not before
            assert after.pollution == ""
    assert all(not s.polluted for s in pool)  # inputs untouched
    assert pollute(pool, ratio, kinds, donors=donors(), seed=seed) == out


@settings(max_examples=60, deadline=None)
@given(pool=pools(min_size=2), ratio=st.floats(0.05, 1), kind=st.sampled_from(TEXT_KINDS), seed=st.integers(0, 2**32))
def test_polluted_text_differs(pool, ratio, kind, seed):
    out = pollute(pool, ratio, [kind], donors=None, seed=seed)
    distinct_answers = len({s.answer for s in pool}) > 1
    for before, after in zip(pool, out):
        if not after.polluted:
            continue
        assert after.question == before.question and after.answer
        if kind == "exchange":
            if distinct_answers:
                assert after.answer != before.answer
            assert after.answer in {s.answer for s in pool}
        elif len(before.answer) > 1:
            assert after.answer != before.answer
            assert len(after.answer) < len(before.answer)


def test_exchange_is_a_derangement():
    pool = [Sample(str(i), f"q{i}", f"a{i}") for i in range(10)]
    out = pollute(pool, 1.0, ["exchange"], donors=None, seed=3)
    assert sorted(s.answer for s in out) == sorted(s.answer for s in pool)
    assert all(a.answer != b.answer for a, b in zip(pool, out))


def test_cut_and_delete_words():
    s = Sample("x", "q", "one two three four five six seven eight nine ten")
    cut = pollute([s], 1.0, ["cut"], donors=None, seed=0)[0]
    assert cut.answer == "one two three" and cut.pollution == "cut" and cut.polluted
    deleted = pollute([s], 1.0, ["delete"], donors=None, seed=0)[0]
    kept = deleted.answer.split()
    assert len(kept) == 6
    assert kept == [w for w in s.answer.split() if w in kept]  # order preserved
    two = Sample("y", "q", "alpha beta")
    assert pollute([two], 1.0, ["cut"], donors=None, seed=0)[0].answer == "alpha"
    assert len(pollute([two], 1.0, ["delete"], donors=None, seed=0)[0].answer.split()) == 1


def test_cut_keeps_formatting_of_kept_part():
    s = Sample("x", "q", "Line one\nline two\n\nline three four five six")
    assert pollute([s], 1.0, ["cut"], donors=None, seed=0)[0].answer == "Line one\nline"


def test_cross_domain():
    pool = [Sample(f"m{i}", f"mq{i}", f"ma{i}", domain="med") for i in range(4)]
    dn = donors(3) + [Sample("dm", "same domain q", "same domain a", domain="med")]
    out = pollute(pool, 0.75, ["cross-domain"], donors=dn, seed=1)
    hit = [s for s in out if s.polluted]
    assert len(hit) == 3
    assert all(s.domain == "fin" and s.question.startswith("donor") for s in hit)
    assert len({s.question for s in hit}) == 3  # donors not reused while fresh ones remain
    with pytest.raises(ValueError, match="cross-domain.*donor"):
        pollute(pool, 0.5, ["cross-domain"], donors=[], seed=1)
    with pytest.raises(ValueError, match="no donor outside domain 'med'"):
        pollute(pool, 0.5, ["cross-domain"], donors=[dn[-1]], seed=1)


def test_duplicate_copies_a_clean_sample():
    pool = [Sample(f"s{i}", f"q{i}", f"a{i}") for i in range(10)]
    out = pollute(pool, 0.3, ["duplicate"], donors=None, seed=5)
    clean = {(s.question, s.answer) for s in out if not s.polluted}
    for s in out:
        if s.polluted:
            assert s.pollution == "duplicate" and (s.question, s.answer) in clean
    assert "duplicate" not in DEFAULT_KINDS and "duplicate" not in LOW_QUALITY_KINDS


def test_near_duplicates_concentrate_on_few_clean_originals():
    pool = [Sample(f"s{i}", f"q{i}", f"w{i} x y z") for i in range(40)]
    out = pollute(pool, 0.4, ["near-duplicate"], donors=None, seed=3)
    copies = [s for s in out if s.polluted]
    assert len(copies) == 16 and all(s.pollution == "near-duplicate" for s in copies)
    sources = {s.question for s in copies}
    assert len(sources) == 4  # sqrt(16) originals
    clean = {s.question: s for s in out if not s.polluted}
    for s in copies:
        original = clean[s.question]  # the original stays in the pool, clean
        assert s.answer != original.answer and len(s.answer.split()) == len(original.answer.split()) - 1
    assert s.id not in {c.id for c in clean.values()}  # ids stay the rows' own


def test_seed_changes_choice():
    pool = [Sample(f"s{i}", f"q{i}", f"a {i} b c") for i in range(50)]
    pick = lambda seed: [s.id for s in pollute(pool, 0.2, ["cut"], donors=None, seed=seed) if s.polluted]
    assert pick(1) == pick(1) and pick(1) != pick(2)


def test_rounding_and_zero():
    pool = [Sample(f"s{i}", "q", "a b c") for i in range(7)]
    assert sum(s.polluted for s in pollute(pool, 0.5, ["cut"], donors=None, seed=0)) == round(3.5)
    assert pollute(pool, 0.0, [], donors=None, seed=0) == pool


def test_validation():
    pool = [Sample("a", "q", "x y"), Sample("b", "q", "y z")]
    with pytest.raises(ValueError, match=r"between 0 and 1"):
        pollute(pool, 1.5, ["cut"], donors=None, seed=0)
    with pytest.raises(ValueError, match=r"between 0 and 1"):
        pollute(pool, -0.1, ["cut"], donors=None, seed=0)
    with pytest.raises(ValueError, match=r"unknown pollution kind\(s\) \['swap'\]; allowed: cross-domain, exchange"):
        pollute(pool, 0.5, ["cut", "swap"], donors=None, seed=0)
    with pytest.raises(ValueError, match="at least one kind"):
        pollute(pool, 0.5, [], donors=None, seed=0)
    with pytest.raises(ValueError, match="exchange.*at least 2"):
        pollute(pool[:1], 1.0, ["exchange"], donors=None, seed=0)


def test_parse_ratios():
    assert parse_ratios("0.8,0.2,0.1,0.5") == [0.8, 0.2, 0.1, 0.5]
    assert parse_ratios(" 0 , 1 ") == [0.0, 1.0]
    with pytest.raises(ValueError, match="item 2 'abc' is not a number"):
        parse_ratios("0.1,abc")
    with pytest.raises(ValueError, match=r"item 1 '1.5' is outside \[0, 1\]"):
        parse_ratios("1.5")
    with pytest.raises(ValueError, match="outside"):
        parse_ratios("nan")
    with pytest.raises(ValueError, match="empty"):
        parse_ratios("")
    with pytest.raises(ValueError, match="item 2 '' is not a number"):
        parse_ratios("0.1,,0.2")
