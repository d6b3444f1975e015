"""Seeded, disjoint splits (anchor/val/test/pool) and client partitions.

Everything is a pure function of the samples and the seed, so the server and every
client can rebuild the same split without shipping data around.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

from clues_fl.data.sources import Sample

PARTITION_METHODS = ("iid", "sizes", "domain")  # "sizes": iid with explicit sizes


class Splits(NamedTuple):
    anchor: list[Sample]  # small trusted public set the gradients are aligned with
    val: list[Sample]
    test: list[Sample]
    pool: list[Sample]  # the rest: material for client training data


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _permutation(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def split_pool(
    samples: Sequence[Sample], *, anchor_size: int, val_size: int, test_size: int, seed: int
) -> Splits:
    for name, value in (("anchor_size", anchor_size), ("val_size", val_size), ("test_size", test_size)):
        _check_count(name, value)
    needed = anchor_size + val_size + test_size
    if needed > len(samples):
        raise ValueError(
            f"not enough samples: anchor_size={anchor_size} + val_size={val_size} + "
            f"test_size={test_size} needs {needed}, have {len(samples)}"
        )
    shuffled = [samples[i] for i in _permutation(len(samples), seed)]
    a, v = anchor_size, anchor_size + val_size
    return Splits(shuffled[:a], shuffled[a:v], shuffled[v:needed], shuffled[needed:])


def _iid_indices(n: int, num_clients: int, seed: int) -> list[list[int]]:
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    partitioner = IidPartitioner(num_partitions=num_clients)
    partitioner.dataset = Dataset.from_dict({"idx": _permutation(n, seed)})
    return [list(partitioner.load_partition(cid)["idx"]) for cid in range(num_clients)]


def _check_nonempty(parts: list[list[Sample]], n: int) -> None:
    for cid, part in enumerate(parts):
        if not part:
            raise ValueError(f"client {cid} would get no samples ({n} samples for {len(parts)} clients)")


def partition(
    samples: Sequence[Sample],
    num_clients: int,
    *,
    sizes: list[int] | None = None,
    seed: int,
    method: str = "iid",
) -> list[list[Sample]]:
    """Split `samples` over clients; `domain` gives client i the i-th domain (sorted).

    With `sizes`, "iid" and "sizes" both slice one seeded permutation.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if method not in PARTITION_METHODS:
        raise ValueError(f"partition method '{method}' is not one of {', '.join(PARTITION_METHODS)}")
    if method == "sizes" and sizes is None:
        raise ValueError("partition method 'sizes' needs per-client sizes (e.g. '100,100,50,50')")
    if sizes is not None:
        if len(sizes) != num_clients:
            raise ValueError(f"got {len(sizes)} client sizes for {num_clients} clients")
        for cid, size in enumerate(sizes):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"client {cid}: size must be a positive integer, got {size!r}")

    if method == "domain":
        return _by_domain(samples, num_clients, sizes, seed)
    if sizes is None:
        if num_clients > len(samples):  # checked first: flwr-datasets raises IndexError here
            raise ValueError(
                f"client {len(samples)} would get no samples ({len(samples)} samples for {num_clients} clients)"
            )
        parts = [[samples[i] for i in idx] for idx in _iid_indices(len(samples), num_clients, seed)]
        _check_nonempty(parts, len(samples))
        return parts
    if sum(sizes) > len(samples):
        raise ValueError(f"client sizes add up to {sum(sizes)} but only {len(samples)} samples are available")
    order = _permutation(len(samples), seed)
    parts, start = [], 0
    for size in sizes:
        parts.append([samples[i] for i in order[start : start + size]])
        start += size
    return parts


def _by_domain(
    samples: Sequence[Sample], num_clients: int, sizes: list[int] | None, seed: int
) -> list[list[Sample]]:
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.domain, []).append(s)
    if "" in groups:
        raise ValueError(
            f"partition method 'domain' needs a domain on every sample; {len(groups[''])} have none"
        )
    names = sorted(groups)
    if len(names) != num_clients:
        raise ValueError(
            f"partition method 'domain' needs one client per domain: {len(names)} domains "
            f"({', '.join(names)}) for {num_clients} clients"
        )
    parts = []
    for cid, name in enumerate(names):
        group = groups[name]
        shuffled = [group[i] for i in _permutation(len(group), seed + cid)]
        if sizes is not None:
            if sizes[cid] > len(group):
                raise ValueError(
                    f"client {cid} (domain '{name}'): size {sizes[cid]} but the domain has {len(group)} samples"
                )
            shuffled = shuffled[: sizes[cid]]
        parts.append(shuffled)
    return parts


def parse_sizes(spec: str) -> list[int]:
    """'100,100,50,50' -> per-client sample counts."""
    parts = [p.strip() for p in str(spec).split(",")]
    if not any(parts):
        raise ValueError("client sizes: empty list (expected e.g. '100,100,50,50')")
    sizes = []
    for pos, part in enumerate(parts, start=1):
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"client sizes: item {pos} '{part}' is not a whole number") from None
        if value < 1:
            raise ValueError(f"client sizes: item {pos} '{part}' must be at least 1")
        sizes.append(value)
    return sizes
