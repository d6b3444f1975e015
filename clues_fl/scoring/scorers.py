"""Selection methods as pluggable scorers, chosen by `selection.method`.

A scorer runs on a site and turns that site's encoded samples into one score per
sample (higher = keep). The server learns from the class what to send it (trace
checkpoints and anchor gradients or nothing) and how to turn scores into a
selection (CLUES's anchor-based global threshold, or one global threshold that keeps
the top `selection.ratio` of all pooled scores).

A new method is one class:

    class LengthScorer(Scorer):          # in mypkg/scorers.py
        def score(self, site, payload):
            return np.array([len(e.input_ids) for e in site.encoded], dtype=float)

    --run-config "selection.method='mypkg.scorers:LengthScorer'"
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from clues_fl import plugins
from clues_fl.scoring import quad
from clues_fl.scoring import signals
from clues_fl.scoring.baselines import (
    datainf_scores,
    encode_answer_only,
    ifd_scores,
    ppl_scores,
    random_scores,
)
from clues_fl.scoring.alignment import ScoreSettings
from clues_fl.model.training import Checkpoint
from clues_fl.model.loading import load_lora_state
from clues_fl.selection.rules import CALIBRATED_SHARE_QUANTILES, SHARE_QUANTILES, global_threshold


@dataclass
class SiteData:
    """What a site holds: its config, model workbench, samples and their encoding."""

    cfg: object
    bench: object
    samples: list
    encoded: list
    cache: object = None
    partition_id: int = 0


@dataclass
class ScorePayload:
    """What the server sent: trace checkpoints, the anchor gradient (reference) at
    each, and the method's scalar settings (e.g. Quad's tau and budget)."""

    checkpoints: list[Checkpoint] = field(default_factory=list)
    anchor_gradients: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)


@dataclass
class AnchorSide:
    """What the server derives from the public anchor set at the trace checkpoints."""

    scores: np.ndarray  # threshold material: the anchors' leave-one-out scores (clues+: its clean reference)
    gradients: list[dict]  # the reference sent to the sites, one per checkpoint
    config: dict = field(default_factory=dict)  # scalars for the sites


class Scorer:
    name = "custom"
    needs_trace = False  # the server traces first and sends checkpoints
    needs_anchor_gradients = False  # ... and the anchor gradient at each checkpoint
    # How scores become a selection: "anchor" = selection.threshold rules on the
    # leave-one-out anchor scores (CLUES); "ratio" = one global threshold keeping the
    # top selection.ratio of all pooled scores; "fixed" = keep score >= 0.5.
    selection = "ratio"
    # where anchor-f1 reads the clean share off the clean reference (rules.clean_share_estimate)
    share_quantiles = SHARE_QUANTILES
    settings: ScoreSettings | None = None  # gradient scorers: how the engine scores

    def score(self, site: SiteData, payload: ScorePayload) -> np.ndarray:
        raise NotImplementedError

    def anchor_side(self, bench, anchors, checkpoints: list[Checkpoint], cfg, cache=None, samples=None) -> AnchorSide:
        """Server side (needs_anchor_gradients): mean anchor gradient per checkpoint and
        each anchor's leave-one-out score. `anchors` are encoded; `samples` are the same
        anchors' raw records (their full text) where the server has them."""
        side = bench.anchor_scores(anchors, checkpoints, cfg, cache=cache, settings=self.settings)
        return AnchorSide(side.scores, side.gradients)

    def extras(self) -> dict:
        """Scalar metrics of the last score() call for the site's reply (e.g. how many
        samples were scored); never per-sample data."""
        return {}


class CluesScorer(Scorer):
    name = "clues"
    needs_trace = needs_anchor_gradients = True
    selection = "anchor"

    def __init__(self, settings: ScoreSettings):
        self.settings = settings

    def score(self, site, payload):
        return site.bench.score(
            site.encoded, payload.checkpoints, payload.anchor_gradients, site.cfg,
            cache=site.cache, settings=self.settings,
        ).scores


