"""CLUES as a Flower strategy: trace, score, global threshold, select, retrain.

The server holds the public anchor set and a clean validation set. It never sees a
site's samples: it sends adapters and anchor gradients, receives per-sample scores
(with keyed hashes of the sample ids, site_ids.py) and confusion counts, and aggregates adapters with Flower's FedAvg
or merges them once (linear / weighted / TIES on dW = B A). The rounds' aggregation is
fed.strategy (any Flower strategy, aggregation.py; rounds.py mixes in what the rounds need).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from clues_fl.aggregation import strategies as aggregation
from clues_fl.aggregation.merging import FinalAdapter
from clues_fl.selection import privacy
from clues_fl.config import RunConfig
from clues_fl.model.device import peak_memory_mib
from clues_fl.model.training import AdamMoments, Checkpoint
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
    ids_digest,
    record_checkpoint,
    split_moments,
    split_record,
    state_record,
    train_config,
)
from clues_fl.selection.metrics import add_counts, selection_metrics
from clues_fl.scoring.scorers import make_scorer
from clues_fl.selection.rules import (
    ThresholdSettings,
    clean_share,
    retraining_sites,
    score_distribution,
    standardise,
    threshold_rule,
)
from clues_fl.federation.site_errors import summarise
from clues_fl.federation.state import (
    Arrays,
    arrays_checkpoint,
    checkpoint_arrays,
    decode,
    encode,
    prefixed,
    unprefixed,
)
from clues_fl.runtime import score_settings
from clues_fl.strategies.rounds import (  # noqa: F401 (SiteFedAvg, SiteDPFedAvg, SitesFailed, sort_replies, ...: re-exported)
    GPU_PEAK_KEY,
    SiteDP,
    SiteDPFedAvg,
    SiteFedAvg,
    SiteRounds,
    SitesFailed,
    site_gpu_peak,
    site_strategy,
    sort_replies,
)

log = logging.getLogger(__name__)


@dataclass
class SiteReport:
    node_id: int
    name: str
    ids: list[str] = field(default_factory=list)
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    counts: dict = field(default_factory=dict)
    kept: int = 0
    mean_kept_score: float = 0.0
    checkpoints: list[Checkpoint] = field(default_factory=list)  # merging mode: local
    trace_state: dict | None = None
    final_state: dict | None = None
    anchor_scores: np.ndarray | None = None  # merging mode: against its own checkpoints
    anchor_grads: list | None = None
    num_examples: int = 0
    skipped_rows: int = 0  # malformed rows the site skipped (data.on-error = skip)
    truncated: int = 0
    scored: int = 0  # samples whose score was computed (Quad scores a fraction)
    method_metrics: dict = field(default_factory=dict)  # the scorer's extras (e.g. Quad clusters)
    clusters: tuple[int, int] | None = None  # eval.coverage: (covered by the kept set, total)
    histogram: np.ndarray | None = None  # privacy.report = histogram: binned counts instead of scores
    digest: str = ""  # merging mode: digest of the site's sample ids, from its trace reply (resume)
    labelled: bool = True  # the site's data carries quality labels (experiments): it sent confusion counts
    selected: bool = False  # the site answered the selection

    @property
    def reported(self) -> bool:
        return bool(self.scores.size) or self.histogram is not None

    # -- state (resume.py, the suite's shared traces) ------------------------------------
    # anchor_grads are not kept: they are only used while scoring.
    TENSOR_FIELDS = ("checkpoints", "trace_state", "final_state", "anchor_grads")

    def to_state(self) -> tuple[dict, Arrays]:
        """(JSON-able fields, named tensor dicts: checkpoint-<k>[/adam-m, /adam-v], trace, final)."""
        values = {f.name: encode(getattr(self, f.name)) for f in fields(self) if f.name not in self.TENSOR_FIELDS}
        values["checkpoint-lrs"] = [c.lr for c in self.checkpoints]
        arrays: Arrays = {}
        for k, ckpt in enumerate(self.checkpoints):
            arrays.update(checkpoint_arrays(f"checkpoint-{k}", ckpt))
        if self.trace_state is not None:
            arrays["trace"] = self.trace_state
        if self.final_state is not None:
            arrays["final"] = self.final_state
        return values, arrays

    @classmethod
    def from_state(cls, values: dict, arrays: Arrays) -> SiteReport:
        known = {f.name for f in fields(cls)} - set(cls.TENSOR_FIELDS)
        site = cls(**{k: decode(v) for k, v in values.items() if k in known})
        site.checkpoints = [arrays_checkpoint(arrays, f"checkpoint-{k}", lr)
                            for k, lr in enumerate(values.get("checkpoint-lrs", []))]
        site.trace_state, site.final_state = arrays.get("trace"), arrays.get("final")
        return site


def wait_for_nodes(grid: Grid, minimum: int, timeout: float = 180.0, every: float = 30.0,
                   poll: float = 1.0) -> list[int]:
    """The connected nodes once at least `minimum` are; logs every `every` seconds how
    many are still missing and which have connected; gives up after `timeout` seconds
    (fed.wait-for-nodes) with TimeoutError."""
    start = time.time()
    said = start
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        waited = time.time() - start
        if waited > timeout:
            raise TimeoutError(
                f"fed.min-nodes={minimum}: only {len(nodes)} site(s) connected in fed.wait-for-nodes={timeout:g} s "
                f"(node ids {nodes or 'none'}); start the missing SuperNodes, or lower fed.min-nodes"
            )
        if time.time() - said >= every:
            said = time.time()
            log.warning("waiting for sites: %d of fed.min-nodes=%d connected (node ids %s), %d missing; "
                        "giving up in %.0f s (fed.wait-for-nodes)", len(nodes), minimum, nodes or "none",
                        minimum - len(nodes), timeout - waited)
        time.sleep(poll)


class Clues:
    """The CLUES protocol over a Flower Grid. `bench` is the server's Workbench."""

    def __init__(self, cfg: RunConfig, bench, anchor_samples, val_samples, test_samples=None):
        self.cfg = cfg
        self.bench = bench
        self.anchor_samples = list(anchor_samples)  # their full text: clues+ computes text signals from it
        self.anchors = bench.encode(self.anchor_samples, cfg)
        self.val = bench.encode(list(val_samples), cfg)
        self.test = list(test_samples or [])  # raw samples: answers are generated for them
        self.anchor_cache = bench.cache(self.anchors, cfg, desc="anchor prefix cache")
        self.val_cache = bench.cache(self.val, cfg, desc="validation prefix cache")
        self.sites: dict[int, SiteReport] = {}
        self.missing: list[dict] = []
        self.site_info: dict[int, dict] = {}  # node -> its name, partition id, data file (query.site)
        self.timings: dict[str, float] = {}
        self.gpu_peaks: dict[str, dict[str, float]] = {}  # phase -> {"server": MiB, "sites": MiB} (CUDA only)
        self.round_losses: dict[str, list[float]] = {}
        self.checkpoints: list[Checkpoint] = []  # federated mode: shared
        self.anchor: dict = {}
        self.threshold: dict = {}
        self.scorer = make_scorer(cfg["selection.method"], score_settings(cfg))
        self.global_state: dict | None = None  # federated retraining: the final global adapter
        self.final: FinalAdapter | None = None  # the aggregate phase's output: what the report evaluates
        self.all_data_state: dict | None = None  # the all-data reference at the selection's budget
        # The rounds each phase has done, as (rounds, the global arrays after them, whether
        # any round aggregated): `rounds` as they go, `resumed_rounds` what a resumed run
        # continues from (from_state); a hook called with (phase, round) after every round
        # (resume.py: it saves the state).
        self.rounds: dict[str, tuple[int, ArrayRecord, bool]] = {}
        self.resumed_rounds: dict[str, tuple[int, ArrayRecord, bool]] = {}
        self.on_round: Callable[[str, int], None] | None = None

    # -- helpers ----------------------------------------------------------------
    def _strategy(self, phase: str, only: set[int] | None = None, offset: int = 0,
                  moments: ArrayRecord | None = None) -> SiteRounds:
        """The aggregation step of `phase`'s rounds: fed.strategy (FedAvg by default) with
        its fed.strategy-args, with the CLUES rounds' behaviour mixed in (rounds.py)."""
        n = self.cfg["fed.min-nodes"]
        if only is not None:
            n = min(n, len(only))

        def failed(node: int, server_round: int, reason: str) -> None:
            self._missing(node, f"{phase} round {server_round}", reason, server_round)

        cls, kwargs = aggregation.resolve(self.cfg.values)
        return site_strategy(cls)(only, failed, offset, phase=phase, min_nodes=n, moments=moments,
                                  **aggregation.run_kwargs(cls, n), **kwargs)

    def _initial_record(self, phase: str) -> ArrayRecord:
        """The initial adapter; for tracing with zero Adam moments (= a fresh optimiser)."""
        state = self.bench.initial_state
        if phase != "trace":
            return state_record(state)
        zeros = {k: torch.zeros_like(v) for k, v in state.items()}
        return state_record(state, AdamMoments(zeros, dict(zeros)))

    def _fedavg_rounds(self, grid: Grid, phase: str, rounds: int, *, only=None, keep=None) -> ArrayRecord | None:
        """The rounds of `phase` (fed.strategy, FedAvg by default) for `rounds` rounds from
        the initial adapter or, in a resumed run, for the rounds left from the saved global
        arrays. Keeps the mean client training loss of each round; after each round calls
        keep(round, arrays) with the global adapter and, while tracing, its averaged Adam
        moments in one record, keeps them as the phase's rounds so far (`rounds`, part of
        to_state), and calls the on_round hook. Returns the last aggregated record (None:
        none aggregated)."""
        done, arrays, aggregated = self.resumed_rounds.pop(phase, (0, self._initial_record(phase), False))
        losses = self.round_losses[phase] = list(self.round_losses.get(phase, []))[:done] if done else []
        adapter, moments = split_moments(arrays)
        strategy = self._strategy(phase, only, offset=done, moments=moments)

        started = [time.time()]

        def after_round(server_round: int, current: ArrayRecord) -> None:
            if server_round == 0:  # Flower's call before the first round
                return
            true_round = done + server_round
            if true_round in strategy.losses:
                losses.append(strategy.losses[true_round])
            loss = f", mean training loss {strategy.losses[true_round]:.4f}" if true_round in strategy.losses else ""
            log.info("%s round %d/%d: %d sites%s (%.1f s)", phase, true_round, rounds,
                     strategy.answered.get(true_round, 0), loss, time.time() - started[0])
            started[0] = time.time()
            current = strategy.with_moments(true_round, current)
            if keep is not None:
                keep(true_round, current)
            self.rounds[phase] = (true_round, current, aggregated or bool(strategy.aggregated))
            if self.on_round is not None:
                self.on_round(phase, true_round)

        runner = strategy
        if self.cfg["privacy.adapter-noise"] > 0:
            sampled = len(only) if only is not None else len(grid.get_node_ids())
            runner = SiteDP(strategy, self.cfg["privacy.adapter-noise"], self.cfg["privacy.adapter-clip"], sampled)
        result = runner.start(
            grid=grid,
            initial_arrays=adapter,
            num_rounds=rounds - done,
            timeout=self.cfg["fed.timeout"],
            train_config=train_config(phase),
            evaluate_fn=after_round,
        )
        self._site_peak(phase, strategy.gpu_peak)
        if result.arrays is not None:
            return strategy.with_moments(max(strategy.aggregated, default=done), result.arrays)
        return arrays if aggregated else None

    def _exchange(self, grid: Grid, phase: str, contents: dict[int, RecordDict], message_type: str) -> dict[int, Message]:
        """Send one message per node; keep the replies that carry no error."""
        messages = [Message(content=c, message_type=message_type, dst_node_id=node) for node, c in contents.items()]
        ok, failed = sort_replies(messages, grid.send_and_receive(messages, timeout=self.cfg["fed.timeout"]))
        self._site_peak(phase, site_gpu_peak(ok.values()))
        for node, reason in failed:
            self._missing(node, phase, reason)
        if len(ok) < min(self.cfg["fed.min-nodes"], len(contents)):
            raise SitesFailed(
                f"phase '{phase}': only {len(ok)} of {len(contents)} sites answered, fewer than "
                f"fed.min-nodes={self.cfg['fed.min-nodes']}; stopping the run. {summarise(failed)}"
            )
        return ok

    def _missing(self, node: int, phase: str, reason: str, server_round: int | None = None) -> None:
        """Record a site that failed: which site (name, partition id, data file when it
        has one), where (phase and FedAvg round) and why."""
        who = self.describe_site(node)
        log.warning("site %s (node %s) failed in phase '%s': %s", who["site"], node, phase, reason)
        self.missing.append({"node": node, **who, "phase": phase, "round": server_round, "reason": str(reason)[:500]})

    def describe_site(self, node: int) -> dict:
        """{"site", "partition-id"[, "data-file"]} of a node, as far as the server knows it."""
        info = dict(self.site_info.get(node, {}))
        if node in self.sites and not self.sites[node].name.startswith("node-"):
            info.setdefault("site", self.sites[node].name)
        info.setdefault("site", f"node-{node}")
        info.setdefault("partition-id", int(info["site"].removeprefix("client-")) if info["site"].startswith("client-") else -1)
        return info

    def name_sites(self, grid: Grid, nodes: list[int]) -> None:
        """Ask each site who it is (query.site: from its node config, no data read), so that
        a site failing before it ever replied is still named in `missing-sites`. A site
        that does not answer stays known by its node id."""
        messages = [Message(content=DescribeRequest().to_record(), message_type=DescribeRequest.message_type,
                            dst_node_id=n) for n in nodes]
        ok, _ = sort_replies(messages, grid.send_and_receive(messages, timeout=self.cfg["fed.timeout"]))
        for node, reply in ok.items():
            site = SiteDescription.from_record(reply.content)
            pid = site.partition_id
            info = {"site": site.name if pid >= 0 else f"node-{node}", "partition-id": pid}
            if site.data_file is not None:
                info["data-file"] = site.data_file
            self.site_info[node] = info

    def record_time(self, name: str, start: float) -> None:
        self.timings[name] = round(time.time() - start, 2)
        peak = peak_memory_mib()  # this process's, since the last phase
        if peak is not None:
            self.gpu_peaks.setdefault(name, {})["server"] = peak

    def _site_peak(self, phase: str, peak: float | None) -> None:
        if peak is not None:
            entry = self.gpu_peaks.setdefault(phase, {})
            entry["sites"] = max(entry.get("sites", 0.0), peak)

    # -- phase 1: trace -------------------------------------------------------------
    def trace_federated(self, grid: Grid) -> None:
        lr = self.cfg["train.lr"]

        def keep(server_round: int, arrays: ArrayRecord) -> None:
            self.checkpoints.append(record_checkpoint(arrays, lr))

        self._fedavg_rounds(grid, "trace", self.cfg["trace.rounds"], keep=keep)
        if not self.checkpoints:
            raise RuntimeError("tracing produced no checkpoint: no site finished a round")

    def trace_local(self, grid: Grid, nodes: list[int]) -> None:
        request = LocalTrainRequest("trace")
        contents = {n: request.to_record() for n in nodes}
        replies = self._exchange(grid, "trace", contents, request.message_type)
        lr = self.cfg["train.lr"]
        for node, reply in replies.items():
            site = self.sites.setdefault(node, SiteReport(node, self.describe_site(node)["site"]))
            local = LocalTrainReply.from_record(reply.content, lr)
            site.checkpoints.extend(local.checkpoints)
            site.trace_state = local.state
            if local.ids_digest:
                site.digest = local.ids_digest

    # -- phase 2: score ---------------------------------------------------------
    def _anchor_side(self, checkpoints: list[Checkpoint]):
        return self.scorer.anchor_side(self.bench, self.anchors, checkpoints, self.cfg, cache=self.anchor_cache,
                                       samples=self.anchor_samples)

    def score(self, grid: Grid, nodes: list[int], federated: bool) -> None:
        contents: dict[int, RecordDict] = {}
        shared, reporting = None, None
        if federated and self.scorer.needs_anchor_gradients:
            shared = self._anchor_side(self.checkpoints)
            private = self._privacy_config(shared.scores)
            reporting = PrivacySettings.from_config(private) if private else None
            self.anchor = {"scores": shared.scores.tolist(), **shared.config, **private}
        for node in nodes:
            ckpts, grads, side = [], [], shared
            if self.scorer.needs_trace:
                if federated:
                    ckpts = self.checkpoints
                    grads = shared.gradients if shared is not None else []
                else:
                    site = self.sites.get(node)
                    if site is None or not site.checkpoints:
                        continue  # failed while tracing
                    ckpts = site.checkpoints
                    if self.scorer.needs_anchor_gradients:
                        side = self._anchor_side(site.checkpoints)
                        site.anchor_scores, site.anchor_grads = side.scores, side.gradients
                        grads = side.gradients
            contents[node] = ScoreRequest(
                self.cfg["selection.method"], list(ckpts), list(grads),
                scorer=dict(side.config) if side is not None else {}, privacy=reporting,
            ).to_record()
        replies = self._exchange(grid, "score", contents, ScoreRequest.message_type)
        for node, reply in replies.items():
            site = self.sites.setdefault(node, SiteReport(node, f"node-{node}"))
            answer = ScoreReply.from_record(reply.content)
            if answer.histogram is not None:
                site.histogram = np.asarray(answer.histogram, dtype=np.int64)
            else:
                site.ids = list(answer.ids)
                site.scores = np.asarray(answer.scores, dtype=float)
            site.num_examples = answer.num_examples
            site.skipped_rows = answer.skipped_rows
            site.truncated = answer.truncated
            site.scored = answer.scored
            site.method_metrics = dict(answer.extras)  # the scorer's extras (e.g. Quad's clusters)
            pid = answer.partition_id
            site.name = f"client-{pid}" if pid >= 0 else f"node-{node}"

    # -- phase 3: threshold -------------------------------------------------------
    def _privacy_config(self, anchor_scores: np.ndarray) -> dict:
        """What sites need to report binned counts and/or noised scores: bin edges and
        a clipping range, both derived from the public anchor scores only."""
        cfg = self.cfg
        histogram, dp = cfg["privacy.report"] == "histogram", privacy.dp_enabled(cfg["privacy.epsilon"])
        if not (histogram or dp):
            return {}
        if self.scorer.selection != "anchor":
            raise ValueError(f"privacy.report='histogram' and privacy.epsilon > 0 need an anchor-threshold "
                             f"method such as 'clues', not '{cfg['selection.method']}'")
        settings = PrivacySettings(cfg["privacy.report"])
        if histogram:
            edges = privacy.histogram_edges(anchor_scores, bins=cfg["privacy.bins"])
            settings.edges = [float(e) for e in edges[1:-1]]  # the outer edges are -inf, +inf
        if dp:
            lo, hi = privacy.clip_range(anchor_scores)
            settings.epsilon, settings.delta = float(cfg["privacy.epsilon"]), float(cfg["privacy.delta"])
            settings.clip_lo, settings.clip_hi = float(lo), float(hi)
        return settings.to_config()

    def site_scores(self, site: SiteReport) -> np.ndarray:
        """One site's scores, or stand-ins reproducing its histogram (its plot in the report)."""
        if site.histogram is None:
            return site.scores
        return privacy.pseudo_scores(site.histogram, self._histogram_edges())

    def _pooled_scores(self, sites: list[SiteReport]) -> np.ndarray:
        """The sites' scores pooled, or (privacy.report = histogram) stand-ins reproducing
        their summed histograms, as privacy.threshold_from_histograms computes them."""
        if all(s.histogram is None for s in sites):
            return np.concatenate([s.scores for s in sites])
        if any(s.histogram is None for s in sites):
            raise RuntimeError("some sites reported scores and others histograms: privacy.report differs between them")
        return privacy.pooled_pseudo_scores([s.histogram for s in sites], self._histogram_edges())

    def _histogram_edges(self) -> np.ndarray:
        """The bins the sites counted in (privacy.report = histogram), from the anchor scores."""
        return privacy.histogram_edges(np.asarray(self.anchor["scores"]), bins=self.cfg["privacy.bins"])

    def decide_threshold(self, federated: bool) -> dict:
        scored = [s for s in self.sites.values() if s.reported]
        if not scored:
            raise RuntimeError("no site returned scores")
        if self.scorer.selection == "anchor":
            info = self._anchor_threshold(scored, federated)
        else:  # "fixed": selection flags; "ratio": the top selection.ratio of all pooled scores
            rule = threshold_rule("global-ratio" if self.scorer.selection == "ratio" else "fixed")
            pooled = self._pooled_scores(scored)
            info = {"rule": rule.name, **rule.decide(None, pooled, self._threshold_settings()), "standardised": False}
        info["method"] = self.cfg["selection.method"]
        self.threshold = info
        return info

    def _anchor_threshold(self, scored: list[SiteReport], federated: bool) -> dict:
        rule = self.cfg["selection.threshold"]
        if federated:
            anchor_scores = np.asarray(self.anchor["scores"])
            all_scores = self._pooled_scores(scored)
        else:
            # Local checkpoints give each site its own score scale: express every score
            # in units of that site's anchor-score spread (z-scores), then pool.
            anchor_scores = np.concatenate([standardise(s.anchor_scores, s.anchor_scores) for s in scored])
            all_scores = np.concatenate([standardise(s.scores, s.anchor_scores) for s in scored])
        info: dict = {"rule": rule, "anchor-scores": anchor_scores.tolist(), "standardised": not federated,
                      "reported": self.cfg["privacy.report"], "epsilon": self.cfg["privacy.epsilon"]}
        info.update(threshold_rule(rule).decide(anchor_scores, all_scores, self._threshold_settings()))
        return info

    def _threshold_settings(self) -> ThresholdSettings:
        return ThresholdSettings(quantile=self.cfg["selection.quantile"], static=self.cfg["selection.static"],
                                 ratio=self.cfg["selection.ratio"])

    # -- phase 4: select ------------------------------------------------------------
    def select(self, grid: Grid) -> None:
        contents = {}
        for node, site in self.sites.items():
            if not site.reported:
                continue
            request = SelectRequest()
            if self.threshold["rule"] == "ratio":
                request.ratio = float(self.threshold["ratio"])
            else:
                request.threshold = float(self.threshold["threshold"])
            if self.threshold["standardised"]:
                request.anchor_mean = float(np.mean(site.anchor_scores))
                request.anchor_std = float(max(np.std(site.anchor_scores, ddof=1), 1e-12))
            if self.holds_exact_scores:  # the site's own scores go back: a resumed run's sites lost theirs
                request.ids, request.scores = list(site.ids), [float(x) for x in site.scores]
            contents[node] = request.to_record()
        replies = self._exchange(grid, "select", contents, SelectRequest.message_type)
        for node, reply in replies.items():
            answer = SelectReply.from_record(reply.content)
            site = self.sites[node]
            site.kept = answer.kept
            site.mean_kept_score = answer.mean_kept_score
            site.labelled = answer.labelled
            site.counts = dict(answer.counts)
            site.selected = True
            if answer.clusters is not None:
                site.clusters = answer.clusters

    # -- phase 5: retrain + aggregate --------------------------------------------------
    def retraining_nodes(self) -> set[int]:
        """The nodes that retrain: their sites kept at least selection.min-kept samples
        (NothingKept when none did: selection/rules.py retraining_sites)."""
        answered = {n: s for n, s in self.sites.items() if s.selected}
        threshold = self.threshold.get("threshold", self.threshold.get("ratio"))
        names = retraining_sites({s.name: s.kept for s in answered.values()}, self.cfg["selection.min-kept"],
                                 f"threshold {self.threshold.get('rule')} = {threshold:.4g}"
                                 if isinstance(threshold, float) else "")
        return {n for n, s in answered.items() if s.name in names}

    def retrain_federated(self, grid: Grid) -> dict:
        self.global_state = self._retrain_kept_sites(grid, "retrain", "retraining")
        return self.global_state

    def _retrain_kept_sites(self, grid: Grid, phase: str, what: str) -> dict:
        """`retrain.rounds` rounds of `phase` over the sites that kept samples (sites that
        kept nothing have nothing to train on); the final adapter state."""
        kept = self.retraining_nodes()
        arrays = self._fedavg_rounds(grid, phase, self.cfg["retrain.rounds"], only=kept)
        if arrays is None:
            raise RuntimeError(f"{what} produced no model: no site finished a round")
        return split_record(arrays)[0]

    def retrain_all_federated(self, grid: Grid) -> dict:
        """The all-data reference at an equal budget: retrained from the base model on every
        sample of the same sites, for the same rounds and, per site, the same number of
        steps as the selection's retraining (client_app._equal_budget_epochs)."""
        self.all_data_state = self._retrain_kept_sites(grid, "retrain-all", "all-data retraining")
        return self.all_data_state

    def retrain_local(self, grid: Grid) -> dict[int, dict]:
        request = LocalTrainRequest("retrain")
        contents = {n: request.to_record() for n in self.retraining_nodes()}
        replies = self._exchange(grid, "retrain", contents, request.message_type)
        states = {}
        for node, reply in replies.items():
            states[node] = LocalTrainReply.from_record(reply.content).state
            self.sites[node].final_state = states[node]
        return states

    # -- state (resume.py, the suite's shared traces) -------------------------------------
    ROUND_PHASES = ("trace", "retrain")  # the phases whose rounds a resumed run continues

    def to_state(self) -> tuple[dict, Arrays]:
        """What the protocol has learnt so far, as (JSON-able values, named tensor dicts)
        (federation/state.py): missing sites, timings, round losses, the anchor side, the
        threshold, the shared checkpoints, every site (SiteReport.to_state), the rounds
        of the phases in ROUND_PHASES so far, and the aggregate phase's final adapter.
        from_state takes it back into a protocol built from the same run-config."""
        values: dict = {
            "missing": encode(self.missing),
            "timings": encode(self.timings),
            "round-losses": encode(self.round_losses),
            "anchor": encode(self.anchor),
            "threshold": encode(self.threshold),
            "checkpoint-lrs": [c.lr for c in self.checkpoints],
            "sites": [],
            "rounds": {},
        }
        arrays: Arrays = {}
        for k, ckpt in enumerate(self.checkpoints):
            arrays.update(checkpoint_arrays(f"checkpoint-{k}", ckpt))
        for i, site in enumerate(self.sites.values()):
            site_values, site_arrays = site.to_state()
            values["sites"].append(site_values)
            arrays.update(prefixed(f"site-{i}", site_arrays))
        for phase, (done, record, aggregated) in self.rounds.items():
            if phase in self.ROUND_PHASES:
                values["rounds"][phase] = {"done": done, "aggregated": aggregated}
                arrays[f"rounds/{phase}"] = record.to_torch_state_dict()
        if self.final is not None:
            values["final"] = {"rule": self.final.rule, "sites": list(self.final.sites),
                               "weights": [float(w) for w in self.final.weights], "density": self.final.density}
            if self.final.state is not None:
                arrays["final"] = self.final.state
        return values, arrays

    def from_state(self, values: dict, arrays: Arrays) -> None:
        """Take back what to_state gave (or a part of it: a missing entry stays as it is).
        The rounds it holds are where their phases continue (resumed_rounds)."""
        if "missing" in values:
            self.missing = decode(values["missing"])
        if "timings" in values:
            self.timings = decode(values["timings"])
        if "round-losses" in values:
            self.round_losses = decode(values["round-losses"])
        if "anchor" in values:
            self.anchor = decode(values["anchor"])
        if "threshold" in values:
            self.threshold = decode(values["threshold"])
        if "checkpoint-lrs" in values:
            self.checkpoints = [arrays_checkpoint(arrays, f"checkpoint-{k}", lr)
                                for k, lr in enumerate(values["checkpoint-lrs"])]
        if "sites" in values:
            self.sites = {}
            for i, entry in enumerate(values["sites"]):
                site = SiteReport.from_state(entry, unprefixed(f"site-{i}", arrays))
                self.sites[site.node_id] = site
        for phase, rounds in values.get("rounds", {}).items():
            self.rounds[phase] = (int(rounds["done"]), ArrayRecord(torch_state_dict=arrays[f"rounds/{phase}"]),
                                  bool(rounds["aggregated"]))
            self.resumed_rounds[phase] = self.rounds[phase]
        if "final" in values:
            final = values["final"]
            by_name = {s.name: s for s in self.sites.values()}
            self.final = FinalAdapter(state=arrays.get("final"), rule=final["rule"], sites=list(final["sites"]),
                                      weights=list(final["weights"]), density=float(final["density"]),
                                      site_states=[by_name[n].final_state for n in final["sites"]])
            if self.final.state is not None:
                self.global_state = self.final.state

    # -- resumption ---------------------------------------------------------------------
    @property
    def holds_exact_scores(self) -> bool:
        """Whether the scores the sites reported are their exact scores (no privacy mode):
        only then can a resumed run hand them back to the sites for selection."""
        return self.cfg["privacy.report"] == "scores" and not privacy.dp_enabled(self.cfg["privacy.epsilon"])

    def rebind_sites(self, grid: Grid, nodes: list[int]) -> list[int]:
        """A restarted run can see its sites under new node ids (simulation draws them at
        random; a restarted SuperNode registers anew). Find each site of the saved state
        among the connected nodes by the digest of its sample ids (query.identify).
        Returns the connected nodes."""
        if set(self.sites) <= set(nodes):
            return nodes
        nodes = wait_for_nodes(grid, max(len(nodes), len(self.sites)), self.cfg["fed.wait-for-nodes"])
        request = IdentifyRequest()
        replies = self._exchange(grid, "identify", {n: request.to_record() for n in nodes}, request.message_type)
        found: dict[str, list[int]] = {}
        for node, reply in replies.items():
            found.setdefault(IdentifyReply.from_record(reply.content).ids_digest, []).append(node)
        moved: dict[int, SiteReport] = {}
        for old, site in self.sites.items():
            matches = found.get(ids_digest(site.ids) if site.ids else site.digest, [])
            if len(matches) != 1:
                raise RuntimeError(
                    f"resuming: site {site.name} (node {old} before) is "
                    f"{'not among' if not matches else 'ambiguous among'} the connected sites {nodes}: "
                    "a resumed run needs the same sites with the same data (or start over: resume=false)"
                )
            log.info("resuming: site %s was node %s, is now node %s", site.name, old, matches[0])
            site.node_id = matches[0]
            moved[matches[0]] = site
        self.sites = moved
        return nodes

    # -- report -----------------------------------------------------------------------
    def selection_summary(self) -> dict:
        answered = [s for s in self.sites.values() if s.selected]
        if answered and not all(s.labelled and s.counts for s in answered):
            return self.unlabelled_summary(answered)
        sites = [s for s in self.sites.values() if s.counts]
        per_site = {}
        for s in sites:
            per_site[s.name] = {**selection_metrics(s.counts), **s.counts, "kept": s.kept,
                                "skipped-rows": s.skipped_rows, "truncated": s.truncated,
                                "scored": s.scored, **s.method_metrics}
            if s.clusters:
                per_site[s.name]["clusters-covered"], per_site[s.name]["clusters-total"] = s.clusters
        overall = selection_metrics(add_counts([s.counts for s in sites])) if sites else {}
        if sites:
            overall["scored-fraction"] = sum(s.scored for s in sites) / max(1, sum(s.num_examples for s in sites))
        if sites and all(s.clusters for s in sites):
            overall["cluster-coverage"] = sum(s.clusters[0] for s in sites) / sum(s.clusters[1] for s in sites)
        return {**overall, **self._share_and_distribution(), "per-client": per_site}

    def unlabelled_summary(self, sites: list[SiteReport]) -> dict:
        """Selection report for data without quality labels: kept counts per site, the
        estimated clean share and the score distribution; no precision/recall/F1 (every
        sample would count as clean and the figures would be meaningless)."""
        per_site = {s.name: {"kept": s.kept, "n": s.num_examples, "kept-share": s.kept / max(1, s.num_examples),
                             "skipped-rows": s.skipped_rows, "truncated": s.truncated, "scored": s.scored,
                             **s.method_metrics} for s in sites}
        n = sum(s.num_examples for s in sites)
        kept = sum(s.kept for s in sites)
        return {"labelled": False, "n": n, "kept": kept, "kept-share": kept / max(1, n),
                **self._share_and_distribution(), "per-client": per_site}

    def _share_and_distribution(self) -> dict:
        """Estimated clean share (anchor-quantile ratios on the anchor-based scores,
        bootstrap interval, and how many anchors it rests on) and the score distribution
        of the sites and of the anchors."""
        out: dict = {}
        reported = [s for s in self.sites.values() if s.reported]
        if not reported or self.scorer.selection != "anchor":
            return out
        try:
            if self.threshold.get("standardised"):
                anchors = np.concatenate([standardise(s.anchor_scores, s.anchor_scores) for s in reported])
                pooled = np.concatenate([standardise(s.scores, s.anchor_scores) for s in reported])
                anchor_count = len(reported[0].anchor_scores)  # each site scored the same anchors
            else:
                anchors = np.asarray(self.anchor["scores"])
                pooled = self._pooled_scores(reported)
                anchor_count = anchors.size
            out["estimated-clean-share"] = {**clean_share(anchors, pooled, seed=self.cfg["seed"]),
                                            "anchors": int(anchor_count)}
            out["score-distribution"] = {"sites": score_distribution(pooled), "anchors": score_distribution(anchors)}
        except ValueError as err:  # too few finite scores
            log.warning("no clean-share estimate: %s", err)
        return out
