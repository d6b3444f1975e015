"""The CLUES protocol as named phases, and the one driver that runs them.

    trace -> score -> threshold -> select -> aggregate [-> all-data] -> report

Each phase is a unit with its own body: its name (the status lines, the saved state and
the messages use it), the fields of the protocol state (server/state.py
`ProtocolState`; `sites.x`: a field of each `SiteRecord`) it reads and writes, what
its status lines say it is about to do (`plan`) and what it did (`result`), and `run`.

| phase      | reads                          | writes                                              |
|------------|--------------------------------|-----------------------------------------------------|
| trace      | (the sites' data)              | checkpoints (federated), or each site's local checkpoints and traced adapter (merging); round_losses |
| score      | checkpoints, (the anchor set)  | anchor (scores, what the scorer shares, privacy settings), each site's scores or histogram |
| threshold  | anchor, the sites' scores      | threshold                                           |
| select     | threshold, the sites' scores   | each site's kept count and confusion counts         |
| aggregate  | each site's kept count         | final: the last global adapter of rounds of the rounds strategy (retrain.mode = rounds), or the sites' retrained adapters with the merge rule's weights (merge) |
| all-data   | each site's kept count         | all_data_state: the equal-budget all-data reference (not saved) |
| report     | everything above               | outputs/<run-name>/ (reporting/results.py)          |

`run_phases` runs them in order over a `ProtocolRun` and skips what its journal has
done: a resumed run (federation/resume.py's RunState is the journal that saves the
state after every phase and round) or a trace the evaluation suite shares across
methods (experiments/suite.py: an in-memory `MemoryJournal`). `CluesStrategy.start`
and the suite's `Lab.run` both run the protocol through it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
from flwr.serverapp import Grid

from clues_fl import console
from clues_fl.aggregation.merging import FinalAdapter, plan_merge
from clues_fl.config import RunConfig
from clues_fl.federation.messages import (
    LocalTrainReply,
    LocalTrainRequest,
    PrivacySettings,
    ScoreReply,
    ScoreRequest,
    SelectReply,
    SelectRequest,
    record_checkpoint,
    split_record,
)
from clues_fl.model.device import peak_memory_mib
from clues_fl.reporting.results import evaluate_and_report
from clues_fl.selection.rules import ThresholdSettings, retraining_sites, threshold_rule
from clues_fl.server.cost import MeteredGrid
from clues_fl.server.data import ServerData
from clues_fl.server.rounds import run_rounds
from clues_fl.server.scores import anchor_and_pooled, holds_exact_scores, pooled_scores, privacy_settings
from clues_fl.server.sites import SiteRegistry
from clues_fl.server.state import ProtocolState

if TYPE_CHECKING:
    from clues_fl.strategies.clues import CluesStrategy

log = logging.getLogger(__name__)


class Journal(Protocol):
    """What the driver asks about and tells the run's record of its phases."""

    def done(self, name: str) -> bool: ...

    def begin(self, name: str) -> float: ...

    def complete(self, name: str) -> None: ...


class MemoryJournal:
    """A journal that keeps nothing past the process (the suite): `done` the phases
    whose outputs the protocol state already holds."""

    def __init__(self, done=()):
        self.completed: list[str] = list(done)

    def done(self, name: str) -> bool:
        return name in self.completed

    def begin(self, name: str) -> float:
        return time.time()

    def complete(self, name: str) -> None:
        if name not in self.completed:
            self.completed.append(name)