class CluesPlusScorer(CluesScorer):
    """CLUES+ (the default method): CLUES alignment plus domain similarity, base-model
    loss, question information, end-of-answer, near-duplicate and question-answer
    similarity signals (``selection.signals``; clues_fl/scoring/signals.py). The server
    fits a clean model of each signal to the anchors and sends it (with the anchors'
    values and their mean question embedding, for ``domain``); a site refines it
    with its own pool and scores each sample by how far short of it the sample falls on
    all signals, as log10 of the share of clean samples that would fall as far short
    (0 = nowhere short, -1.3 = worse than 95% of clean ones). The sites report only that
    one number per sample; the threshold rules' picture of clean scores is the model's
    (signals.clean_reference), not the anchors' own scores."""

    name = "clues+"
    share_quantiles = CALIBRATED_SHARE_QUANTILES  # its clean reference is exact (signals.clean_reference)

    def __init__(self, settings: ScoreSettings):
        super().__init__(settings)
        self.details: dict = {}  # the last score() call's per-signal values: stay on the site

    def anchor_side(self, bench, anchors, checkpoints, cfg, cache=None, samples=None):
        if samples is None:
            raise ValueError("selection.method='clues+': the server needs the anchors' text (their "
                             "records) to compute their signals; pass them as `samples`")
        side = super().anchor_side(bench, anchors, checkpoints, cfg, cache=cache)  # CLUES's: the gradients
        values = self.anchor_signals(bench, anchors, checkpoints, cfg, side.scores, samples, cache)
        cal = signals.calibrate(values)
        if "domain" in cal.names:
            from clues_fl.model.device import device_of

            cal.domain_centre = signals.domain_centre_of(samples, cfg.selection.embedding_model,
                                                         device_of(bench.model))
        return AnchorSide(signals.clean_reference(len(anchors)), side.gradients, cal.to_config())

    def anchor_signals(self, bench, anchors, checkpoints, cfg, loo_scores, samples, cache=None,
                       names=None) -> dict:
        """The signals (`names`, default ``selection.signals``) of the public anchors
        (`samples`: their records; `anchors`: their encodings)."""
        losses = signals.checkpoint_losses(bench, anchors, checkpoints, batch_size=cfg.scoring.batch_size,
                                           cache=cache)
        return signals.compute_signals(bench, samples, anchors, cfg, clues_scores=loo_scores, losses=losses,
                                       cache=cache, names=names or tuple(cfg.selection.list("signals")))

    def score(self, site, payload):
        result = site.bench.score(site.encoded, payload.checkpoints, payload.anchor_gradients, site.cfg,
                                  cache=site.cache, settings=self.settings)
        cal = signals.Calibration.from_config(payload.config)
        if "domain" in cal.names and cal.domain_centre is None:
            raise ValueError("selection.signals: 'domain' needs the anchors' mean question embedding "
                             "(signal-domain-centre) in the server's message, and it has none")
        raw = signals.compute_signals(site.bench, site.samples, site.encoded, site.cfg, clues_scores=result.scores,
                                      losses=result.losses, cache=site.cache, names=cal.names,
                                      domain_centre=cal.domain_centre)
        combined, z, _ = signals.calibrated_scores(raw, cal)
        self.details = {"names": list(cal.names), "z": z, "raw": raw}
        return combined


class LessScorer(CluesScorer):
    """LESS: cosine of Adam-preconditioned gradients, lr-weighted over checkpoints;
    selects a top fraction (it has no threshold of its own)."""

    name = "less"
    selection = "ratio"

    def __init__(self, settings: ScoreSettings):
        super().__init__(ScoreSettings("cosine", "adam", settings.batch_size))


class DataInfScorer(Scorer):
    """DataInf at the last trace checkpoint."""

    name = "datainf"
    needs_trace = needs_anchor_gradients = True

    def score(self, site, payload):
        bench = site.bench
        load_lora_state(bench.model, payload.checkpoints[-1].state)
        return datainf_scores(
            bench.model, site.encoded, payload.anchor_gradients[-1], bench.first_layer,
            pad_id=bench.pad_id, batch_size=site.cfg.scoring.batch_size, cache=site.cache,
        )


class PplScorer(Scorer):
    """Perplexity of the answer under the base model (low perplexity kept)."""

    name = "ppl"

    def score(self, site, payload):
        bench = site.bench
        load_lora_state(bench.model, bench.initial_state)
        return ppl_scores(bench.model, site.encoded, bench.first_layer, pad_id=bench.pad_id,
                          batch_size=site.cfg.scoring.batch_size, cache=site.cache)


class IfdScorer(Scorer):
    """Instruction-following difficulty under the base model."""

    name = "ifd"

    def score(self, site, payload):
        bench, cfg = site.bench, site.cfg
        load_lora_state(bench.model, bench.initial_state)
        answer_only = encode_answer_only(bench.tokenizer, site.encoded, cfg.data.system_prompt or None)
        return ifd_scores(bench.model, site.encoded, answer_only, bench.first_layer, pad_id=bench.pad_id,
                          batch_size=cfg.scoring.batch_size, cache=site.cache)


