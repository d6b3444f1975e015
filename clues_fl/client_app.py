"""Flower ClientApp: a site. Trains LoRA on its private data, scores its samples
against the anchor gradients the server sends, keeps those above the global
threshold, and replies with adapters, scores and counts only (never text, token
ids or per-sample gradients).

Each handler has Flower's quickstart shape: unpack the typed request (messages.py),
call one plain function (federation/site.py), pack the typed reply. What the site
keeps between messages (its exact scores, the kept rows, per-signal values) lives in
its context.state, and its data and model in a per-process cache, both here."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from clues_fl import console

with console.held_warnings():  # the libraries' import-time deprecations go to site.log, not the console
    import numpy as np
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp

    from clues_fl.config import parse_config
    from clues_fl.data.scenario import site_samples
    from clues_fl.federation import site
    from clues_fl.federation.messages import (
        DescribeRequest,
        IdentifyReply,
        IdentifyRequest,
        LocalTrainReply,
        LocalTrainRequest,
        PrivacySettings,
        ScoreReply,
        ScoreRequest,
        SelectReply,
        SelectRequest,
        SiteDescription,
        TrainReply,
        TrainRequest,
        ids_digest,
    )
    from clues_fl.federation.site_cost import site_cost_mod
    from clues_fl.federation.site_errors import report_site_errors
    from clues_fl.federation.site_ids import site_name, wire_ids
    from clues_fl.model.device import peak_memory_mib
    from clues_fl.runtime import has_scoring_model, score_settings, selection_workbench, workbench
    from clues_fl.scoring.scorers import ScorePayload, SiteData, make_scorer



def _cache_bytes(message: Message, context: Context) -> int | None:
    """The site's prefix caches on disk (the trained model's and a scoring model's), for a
    message that has loaded its data (query.site reads none)."""
    if message.metadata.message_type == DescribeRequest.message_type:
        return None
    caches = {id(c): c for c in (_load(context)[4], _selection(context)[2]) if c is not None}
    return sum(c.disk_bytes for c in caches.values()) if caches else None


# a site's error reaches the server as one line; every good reply says what it cost
app = ClientApp(mods=[report_site_errors, site_cost_mod(_cache_bytes)])

SCORES_KEY = "clues.scores"
KEPT_KEY = "clues.kept"


def _frozen(d: dict) -> str:
    return json.dumps(dict(d), sort_keys=True, default=str)


@functools.lru_cache(maxsize=4)
def _site(run_config: str, node_config: str):
    """This site's samples, their encoding and prefix cache (cached per process)."""
    cfg = parse_config(json.loads(run_config))
    console.setup(site.site_report_dir(cfg, json.loads(node_config)) / "site.log")
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
def _selection_site(run_config: str, node_config: str):
    """The model the selection runs with, this site's samples encoded for it and their
    prefix cache: the trained model's, or scoring.model's with its own tokenizer."""
    cfg, bench, samples, encoded, cache, _ = _site(run_config, node_config)
    if not has_scoring_model(cfg):
        return bench, encoded, cache
    scoring = selection_workbench(cfg)
    scoring_encoded = scoring.encode(samples, cfg)  # one row per sample, in order, as the trained model's
    return scoring, scoring_encoded, scoring.cache(scoring_encoded, cfg, desc="site prefix cache (scoring model)")


def _selection(context: Context):
    """(workbench, encoded samples, prefix cache) of the selection (tracing, scoring)."""
    return _selection_site(_frozen(context.run_config), _frozen(context.node_config))


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


# A site's per-sample state (scores, signal values, kept rows) is held as the bytes of
# one numpy array, not a list of Python numbers: 8 bytes a value against 32 (at 100k
# samples and seven signals, 7 MB against 26 MB for as long as the site runs).
def keep_array(state, key: str, field: str, values, dtype) -> None:
    state[key] = ConfigRecord({field: np.asarray(values, dtype=dtype).tobytes()})


def kept_array(state, key: str, field: str, dtype) -> np.ndarray:
    return np.frombuffer(state[key][field], dtype=dtype)


