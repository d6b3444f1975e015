from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clues_fl.data.sources import Sample
from clues_fl.data.splits import Splits, parse_sizes, partition, split_pool


def make(n: int, domains=("",)) -> list[Sample]:
    return [Sample(f"s{i}", f"q{i}", f"a{i}", domain=domains[i % len(domains)]) for i in range(n)]


def ids(samples) -> list[str]:
    return [s.id for s in samples]


# ------------------------------------------------------------------ split_pool


def test_split_pool_disjoint_and_covering():
    samples = make(100)
    sp = split_pool(samples, anchor_size=10, val_size=5, test_size=20, seed=0)
    assert isinstance(sp, Splits)
    assert (len(sp.anchor), len(sp.val), len(sp.test), len(sp.pool)) == (10, 5, 20, 65)
    all_ids = ids(sp.anchor) + ids(sp.val) + ids(sp.test) + ids(sp.pool)
    assert sorted(all_ids) == sorted(ids(samples))  # disjoint and complete
    anchor, val, test, pool = sp  # unpacks like a tuple
    assert anchor == sp.anchor


def test_split_pool_deterministic():
    samples = make(50)
    a = split_pool(samples, anchor_size=5, val_size=5, test_size=5, seed=7)
    b = split_pool(samples, anchor_size=5, val_size=5, test_size=5, seed=7)
    c = split_pool(samples, anchor_size=5, val_size=5, test_size=5, seed=8)
    assert a == b and ids(a.anchor) != ids(c.anchor)
    assert ids(a.anchor) != ids(samples[:5])  # actually shuffled


def test_split_pool_errors():
    with pytest.raises(ValueError, match=r"needs 35, have 30"):
        split_pool(make(30), anchor_size=10, val_size=5, test_size=20, seed=0)
    with pytest.raises(ValueError, match="val_size must be a non-negative integer"):
        split_pool(make(30), anchor_size=1, val_size=-1, test_size=1, seed=0)
    empty_pool = split_pool(make(3), anchor_size=1, val_size=1, test_size=1, seed=0)
    assert empty_pool.pool == []


# ------------------------------------------------------------------ partition


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 120), k=st.integers(1, 8), seed=st.integers(0, 1000))
def test_iid_partition_properties(n, k, seed):
    samples = make(n)
    if k > n:
        with pytest.raises(ValueError, match="would get no samples"):
            partition(samples, k, seed=seed)
        return
    parts = partition(samples, k, seed=seed)
    assert len(parts) == k and all(parts)
    flat = [s.id for p in parts for s in p]
    assert sorted(flat) == sorted(ids(samples))  # disjoint, full coverage
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [ids(p) for p in partition(samples, k, seed=seed)] == [ids(p) for p in parts]


def test_iid_partition_shuffles_with_seed():
    samples = make(40)
    a = partition(samples, 4, seed=1)
    b = partition(samples, 4, seed=2)
    assert [ids(p) for p in a] != [ids(p) for p in b]
    assert ids(a[0]) != ids(samples[:10])


def test_sized_partition():
    samples = make(400)
    parts = partition(samples, 4, sizes=[100, 100, 50, 50], seed=0)
    assert list(map(len, parts)) == [100, 100, 50, 50]
    flat = [s.id for p in parts for s in p]
    assert len(set(flat)) == 300
    assert [ids(p) for p in partition(samples, 4, sizes=[100, 100, 50, 50], seed=0)] == [ids(p) for p in parts]
    alias = partition(samples, 4, sizes=[100, 100, 50, 50], seed=0, method="sizes")
    assert [ids(p) for p in alias] == [ids(p) for p in parts]


def test_sized_partition_errors():
    samples = make(20)
    with pytest.raises(ValueError, match="add up to 25 but only 20"):
        partition(samples, 2, sizes=[10, 15], seed=0)
    with pytest.raises(ValueError, match="got 3 client sizes for 2 clients"):
        partition(samples, 2, sizes=[1, 2, 3], seed=0)
    with pytest.raises(ValueError, match="client 1: size must be a positive integer"):
        partition(samples, 2, sizes=[5, 0], seed=0)
    with pytest.raises(ValueError, match="client 3 would get no samples"):
        partition(make(3), 5, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        partition(samples, 0, seed=0)
    with pytest.raises(ValueError, match="method 'sizes' needs per-client sizes"):
        partition(samples, 2, seed=0, method="sizes")
    with pytest.raises(ValueError, match="method 'dirichlet' is not one of iid, sizes, domain"):
        partition(samples, 2, seed=0, method="dirichlet")


def test_domain_partition():
    samples = make(30, domains=("med", "fin", "law"))
    parts = partition(samples, 3, seed=0, method="domain")
    assert [{s.domain for s in p} for p in parts] == [{"fin"}, {"law"}, {"med"}]  # sorted names
    assert all(len(p) == 10 for p in parts)
    sized = partition(samples, 3, sizes=[4, 5, 6], seed=0, method="domain")
    assert list(map(len, sized)) == [4, 5, 6] and sized[2][0].domain == "med"
    assert [ids(p) for p in partition(samples, 3, sizes=[4, 5, 6], seed=0, method="domain")] == [
        ids(p) for p in sized
    ]


def test_domain_partition_errors():
    samples = make(30, domains=("med", "fin", "law"))
    with pytest.raises(ValueError, match=r"3 domains \(fin, law, med\) for 2 clients"):
        partition(samples, 2, seed=0, method="domain")
    with pytest.raises(ValueError, match=r"client 0 \(domain 'fin'\): size 11 but the domain has 10"):
        partition(samples, 3, sizes=[11, 1, 1], seed=0, method="domain")
    with pytest.raises(ValueError, match="needs a domain on every sample; 30 have none"):
        partition(make(30), 1, seed=0, method="domain")


def test_parse_sizes():
    assert parse_sizes("100,100,50,50") == [100, 100, 50, 50]
    assert parse_sizes(" 3 ") == [3]
    with pytest.raises(ValueError, match="item 2 'x' is not a whole number"):
        parse_sizes("1,x")
    with pytest.raises(ValueError, match="item 1 '1.5' is not a whole number"):
        parse_sizes("1.5")
    with pytest.raises(ValueError, match="item 2 '0' must be at least 1"):
        parse_sizes("4,0")
    with pytest.raises(ValueError, match="empty"):
        parse_sizes("")