@dataclass
class ProtocolRun:
    """One run of the protocol: its config, the strategy whose parts it uses (scorer,
    threshold rule, rounds strategy, merge rule), the state it builds, the server's
    data and model, the sites, the grid, its journal; `metrics` once the report is
    written."""

    cfg: RunConfig
    strategy: CluesStrategy
    state: ProtocolState
    data: ServerData
    bench: object  # runtime.Workbench: the server's model, tokenizer and initial adapter
    sites: SiteRegistry
    grid: Grid
    journal: Journal
    nodes: list[int] = field(default_factory=list)
    skipped: list = field(default_factory=list)  # rows the server's own sets skipped (data.on-error)
    started: float = field(default_factory=time.time)
    resumed_from: str | None = None  # where a resumed run started (the report says so)
    reference: bool = True  # retrain on all data at the selection's budget for the report (all-data)
    on_round: Callable[[str, int], None] | None = None  # after every saved round (resume.py)
    evaluate_fn: Callable | None = None  # Flower's evaluate_fn, after every round of every round phase
    evaluations: dict = field(default_factory=dict)  # aggregate round -> what evaluate_fn returned
    initial_state: dict | None = None  # the adapter the round phases start from (default: the bench's)
    selection_bench: object = None  # the model tracing and scoring run with (scoring.model; default: bench)
    metrics: dict | None = None
    clock: tuple | None = None  # (phase, wall, cpu) since the server's seconds were last added to its cost

    def __post_init__(self) -> None:
        if self.initial_state is None:
            self.initial_state = self.bench.initial_state
        if self.selection_bench is None:
            self.selection_bench = self.bench
        if not isinstance(self.grid, MeteredGrid):  # every message of the run is counted (server/cost.py)
            self.grid = MeteredGrid(self.grid, lambda: self.state.cost)

    @contextmanager
    def metered(self, phase: str) -> Iterator[None]:
        """A block whose messages and server seconds count towards `phase`'s cost."""
        self.grid.phase = phase
        self.clock = (phase, time.time(), time.process_time())
        try:
            yield
        finally:
            self.add_server_seconds()
            self.clock = None

    def add_server_seconds(self) -> None:
        """The server's seconds since the last call into the running phase's cost (also
        before each round's state is saved, so a resumed run keeps them)."""
        if self.clock is not None:
            phase, wall, cpu = self.clock
            now_wall, now_cpu = time.time(), time.process_time()
            self.state.cost.add_server(phase, now_wall - wall, now_cpu - cpu)
            self.clock = (phase, now_wall, now_cpu)

    @property
    def scoring_model_apart(self) -> bool:
        """The selection ran on a model apart from the trained one (scoring.model)."""
        return self.selection_bench is not self.bench

    @property
    def federated(self) -> bool:
        return self.cfg.run.mode == "federated"

    def record_time(self, name: str, start: float) -> None:
        self.state.timings[name] = round(time.time() - start, 2)
        peak = peak_memory_mib()  # this process's, since the last phase
        if peak is not None:
            self.state.gpu_peaks.setdefault(name, {})["server"] = peak


class Phase:
    """One step of the protocol. `status`: it prints a started and a done line; `timed`:
    its seconds go into the report's timings; `saved`: the journal records it done, and
    a run whose journal has it done skips it (calling `resumed` instead)."""

    name = ""
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    status = True
    timed = True
    saved = True

    def applies(self, run: ProtocolRun) -> bool:
        return True

    def plan(self, run: ProtocolRun) -> str:
        return _n(len(run.nodes), "site")

    def run(self, run: ProtocolRun) -> None:
        raise NotImplementedError

    def result(self, run: ProtocolRun) -> str:
        return _failed(run, self.name).lstrip("; ")

    def resumed(self, run: ProtocolRun) -> None:
        """Called instead of `run` when the journal has the phase done."""

    def __repr__(self) -> str:
        return f"<phase {self.name}>"


class Trace(Phase):
    """Train on every site's raw data and keep the checkpoints the scores are taken at:
    the global adapters after each round of the rounds strategy (mode = federated), or
    each site's own local checkpoints (mode = merging)."""

    name = "trace"
    reads = ()
    writes = ("checkpoints", "sites.checkpoints", "sites.trace_state", "sites.digest", "round_losses")

    def applies(self, run: ProtocolRun) -> bool:
        return run.strategy.scorer.needs_trace

    def plan(self, run: ProtocolRun) -> str:
        rounds = run.cfg.trace.rounds
        return (f"{_n(len(run.nodes), 'site')}, {_n(rounds, _round(run) if run.federated else 'local checkpoint')}"
                + _on_scoring_model(run))

    def run(self, run: ProtocolRun) -> None:
        lr = run.cfg.train.lr
        if run.federated:
            def keep(server_round: int, arrays) -> None:
                run.state.checkpoints.append(record_checkpoint(arrays, lr))

            run_rounds(run, self.name, run.cfg.trace.rounds, keep=keep)
            if not run.state.checkpoints:
                raise RuntimeError("tracing produced no checkpoint: no site finished a round")
            return
        request = LocalTrainRequest(self.name)
        replies = run.sites.exchange(run.grid, self.name, {n: request.to_record() for n in run.nodes},
                                     request.message_type)
        for node, reply in replies.items():
            site = run.sites.record(node)
            local = LocalTrainReply.from_record(reply.content, lr)
            site.checkpoints.extend(local.checkpoints)
            site.trace_state = local.state
            if local.ids_digest:
                site.digest = local.ids_digest

    def result(self, run: ProtocolRun) -> str:
        return _loss_result(run, self.name)