def _kept_rows(context: Context) -> list[int]:
    if KEPT_KEY not in context.state:
        raise RuntimeError("retraining asked for before selection: no kept samples on this site")
    return kept_array(context.state, KEPT_KEY, "rows", np.int64).tolist()


def _reply(message: Message, content: RecordDict) -> Message:
    return Message(content=content, reply_to=message)


def _partition(context: Context, default: int = 0) -> int:
    return int(context.node_config.get("partition-id", default))


@app.train()
@_ids_hidden
def train(message: Message, context: Context) -> Message:
    """One round of fed.strategy: 'trace' on all raw data, 'aggregate' on the kept samples,
    'all-data' on all at the kept samples' budget. The Adam moments (tracing) come
    and go in their own record; FedProx's proximal-mu adds its proximal term."""
    cfg, bench, samples, encoded, cache, _ = _load(context)
    request = TrainRequest.from_record(message.content)
    if request.phase == "trace":  # the selection's model traces
        bench, encoded, cache = _selection(context)
    kept = None if request.phase == "trace" else _kept_rows(context)
    rows = list(range(len(encoded))) if request.phase in ("trace", "all-data") else kept
    result = site.train_round(
        bench, cfg, encoded, cache, rows, request.state, request.moments, phase=request.phase,
        server_round=request.server_round, proximal_mu=request.proximal_mu, partition_id=_partition(context),
        kept=len(kept) if request.phase == "all-data" else None,
    )
    return _reply(message, TrainReply(
        result.state, result.num_examples, result.loss, result.steps, result.seconds,
        moments=result.moments if request.phase == "trace" else None, gpu_peak_mib=peak_memory_mib(),
    ).to_record())


@app.train("local")
@_ids_hidden
def train_local(message: Message, context: Context) -> Message:
    """Merging mode: a whole local run, with K checkpoints when tracing."""
    cfg, bench, samples, encoded, cache, _ = _load(context)
    request = LocalTrainRequest.from_record(message.content)
    if request.phase == "trace":  # the selection's model traces
        bench, encoded, cache = _selection(context)
    rows = list(range(len(encoded))) if request.phase == "trace" else _kept_rows(context)
    run = site.local_run(bench, cfg, encoded, cache, rows, phase=request.phase, partition_id=_partition(context))
    return _reply(message, LocalTrainReply(
        run.state, run.num_examples, run.loss, run.checkpoints,
        ids_digest=ids_digest(_wire_ids(context)),  # resume: who this is
        gpu_peak_mib=peak_memory_mib(),
    ).to_record())


@app.query("score")
@_ids_hidden
def score(message: Message, context: Context) -> Message:
    """Per-sample scores of the configured selection method (clues+ by default)."""
    cfg, _, samples, _, _, skipped = _load(context)
    bench, encoded, cache = _selection(context)
    request = ScoreRequest.from_record(message.content)
    scorer = make_scorer(request.method, score_settings(cfg))
    payload = ScorePayload(request.checkpoints, request.anchor_gradients, dict(request.scorer))
    result = site.score_samples(scorer, SiteData(cfg, bench, samples, encoded, cache, _partition(context)), payload)
    keep_array(context.state, SCORES_KEY, "scores", result.values, np.float64)  # exact, stays here
    keep_signals(context.state, result.details)
    how = request.privacy or PrivacySettings()  # none: exact per-sample scores
    scores, histogram = site.reported(result.values, report=how.report, epsilon=how.epsilon, delta=how.delta,
                                      edges=how.edges, clip_lo=how.clip_lo, clip_hi=how.clip_hi)
    extras = dict(result.extras)
    return _reply(message, ScoreReply(
        num_examples=len(encoded), ids=_wire_ids(context) if histogram is None else [], scores=scores,
        histogram=histogram, partition_id=_partition(context, -1), score_seconds=result.seconds,
        skipped_rows=len(skipped), truncated=sum(int(e.truncated) for e in encoded),
        scored=int(extras.pop("scored", len(encoded))),  # a scorer that scores fewer (Quad) says so
        extras=extras, gpu_peak_mib=peak_memory_mib(),
    ).to_record())


