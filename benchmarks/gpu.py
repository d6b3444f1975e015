"""The product's scoring engine at LLM shapes on a GPU (a script that prints figures, not a test).

Random-weight Llama shapes, LoRA q,v r=16 on every layer, N samples of random tokens
with lengths drawn from [min, max] (answer = the last two thirds), one checkpoint:

  floor   batched forward+backward through the engine's split forward, no hooks, no scoring
  dot     engine.score_samples, dot product       (hooks + batched inner products)
  cosine  engine.score_samples, cosine            (+ exact per-sample norms)
  adam    engine.score_samples, Adam (LESS)       (+ per-sample gradients per layer)
  loop    batch of one, the model's full forward with full logits, flattened gradient

per shape: seconds, tokens/s, x floor, peak GPU memory, Spearman of the engine's dot
scores with the loop's; at the 1B shape bf16 vs float32 Spearman of the same weights
(dot, cosine); at the 8B shape the engine (dot) on the model loaded in 4-bit nf4 through
the product's loader (saved once to a temporary folder). `--smoke` (default on CUDA) runs
scenarios/smoke.toml in-process with model.device=cuda and with model.device=cpu
(float32 both), with CLUES and with the default clues+, and reports whether they keep
the same samples.

    python benchmarks/gpu.py                 # CUDA: --shapes 1b 8b --smoke
    python benchmarks/gpu.py --shapes tiny   # the CPU, about a minute

Ends with one key=value line.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from clues_fl.model.device import free_memory, peak_memory_mib
from clues_fl.scoring.alignment import ScoreSettings, score_samples
from clues_fl.model.training import AdamMoments, Checkpoint
from clues_fl.model.forward import iterate_batches
from clues_fl.model.loading import lora_parameters
from clues_fl.model.forward import sample_losses
from clues_fl.model.loading import LoraSettings, add_lora, first_lora_layer, load_lora_state

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, samples=24, lengths=(16, 64)),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, samples=256, lengths=(128, 512)),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, samples=256, lengths=(128, 512)),
}


class Enc:  # what the engine reads of an encoded sample
    def __init__(self, i, ids, prompt_len):
        self.id, self.input_ids, self.prompt_len = f"s{i}", ids, prompt_len


def make_samples(n, lo, hi, vocab, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(lo, hi + 1))
        out.append(Enc(i, rng.integers(3, vocab, size=length).tolist(), max(2, length // 3)))
    return out


def build(shape: str, device, dtype, seed=0, lora=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = {k: v for k, v in SHAPES[shape].items() if k not in ("samples", "lengths")}
    config = LlamaConfig(**spec, max_position_embeddings=4096, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in place, in the target dtype, on the device
    try:
        with torch.device(device):
            base = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return prepared(base) if lora else base


def prepared(base):
    base.config.use_cache = False
    for p in base.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    model = add_lora(base, LoraSettings(r=16, alpha=16, target_modules=("q_proj", "v_proj"), layers=None))
    return model.eval()


def checkpoint(model, seed=0):
    """One checkpoint near the adapter (B random so gradients are non-trivial), its
    reference gradient and Adam moments; float32 on the host, as they arrive in messages."""
    gen = torch.Generator().manual_seed(seed)
    state = {n: (0.02 * torch.randn(p.shape, generator=gen)) for n, p in lora_parameters(model).items()}
    adam = AdamMoments({n: 1e-3 * torch.randn(s.shape, generator=gen) for n, s in state.items()},
                       {n: 1e-6 * torch.rand(s.shape, generator=gen) for n, s in state.items()})
    ref = {n: 1e-3 * torch.randn(s.shape, generator=gen) for n, s in state.items()}
    return Checkpoint(state, 1e-4, adam), ref


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    free_memory()
    peak_memory_mib(reset=True)
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out, peak_memory_mib(reset=True)


def floor(model, samples, batch_size):
    params = list(lora_parameters(model).values())
    device = params[0].device
    for batch in iterate_batches(samples, batch_size, 0, None, device):
        torch.autograd.grad(sample_losses(model, batch, 0).sum(), params)


def engine(model, samples, ckpt, ref, similarity, preconditioner, batch_size):
    settings = ScoreSettings(similarity, preconditioner, batch_size)
    return score_samples(model, samples, [ckpt], [ref], first_lora_layer(model), settings, pad_id=0).scores


def loop(model, samples, ckpt, ref):
    params = lora_parameters(model)
    names = list(params)
    device = next(iter(params.values())).device
    anchor = torch.cat([ref[n].reshape(-1) for n in names]).to(device)
    out = np.zeros(len(samples))
    for i, s in enumerate(samples):
        ids = torch.tensor([s.input_ids], device=device)
        logits = model(input_ids=ids).logits[0].float()  # full vocabulary at every token
        loss = F.cross_entropy(logits[s.prompt_len - 1 : -1], ids[0, s.prompt_len :])
        grads = torch.autograd.grad(loss, list(params.values()))
        out[i] = ckpt.lr * float(torch.cat([g.reshape(-1).float() for g in grads]) @ anchor)
    return out


def rho(a, b) -> float:
    return float(spearmanr(a, b).statistic)


def bench_shape(shape, device, dtype, batch_size, skip_loop=False):
    spec = SHAPES[shape]
    samples = make_samples(spec["samples"], *spec["lengths"], spec["vocab_size"])
    tokens = sum(len(s.input_ids) for s in samples)
    model = build(shape, device, dtype)
    ckpt, ref = checkpoint(model)
    load_lora_state(model, ckpt.state)
    # warm-up: one full pass of each path, so that no timed method pays the allocator's growth
    engine(model, samples, ckpt, ref, "cosine", "adam", batch_size)
    floor(model, samples, batch_size)
    rows = {"floor": timed(lambda: floor(model, samples, batch_size))}
    for name, sim, pre in (("dot", "dot", "sgd"), ("cosine", "cosine", "sgd"), ("adam", "cosine", "adam")):
        rows[name] = timed(lambda: engine(model, samples, ckpt, ref, sim, pre, batch_size))
    if not skip_loop:
        rows["loop"] = timed(lambda: loop(model, samples, ckpt, ref))
    print(f"\n{shape}: {len(samples)} samples, {tokens} tokens, {dtype}, {device}, batch {batch_size}")
    print(f"{'method':<8}{'seconds':>9}{'tokens/s':>11}{'x floor':>9}{'peak MiB':>10}")
    for name, (sec, _, peak) in rows.items():
        print(f"{name:<8}{sec:>9.2f}{tokens / sec:>11.0f}{sec / rows['floor'][0]:>9.2f}"
              f"{'-' if peak is None else f'{peak:.0f}':>10}")
    figures = {f"{shape}_{k}_s": round(v[0], 3) for k, v in rows.items()}
    figures[f"{shape}_tokens_per_s"] = round(tokens / rows["dot"][0])
    figures[f"{shape}_cosine_x_floor"] = round(rows["cosine"][0] / rows["floor"][0], 3)
    figures[f"{shape}_dot_x_floor"] = round(rows["dot"][0] / rows["floor"][0], 3)
    figures[f"{shape}_adam_x_floor"] = round(rows["adam"][0] / rows["floor"][0], 3)
    peaks = [v[2] for v in rows.values() if v[2] is not None]
    if peaks:
        figures[f"{shape}_peak_gib"] = round(max(peaks) / 1024, 2)
    if "loop" in rows:
        figures[f"{shape}_speedup_vs_loop"] = round(rows["loop"][0] / rows["dot"][0], 2)
        figures[f"{shape}_spearman_vs_loop"] = round(rho(rows["dot"][1], rows["loop"][1]), 4)
        print(f"engine vs loop: {figures[f'{shape}_speedup_vs_loop']}x, "
              f"Spearman {figures[f'{shape}_spearman_vs_loop']}")
    return model, samples, ckpt, ref, rows, figures


def bf16_vs_float32(model, samples, ckpt, ref, rows, batch_size, shape):
    """The same (bf16) weights in float32: Spearman of the scores, dot and cosine."""
    model.to(torch.float32)
    out = {}
    for sim in ("dot", "cosine"):
        out[f"{shape}_bf16_vs_fp32_spearman_{sim}"] = round(
            rho(rows[sim][1], engine(model, samples, ckpt, ref, sim, "sgd", batch_size)), 4)
    print(f"bf16 vs float32 (same weights): {out}")
    return out


def four_bit(shape, device, batch_size):
    """The shape in 4-bit nf4 through the product's loader (model.load_base_model)."""
    from clues_fl.model.loading import load_base_model

    with tempfile.TemporaryDirectory() as folder:
        model = build(shape, device, torch.bfloat16, lora=False)
        model.save_pretrained(folder)
        del model
        gc.collect()
        free_memory()
        spec = SHAPES[shape]
        samples = make_samples(spec["samples"], *spec["lengths"], spec["vocab_size"])
        tokens = sum(len(s.input_ids) for s in samples)
        t = time.perf_counter()
        base = load_base_model(folder, "4bit", device=str(device), dtype="bfloat16")
        load_s = time.perf_counter() - t
    model = prepared(base)
    ckpt, ref = checkpoint(model)
    engine(model, samples[:batch_size], ckpt, ref, "dot", "sgd", batch_size)
    peak_memory_mib(reset=True)
    sec, _, peak = timed(lambda: engine(model, samples, ckpt, ref, "dot", "sgd", batch_size))
    print(f"\n{shape} 4-bit nf4: load {load_s:.1f} s, engine dot {sec:.2f} s, {tokens / sec:.0f} tokens/s, "
          f"peak {'-' if peak is None else f'{peak / 1024:.2f} GiB'}")
    out = {f"{shape}_4bit_dot_s": round(sec, 3), f"{shape}_4bit_tokens_per_s": round(tokens / sec)}
    if peak is not None:
        out[f"{shape}_4bit_peak_gib"] = round(peak / 1024, 2)
    return out


