"""What `selection.method="clues+"` costs on top of CLUES, side by side in one process.

One site of the demo's size (80 FiQA samples, max 128 tokens, 3 checkpoints, 16 anchors,
LoRA r=16 on q,v of layers 22-29). Checkpoint adapters are random (timings do not depend
on values), so there is no trace. Timed, each with its own prefix-cache build:

  site, CLUES:   the scoring pass (bench.score over the 3 checkpoints)
  site, extra:   clues+'s signals on top of it (base-model forwards over the samples,
                 the answers alone and the answers' ends; the sentence encoder over the
                 questions and answers; near-duplicates from the text)
  server, CLUES: the anchors' leave-one-out scores
  server, extra: the anchors' signals (their losses at each checkpoint, the three
                 base-model forwards)

    python benchmarks/clues_plus_cost.py [--samples 80] [--k 3] [--max-length 128]
"""

from __future__ import annotations

import argparse
import time

import torch

from clues_fl.config import parse_config
from clues_fl.data.scenario import build_scenario
from clues_fl.runtime import score_settings, workbench
from clues_fl.scoring import signals as sg
from clues_fl.model.training import Checkpoint
from clues_fl.scoring.scorers import CluesPlusScorer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=80)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()
    cfg = parse_config({"lora.layers": "22-29", "lora.r": 16, "lora.alpha": 16, "data.max-length": args.max_length,
                        "data.anchor-size": 16, "data.samples-per-client": args.samples,
                        "pollution.ratios": "0.5", "pollution.types": "cross-domain,exchange,cut,delete"})
    data = build_scenario(cfg, 1)
    bench = workbench(cfg)
    samples, enc = data.clients[0], bench.encode(data.clients[0], cfg)
    anchors = bench.encode(data.anchor, cfg)
    gen = torch.Generator().manual_seed(0)
    ckpts = [Checkpoint({n: p.detach().clone() + 0.01 * torch.randn(p.shape, generator=gen)
                         for n, p in bench.initial_state.items()}, 1e-4) for _ in range(args.k)]
    times = {}

    t = time.perf_counter()
    a_cache = bench.cache(anchors, cfg)
    side = bench.anchor_scores(anchors, ckpts, cfg, cache=a_cache)
    times["server, CLUES (anchors' leave-one-out scores)"] = time.perf_counter() - t
    t = time.perf_counter()
    CluesPlusScorer(score_settings(cfg)).anchor_signals(bench, anchors, ckpts, cfg, side.scores, data.anchor,
                                                    a_cache)
    times["server, clues+ extra (anchors' signals)"] = time.perf_counter() - t

    t = time.perf_counter()
    cache = bench.cache(enc, cfg)
    res = bench.score(enc, ckpts, side.gradients, cfg, cache=cache)
    times[f"site, CLUES (scoring {len(enc)} samples)"] = time.perf_counter() - t
    t = time.perf_counter()
    sg.compute_signals(bench, samples, enc, cfg, clues_scores=res.scores, losses=res.losses, cache=cache,
                       names=sg.DEFAULT_SIGNALS)
    times["site, clues+ extra (signals)"] = time.perf_counter() - t

    cut = sum(e.truncated for e in enc)
    print(f"{len(enc)} samples, {cut} cut at data.max-length={args.max_length}")
    for name, sec in times.items():
        print(f"{name:<52}{sec:>8.1f} s")
    clues = sum(v for k, v in times.items() if "CLUES" in k)
    extra = sum(v for k, v in times.items() if "extra" in k)
    print(f"clues+ adds {extra:.1f} s to CLUES's {clues:.1f} s of scoring (+{extra / clues:.0%})")


if __name__ == "__main__":
    main()
