"""One site's time, peak memory, disk and traffic as its pool grows (docs/scale.md).

One site holds a pool of N synthetic question-answer samples (a fixed vocabulary of
made-up words drawn Zipf-like, with near-copies and off-topic answers mixed in) and runs,
on the CPU, what its ClientApp runs for each message, through the same plain functions
(clues_fl.federation.site) and typed messages (clues_fl.federation.messages):

  load          its data file read and checked (site_samples), the model loaded
  encode        tokenised (Workbench.encode)
  prefix-cache  the frozen layers' states written to disk (Workbench.cache, scoring.cache-budget)
  trace         trace.rounds rounds of local training (train messages with Adam moments)
  score         the default method, clues+: gradient alignment at the trace checkpoints and
                the other signals (query.score)
  select        the threshold applied, the site's report of its dropped samples (query.select)
  retrain       retrain.rounds rounds on the kept samples (train messages of the aggregate
                phase, each as long as retrain.budget says)
  quad          Quad instead of clues+: embeddings, k-means, bandit scoring (query.score)

and, on the server, the anchors' side (clues+ and Quad: constant in N) and the
threshold over the scores of 4 such sites (their score replies unpacked and pooled,
the anchor-f1 rule and the clean-share estimate). The model is a tiny random Llama of
a fixed shape built in code (hidden 32, 4 layers, LoRA r=8 on q,v of the top two) with
a word-level tokenizer of that vocabulary (600 words), and the qa-sim and domain signals'
sentence encoder a tiny random BERT: figures measure the code's scaling, not a real model's speed.
One thread (`--threads`): these tensors are too small for a second one to help.

Each pool size runs in its own process. Peak RSS per step: before the step the heap's
free memory goes back to the OS (malloc_trim) and the process's peak is reset
(/proc/self/clear_refs); after it the peak is read (VmHWM): the most memory the process
held during that step, what the site process holds anyway (its pool, model and prefix
cache's mapped pages) included. Disk: the prefix cache's file and the site's report. Bytes: the
contents of the messages that step sends and receives (messages.wire_bytes).

    python benchmarks/scale.py                 # 1k, 10k and 100k samples (22 min on one idle core)
    python benchmarks/scale.py --quick         # 1k and 10k
    python benchmarks/scale.py --sizes 300,3000 --json scale.json
    python benchmarks/scale.py --sizes 10000 --cache-budget 100MB   # a cache over its budget

Last line: time_exponent (slope of log site seconds over log N: 1 = linear),
rss_growth (peak RSS at the largest size over the smallest), the prefix cache's disk
at the largest size, and bytes on the wire per extra sample.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

SITE_STEPS = ("load", "encode", "prefix-cache", "trace", "score", "select", "retrain")
SERVER_STEPS = ("server: anchors", "server: threshold (4 sites)")
QUAD_STEPS = ("server: quad anchors", "quad")
ALL_STEPS = SITE_STEPS + SERVER_STEPS + QUAD_STEPS
PARTS = ("score: gradient alignment", "score: model signals", "score: near-duplicates", "score: sentence encoder",
         "quad: embeddings", "quad: k-means", "quad: bandit scoring")
SITES = 4  # the threshold's pool: this many sites of this size
ANCHORS = 32

# -- the synthetic pool and the tiny model ------------------------------------------------

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
WORDS = sorted({a + b + c for a in _SYLLABLES for b in _SYLLABLES for c in _SYLLABLES[:3]})[:600]
OFF_TOPIC = WORDS[450:]  # an off-topic answer draws only from these
SPECIALS = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
TEMPLATE_WORDS = ["system", "user", "assistant", "You", "are", "a", "helpful", ".", "?", ","]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _zipf_words(rng, count: int, vocab: list[str]) -> str:
    ranks = rng.zipf(1.15, count) - 1
    return " ".join(vocab[int(r) % len(vocab)] for r in ranks)


def synthetic_pool(n: int, seed: int, prefix: str = "s") -> list[dict]:
    """n question-answer rows: 20% off-topic answers, 3% near-copies (a word dropped) of
    an earlier answer, 1% exact copies, the rest topical answers."""
    rng = np.random.default_rng(seed)
    topical = WORDS[:450]
    rows: list[dict] = []
    for i in range(n):
        question = _zipf_words(rng, int(rng.integers(5, 13)), topical) + " ?"
        kind = rng.random()
        if rows and kind < 0.03:
            words = rows[int(rng.integers(len(rows)))]["answer"].split()
            del words[int(rng.integers(len(words)))]
            answer = " ".join(words)
        elif rows and kind < 0.04:
            answer = rows[int(rng.integers(len(rows)))]["answer"]
        elif kind < 0.24:
            answer = _zipf_words(rng, int(rng.integers(10, 40)), OFF_TOPIC) + " ."
        else:
            answer = _zipf_words(rng, int(rng.integers(10, 40)), topical) + " ."
        rows.append({"id": f"{prefix}{i}", "question": question, "answer": answer})
    return rows


def build_models(folder: Path) -> tuple[str, str]:
    """The tiny random Llama with its word-level tokenizer, and the tiny random BERT
    sentence encoder, saved as local model folders: (llm folder, encoder folder)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, BertTokenizerFast, LlamaConfig, LlamaForCausalLM, \
        PreTrainedTokenizerFast

    llm, encoder = folder / "tiny-llama", folder / "tiny-encoder"
    if (llm / "config.json").exists() and (encoder / "config.json").exists():
        return str(llm), str(encoder)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + TEMPLATE_WORDS + WORDS)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"],
                         eos_token_id=vocab["<|im_end|>"])
    LlamaForCausalLM(config).save_pretrained(llm)
    tokenizer.save_pretrained(llm)
    encoder.mkdir(parents=True, exist_ok=True)
    (encoder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TEMPLATE_WORDS,
                                                  *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(encoder / "vocab.txt"), do_lower_case=False).save_pretrained(encoder)
    BertModel(BertConfig(vocab_size=len(WORDS) + 15, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=256)).save_pretrained(encoder)
    return str(llm), str(encoder)


