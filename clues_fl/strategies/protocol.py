"""The CLUES protocol as named phases, and the one driver that runs them.

    trace -> score -> threshold -> select -> retrain (aggregate) [-> retrain-all] -> report

Each phase is a unit: its name (the status lines and the saved state use it), what it
reads and writes of the protocol state (`Clues`, strategies/clues.py), what its status
lines say it is about to do (`plan`) and what it did (`result`), and `run`.

| phase      | reads                                   | writes                                      |
|------------|-----------------------------------------|---------------------------------------------|
| trace      | the sites' data (through the grid)      | checkpoints (federated) or each site's local checkpoints and traced adapter (merging), round losses |
| score      | checkpoints, the anchor set             | the anchor side (anchor scores, privacy config), each site's scores or histogram |
| threshold  | anchor scores, the sites' scores        | threshold                                   |
| select     | threshold, the sites' scores            | each site's kept count and confusion counts |
| retrain    | each site's kept count                  | final (aggregation.merging.FinalAdapter): the last global adapter of retraining in rounds of fed.strategy, or the sites' retrained adapters with the merge rule's weights (one-shot merging) |
| retrain-all| each site's kept count                  | the equal-budget all-data reference (server_app only; not saved) |
| report     | final, everything above                 | outputs/<run-name>/ (reporting/results.py)  |

`run_phases` runs them in order over a `ProtocolRun` and skips what its journal has
done: a resumed run (federation/resume.py's RunState is the journal that saves the
state after every phase and round) or a trace the evaluation suite shares across
methods (experiments/suite.py: an in-memory `Journal`). `server_app.run_protocol` and
the suite's `Lab.run` both run the protocol through it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from flwr.serverapp import Grid

from clues_fl.aggregation.merging import FinalAdapter, plan_merge
from clues_fl.config import RunConfig
from clues_fl import console
from clues_fl.strategies.clues import Clues

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
    """One run of the protocol: its config, state (`clues`), grid, the connected sites,
    its journal; `metrics` once the report is written."""

    cfg: RunConfig
    clues: Clues
    grid: Grid
    journal: Journal
    nodes: list[int] = field(default_factory=list)
    skipped: list = field(default_factory=list)  # rows the server's own sets skipped (data.on-error)
    started: float = field(default_factory=time.time)
    resumed_from: str | None = None  # where a resumed run started (the report says so)
    reference: bool = True  # retrain on all data at the selection's budget for the report (retrain-all)
    metrics: dict | None = None

    @property
    def federated(self) -> bool:
        return self.cfg["mode"] == "federated"


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
        return _failed(run.clues, self.name).lstrip("; ")

    def resumed(self, run: ProtocolRun) -> None:
        """Called instead of `run` when the journal has the phase done."""

    def __repr__(self) -> str:
        return f"<phase {self.name}>"


class Trace(Phase):
    """Train on every site's raw data and keep the checkpoints the scores are taken at:
    the global adapters after each round of fed.strategy (mode = federated), or each
    site's own local checkpoints (mode = merging)."""

    name = "trace"
    reads = ("the sites' data",)
    writes = ("checkpoints", "sites[].checkpoints", "sites[].trace_state", "round_losses[trace]")

    def applies(self, run: ProtocolRun) -> bool:
        return run.clues.scorer.needs_trace

    def plan(self, run: ProtocolRun) -> str:
        rounds = run.cfg["trace.rounds"]
        return f"{_n(len(run.nodes), 'site')}, {_n(rounds, _round(run.cfg) if run.federated else 'local checkpoint')}"

    def run(self, run: ProtocolRun) -> None:
        if run.federated:
            run.clues.trace_federated(run.grid)
        else:
            run.clues.trace_local(run.grid, run.nodes)

    def result(self, run: ProtocolRun) -> str:
        return _loss_result(run.clues, self.name)


class Score(Phase):
    """The sites score their samples against the anchors' gradients at the checkpoints
    (selection.method's scorer) and report scores, binned counts or noised scores."""

    name = "score"
    reads = ("checkpoints", "sites[].checkpoints", "the anchor set")
    writes = ("anchor", "sites[].scores", "sites[].histogram", "sites[].ids")

    def plan(self, run: ProtocolRun) -> str:
        return f"{_n(len(run.nodes), 'site')}, method {run.cfg['selection.method']}, {len(run.clues.anchors)} anchors"

    def run(self, run: ProtocolRun) -> None:
        run.clues.score(run.grid, run.nodes, run.federated)

    def result(self, run: ProtocolRun) -> str:
        sites = [s for s in run.clues.sites.values() if s.reported]
        return (f"{_n(sum(s.scored for s in sites), 'sample')} scored on {_n(len(sites), 'site')}"
                f"{_failed(run.clues, self.name)}")


class Threshold(Phase):
    """One global threshold (selection.threshold) from the anchor scores and the sites'
    reported scores."""

    name = "threshold"
    reads = ("anchor", "sites[].scores")
    writes = ("threshold",)

    def plan(self, run: ProtocolRun) -> str:
        clues = run.clues
        return f"rule {run.cfg['selection.threshold'] if clues.scorer.selection == 'anchor' else clues.scorer.selection}"

    def run(self, run: ProtocolRun) -> None:
        run.clues.decide_threshold(run.federated)

    def result(self, run: ProtocolRun) -> str:
        threshold = run.clues.threshold
        value = threshold.get("threshold", threshold.get("ratio"))
        return f"{threshold.get('rule')} = {value:.4g}" if isinstance(value, float) else f"{threshold.get('rule')}"


