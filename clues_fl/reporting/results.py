"""Final evaluation on the server's clean validation set and the run's output folder.

outputs/<run-name>/
  metrics.json      selection P/R/F1/accuracy (overall and per client), thresholds,
                    validation losses (base, all raw data, selection), timings, cost
                    (bytes each way, messages, site and server seconds per phase)
  thresholds.json   the rule, the threshold and the anchor scores it came from
  manifest/<client>.csv   id-hash, score, kept (the keyed hashes the sites sent, site_ids.py;
                    each site keeps the map back to its ids in its own ids.csv)
  report.md         the run in words and plots (run_report.py)
  adapter/          the final adapter, the aggregate step's output: a peft adapter folder with the
                    tokenizer, its base model a real folder or hub id (clues_fl/export.py)
  state/            the server's state after each step and round, for resuming (resume.py)
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clues_fl import console
from clues_fl.config import RunConfig, mc_source, parse_config
from clues_fl.outputs import output_dir
from clues_fl.export import base_model_path, save_adapter
from clues_fl.reporting.evaluation import generation_quality
from clues_fl.reporting.run_report import (
    describe_adapter,
    describe_aggregate,
    published_model_warnings,
    validation_loss_name,
    write_run_report,
)
from clues_fl.aggregation.merging import FinalAdapter
from clues_fl.data.scenario import build_scenario
from clues_fl.selection.rules import keep, standardise
from clues_fl.model.training import mean_loss
from clues_fl.server.cost import cost_section, selection_line
from clues_fl.server.state import ProtocolState, SiteRecord
from clues_fl.server.summary import selection_summary

if TYPE_CHECKING:
    from clues_fl.server.phases import ProtocolRun

log = logging.getLogger(__name__)


def own_site_data(run: ProtocolRun) -> bool:
    """Whether the sites read their own files (a node's `data-file`), as they told the server."""
    return any(info.get("data-file") for info in run.sites.info.values())


def eval_section(cfg: RunConfig, run: ProtocolRun):
    """The `eval` section as this run applies it: `eval.mc-source` resolved against the
    run's data (config.mc_source: no multiple-choice items for a user's own data unless
    named), `eval.mc-items` 0 where there are none."""
    source = mc_source(cfg, own_site_data(run))
    return replace(cfg.eval, mc_source=source or "", mc_items=cfg.eval.mc_items if source else 0)


def model_quality(cfg: RunConfig, run: ProtocolRun, model) -> dict:
    """Clean validation loss, answer quality on the test set (greedy generation,
    ROUGE-L and token F1) and knowledge retention (multiple-choice accuracy)."""
    out: dict = {}
    bench, data = run.bench, run.data
    if cfg.eval.validation and data.val:
        out["validation-loss"] = mean_loss(model, data.val, bench.first_layer, pad_id=bench.pad_id, cache=data.val_cache)
    out.update(generation_quality(model, bench.tokenizer, data.test, eval_section(cfg, run),
                                  system_prompt=cfg.data.system_prompt or None))
    return out


def aggregate_step(cfg: RunConfig, rounds_strategy: str) -> dict:
    """How the aggregate step made the published adapter (metrics.json "aggregate")."""
    if cfg.retrain.mode == "rounds":
        return {"mode": "rounds", "strategy": rounds_strategy, "strategy-args": cfg.fed.strategy_args,
                "rounds": cfg.retrain.rounds,
                **({"adapter-noise": cfg.privacy.adapter_noise} if cfg.privacy.adapter_noise > 0 else {})}
    return {"mode": "merge", "rule": cfg.merge.rule, "local-epochs": cfg.retrain.rounds,
            **({"density": cfg.merge.density} if cfg.merge.rule == "ties" else {})}


def evaluate_and_report(run: ProtocolRun) -> dict:
    """Evaluate the aggregate phase's adapter (`run.state.final`) and the references on the
    server's sets, and write the run's outputs (see the module's docstring)."""
    cfg, state, bench, data = run.cfg, run.state, run.bench, run.data
    final = state.final
    out = output_dir(cfg)
    t, cpu = time.time(), time.process_time()
    console.status("evaluate: started (validation loss on %d samples, %d test answers, %d multiple-choice items)",
                   len(data.val) if cfg.eval.validation else 0, min(cfg.eval.max_samples, len(data.test)),
                   eval_section(cfg, run).mc_items)
    losses: dict[str, float] = {}
    reference = ""  # what "all-data" is: a key of ALL_DATA_REFERENCES
    if cfg.eval.validation and data.val:
        losses["base"] = bench.loss(data.val, run.initial_state, cache=data.val_cache)
        # with scoring.model the trace trained the scoring model: its adapters are not this model's
        own_trace = not run.scoring_model_apart
        if state.checkpoints and own_trace:  # federated trace: the last global adapter, trained on all raw data
            losses["last-trace-checkpoint"] = bench.loss(data.val, state.checkpoints[-1].state, cache=data.val_cache)
        if state.all_data_state is not None:  # retrained on all data at the selection's budget
            losses["all-data"] = bench.loss(data.val, state.all_data_state, cache=data.val_cache)
            reference = "equal-budget"
        elif own_trace and state.checkpoints:
            losses["all-data"] = losses["last-trace-checkpoint"]
            reference = "last-trace-checkpoint"
        elif own_trace:
            reference = "merged-trace-adapters"
            traced = [s.trace_state for s in state.sites.values() if s.trace_state]
            if traced:
                merged = FinalAdapter(rule="linear", weights=[1 / len(traced)] * len(traced), site_states=traced,
                                      density=cfg.merge.density)
                with merged.active(bench.model, bench.initial_state) as model:
                    losses["all-data"] = mean_loss(model, data.val, bench.first_layer, pad_id=bench.pad_id,
                                                   cache=data.val_cache)
    adapter_dir = out / "adapter"
    with final.active(bench.model, bench.initial_state) as model:
        quality = model_quality(cfg, run, model)
        save_adapter(model, adapter_dir, bench.tokenizer, base_model_path(cfg.model.name),
                     "merged" if final.merged else "default")
    if "validation-loss" in quality:
        losses["selected"] = quality.pop("validation-loss")
    warnings = published_model_warnings(losses, reference)
    for line in warnings:
        log.warning("%s", line)
    run.record_time("evaluate", t)
    state.cost.add_server("evaluate", time.time() - t, time.process_time() - cpu)
    console.status("evaluate: done in %s (%s)", console.seconds(time.time() - t),
                   ", ".join(f"validation loss {k} {v:.4f}" for k, v in losses.items()) or "no validation set")

    anchor_threshold = run.strategy.scorer.selection == "anchor"
    manifest_dir = out / "manifest"
    manifest_dir.mkdir(exist_ok=True)
    for site in state.sites.values():
        if not site.scores.size:
            continue
        scores = site.scores
        if state.threshold.get("standardised"):
            scores = standardise(scores, site.anchor_scores)
        kept = keep(scores, state.threshold)
        readable = anchor_units(state, site, anchor_threshold)
        with open(manifest_dir / f"{site.name}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id-hash", "score", "kept", *(["score-z"] if readable is not None else [])])
            for row, (i, s, k) in enumerate(zip(site.ids, site.scores, kept)):
                writer.writerow([i, f"{s:.8g}", int(k), *([f"{readable[row]:.3f}"] if readable is not None else [])])

    selection = selection_summary(state, cfg, anchor_threshold)
    threshold = {**state.threshold, **({"merge-weights": final.merge_weights} if final.merged else {})}
    metrics = {
        "run-name": cfg.run.run_name,
        "mode": cfg.run.mode,
        "aggregate": aggregate_step(cfg, type(run.strategy.rounds).__name__),
        "selection": selection,
        "threshold": {k: v for k, v in threshold.items() if k != "anchor-scores"},
        "validation-loss": losses,
        **({"all-data-reference": reference} if "all-data" in losses else {}),
        **({"warnings": warnings} if warnings else {}),
        "model-quality": quality,
        "round-losses": state.round_losses,
        "missing-sites": state.missing,
        **({"site-data-files": files} if (files := site_data_files(run)) else {}),
        "skipped-rows": [{"where": w, "reason": r} for w, r in run.skipped],
        "timings-seconds": {**state.timings, "total": round(time.time() - run.started, 2)},
        # peak GPU memory (MiB) per phase, of the server process and the largest site; null on the CPU
        "gpu-peak-mib": state.gpu_peaks or None,
        "cost": run_cost(run),
        **({"resumed-from": run.resumed_from} if run.resumed_from else {}),
        "config": cfg.values,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    (out / "thresholds.json").write_text(json.dumps(threshold, indent=2, default=float))
    describe_adapter(adapter_dir, cfg, metrics)
    try:
        write_run_report(out, metrics, run)
    except Exception as err:  # the run's results are written: a plot must not fail it
        log.warning("report.md could not be written: %s: %s", type(err).__name__, err)
    print(summary_text(metrics, out))
    return metrics


def run_cost(run: ProtocolRun) -> dict:
    """metrics.json "cost" (server/cost.py), the sites named as the report names them."""
    selected = [s for s in run.state.sites.values() if s.selected]
    phases = [*(["trace"] if run.strategy.scorer.needs_trace else []), "score", "aggregate"]
    return cost_section(run.state.cost, lambda node: run.sites.describe(node)["site"],
                        sum(s.kept for s in selected), sum(s.num_examples for s in selected), phases)


def site_data_files(run: ProtocolRun) -> dict[str, str]:
    """Site -> the name of its own data file (a deployment's `data-file`), as the sites told it."""
    return {info.get("site", str(node)): info["data-file"]
            for node, info in sorted(run.sites.info.items()) if info.get("data-file")}


def summary_text(metrics: dict, out: Path) -> str:
    sel = metrics["selection"]
    lines = [
        "",
        f"CLUES run '{metrics['run-name']}' ({metrics['mode']} tracing, aggregate step: "
        f"{describe_aggregate(metrics['aggregate'])})",
        f"  threshold: {metrics['threshold'].get('rule')} = "
        f"{metrics['threshold'].get('threshold', metrics['threshold'].get('ratio'))}",
    ]
    if sel and sel.get("labelled") is False:
        lines += unlabelled_lines(sel)
    elif sel:
        lines.append(
            f"  selection: precision {sel.get('precision', float('nan')):.3f}  recall {sel.get('recall', float('nan')):.3f}  "
            f"F1 {sel.get('f1', float('nan')):.3f}  accuracy {sel.get('accuracy', float('nan')):.3f}"
        )
        for name, m in sorted(sel.get("per-client", {}).items()):
            lines.append(f"    {name}: kept {m['kept']}/{m['tp'] + m['fp'] + m['fn'] + m['tn']}  F1 {m['f1']:.3f}")
    for key, value in metrics["validation-loss"].items():
        lines.append(f"  validation loss ({validation_loss_name(key, metrics)}): {value:.4f}")
    for warning in metrics.get("warnings", []):
        lines.append(f"  WARNING: {warning}")
    for key, value in metrics.get("model-quality", {}).items():
        lines.append(f"  final model {key}: {value:.4f}" if isinstance(value, float) else f"  final model {key}: {value}")
    for m in metrics["missing-sites"]:
        where = m["phase"] if m.get("round") is None or "round" in str(m["phase"]) else f"{m['phase']} round {m['round']}"
        lines.append(f"  missing: {m.get('site', 'node-' + str(m['node']))} in {where}: {m['reason'][:200]}")
    lines.append(f"  time: {metrics['timings-seconds']}")
    if metrics.get("cost"):
        lines.append(f"  {selection_line(metrics['cost']['selection'])}")
    lines.append(f"  outputs: {out} (report: {out / 'report.md'})")
    return "\n".join(lines)


def anchor_units(state: ProtocolState, site: SiteRecord, anchor_threshold: bool):
    """A site's scores in anchor units, (s - mean) / sd of the anchors' leave-one-out
    scores (0 = a typical anchor, -3 = far below), or None for methods without anchors."""
    anchors = site.anchor_scores if site.anchor_scores is not None else state.anchor.get("scores")
    if anchors is None or len(anchors) < 2 or not anchor_threshold:
        return None
    return standardise(site.scores, np.asarray(anchors, dtype=float))


# Below this many anchors the summary says the clean-share estimate is rough: 16 anchors
# misjudged it by 0.09-0.17 rms on the pools of docs/selection.md ("More anchors"), 48-64 by 0.01-0.12.
FEW_ANCHORS = 32


def unlabelled_lines(sel: dict) -> list[str]:
    """The summary of a selection on data without quality labels: no P/R/F1."""
    lines = [f"  selection (no quality labels, so no precision or recall): kept {sel['kept']}/{sel['n']} "
             f"({sel['kept-share']:.0%})"]
    share = sel.get("estimated-clean-share")
    if share:
        lines.append(f"  estimated clean share {share['estimate']:.2f} "
                     f"({share['level']:.0%} interval {share['low']:.2f}-{share['high']:.2f})")
        if share.get("anchors", FEW_ANCHORS) < FEW_ANCHORS:
            lines.append(f"    rests on {share['anchors']} anchors, which misjudge the clean share (and so the "
                         f"threshold) by about 0.1; {FEW_ANCHORS}-64 anchors narrow it (docs/data.md: Anchors)")
    dist = sel.get("score-distribution", {})
    for who in ("sites", "anchors"):
        if dist.get(who):
            q = dist[who]
            lines.append(f"  scores ({who}): min {q['q00']:.4g}  q10 {q['q10']:.4g}  median {q['q50']:.4g}  "
                         f"q90 {q['q90']:.4g}  max {q['q100']:.4g}")
    for name, m in sorted(sel.get("per-client", {}).items()):
        lines.append(f"    {name}: kept {m['kept']}/{m['n']}")
    return lines


def read_manifests(out: Path, cfg: RunConfig) -> list[tuple[list, np.ndarray, np.ndarray]]:
    """Per site, (its samples, their scores, their kept flags) from a finished run's
    manifests, in the scenario's sample order; the samples, with their pollution
    flags, are rebuilt from the run-config and seed. The manifests hold the hashed ids
    the sites sent: each is joined to its sample through the site's own id map
    (outputs/<run>/sites/client-<i>/ids.csv, where a simulated site keeps it).
    OSError if a manifest or a site's id map is missing."""
    from clues_fl.federation.site_ids import read_id_map

    data = build_scenario(cfg, len(cfg.pollution.list("ratios")))
    sites = []
    for i, samples in enumerate(data.clients):
        with open(out / "manifest" / f"client-{i}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows and "id-hash" in rows[0]:
            ids = read_id_map(out / "sites" / f"client-{i}")
            rows = {ids.get(row["id-hash"], row["id-hash"]): row for row in rows}
        else:  # written before ids were hashed
            rows = {row["id"]: row for row in rows}
        sites.append((samples, np.array([float(rows[s.id]["score"]) for s in samples]),
                      np.array([rows[s.id]["kept"] == "1" for s in samples], dtype=bool)))
    return sites


def read_run(out: Path):
    """(metrics, anchor scores, scores, polluted flags, kinds, site index) of a finished
    experiment run (federated, scores reported), pooled over sites in site order; the
    flags are rebuilt from its run-config and seed."""
    metrics = json.loads((out / "metrics.json").read_text())
    anchors = np.asarray(json.loads((out / "thresholds.json").read_text()).get("anchor-scores", []))
    sites = read_manifests(out, parse_config(metrics["config"]))
    samples = [s for site, _, _ in sites for s in site]
    return (metrics, anchors, np.concatenate([scores for _, scores, _ in sites]),
            np.array([s.polluted for s in samples]), [f"{s.pollution}:{s.domain}" if s.polluted else "" for s in samples],
            np.concatenate([np.full(len(site), i) for i, (site, _, _) in enumerate(sites)]))