class Score(Phase):
    """The sites score their samples against the anchors' gradients at the checkpoints
    (the scorer, selection.method) and report scores, binned counts or noised scores."""

    name = "score"
    reads = ("checkpoints", "sites.checkpoints")
    writes = ("anchor", "sites.scores", "sites.histogram", "sites.ids", "sites.anchor_scores", "sites.num_examples",
              "sites.skipped_rows", "sites.truncated", "sites.scored", "sites.method_metrics")

    def plan(self, run: ProtocolRun) -> str:
        return (f"{_n(len(run.nodes), 'site')}, method {run.cfg['selection.method']}, {len(run.data.anchors)} anchors"
                + _on_scoring_model(run))

    def run(self, run: ProtocolRun) -> None:
        cfg, state, scorer = run.cfg, run.state, run.strategy.scorer

        def anchor_side(checkpoints):
            return scorer.anchor_side(run.selection_bench, run.data.anchors, checkpoints, cfg, cache=run.data.anchor_cache,
                                      samples=run.data.anchor_samples)

        shared, reporting = None, None
        if run.federated and scorer.needs_anchor_gradients:
            shared = anchor_side(state.checkpoints)
            private = privacy_settings(cfg, shared.scores, scorer.selection == "anchor")
            reporting = PrivacySettings.from_config(private) if private else None
            state.anchor = {"scores": shared.scores.tolist(), **shared.config, **private}
        contents = {}
        for node in run.nodes:
            ckpts, grads, side = [], [], shared
            if scorer.needs_trace:
                if run.federated:
                    ckpts = state.checkpoints
                    grads = shared.gradients if shared is not None else []
                else:
                    site = state.sites.get(node)
                    if site is None or not site.checkpoints:
                        continue  # failed while tracing
                    ckpts = site.checkpoints
                    if scorer.needs_anchor_gradients:
                        side = anchor_side(site.checkpoints)
                        site.anchor_scores, site.anchor_grads = side.scores, side.gradients
                        grads = side.gradients
            contents[node] = ScoreRequest(
                cfg.selection.method, list(ckpts), list(grads),
                scorer=dict(side.config) if side is not None else {}, privacy=reporting,
            ).to_record()
        replies = run.sites.exchange(run.grid, self.name, contents, ScoreRequest.message_type)
        for node, reply in replies.items():
            site = run.sites.record(node, f"node-{node}")
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

    def result(self, run: ProtocolRun) -> str:
        sites = run.state.reported()
        return (f"{_n(sum(s.scored for s in sites), 'sample')} scored on {_n(len(sites), 'site')}"
                f"{_failed(run, self.name)}")


class Threshold(Phase):
    """One global threshold from the anchor scores and the sites' reported scores: the
    threshold rule (selection.threshold), or for a method without an anchor threshold
    its own selection (its flags, or the top selection.ratio of the pooled scores)."""

    name = "threshold"
    reads = ("anchor", "sites.scores", "sites.histogram", "sites.anchor_scores")
    writes = ("threshold",)

    def plan(self, run: ProtocolRun) -> str:
        selection = run.strategy.scorer.selection
        return f"rule {run.cfg['selection.threshold'] if selection == 'anchor' else selection}"

    def run(self, run: ProtocolRun) -> None:
        cfg, state, scorer = run.cfg, run.state, run.strategy.scorer
        scored = state.reported()
        if not scored:
            raise RuntimeError("no site returned scores")
        settings = ThresholdSettings(quantile=cfg.selection.quantile, static=cfg.selection.static,
                                     ratio=cfg.selection.ratio, share_quantiles=tuple(scorer.share_quantiles))
        if scorer.selection == "anchor":
            anchor_scores, all_scores = anchor_and_pooled(state, scored, cfg)
            info = {"rule": cfg.selection.threshold, "anchor-scores": anchor_scores.tolist(),
                    "share-quantiles": list(settings.share_quantiles),
                    "standardised": not run.federated, "reported": cfg.privacy.report,
                    "epsilon": cfg.privacy.epsilon}
            info.update(run.strategy.threshold_rule.decide(anchor_scores, all_scores, settings))
        else:  # "fixed": selection flags; "ratio": the top selection.ratio of all pooled scores
            rule = threshold_rule("global-ratio" if scorer.selection == "ratio" else "fixed")
            info = {"rule": rule.name, **rule.decide(None, pooled_scores(state, scored, cfg), settings),
                    "standardised": False}
        info["method"] = cfg.selection.method
        state.threshold = info

    def result(self, run: ProtocolRun) -> str:
        threshold = run.state.threshold
        value = threshold.get("threshold", threshold.get("ratio"))
        return f"{threshold.get('rule')} = {value:.4g}" if isinstance(value, float) else f"{threshold.get('rule')}"


