"""Scoring cost, side by side in one run (a script that prints figures, not a test).

SmolLM2-135M, LoRA q,v on layers 22-29 (r=16), real FiQA samples (max 128 tokens),
K checkpoints. Every method computes the same quantity, sum_k eta_k <g_k(z), G_k>,
for every sample, and the script checks that they agree:

  (a) reference-style loop: batch size 1, full forward with full-vocabulary logits
      at every token, full LoRA gradient flattened per sample, dot with the anchor
      vector, at each of K checkpoints;
  (b) torch.func vmap(grad) per-sample gradients (chunks of 8, padded);
  (c) this project's engine, dot and Adam modes, prefix-cache build included;
  (d) the floor: the forward+backward passes (c) runs (same cache, same batches,
      answer-only logits) with no hooks and no scoring, cache build included.

Checkpoint adapters and Adam moments are random (timings do not depend on values).
Peak RSS is measured in fresh subprocesses that score 64 and 256 samples with (c).

    python benchmarks/scoring.py [--samples 64] [--k 3 5] [--skip-vmap]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clues_fl.config import parse_config
from clues_fl.scoring.alignment import ScoreSettings, score_samples
from clues_fl.model.training import AdamMoments, Checkpoint
from clues_fl.model.forward import iterate_batches
from clues_fl.model.loading import lora_parameters
from clues_fl.model.forward import sample_losses
from clues_fl.model.loading import load_lora_state
from clues_fl.model.prefix_cache import PrefixCache
from clues_fl.data.scenario import build_scenario
from clues_fl.runtime import workbench

CONFIG = {"lora.layers": "22-29", "lora.r": 16, "lora.alpha": 16, "data.max-length": 128,
          "data.anchor-size": 16, "data.val-size": 0, "data.test-size": 0}


def setup(n_samples: int, k: int, seed: int = 0):
    cfg = parse_config({**CONFIG, "data.samples-per-client": n_samples})
    samples = build_scenario(cfg, 1).clients[0]
    bench = workbench(cfg)
    encoded = bench.encode(samples, cfg)
    gen = torch.Generator().manual_seed(seed)
    ckpts, refs = [], []
    for i in range(k):
        state = {n: p.detach().clone() + 0.01 * torch.randn(p.shape, generator=gen) for n, p in bench.initial_state.items()}
        adam = AdamMoments(
            {n: 1e-3 * torch.randn(p.shape, generator=gen) for n, p in state.items()},
            {n: 1e-6 * torch.rand(p.shape, generator=gen) for n, p in state.items()},
        )
        ckpts.append(Checkpoint(state, 1e-4 * (i + 1), adam))
        refs.append({n: torch.randn(p.shape, generator=gen) * 1e-3 for n, p in state.items()})
    return cfg, bench, encoded, ckpts, refs


def _flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names])


def method_loop(bench, encoded, ckpts, refs):
    """(a) batch size 1, full logits, flattened per-sample gradient."""
    model = bench.model
    params = lora_parameters(model)
    names = list(params)
    scores = np.zeros(len(encoded))
    for ckpt, ref in zip(ckpts, refs):
        load_lora_state(model, ckpt.state)
        anchor = _flat(ref, names)
        for i, e in enumerate(encoded):
            ids = torch.as_tensor(np.asarray(e.input_ids, dtype=np.int64))[None]
            labels = ids.clone()
            labels[0, : e.prompt_len] = -100
            loss = model(input_ids=ids, labels=labels).loss  # full-vocab logits everywhere
            grads = torch.autograd.grad(loss, list(params.values()))
            scores[i] += ckpt.lr * float(torch.cat([g.reshape(-1) for g in grads]) @ anchor)
    return scores


def method_vmap(bench, encoded, ckpts, refs, chunk: int = 8):
    """(b) torch.func vmap(grad) per-sample gradients over padded chunks.

    HF's full forward cannot be vmapped (it calls .item() while building masks), so
    this runs the same split forward as the engine, given the prefix cache and a
    prebuilt 4D causal mask, with full logits masked to answer positions."""
    from torch.func import grad, vmap

    from clues_fl.model.forward import collate, length_buckets
    from clues_fl.model.loading import backbone, lm_head

    model = bench.model
    stack = backbone(model)
    params = lora_parameters(model)
    names = list(params)
    scores = np.zeros(len(encoded))
    cache = PrefixCache.build(model, encoded, bench.first_layer, pad_id=bench.pad_id,
                              cache_dir=Path(tempfile.mkdtemp()))
    layers = list(stack.layers[bench.first_layer:])

    def loss_one(p, hidden, ids, mask, target):
        t = hidden.shape[0]
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool)) & mask.bool()[None, :]
        attn = torch.zeros(t, t).masked_fill(~causal, torch.finfo(torch.float32).min)[None, None]
        pos = torch.arange(t)[None]
        rope = stack.rotary_emb(hidden[None], position_ids=pos)
        h = hidden[None]
        with torch.nn.utils.stateless._reparametrize_module(model, p):
            for layer in layers:
                h = layer(h, attention_mask=attn, position_embeddings=rope, position_ids=pos)
            logits = lm_head(model)(stack.norm(h))[0, :-1]
        tok = F.cross_entropy(logits, ids[1:], reduction="none")
        w = target[:-1].to(tok.dtype)
        return (tok * w).sum() / w.sum()

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0))
    for ckpt, ref in zip(ckpts, refs):
        load_lora_state(model, ckpt.state)
        p = {n: t.detach() for n, t in params.items()}
        for rows in length_buckets(encoded, chunk):
            b = cache.attach(collate(encoded, rows, bench.pad_id))
            g = per_sample(p, b.hidden, b.input_ids, b.attention_mask, b.target_mask)
            dots = sum((g[n].reshape(len(rows), -1) @ ref[n].reshape(-1)) for n in names)
            scores[rows] += ckpt.lr * dots.detach().numpy()
    return scores


def method_engine(bench, encoded, ckpts, refs, preconditioner: str, cache_dir: Path):
    """(c) hooks + batched inner products, prefix cache built inside the timing."""
    cache = PrefixCache.build(bench.model, encoded, bench.first_layer, pad_id=bench.pad_id, cache_dir=cache_dir)
    settings = ScoreSettings(similarity="dot", preconditioner=preconditioner, batch_size=8)
    return score_samples(bench.model, encoded, ckpts, refs, bench.first_layer, settings,
                         pad_id=bench.pad_id, cache=cache).scores


def method_floor(bench, encoded, ckpts, cache_dir: Path):
    """(d) the same batched forward+backward from the cache, nothing else."""
    cache = PrefixCache.build(bench.model, encoded, bench.first_layer, pad_id=bench.pad_id, cache_dir=cache_dir)
    params = list(lora_parameters(bench.model).values())
    for ckpt in ckpts:
        load_lora_state(bench.model, ckpt.state)
        for batch in iterate_batches(encoded, 8, bench.pad_id, cache):
            torch.autograd.grad(sample_losses(bench.model, batch, bench.first_layer).sum(), params)


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_during_scoring(n: int) -> float:
    """Peak RSS (MiB) while scoring n samples (K=1), model loading excluded: the
    kernel's peak counter is reset (clear_refs 5) after set-up."""
    cfg, bench, encoded, ckpts, refs = setup(n, 1)
    Path("/proc/self/clear_refs").write_text("5")
    method_engine(bench, encoded, ckpts, refs, "sgd", Path(tempfile.mkdtemp()))
    return _peak_rss_mib()