def run_config(llm: str, encoder: str, out: Path, cache_budget: str) -> dict:
    return {"model.name": llm, "model.device": "cpu", "model.dtype": "float32", "lora.r": 8, "lora.alpha": 16,
            "lora.layers": "2-3", "selection.embedding-model": encoder, "output-dir": str(out),
            "run-name": "scale", "scoring.cache-budget": cache_budget, "data.system-prompt": "You are a helpful "
            "assistant ."}


# -- measuring -------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    """Hand the heap's free memory back to the OS (glibc), so that what a step freed is
    not counted in the next one's RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float:
    hwm = _status_kib("VmHWM")
    return (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def _disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


class Meter:
    """Per step: seconds, peak RSS (MiB), bytes received and sent; per part: seconds."""

    def __init__(self):
        self.steps: dict[str, dict] = {}
        self.parts: dict[str, float] = {}
        self.isolated = True

    @contextmanager
    def step(self, name: str):
        gc.collect()
        _trim_heap()
        self.isolated &= _reset_peak()
        row = self.steps.setdefault(name, {"seconds": 0.0, "peak_mib": 0.0, "received": 0, "sent": 0,
                                           "start_mib": (_status_kib("VmRSS") or 0) / 1024})
        start = time.perf_counter()
        try:
            yield row
        finally:
            row["seconds"] += time.perf_counter() - start
            row["peak_mib"] = max(row["peak_mib"], _peak_mib())

    def timed(self, part: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.parts[part] = self.parts.get(part, 0.0) + time.perf_counter() - start
        return wrapper


def measure_site(n: int, workdir: Path, llm: str, encoder: str, cache_budget: str) -> dict:
    """Every step for one pool of n samples, in this process."""
    import torch
    from flwr.app import RecordDict

    from clues_fl.client_app import KEPT_KEY, SCORES_KEY, keep_array, keep_signals, kept_array, kept_signals
    from clues_fl.config import parse_config
    from clues_fl.data.scenario import site_samples
    from clues_fl.data.sources import Sample
    from clues_fl.federation import messages as msg
    from clues_fl.federation import site
    from clues_fl.federation.site_ids import wire_ids
    from clues_fl.model.training import Checkpoint
    from clues_fl.runtime import score_settings, workbench
    from clues_fl.scoring import baselines, quad, signals
    from clues_fl.scoring.scorers import ScorePayload, SiteData, make_scorer
    from clues_fl.selection.rules import ThresholdSettings, clean_share, threshold_rule

    meter = Meter()
    site_state = RecordDict()  # the site's context.state
    baseline_mib = (_status_kib("VmRSS") or 0) / 1024
    folder = workdir / f"site-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["CLUES_FL_CACHE"] = str(folder / "cache")  # this size's prefix caches alone
    data_file = folder / "pool.jsonl"
    with open(data_file, "w") as fh:
        for row in synthetic_pool(n, seed=1):
            fh.write(json.dumps(row) + "\n")
    anchor_samples = [Sample(r["id"], r["question"], r["answer"]) for r in synthetic_pool(ANCHORS, seed=2, prefix="a")
                      if not set(r["answer"].split()) & set(OFF_TOPIC)][: ANCHORS // 2]
    cfg = parse_config(run_config(llm, encoder, folder / "outputs", cache_budget))
    node = {"data-file": str(data_file), "site-dir": str(folder / "site")}
    sizes: dict[str, int] = {}

    with meter.step("load"):
        samples, _ = site_samples(cfg, node)
        bench = workbench(cfg)
    with meter.step("encode"):
        encoded = bench.encode(samples, cfg)
        ids = wire_ids(cfg, node, [e.id for e in encoded])
    with meter.step("prefix-cache"):
        cache = bench.cache(encoded, cfg, desc="site prefix cache")
    sizes["prefix-cache"] = _disk(folder / "cache" / "prefix")
    budget = _budget_bytes(cfg.scoring.cache_budget, folder / "cache" / "prefix")
    rows = list(range(len(encoded)))

    # trace: FedAvg over one site is its own adapter and moments
    state, moments, checkpoints = dict(bench.initial_state), None, []
    with meter.step("trace") as row:
        for rnd in range(1, cfg.trace.rounds + 1):
            request = msg.TrainRequest(state, "trace", rnd, moments=moments).to_record()
            row["received"] += msg.wire_bytes(request)
            got = msg.TrainRequest.from_record(request)
            result = site.train_round(bench, cfg, encoded, cache, rows, got.state, got.moments, phase="trace",
                                      server_round=rnd, proximal_mu=0.0, partition_id=0)
            reply = msg.TrainReply(result.state, result.num_examples, result.loss, result.steps, result.seconds,
                                   moments=result.moments).to_record()
            row["sent"] += msg.wire_bytes(reply)
            back = msg.TrainReply.from_record(reply)
            state, moments = back.state, back.moments
            checkpoints.append(Checkpoint(state, cfg.train.lr, moments))

    anchors = bench.encode(anchor_samples, cfg)
    scorer = make_scorer(cfg.selection.method, score_settings(cfg))
    with meter.step("server: anchors"):
        anchor_cache = bench.cache(anchors, cfg, desc="anchor prefix cache")
        side = scorer.anchor_side(bench, anchors, checkpoints, cfg, cache=anchor_cache, samples=anchor_samples)
    request = msg.ScoreRequest(cfg.selection.method, checkpoints, side.gradients, side.config).to_record()

    bench.score = meter.timed("score: gradient alignment", bench.score)
    baselines.answer_losses_of = meter.timed("score: model signals", baselines.answer_losses_of)
    signals.token_loss_stats = meter.timed("score: model signals", signals.token_loss_stats)
    signals.near_duplicate_scores = meter.timed("score: near-duplicates", signals.near_duplicate_scores)
    signals.question_signals = meter.timed("score: sentence encoder", signals.question_signals)
    def answer_score(row: dict, request, scorer, run_cfg):
        """What the site's query.score handler does with `request`, its bytes counted in `row`."""
        row["received"] += msg.wire_bytes(request)
        got = msg.ScoreRequest.from_record(request)
        payload = ScorePayload(got.checkpoints, got.anchor_gradients, dict(got.scorer))
        return site.score_samples(scorer, SiteData(run_cfg, bench, samples, encoded, cache, 0), payload)

    with meter.step("score") as row:
        scored = answer_score(row, request, scorer, cfg)
        keep_array(site_state, SCORES_KEY, "scores", scored.values, np.float64)  # as the handler
        keep_signals(site_state, scored.details)
        reported, _ = site.reported(scored.values)
        reply = msg.ScoreReply(len(encoded), ids=ids, scores=reported, score_seconds=scored.seconds).to_record()
        row["sent"] += msg.wire_bytes(reply)

    with meter.step("server: threshold (4 sites)"):
        pooled = np.concatenate([np.asarray(msg.ScoreReply.from_record(reply).scores) for _ in range(SITES)])
        decision = threshold_rule(cfg.selection.threshold).decide(
            side.scores, pooled, ThresholdSettings(cfg.selection.quantile, cfg.selection.static,
                                                   cfg.selection.ratio))
        clean_share(side.scores, pooled, seed=cfg.run.seed)

    with meter.step("select") as row:
        request = msg.SelectRequest(threshold=decision.get("threshold"), ratio=decision.get("ratio")).to_record()
        row["received"] += msg.wire_bytes(request)
        got = msg.SelectRequest.from_record(request)
        chosen = site.select(kept_array(site_state, SCORES_KEY, "scores", np.float64), got.decision)
        keep_array(site_state, KEPT_KEY, "rows", chosen.rows, np.int64)
        report = folder / "site-report"
        names, z = kept_signals(site_state)
        site.write_site_report(cfg, report, samples, chosen.scores, chosen.kept,
                               float(got.threshold) if got.threshold is not None else float("nan"), names, z)
        reply = msg.SelectReply(len(samples), int(chosen.kept.sum()), chosen.mean_kept_score, False).to_record()
        row["sent"] += msg.wire_bytes(reply)
    sizes["select"] = _disk(report)
    kept = kept_array(site_state, KEPT_KEY, "rows", np.int64).tolist()  # what retraining reads

    with meter.step("retrain") as row:
        for rnd in range(1, cfg.retrain.rounds + 1):
            request = msg.TrainRequest(state, "aggregate", rnd).to_record()
            row["received"] += msg.wire_bytes(request)
            got = msg.TrainRequest.from_record(request)
            result = site.train_round(bench, cfg, encoded, cache, kept, got.state, None, phase="aggregate",
                                      server_round=rnd, proximal_mu=0.0, partition_id=0)
            reply = msg.TrainReply(result.state, result.num_examples, result.loss, result.steps,
                                   result.seconds).to_record()
            row["sent"] += msg.wire_bytes(reply)
            state = msg.TrainReply.from_record(reply).state

    quad_cfg = parse_config({**run_config(llm, encoder, folder / "outputs", cache_budget), "selection.method": "quad"})
    quad_scorer = make_scorer("quad", score_settings(quad_cfg))
    with meter.step("server: quad anchors"):
        quad_side = quad_scorer.anchor_side(bench, anchors, checkpoints, quad_cfg, cache=anchor_cache)
    request = msg.ScoreRequest("quad", checkpoints, quad_side.gradients, quad_side.config).to_record()
    quad.embed_samples = meter.timed("quad: embeddings", quad.embed_samples)
    quad.cluster_samples = meter.timed("quad: k-means", quad.cluster_samples)
    quad.quad_select = meter.timed("quad: bandit scoring", quad.quad_select)
    with meter.step("quad") as row:
        quad_scored = answer_score(row, request, quad_scorer, quad_cfg)
        reply = msg.ScoreReply(len(encoded), ids=ids, scores=[float(s) for s in quad_scored.values],
                               scored=int(quad_scored.extras["scored"]),
                               extras={k: v for k, v in quad_scored.extras.items() if k != "scored"}).to_record()
        row["sent"] += msg.wire_bytes(reply)

    return {"n": n, "steps": meter.steps, "parts": meter.parts, "disk": sizes, "cache_budget": budget,
            "cached": int(cache.cached) if cache is not None else 0, "kept": len(kept),
            "quad_scored": int(quad_scored.extras["scored"]), "quad_clusters": int(quad_scored.extras["clusters"]),
            "baseline_mib": baseline_mib, "isolated_peaks": meter.isolated, "threads": torch.get_num_threads()}


def _budget_bytes(spec: str, folder: Path) -> int:
    from clues_fl.model.prefix_cache import budget_bytes

    folder.mkdir(parents=True, exist_ok=True)
    return int(budget_bytes(spec, folder, reclaimable=_disk(folder))[0])


# -- the table ----------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    results = sorted(results, key=lambda r: r["n"])
    sizes = [r["n"] for r in results]
    first = results[0]
    head = ["step"] + [f"s/sample {n:,}" for n in sizes] + ["x (largest/smallest)"] + \
        [f"peak RSS MiB {n:,}" for n in sizes] + [f"wire B/sample {n:,}" for n in sizes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step in ALL_STEPS:
        if step not in first["steps"]:
            continue
        per = [r["steps"][step]["seconds"] / r["n"] for r in results]
        ratio = per[-1] / per[0] if per[0] > 0 else float("nan")
        rss = [r["steps"][step]["peak_mib"] for r in results]
        wire = [(r["steps"][step]["sent"] + r["steps"][step]["received"]) / r["n"] for r in results]
        lines.append("| " + " | ".join([step] + [f"{p * 1e3:.3g} ms" for p in per] + [f"{ratio:.2f}"]
                                       + [f"{m:.0f}" for m in rss] + [f"{w:.4g}" for w in wire]) + " |")
    total = [sum(r["steps"][s]["seconds"] for s in SITE_STEPS) / r["n"] for r in results]
    lines.append("| **site, all steps** | " + " | ".join(f"{p * 1e3:.3g} ms" for p in total)
                 + f" | {total[-1] / total[0]:.2f} | "
                 + " | ".join(f"{max(r['steps'][s]['peak_mib'] for s in SITE_STEPS):.0f}" for r in results) + " | "
                 + " | ".join(f"{sum(r['steps'][s]['sent'] + r['steps'][s]['received'] for s in SITE_STEPS) / r['n']:.4g}"
                              for r in results) + " |")
    parts = ["", "| part | " + " | ".join(f"s/sample {n:,}" for n in sizes) + " | x |", "|---|" + "---|" * (len(sizes) + 1)]
    for part in PARTS:
        per = [r["parts"].get(part, 0.0) / r["n"] for r in results]
        parts.append(f"| {part} | " + " | ".join(f"{p * 1e3:.3g} ms" for p in per)
                     + f" | {per[-1] / per[0] if per[0] else float('nan'):.2f} |")
    extra = ["", "| size | prefix cache on disk | its budget | samples cached | site report | kept | "
             "Quad scored | Quad clusters | Quad seconds | RSS after imports MiB |", "|" + "---|" * 10]
    for r in results:
        extra.append(f"| {r['n']:,} | {r['disk']['prefix-cache'] / 1e6:.1f} MB | {r['cache_budget'] / 1e9:.1f} GB | "
                     f"{r['cached']:,} | {r['disk']['select'] / 1e6:.2f} MB | {r['kept']:,} | "
                     f"{r['quad_scored'] / r['n']:.1%} | {r['quad_clusters']} | {r['steps']['quad']['seconds']:.0f} | "
                     f"{r['baseline_mib']:.0f} |")
    return "\n".join(lines + parts + extra)


def summary(results: list[dict]) -> str:
    results = sorted(results, key=lambda r: r["n"])
    n = np.array([r["n"] for r in results], dtype=float)
    seconds = np.array([sum(r["steps"][s]["seconds"] for s in SITE_STEPS) for r in results])
    exponent = float(np.polyfit(np.log(n), np.log(seconds), 1)[0]) if len(n) > 1 else float("nan")
    peaks = [max(r["steps"][s]["peak_mib"] for s in SITE_STEPS) for r in results]
    wire = np.array([sum(r["steps"][s]["sent"] + r["steps"][s]["received"] for s in SITE_STEPS) for r in results])
    per_sample = float((wire[-1] - wire[0]) / (n[-1] - n[0])) if len(n) > 1 else float(wire[0] / n[0])
    largest = results[-1]
    label = f"{largest['n'] // 1000}k" if largest["n"] % 1000 == 0 else str(largest["n"])
    return (f"time_exponent={exponent:.3f} rss_growth={peaks[-1] / peaks[0]:.3f} "
            f"disk_gb_at_{label}={largest['disk']['prefix-cache'] / 1e9:.3f} bytes_per_sample={per_sample:.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1k and 10k samples only")
    ap.add_argument("--sizes", help="comma-separated pool sizes (default 1000,10000,100000)")
    ap.add_argument("--cache-budget", default="0.5", help="scoring.cache-budget (default 0.5: half the free disk)")
    ap.add_argument("--workdir", type=Path, help="where pools, caches and models go (default: a temporary folder)")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads of each size's process")
    ap.add_argument("--json", type=Path, help="also write the measurements here")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: measure this size, print its JSON
    args = ap.parse_args(argv)
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        llm, encoder = build_models(args.workdir)
        print("RESULT " + json.dumps(measure_site(args.one, args.workdir, llm, encoder, args.cache_budget)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [1000, 10000] if args.quick \
        else [1000, 10000, 100000]
    with tempfile.TemporaryDirectory(prefix="clues-scale-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        build_models(workdir)
        results = []
        for n in sizes:
            start = time.time()
            print(f"{n:,} samples ...", file=sys.stderr, flush=True)
            threads = {k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
            child = subprocess.run([sys.executable, __file__, "--one", str(n), "--workdir", str(workdir),
                                    "--cache-budget", args.cache_budget, "--threads", str(args.threads)],
                                   capture_output=True, text=True, env={**os.environ, **threads})
            found = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
            if child.returncode or not found:
                sys.stderr.write(child.stderr[-4000:])
                raise SystemExit(f"the {n}-sample run failed (exit {child.returncode})")
            results.append(json.loads(found[-1][len("RESULT "):]))
            print(f"{n:,} samples: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not all(r["isolated_peaks"] for r in results):
        print("(peak RSS could not be reset between steps here: each figure is the peak so far)")
    print(table(results))
    print(summary(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