class QuadScorer(Scorer):
    """Quad: k-means clusters of the site's samples are bandit arms; a few samples of
    each pulled cluster are scored by K-FAC influence against the anchor gradient,
    and clusters whose mean influence beats tau join the selection until the budget.
    Scores are 1 (selected) / 0, so the server's rule is "fixed"."""

    name = "quad"
    needs_trace = needs_anchor_gradients = True
    selection = "fixed"

    def __init__(self, settings: ScoreSettings):
        self.settings = ScoreSettings(settings.similarity, "sgd", settings.batch_size)
        self._extras: dict = {}

    def anchor_side(self, bench, anchors, checkpoints, cfg, cache=None, samples=None):
        side = quad.anchor_influence(bench, anchors, checkpoints, cfg, self.settings, cache=cache)
        tau = global_threshold(cfg.quad.tau, side.scores, quantile=cfg.quad.tau_quantile,
                               static=cfg.selection.static)
        # Influence values are tiny and their scale depends on the model and damping;
        # rewards in units of the anchors' spread make the UCB bonus (alpha) meaningful.
        scale = float(np.std(side.scores, ddof=1))  # anchor_influence needs >= 2 anchors
        return AnchorSide(side.scores, side.references, {
            "tau": float(tau), "budget": float(cfg.quad.budget), "scale": scale if scale > 0 else 1.0})

    def score(self, site, payload):
        cfg, bench, encoded = site.cfg, site.bench, site.encoded
        labels = site_clusters(site)
        budget = float(payload.config.get("budget", cfg.quad.budget))
        count = int(np.ceil(budget * len(encoded) - 1e-9)) if budget <= 1 else int(budget)

        scale = float(payload.config.get("scale", 1.0))

        def influence(rows):  # in units of the anchors' influence spread
            subset = site.cache.subset(rows) if site.cache is not None else None
            return bench.score([encoded[r] for r in rows], payload.checkpoints, payload.anchor_gradients, cfg,
                               cache=subset, settings=self.settings).scores / scale

        result = quad.quad_select(
            labels, influence, budget=max(1, min(count, len(encoded))),
            sampling_ratio=cfg.quad.sampling_ratio, tau=float(payload.config["tau"]) / scale, alpha=cfg.quad.alpha,
            max_scored_fraction=cfg.quad.max_scored, seed=cfg.run.seed * 1000 + site.partition_id,
        )
        self._extras = {
            "scored": int(result.n_scored), "clusters": int(labels.max() + 1),
            "selected-clusters": len(result.selected_clusters), "bandit-iterations": int(result.iterations),
        }
        return result.kept.astype(float)

    def extras(self):
        return dict(self._extras)


_CLUSTERS: dict[tuple, np.ndarray] = {}


def site_clusters(site: SiteData) -> np.ndarray:
    """k-means labels of a site's samples, computed once per process and site (the
    embeddings come from the base model, which does not change during a run)."""
    cfg = site.cfg
    key = (cfg.scoring.model or cfg.model.name, cfg.quad.embedding_model, cfg.quad.clusters, cfg.run.seed,
           tuple(e.id for e in site.encoded))
    if key not in _CLUSTERS:
        bench = site.bench
        if cfg.quad.embedding_model:
            emb = quad.embed_with_model(cfg.quad.embedding_model, site.samples)
        else:
            load_lora_state(bench.model, bench.initial_state)  # LoRA B = 0: the base model
            emb = quad.embed_samples(bench.model, site.encoded, bench.first_layer, pad_id=bench.pad_id,
                                     batch_size=cfg.scoring.batch_size, cache=site.cache)
        if len(_CLUSTERS) >= 8:
            _CLUSTERS.pop(next(iter(_CLUSTERS)))
        _CLUSTERS[key] = quad.cluster_samples(emb, cfg.quad.clusters, seed=cfg.run.seed)
    return _CLUSTERS[key]


class RandomScorer(Scorer):
    name = "random"

    def score(self, site, payload):
        return random_scores(len(site.encoded), site.cfg.run.seed * 1000 + site.partition_id)


class KeepAll(Scorer):
    """No selection: train on everything (the 'low-quality' baseline)."""

    name = "all"
    selection = "fixed"

    def score(self, site, payload):
        return np.ones(len(site.encoded))


class Oracle(Scorer):
    """Keeps exactly the clean samples by the experiment-only pollution flags."""

    name = "oracle"
    selection = "fixed"

    def score(self, site, payload):
        return np.array([0.0 if s.polluted else 1.0 for s in site.samples])


BUILTIN = {c.name: c for c in (CluesScorer, CluesPlusScorer, QuadScorer, LessScorer, DataInfScorer, PplScorer, IfdScorer, RandomScorer, KeepAll, Oracle)}


def make_scorer(method: str, settings: ScoreSettings) -> Scorer:
    """A built-in name, or 'package.module:ClassName' for a user's scorer."""
    if method in BUILTIN:
        cls = BUILTIN[method]
    elif plugins.is_reference(method):
        cls = plugins.load(method, "selection.method", accepts=plugins.subclass_of(Scorer),
                           expected="a clues_fl.scoring.scorers.Scorer subclass")
    else:
        raise ValueError(
            f"selection.method: '{method}' is not one of {', '.join(BUILTIN)} or 'module:Class'"
        )
    try:
        return cls(settings)
    except TypeError:
        return cls()


def method_name(scorer) -> str:
    """The selection.method value of a scorer (a name, a Scorer class or instance)."""
    if isinstance(scorer, str):
        return scorer
    cls = scorer if isinstance(scorer, type) else type(scorer)
    return cls.name if BUILTIN.get(cls.name) is cls else plugins.reference(cls)