def smoke(device: str, overrides: dict | None = None) -> dict:
    """scenarios/smoke.toml in-process (InMemoryGrid) on `device` and on the CPU, float32,
    with CLUES + mixture and with the default clues+ (all its default signals) + anchor-f1.
    `overrides`: run-config values over the scenario's (--smoke-set)."""
    import tomllib

    from flwr.common.config import flatten_dict

    from clues_fl import client_app
    from clues_fl.config import parse_config
    from clues_fl.federation.inmemory_grid import InMemoryGrid
    from clues_fl.server_app import run_protocol
    from clues_fl.runtime import _cached

    from clues_fl.config import DEFAULT_SIGNALS

    raw = flatten_dict(tomllib.loads((Path(__file__).resolve().parent.parent / "scenarios" / "smoke.toml").read_text()))
    raw["selection.signals"] = ",".join(DEFAULT_SIGNALS)  # the default clues+ (the scenario runs a cheaper subset)
    raw.update(overrides or {})
    nodes = {101: {"partition-id": 0, "num-partitions": 2}, 202: {"partition-id": 1, "num-partitions": 2}}
    figures = {}
    for method, rule in (("clues", "mixture"), ("clues+", "anchor-f1")):
        kept, seconds = {}, {}
        with tempfile.TemporaryDirectory() as out:
            for where in dict.fromkeys((device, "cpu")):  # once when --device is the CPU
                run = {**raw, "run-name": f"smoke-{where.replace(':', '')}", "output-dir": out, "model.device": where,
                       "model.dtype": "float32", "resume": False, "selection.method": method,
                       "selection.threshold": rule}
                _cached.cache_clear()
                free_memory()
                t = time.perf_counter()
                done, metrics = run_protocol(InMemoryGrid(client_app.app, nodes, run), parse_config(run))
                seconds[where] = time.perf_counter() - t
                sites = done.state.sites
                kept[where] = {s.name: s.kept for s in sites.values()}
                kept[where]["scores"] = np.concatenate([sites[n].scores for n in sorted(sites)])
        same_scores = rho(kept[device]["scores"], kept["cpu"]["scores"])
        counts = {w: {k: v for k, v in kept[w].items() if k != "scores"} for w in kept}
        print(f"\nsmoke in-process, {method} + {rule}: {device} {seconds[device]:.1f} s, cpu {seconds['cpu']:.1f} s; "
              f"kept per site {counts[device]} vs cpu {counts['cpu']}; score Spearman {same_scores:.4f}")
        tag = "smoke" if method == "clues" else "smoke_clues_plus"
        figures.update({f"{tag}_same_kept_counts": int(counts[device] == counts["cpu"]),
                        f"{tag}_score_spearman": round(same_scores, 4), f"{tag}_device_s": round(seconds[device], 1)})
    return figures


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["1b", "8b"] if cuda else ["tiny"], choices=list(SHAPES))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--skip-loop", action="store_true")
    ap.add_argument("--skip-4bit", action="store_true")
    ap.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=cuda,
                    help="the smoke scenario in-process on --device and on the CPU (default: on CUDA)")
    ap.add_argument("--smoke-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="run-config values over the smoke scenario's, as TOML (e.g. model.name='PATH' lora.layers='2-3')")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" or "tiny" in args.shapes else torch.float32
    figures: dict = {"device": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu").replace(" ", "_")}
    for shape in args.shapes:
        model, samples, ckpt, ref, rows, fig = bench_shape(shape, device, dtype, args.batch_size, args.skip_loop)
        figures.update(fig)
        if shape in ("1b", "tiny") and dtype == torch.bfloat16:
            figures.update(bf16_vs_float32(model, samples, ckpt, ref, rows, args.batch_size, shape))
        del model, rows
        gc.collect()
        free_memory()
        if shape in ("8b", "tiny") and not args.skip_4bit:
            try:
                figures.update(four_bit(shape, device, args.batch_size))
            except Exception as err:  # report, do not hide
                print(f"{shape} 4-bit failed: {type(err).__name__}: {err}")
                figures[f"{shape}_4bit"] = "failed"
            gc.collect()
            free_memory()
    if args.smoke:
        from flwr.common.config import parse_config_args

        figures.update(smoke(str(device), parse_config_args([" ".join(args.smoke_set)]) if args.smoke_set else {}))
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