class Select(Phase):
    """Each site keeps the samples the threshold keeps (and counts how right it was,
    when its data carries quality labels)."""

    name = "select"
    reads = ("threshold", "sites.scores", "sites.anchor_scores", "sites.ids")
    writes = ("sites.kept", "sites.mean_kept_score", "sites.counts", "sites.labelled", "sites.selected",
              "sites.clusters")

    def plan(self, run: ProtocolRun) -> str:
        return _n(len(run.state.reported()), "site")

    def run(self, run: ProtocolRun) -> None:
        state, threshold = run.state, run.state.threshold
        contents = {}
        for node, site in state.sites.items():
            if not site.reported:
                continue
            request = SelectRequest()
            if threshold["rule"] == "ratio":
                request.ratio = float(threshold["ratio"])
            else:
                request.threshold = float(threshold["threshold"])
            if threshold["standardised"]:
                request.anchor_mean = float(np.mean(site.anchor_scores))
                request.anchor_std = float(max(np.std(site.anchor_scores, ddof=1), 1e-12))
            if holds_exact_scores(run.cfg):  # the site's own scores go back: a resumed run's sites lost theirs
                request.ids, request.scores = list(site.ids), [float(x) for x in site.scores]
            contents[node] = request.to_record()
        replies = run.sites.exchange(run.grid, self.name, contents, SelectRequest.message_type)
        for node, reply in replies.items():
            answer = SelectReply.from_record(reply.content)
            site = state.sites[node]
            site.kept = answer.kept
            site.mean_kept_score = answer.mean_kept_score
            site.labelled = answer.labelled
            site.counts = dict(answer.counts)
            site.selected = True
            if answer.clusters is not None:
                site.clusters = answer.clusters

    def resumed(self, run: ProtocolRun) -> None:
        if not run.journal.done("aggregate"):
            self.run(run)  # a new run's sites have lost their kept rows: select again

    def result(self, run: ProtocolRun) -> str:
        sites = sorted(run.state.sites.values(), key=lambda s: s.name)
        kept = ", ".join(f"{s.name} {s.kept}/{s.num_examples}" for s in sites if s.selected)
        return f"kept {kept}{_failed(run, self.name)}"


def _retraining_sites(run: ProtocolRun) -> set[int]:
    """The nodes that retrain: their sites kept at least selection.min-kept samples
    (NothingKept when none did: selection/rules.py retraining_sites)."""
    answered = {n: s for n, s in run.state.sites.items() if s.selected}
    threshold = run.state.threshold.get("threshold", run.state.threshold.get("ratio"))
    names = retraining_sites({s.name: s.kept for s in answered.values()}, run.cfg.selection.min_kept,
                             f"threshold {run.state.threshold.get('rule')} = {threshold:.4g}"
                             if isinstance(threshold, float) else "")
    return {n for n, s in answered.items() if s.name in names}


class Aggregate(Phase):
    """The aggregate step: the sites retrain on their kept samples, and the server makes
    one adapter of it: rounds of the rounds strategy (retrain.mode = rounds: the last
    global adapter), or once locally and a one-shot merge (retrain.mode = merge, with
    merge.rule). Its output, `final`, is what the report evaluates and saves."""

    name = "aggregate"
    reads = ("sites.kept", "sites.mean_kept_score")
    writes = ("final", "sites.final_state", "round_losses")

    def plan(self, run: ProtocolRun) -> str:
        cfg, rounds = run.cfg, run.cfg.retrain.rounds
        plan = (_n(rounds, _round(run)) if cfg.retrain.mode == "rounds"
                else f"{_n(rounds, 'local epoch')}, {cfg['merge.rule']} merge")
        retraining = sum(1 for s in run.state.sites.values() if s.kept >= run.cfg.selection.min_kept)
        return f"{_n(retraining, 'site')} with kept samples, {plan}"

    def run(self, run: ProtocolRun) -> None:
        cfg, state = run.cfg, run.state
        if cfg.retrain.mode == "rounds":
            arrays = run_rounds(run, self.name, cfg.retrain.rounds, only=_retraining_sites(run))
            if arrays is None:
                raise RuntimeError("the aggregate step produced no model: no site finished a round")
            state.final = FinalAdapter(state=split_record(arrays)[0])
            return
        request = LocalTrainRequest(self.name)
        contents = {n: request.to_record() for n in _retraining_sites(run)}
        for node, reply in run.sites.exchange(run.grid, self.name, contents, request.message_type).items():
            state.sites[node].final_state = LocalTrainReply.from_record(reply.content).state
        state.final = plan_merge(cfg.merge.rule, [(s.name, s.kept, s.mean_kept_score, s.final_state)
                                                     for s in state.sites.values() if s.final_state is not None],
                                 density=cfg.merge.density)

    def result(self, run: ProtocolRun) -> str:
        return _loss_result(run, self.name)


