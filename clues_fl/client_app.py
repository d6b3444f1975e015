"""Flower ClientApp: a site. Trains LoRA on its private data, scores its samples
against the anchor gradients the server sends, keeps those above the global
threshold, and replies with adapters, scores and counts only (never text, token
ids or per-sample gradients)."""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clues_fl.selection import privacy
from clues_fl.config import parse_config
from clues_fl.federation.messages import (
    ids_digest,
    record_checkpoint,
    record_gradient,
    MOMENTS_KEY,
    moments_record,
    record_moments,
    split_record,
    state_record,
)
from clues_fl.model.device import peak_memory_mib
from clues_fl.selection.metrics import confusion_counts
from clues_fl.model.loading import lora_state
from clues_fl.data.scenario import site_samples
from clues_fl.scoring.scorers import ScorePayload, SiteData, make_scorer, site_clusters
from clues_fl.selection.rules import keep
from clues_fl.federation.site_errors import report_site_errors
from clues_fl.federation.site_ids import site_name, wire_ids
from clues_fl.model.runtime import score_settings, workbench

app = ClientApp(mods=[report_site_errors])  # a site's error reaches the server as one line

SCORES_KEY = "clues.scores"
KEPT_KEY = "clues.kept"


def _frozen(d: dict) -> str:
    return json.dumps(dict(d), sort_keys=True, default=str)


@functools.lru_cache(maxsize=4)
def _site(run_config: str, node_config: str):
    """This site's samples, their encoding and prefix cache (cached per process)."""
    cfg = parse_config(json.loads(run_config))
    samples, skipped = site_samples(cfg, json.loads(node_config))
    if not samples:
        raise ValueError("this site has no training samples (empty partition or file)")
    bench = workbench(cfg)
    encoded = bench.encode(samples, cfg)
    cache = bench.cache(encoded, cfg, desc="site prefix cache")
    return cfg, bench, samples, encoded, cache, skipped


def _load(context: Context):
    return _site(_frozen(context.run_config), _frozen(context.node_config))


@functools.lru_cache(maxsize=4)
def _wire_ids_cached(run_config: str, node_config: str) -> tuple[str, ...]:
    cfg, _, _, encoded, _, _ = _site(run_config, node_config)
    return tuple(wire_ids(cfg, json.loads(node_config), [e.id for e in encoded]))


def _wire_ids(context: Context) -> list[str]:
    """This site's sample ids as they travel: keyed hashes (site_ids.py); the map back to
    the ids stays in the site's own folder."""
    return list(_wire_ids_cached(_frozen(context.run_config), _frozen(context.node_config)))