def rss_child(n: int) -> float:
    """rss_during_scoring(n) in a fresh process."""
    code = f"import sys;sys.path.insert(0,'benchmarks');import scoring as s;print(s.rss_during_scoring({n}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return float(out.stdout.strip().splitlines()[-1])


def rel_diff(a, b) -> float:
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--k", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--skip-vmap", action="store_true")
    ap.add_argument("--rss", type=int, nargs=2, default=[64, 256])
    ap.add_argument("--rss-only", action="store_true", help="only the peak-memory measurement")
    args = ap.parse_args()
    if args.rss_only:
        small, large = rss_child(args.rss[0]), rss_child(args.rss[1])
        print(f"peak RSS while scoring: {args.rss[0]} samples {small:.0f} MiB, {args.rss[1]} samples {large:.0f} MiB; "
              f"rss_growth={large / small:.3f}")
        return
    torch.set_num_threads(torch.get_num_threads())
    summary = {}
    for k in args.k:
        cfg, bench, encoded, ckpts, refs = setup(args.samples, k)
        tmp = Path(tempfile.mkdtemp())
        rows = {}
        rows["(a) loop, batch 1"] = timed(method_loop, bench, encoded, ckpts, refs)
        if not args.skip_vmap and k == args.k[0]:
            try:
                rows["(b) vmap(grad)"] = timed(method_vmap, bench, encoded, ckpts, refs)
            except Exception as err:  # report, do not hide
                rows["(b) vmap(grad)"] = (float("nan"), f"failed: {type(err).__name__}: {str(err)[:80]}")
        rows["(c) engine, dot"] = timed(method_engine, bench, encoded, ckpts, refs, "sgd", tmp / "c1")
        rows["(c) engine, Adam"] = timed(method_engine, bench, encoded, ckpts, refs, "adam", tmp / "c2")
        rows["(d) floor"] = timed(method_floor, bench, encoded, ckpts, tmp / "d")
        reference = rows["(a) loop, batch 1"][1]
        floor = rows["(d) floor"][0]
        print(f"\nK={k} checkpoints, {args.samples} samples, {torch.get_num_threads()} threads")
        print(f"{'method':<22}{'seconds':>9}{'samples/s':>11}{'vs floor':>10}{'max rel diff vs (a)':>21}")
        for name, (sec, out) in rows.items():
            if isinstance(out, str):
                print(f"{name:<22}{'-':>9}{'-':>11}{'-':>10}  {out}")
                continue
            diff = "" if out is None or name.startswith("(a)") else f"{rel_diff(out, reference):.1e}"
            if name.startswith("(c) engine, Adam"):
                diff = "(different score)"
            print(f"{name:<22}{sec:>9.1f}{args.samples * k / sec:>11.2f}{sec / floor:>10.2f}{diff:>21}")
        summary[k] = {name: sec for name, (sec, _) in rows.items()}
    k0 = args.k[0]
    s = summary[k0]
    rss_small, rss_large = rss_child(args.rss[0]), rss_child(args.rss[1])
    print(f"\npeak RSS while scoring (model loading excluded): {args.rss[0]} samples {rss_small:.0f} MiB, "
          f"{args.rss[1]} samples {rss_large:.0f} MiB")
    for k in args.k[1:]:
        print(f"K={k}: speedup vs loop {summary[k]['(a) loop, batch 1'] / summary[k]['(c) engine, dot']:.2f}x")
    print(
        f"speedup_vs_loop={s['(a) loop, batch 1'] / s['(c) engine, dot']:.3f} "
        f"overhead_vs_floor={s['(c) engine, dot'] / s['(d) floor']:.3f} "
        f"adam_overhead_vs_floor={s['(c) engine, Adam'] / s['(d) floor']:.3f} "
        f"rss_growth={rss_large / rss_small:.3f}"
    )


if __name__ == "__main__":
    main()