class AllDataReference(Phase):
    """Retrain on all data from the base model with the selection's rounds and steps, so
    that the report's "all-data" validation loss is comparable with "selected". Not saved
    for resuming (a resumed run that still talks to its sites redoes it); a failure
    leaves the last trace checkpoint as the reference."""

    name = "all-data"
    reads = ("sites.kept",)
    writes = ("all_data_state", "round_losses")
    status = False
    saved = False

    def applies(self, run: ProtocolRun) -> bool:
        cfg = run.cfg
        return bool(run.reference and run.nodes and run.federated and cfg.retrain.mode == "rounds"
                    and cfg.eval.validation and run.data.val)

    def run(self, run: ProtocolRun) -> None:
        try:
            arrays = run_rounds(run, self.name, run.cfg.retrain.rounds, only=_retraining_sites(run))
            if arrays is None:
                raise RuntimeError("all-data retraining produced no model: no site finished a round")
            run.state.all_data_state = split_record(arrays)[0]
        except RuntimeError as err:
            log.warning("no equal-budget all-data reference: %s", err)


class Report(Phase):
    """Evaluate the final adapter on the server's sets and write outputs/<run-name>/
    (reporting/results.py; its own 'evaluate' status lines)."""

    name = "report"
    reads = ("final", "threshold", "sites", "anchor", "round_losses", "missing", "timings", "all_data_state")
    writes = ()
    status = False
    timed = False

    def run(self, run: ProtocolRun) -> None:
        run.metrics = evaluate_and_report(run)


PHASES: tuple[Phase, ...] = (Trace(), Score(), Threshold(), Select(), Aggregate(), AllDataReference(), Report())


def phase(name: str) -> Phase:
    """The phase called `name`."""
    for p in PHASES:
        if p.name == name:
            return p
    raise KeyError(f"no phase '{name}': {', '.join(p.name for p in PHASES)}")


def saved_phases(run: ProtocolRun) -> list[str]:
    """The names of the phases the run's journal records, in order (those that apply)."""
    return [p.name for p in PHASES if p.saved and p.applies(run)]


def run_phases(run: ProtocolRun, phases: tuple[Phase, ...] = PHASES, *, until: str | None = None) -> ProtocolRun:
    """Run `phases` in order, up to and including `until` (default: all), skipping the
    ones that do not apply and those the journal has done."""
    for p in phases:
        if p.applies(run):
            if p.saved and run.journal.done(p.name):
                p.resumed(run)
            else:
                run_phase(run, p)
        if p.name == until:
            break
    return run


def run_phase(run: ProtocolRun, p: Phase) -> None:
    """One phase: its started line, the phase, its timing, the journal, its done line."""
    start = run.journal.begin(p.name) if p.saved else time.time()
    if p.status:
        console.status("%s: started (%s)", p.name, p.plan(run))
    if p.timed:  # the report's own seconds are its 'evaluate' line's
        with run.metered(p.name):
            p.run(run)
    else:
        p.run(run)
    if p.timed:
        run.record_time(p.name, start)
    if p.saved:
        run.journal.complete(p.name)
    if p.status:
        console.status("%s: done in %s (%s)", p.name, console.seconds(time.time() - start), p.result(run))


# -- status-line helpers ----------------------------------------------------------------
def _n(count: int, what: str) -> str:
    return f"{count} {what}{'' if count == 1 else 's'}"


def _round(run: ProtocolRun) -> str:
    """'FedAvg round', or the round of the rounds strategy chosen ('FedProx round')."""
    return f"{type(run.strategy.rounds).__name__} round"


def _on_scoring_model(run: ProtocolRun) -> str:
    return f", on the scoring model {run.cfg.scoring.model}" if run.scoring_model_apart else ""


def _failed(run: ProtocolRun, name: str) -> str:
    missing = run.sites.failed_in(name)
    return f"; failed: {', '.join(missing)}" if missing else ""


def _loss_result(run: ProtocolRun, name: str) -> str:
    losses = run.state.round_losses.get(name, [])
    loss = f"mean training loss {losses[-1]:.4f} in the last round" if losses else "local training"
    return f"{loss}{_failed(run, name)}"