def _ids_hidden(handler):
    """A handler whose errors name this site's samples by their hashed ids: an error's
    message travels to the server (Flower's error reply), and a sample id can be a
    patient or account number (e.g. the engine's `non-finite loss for samples [...]`)."""

    @functools.wraps(handler)
    def wrapper(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except Exception as err:
            text = str(err)
            try:
                _, _, _, encoded, _, _ = _load(context)
                pairs = [(e.id, h) for e, h in zip(encoded, _wire_ids(context)) if e.id in text]
            except Exception:  # the site's data did not load: its errors name files and lines
                raise err from None
            if not pairs:
                raise
            for real, hashed in sorted(pairs, key=lambda p: -len(p[0])):  # longest first: 'x-12' before 'x-1'
                text = text.replace(real, f"<id {hashed}>")
            try:
                hidden = type(err)(text)
            except Exception:
                hidden = RuntimeError(f"{type(err).__name__}: {text}")
            raise hidden from None

    return wrapper


def _kept_rows(context: Context) -> list[int]:
    if KEPT_KEY not in context.state:
        raise RuntimeError("retraining asked for before selection: no kept samples on this site")
    return [int(i) for i in context.state[KEPT_KEY]["rows"]]


def _reply(message: Message, content: RecordDict) -> Message:
    return Message(content=content, reply_to=message)


@app.train()
@_ids_hidden
def train(message: Message, context: Context) -> Message:
    """One round of fed.strategy: 'trace' on all raw data, 'retrain' on the kept samples.
    The Adam moments (tracing) come and go in their own record; FedProx's proximal-mu
    adds its proximal term to the local loss."""
    cfg, bench, samples, encoded, cache, _ = _load(context)
    config = message.content["config"]
    phase = str(config.get("phase", "trace"))
    state, moments = split_record(message.content["arrays"])
    if MOMENTS_KEY in message.content:
        moments = record_moments(message.content[MOMENTS_KEY])
    rows = list(range(len(encoded))) if phase in ("trace", "retrain-all") else _kept_rows(context)
    server_round = int(config.get("server-round", 1))
    t0 = time.time()
    result = bench.train(
        [encoded[i] for i in rows], cfg, state, moments=moments, epochs=_equal_budget_epochs(phase, cfg, context, len(rows)),
        start_step=_steps_before(server_round, len(rows), cfg) if moments is not None else 0,
        cache=_subset_cache(cache, rows),
        seed_offset=server_round * 101 + int(context.node_config.get("partition-id", 0)),
        desc=f"{phase} round {server_round}", proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    content = RecordDict({"arrays": state_record(lora_state(bench.model))})
    if phase == "trace":
        content[MOMENTS_KEY] = moments_record(result.moments)
    content["metrics"] = MetricRecord({
        "num-examples": len(rows),
        "train-loss": result.mean_loss,
        "train-steps": len(result.step_losses),
        "train-seconds": time.time() - t0,
        **_gpu_peak(),
    })
    return _reply(message, content)


def _equal_budget_epochs(phase: str, cfg, context: Context, n: int) -> float | None:
    """'retrain-all' (the all-data reference) trains on every sample for as many steps per
    round as the selection's retraining takes on this site (its kept samples): equal budgets."""
    if phase != "retrain-all":
        return None
    per_round = math.ceil(len(_kept_rows(context)) / cfg["train.batch-size"])
    return cfg["train.local-epochs"] * per_round / max(1, math.ceil(n / cfg["train.batch-size"]))


def _gpu_peak() -> dict:
    """{"gpu-peak-mib": peak since the last reply} on a GPU, {} on the CPU."""
    peak = peak_memory_mib()
    return {} if peak is None else {"gpu-peak-mib": peak}


def _steps_before(server_round: int, n: int, cfg) -> int:
    """Adam steps this site took before this round (for the bias correction of the
    averaged moments it continues from)."""
    per_round = math.ceil(math.ceil(n / cfg["train.batch-size"]) * cfg["train.local-epochs"])
    return (server_round - 1) * per_round


def _subset_cache(cache, rows):
    """The prefix cache indexes rows of the full pool; a subset needs a row map."""
    return None if cache is None else cache.subset(rows)


@app.train("local")
@_ids_hidden
def train_local(message: Message, context: Context) -> Message:
    """Merging mode: a whole local run, with K checkpoints when tracing."""
    cfg, bench, samples, encoded, cache, _ = _load(context)
    config = message.content["config"]
    phase = str(config["phase"])
    rows = list(range(len(encoded))) if phase == "trace" else _kept_rows(context)
    rounds = cfg["trace.rounds"] if phase == "trace" else cfg["retrain.rounds"]
    result = bench.train(
        [encoded[i] for i in rows], cfg, None, epochs=rounds * cfg["train.local-epochs"],
        num_checkpoints=rounds if phase == "trace" else 0, cache=_subset_cache(cache, rows),
        seed_offset=int(context.node_config.get("partition-id", 0)), desc=f"local {phase}",
    )
    content = RecordDict({
        "arrays": state_record(lora_state(bench.model)),
        "metrics": MetricRecord({"num-examples": len(rows), "train-loss": result.mean_loss, **_gpu_peak()}),
        "site": ConfigRecord({"ids-digest": ids_digest(_wire_ids(context))}),  # resume: who this is
    })
    for k, ckpt in enumerate(result.checkpoints):
        content[f"ckpt-{k}"] = state_record(ckpt.state, ckpt.adam)
    return _reply(message, content)


@app.query("score")
@_ids_hidden
def score(message: Message, context: Context) -> Message:
    """Per-sample scores of the configured selection method (CLUES by default)."""
    cfg, bench, samples, encoded, cache, skipped = _load(context)
    config = message.content["config"]
    lrs = [float(x) for x in config.get("lrs", [])]
    payload = ScorePayload(
        [record_checkpoint(message.content[f"ckpt-{k}"], lr) for k, lr in enumerate(lrs)],
        [record_gradient(message.content[f"grad-{k}"]) for k in range(len(lrs)) if f"grad-{k}" in message.content],
        {k: v for k, v in config.items() if k not in ("method", "lrs")},
    )
    pid = int(context.node_config.get("partition-id", 0))
    scorer = make_scorer(str(config.get("method", cfg["selection.method"])), score_settings(cfg))
    t0 = time.time()
    values = np.asarray(scorer.score(SiteData(cfg, bench, samples, encoded, cache, pid), payload), dtype=float)
    if values.shape != (len(encoded),) or not np.isfinite(values).all():
        raise ValueError(f"scorer '{scorer.name}' returned {values.shape} scores (finite: "
                         f"{bool(np.isfinite(values).all())}) for {len(encoded)} samples")
    context.state[SCORES_KEY] = ConfigRecord({"scores": [float(s) for s in values]})  # exact, stays here
    _keep_signals(context, scorer)
    reply = RecordDict({
        **_reported(values, _wire_ids(context), config),
        "metrics": MetricRecord({
            "num-examples": len(encoded),
            "partition-id": int(context.node_config.get("partition-id", -1)),
            "score-seconds": time.time() - t0,
            "skipped-rows": len(skipped),
            "truncated": sum(int(e.truncated) for e in encoded),
            "scored": len(encoded),  # a scorer that scores fewer (Quad) overrides it
            **scorer.extras(),
            **_gpu_peak(),
        }),
    })
    return _reply(message, reply)


def _reported(values: np.ndarray, ids: list[str], config) -> dict:
    """What leaves the site: per-sample scores, or only binned counts
    (privacy.report = histogram); Gaussian noise on either when privacy.epsilon > 0.
    The noise comes from the OS's entropy, not the run seed the server knows."""
    epsilon, delta = float(config.get("epsilon", 0.0)), float(config.get("delta", 1e-5))
    rng = np.random.default_rng()
    if str(config.get("privacy-report", "scores")) == "histogram":
        edges = np.array([-np.inf, *[float(e) for e in config["edges"]], np.inf])
        counts = privacy.privatise_counts(privacy.histogram_counts(values, edges), epsilon, delta, rng)
        return {"histogram": ConfigRecord({"counts": [int(c) for c in counts]})}
    if privacy.dp_enabled(epsilon):
        values = privacy.privatise_scores(values, float(config["clip-lo"]), float(config["clip-hi"]),
                                          epsilon, delta, rng)
    return {"scores": ConfigRecord({"ids": ids, "scores": [float(s) for s in values]})}


@app.query("select")
@_ids_hidden
def select(message: Message, context: Context) -> Message:
    """Apply the global threshold (or ratio) locally; report counts only."""
    cfg, bench, samples, encoded, cache, _ = _load(context)
    scores = _own_scores(message, context, encoded)
    config = message.content["config"]
    if "anchor-mean" in config:  # merging mode: scores from local checkpoints, standardised
        scores = (scores - float(config["anchor-mean"])) / float(config["anchor-std"])
    kept = keep(scores, config)  # the server's threshold, or its ratio of this site's scores
    rows = [int(i) for i in np.flatnonzero(kept)]
    context.state[KEPT_KEY] = ConfigRecord({"rows": rows})
    labelled = has_quality_labels(cfg, context.node_config)
    # Confusion counts only where the data carries quality labels (an experiment's
    # pollution flags); computed here: flags never leave the site.
    counts = confusion_counts(kept, np.array([s.polluted for s in samples])) if labelled else {}
    write_site_report(cfg, context, samples, scores, kept, float(config.get("threshold", np.nan)))
    metrics = {
        "num-examples": len(samples),
        **(_coverage(cfg, bench, samples, encoded, cache, context, kept) if cfg["eval.coverage"] else {}),
        "kept": int(kept.sum()),
        "mean-kept-score": float(scores[kept].mean()) if kept.any() else 0.0,
        "labelled": int(labelled),
        **{k: int(v) for k, v in counts.items()},
    }
    return _reply(message, RecordDict({"metrics": MetricRecord(metrics)}))


SIGNALS_KEY = "clues.signals"


def has_quality_labels(cfg, node_config) -> bool:
    """Whether this site's samples carry quality labels: only an experiment that
    polluted them on purpose (`pollution.ratios`) knows which are bad; a user's own
    data (`data.pool`, a node's `data-file`) does not."""
    return bool(str(cfg["pollution.ratios"]).strip()) and not cfg["data.pool"] and not node_config.get("data-file")


def _keep_signals(context: Context, scorer) -> None:
    """A multi-signal scorer's per-signal standardised values, kept in the site's own
    state for its local report of dropped samples (never sent)."""
    details = getattr(scorer, "details", None)
    if not details:
        if SIGNALS_KEY in context.state:
            del context.state[SIGNALS_KEY]
        return
    z = np.asarray(details["z"], dtype=float)
    context.state[SIGNALS_KEY] = ConfigRecord({"names": [str(n) for n in details["names"]],
                                               "z": [float(x) for x in z.ravel()]})


def site_report_dir(cfg, node_config):
    """Where a site writes its local report: its node config's `report-dir`, else (in
    simulation) <output-dir>/<run-name>/site-reports/client-<partition-id>."""
    from pathlib import Path

    from clues_fl.reporting.results import output_dir

    if node_config.get("report-dir"):
        return Path(str(node_config["report-dir"])).expanduser()
    return output_dir(cfg) / "site-reports" / f"client-{int(node_config.get('partition-id', 0))}"


def write_site_report(cfg, context: Context, samples, scores, kept, threshold: float) -> None:
    """The data owner's audit of the drop, on this site's disk only: every dropped sample
    with its text, its score and which signal put it below the threshold."""
    from clues_fl.scoring.signals import SIGNALS

    names, z = [], None
    if SIGNALS_KEY in context.state:
        rec = context.state[SIGNALS_KEY]
        names = [str(n) for n in rec["names"]]
        z = np.asarray(rec["z"], dtype=float).reshape(len(names), len(samples))
    folder = site_report_dir(cfg, context.node_config)
    folder.mkdir(parents=True, exist_ok=True)
    reasons: dict[str, int] = {}
    with open(folder / "dropped.jsonl", "w") as fh:
        for i in np.flatnonzero(~np.asarray(kept, dtype=bool)):
            row = {"id": samples[i].id, "question": samples[i].question, "answer": samples[i].answer,
                   "score": float(scores[i]), "threshold": threshold}
            if z is not None:
                worst = int(np.argmin(z[:, i]))
                row["reason"] = SIGNALS[names[worst]][1]
                row["worst-signal"] = names[worst]
                row["signals"] = {n: round(float(z[j, i]), 3) for j, n in enumerate(names)}
            else:
                row["reason"] = f"{cfg['selection.method']} score below the threshold"
            reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
            fh.write(json.dumps(row) + "\n")
    (folder / "summary.json").write_text(json.dumps({
        "samples": len(samples), "kept": int(np.sum(kept)), "dropped": int(len(samples) - np.sum(kept)),
        "threshold": threshold, "dropped-by-reason": reasons,
        "note": "written by this site for its own audit; nothing of it is sent to the server"}, indent=2))


def _own_scores(message: Message, context: Context, encoded) -> np.ndarray:
    """This site's scores: kept from scoring, or, in a resumed run (a new Flower run: the
    site's state is gone), the ones the server sends back, checked to be for its samples."""
    if SCORES_KEY not in context.state:
        if "scores" not in message.content:
            raise RuntimeError("selection asked for before scoring: no scores on this site")
        sent = message.content["scores"]
        ids, own = [str(i) for i in sent["ids"]], _wire_ids(context)
        if ids != own:
            same = len(set(ids) & set(own))
            order = " (in another order)" if same == len(ids) == len(own) else ""
            raise ValueError(
                f"the scores sent back for selection are not this site's: {len(ids)} ids, {same} of them "
                f"among this site's {len(own)} sample ids{order}; a resumed run needs each site to hold "
                "the data it scored"
            )
        context.state[SCORES_KEY] = ConfigRecord({"scores": [float(x) for x in sent["scores"]]})
    return np.asarray(context.state[SCORES_KEY]["scores"], dtype=float)


@app.query("identify")
def identify(message: Message, context: Context) -> Message:
    """Which site this is, for a resumed run whose sites got new node ids: a digest of
    its sample ids (the server holds the ids from scoring, or the digest from tracing)."""
    _, _, _, encoded, _, _ = _load(context)
    return _reply(message, RecordDict({
        "site": ConfigRecord({"ids-digest": ids_digest(_wire_ids(context))}),
        "metrics": MetricRecord({"num-examples": len(encoded),
                                 "partition-id": int(context.node_config.get("partition-id", -1))}),
    }))


@app.query("site")
def describe(message: Message, context: Context) -> Message:
    """Which site this is, from its node config alone (no data is read, so a site whose
    data is broken still answers): the server names the site in `missing-sites`."""
    node_config = context.node_config
    info = {"name": site_name(node_config)}
    if node_config.get("data-file"):
        info["data-file"] = Path(str(node_config["data-file"])).name  # the file's name, not where it lies
    return _reply(message, RecordDict({
        "site": ConfigRecord(info),
        "metrics": MetricRecord({"partition-id": int(node_config.get("partition-id", -1))}),
    }))


def _coverage(cfg, bench, samples, encoded, cache, context, kept) -> dict:
    """How many of this site's k-means clusters the kept set touches (diversity)."""
    pid = int(context.node_config.get("partition-id", 0))
    labels = site_clusters(SiteData(cfg, bench, samples, encoded, cache, pid))
    return {"clusters-covered": len(set(labels[kept].tolist())), "clusters-total": len(set(labels.tolist()))}