@app.query("select")
@_ids_hidden
def select(message: Message, context: Context) -> Message:
    """Apply the global threshold (or ratio) locally; report counts only."""
    cfg, _, samples, _, _, _ = _load(context)
    bench, encoded, cache = _selection(context)  # coverage: the clusters of the selection's embeddings
    request = SelectRequest.from_record(message.content)
    labelled = site.has_quality_labels(cfg, context.node_config)
    chosen = site.select(
        _own_scores(request, context), request.decision, anchor_mean=request.anchor_mean,
        anchor_std=request.anchor_std, polluted=[s.polluted for s in samples] if labelled else None,
    )
    keep_array(context.state, KEPT_KEY, "rows", chosen.rows, np.int64)
    names, z = kept_signals(context.state)
    threshold = float(request.threshold) if request.threshold is not None else float("nan")
    own = threshold if request.anchor_mean is None else request.anchor_mean + threshold * request.anchor_std
    site.write_site_report(cfg, site.site_report_dir(cfg, context.node_config), samples, chosen.scores, chosen.kept,
                           threshold, names, z, score_threshold=own)
    clusters = None
    if cfg.eval.coverage:
        clusters = site.coverage(SiteData(cfg, bench, samples, encoded, cache, _partition(context)), chosen.kept)
    return _reply(message, SelectReply(
        len(samples), int(chosen.kept.sum()), chosen.mean_kept_score, labelled, chosen.counts, clusters,
    ).to_record())


SIGNALS_KEY = "clues.signals"


def keep_signals(state, details: dict | None) -> None:
    """A multi-signal scorer's per-signal standardised values, kept in the site's own
    state (`context.state`) for its local report of dropped samples (never sent)."""
    if not details:
        if SIGNALS_KEY in state:
            del state[SIGNALS_KEY]
        return
    z = np.asarray(details["z"], dtype=np.float64)
    state[SIGNALS_KEY] = ConfigRecord({"names": [str(n) for n in details["names"]], "z": z.tobytes()})


def kept_signals(state) -> tuple[list[str] | None, np.ndarray | None]:
    """(signal names, their z values flat, names x samples), or (None, None)."""
    if SIGNALS_KEY not in state:
        return None, None
    rec = state[SIGNALS_KEY]
    return [str(n) for n in rec["names"]], np.frombuffer(rec["z"], dtype=np.float64)


def _own_scores(request: SelectRequest, context: Context) -> np.ndarray:
    """This site's scores: kept from scoring, or, in a resumed run (a new Flower run: the
    site's state is gone), the ones the server sends back, checked to be for its samples."""
    if SCORES_KEY not in context.state:
        if request.scores is None:
            raise RuntimeError("selection asked for before scoring: no scores on this site")
        site.check_sent_scores(list(request.ids), _wire_ids(context))
        keep_array(context.state, SCORES_KEY, "scores", request.scores, np.float64)
    return kept_array(context.state, SCORES_KEY, "scores", np.float64)


@app.query("identify")
def identify(message: Message, context: Context) -> Message:
    """Which site this is, for a resumed run whose sites got new node ids: a digest of
    its sample ids (the server holds the ids from scoring, or the digest from tracing)."""
    IdentifyRequest.from_record(message.content)
    _, _, _, encoded, _, _ = _load(context)
    return _reply(message, IdentifyReply(ids_digest(_wire_ids(context)), len(encoded),
                                         _partition(context, -1)).to_record())


@app.query("site")
def describe(message: Message, context: Context) -> Message:
    """Which site this is, from its node config alone (no data is read, so a site whose
    data is broken still answers): the server names the site in `missing-sites`."""
    DescribeRequest.from_record(message.content)
    node_config = context.node_config
    data_file = Path(str(node_config["data-file"])).name if node_config.get("data-file") else None  # not where it lies
    return _reply(message, SiteDescription(site_name(node_config), _partition(context, -1), data_file).to_record())