class Select(Phase):
    """Each site keeps the samples the threshold keeps (and counts how right it was,
    when its data carries quality labels)."""

    name = "select"
    reads = ("threshold", "sites[].scores")
    writes = ("sites[].kept", "sites[].counts")

    def plan(self, run: ProtocolRun) -> str:
        return _n(sum(1 for s in run.clues.sites.values() if s.reported), "site")

    def run(self, run: ProtocolRun) -> None:
        run.clues.select(run.grid)

    def resumed(self, run: ProtocolRun) -> None:
        if not run.journal.done("retrain"):
            run.clues.select(run.grid)  # a new run's sites have lost their kept rows: select again

    def result(self, run: ProtocolRun) -> str:
        sites = sorted(run.clues.sites.values(), key=lambda s: s.name)
        kept = ", ".join(f"{s.name} {s.kept}/{s.num_examples}" for s in sites if s.selected)
        return f"kept {kept}{_failed(run.clues, self.name)}"


class Aggregate(Phase):
    """The aggregate step: the sites retrain on their kept samples, and the server makes
    one adapter of it: rounds of fed.strategy (aggregation = fedavg, the last global
    adapter), or once locally and a one-shot merge (aggregation = a merge rule of
    aggregation/merging.py MERGE_RULES, or module:function). Its output, `final`, is
    what the report evaluates and saves. (Its status lines and saved state call it
    'retrain': what the sites do in it.)"""

    name = "retrain"
    reads = ("sites[].kept", "sites[].mean_kept_score")
    writes = ("final", "sites[].final_state", "round_losses[retrain]")

    def plan(self, run: ProtocolRun) -> str:
        cfg, rounds = run.cfg, run.cfg["retrain.rounds"]
        plan = (_n(rounds, _round(cfg)) if cfg["aggregation"] == "fedavg"
                else f"{_n(rounds, 'local epoch')}, {cfg['aggregation']} merge")
        retraining = sum(1 for s in run.clues.sites.values() if s.kept >= cfg["selection.min-kept"])
        return f"{_n(retraining, 'site')} with kept samples, {plan}"

    def run(self, run: ProtocolRun) -> None:
        clues = run.clues
        if run.cfg["aggregation"] == "fedavg":
            clues.final = FinalAdapter(state=clues.retrain_federated(run.grid))
            return
        clues.retrain_local(run.grid)
        clues.final = plan_merge(run.cfg["aggregation"], [(s.name, s.kept, s.mean_kept_score, s.final_state)
                                                          for s in clues.sites.values() if s.final_state is not None],
                                 density=run.cfg["merge.density"])

    def result(self, run: ProtocolRun) -> str:
        return _loss_result(run.clues, self.name)


class AllDataReference(Phase):
    """Retrain on all data from the base model with the selection's rounds and steps, so
    that the report's "all-data" validation loss is comparable with "selected". Not saved
    for resuming (a resumed run that still talks to its sites redoes it); a failure
    leaves the last trace checkpoint as the reference."""

    name = "retrain-all"
    reads = ("sites[].kept",)
    writes = ("all_data_state", "round_losses[retrain-all]")
    status = False
    saved = False

    def applies(self, run: ProtocolRun) -> bool:
        cfg, clues = run.cfg, run.clues
        return bool(run.reference and run.nodes and run.federated and cfg["aggregation"] == "fedavg"
                    and cfg["eval.validation"] and clues.val)

    def run(self, run: ProtocolRun) -> None:
        clues = run.clues
        hook, clues.on_round = clues.on_round, None  # its rounds are not saved
        try:
            clues.retrain_all_federated(run.grid)
        except RuntimeError as err:
            log.warning("no equal-budget all-data reference: %s", err)
        finally:
            clues.on_round = hook


class Report(Phase):
    """Evaluate the final adapter on the server's sets and write outputs/<run-name>/
    (reporting/results.py; its own 'evaluate' status lines)."""

    name = "report"
    reads = ("final", "threshold", "sites", "anchor", "round_losses", "missing", "timings")
    writes = ("outputs/<run-name>/",)
    status = False
    timed = False

    def run(self, run: ProtocolRun) -> None:
        from clues_fl.reporting.results import evaluate_and_report

        run.metrics = evaluate_and_report(run.cfg, run.clues, run.clues.final, skipped=run.skipped,
                                          started=run.started, resumed_from=run.resumed_from)


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
    p.run(run)
    if p.timed:
        run.clues.record_time(p.name, start)
    if p.saved:
        run.journal.complete(p.name)
    if p.status:
        console.status("%s: done in %s (%s)", p.name, console.seconds(time.time() - start), p.result(run))


# -- status-line helpers ----------------------------------------------------------------
def _n(count: int, what: str) -> str:
    return f"{count} {what}{'' if count == 1 else 's'}"


def _round(cfg: RunConfig) -> str:
    """'FedAvg round', or the round of the fed.strategy chosen ('FedProx round')."""
    from clues_fl.aggregation.strategies import builtin_name

    return f"{builtin_name(cfg['fed.strategy']) or cfg['fed.strategy'].rpartition(':')[2]} round"


def _failed(clues: Clues, name: str) -> str:
    missing = sorted({m["site"] for m in clues.missing if m["phase"].split()[0] == name})
    return f"; failed: {', '.join(missing)}" if missing else ""


def _loss_result(clues: Clues, name: str) -> str:
    losses = clues.round_losses.get(name, [])
    loss = f"mean training loss {losses[-1]:.4f} in the last round" if losses else "local training"
    return f"{loss}{_failed(clues, name)}"
