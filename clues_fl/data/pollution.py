"""Synthetic low-quality data, so data-selection methods can be scored against a known truth.

Every polluted sample keeps its id and position; only its text (and, for
cross-domain, its domain) changes, and ``polluted``/``pollution`` record what was done.
``duplicate`` (copies of clean samples) and ``near-duplicate`` (many near-copies of a
few clean samples: a duplicate-heavy pool) make redundancy rather than wrong answers,
so they are not part of ``DEFAULT_KINDS``/``LOW_QUALITY_KINDS``.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import replace

from clues_fl.data.sources import Sample

KINDS = ("cross-domain", "exchange", "cut", "delete", "duplicate", "near-duplicate")
LOW_QUALITY_KINDS = ("cross-domain", "exchange", "cut", "delete")
DEFAULT_KINDS = LOW_QUALITY_KINDS

CUT_KEEP = 0.3  # fraction of words kept by "cut"
DELETE_FRACTION = 0.4  # fraction of words dropped by "delete"

_WORD = re.compile(r"\S+\s*")


def _check(ratio: float, kinds: list[str]) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"pollution ratio must be between 0 and 1, got {ratio!r}")
    if isinstance(kinds, str):
        raise ValueError(f"pollution kinds must be a list, got the string {kinds!r}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown pollution kind(s) {unknown}; allowed: {', '.join(KINDS)}")
    if ratio > 0 and not kinds:
        raise ValueError(f"pollution ratio {ratio} needs at least one kind; allowed: {', '.join(KINDS)}")


def _cut(answer: str) -> str:
    words = _WORD.findall(answer.strip())
    if len(words) >= 2:
        keep = min(max(1, round(CUT_KEEP * len(words))), len(words) - 1)
        return "".join(words[:keep]).rstrip()
    text = answer.strip()  # a single word: cut its characters instead
    return text[: max(1, round(CUT_KEEP * len(text)))] if len(text) > 1 else text


def _delete(answer: str, rng: random.Random) -> str:
    words = _WORD.findall(answer.strip())
    units = words if len(words) >= 2 else list(answer.strip())  # single word: drop characters
    if len(units) < 2:
        return answer
    n_drop = min(max(1, round(DELETE_FRACTION * len(units))), len(units) - 1)
    dropped = set(rng.sample(range(len(units)), n_drop))
    return "".join(u for i, u in enumerate(units) if i not in dropped).strip()


def _derangement(n: int, rng: random.Random) -> list[int]:
    """Sattolo's shuffle: a single random cycle, so no index maps to itself (n >= 2)."""
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def pollute(
    samples: list[Sample],
    ratio: float,
    kinds: list[str],
    *,
    donors: list[Sample] | None,
    seed: int,
) -> list[Sample]:
    """Copies of `samples` with exactly round(ratio * len) of them polluted."""
    _check(ratio, kinds)
    out = [replace(s) for s in samples]
    n_polluted = round(ratio * len(samples))
    if n_polluted == 0:
        return out
    rng = random.Random(seed)
    chosen = rng.sample(range(len(samples)), n_polluted)  # random order = shuffled round-robin
    by_kind: dict[str, list[int]] = {k: [] for k in kinds}
    for j, idx in enumerate(chosen):
        by_kind[kinds[j % len(kinds)]].append(idx)
    for kind in by_kind:
        by_kind[kind].sort()  # fixed processing order keeps the RNG stream reproducible
    chosen_set = set(chosen)

    def mark(i: int, kind: str, **changes) -> None:
        out[i] = replace(samples[i], polluted=True, pollution=kind, **changes)

    if by_kind.get("cross-domain"):
        if not donors:
            raise ValueError("pollution kind 'cross-domain' needs donor samples from another domain")
        used: set[int] = set()  # avoid reusing a donor while unused ones remain
        for i in by_kind["cross-domain"]:
            eligible = [d for d, s in enumerate(donors) if s.domain != samples[i].domain]
            if not eligible:
                raise ValueError(
                    f"pollution kind 'cross-domain': no donor outside domain '{samples[i].domain}'"
                )
            pick = rng.choice([d for d in eligible if d not in used] or eligible)
            used.add(pick)
            donor = donors[pick]
            mark(i, "cross-domain", question=donor.question, answer=donor.answer, domain=donor.domain)

    exchange = by_kind.get("exchange", [])
    if exchange:
        if len(samples) < 2:
            raise ValueError("pollution kind 'exchange' needs at least 2 samples")
        if len(exchange) >= 2:
            perm = _derangement(len(exchange), rng)
            sources = [exchange[p] for p in perm]
        else:
            sources = [rng.choice([j for j in range(len(samples)) if j != exchange[0]])]
        for i, src in zip(exchange, sources):
            if samples[src].answer == samples[i].answer:  # duplicate answers: find a different one
                others = [j for j in range(len(samples)) if samples[j].answer != samples[i].answer]
                if others:
                    src = rng.choice(others)
            mark(i, "exchange", answer=samples[src].answer)

    for i in by_kind.get("cut", []):
        mark(i, "cut", answer=_cut(samples[i].answer))
    for i in by_kind.get("delete", []):
        mark(i, "delete", answer=_delete(samples[i].answer, rng))

    duplicate = by_kind.get("duplicate", [])
    if duplicate:
        if len(samples) < 2:
            raise ValueError("pollution kind 'duplicate' needs at least 2 samples")
        clean = [j for j in range(len(samples)) if j not in chosen_set]
        for i in duplicate:
            pool = clean or [j for j in range(len(samples)) if j != i]  # prefer an original that stays
            src = samples[rng.choice(pool)]
            mark(i, "duplicate", question=src.question, answer=src.answer, domain=src.domain)

    # Duplicate-heavy pools: many near-copies of a FEW originals (about sqrt of their
    # number), each copy with one answer word dropped, so redundancy concentrates.
    near = by_kind.get("near-duplicate", [])
    if near:
        clean = [j for j in range(len(samples)) if j not in chosen_set] or list(range(len(samples)))
        originals = rng.sample(clean, min(len(clean), max(1, math.isqrt(len(near)))))
        for i in near:
            src = samples[rng.choice(originals)]
            words = _WORD.findall(src.answer.strip())
            if len(words) >= 2:
                drop = rng.randrange(len(words))
                answer = "".join(w for k, w in enumerate(words) if k != drop).strip()
            else:
                answer = src.answer
            mark(i, "near-duplicate", question=src.question, answer=answer, domain=src.domain)
    return out


def parse_ratios(spec: str) -> list[float]:
    """'0.8,0.2,0.1,0.5' -> per-client pollution ratios."""
    parts = [p.strip() for p in str(spec).split(",")]
    if not any(parts):
        raise ValueError("pollution ratios: empty list (expected e.g. '0.8,0.2,0.1,0.5')")
    ratios = []
    for pos, part in enumerate(parts, start=1):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"pollution ratios: item {pos} '{part}' is not a number") from None
        if math.isnan(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"pollution ratios: item {pos} '{part}' is outside [0, 1]")
        ratios.append(value)
    return ratios
