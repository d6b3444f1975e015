"""CLUES as a Flower strategy.

`CluesStrategy` is a `flwr.serverapp.strategy.Strategy`. Its `start(grid=...)` runs the
whole protocol (server/phases.py): trace -> score -> threshold -> select -> aggregate
-> report. The server holds the public anchor set and a clean validation set; it never
sees a site's samples: it sends adapters and anchor gradients, receives per-sample scores
(with keyed hashes of the sample ids) and counts, and aggregates adapters.

Its parts, each one object with one job:

- `rounds`: the Flower strategy of the round phases (tracing, the aggregate step):
  FedAvg by default, any `Strategy` (``FedProx(proximal_mu=0.01)``, your subclass). Each
  round phase runs a fresh copy of it wrapped in `SiteRounds` (strategies/site_rounds.py).
- `scorer`: the selection method, by a name the sites know (``"clues+"``,
  ``"mypkg.scorers:MyScorer"``) or a `Scorer` (scoring/scorers.py).
- `threshold`: the threshold rule (``AnchorF1()``, selection/rules.py), or its name.
- `aggregator`: ``"rounds"`` (the aggregate step in rounds of `rounds`) or a one-shot
  merge rule: a name (``"ties"``), ``"module:function"`` or a `MergeRule`.

Everything else comes from the run-config `cfg`. What the parts change is written back
into the run's config (`self.cfg`: its report and saved state name them). While a round
phase runs, Flower's round loop asks this strategy (configure_train, aggregate_train, ...)
and it answers with the phase's SiteRounds.
"""

from __future__ import annotations

import logging
import time
from logging import INFO

from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log as flwr_log

from clues_fl import console
from clues_fl.aggregation import fed_strategy, merging
from clues_fl.config import RunConfig, parse_config
from clues_fl.data.scenario import server_sets
from clues_fl.runtime import score_settings, selection_workbench, workbench
from clues_fl.scoring.scorers import Scorer, make_scorer, method_name
from clues_fl.selection.rules import ThresholdRule, rule_name, threshold_rule
from clues_fl.server.cost import CONNECT
from clues_fl.server.data import ServerData
from clues_fl.federation.run_dir import run_lock
from clues_fl.server.phases import Journal, MemoryJournal, ProtocolRun, run_phases, saved_phases
from clues_fl.server.scores import holds_exact_scores
from clues_fl.server.sites import SiteRegistry, wait_for_nodes
from clues_fl.server.state import ProtocolState

log = logging.getLogger(__name__)


def _config_overrides(rounds, scorer, threshold, aggregator) -> dict:
    """The run-config values the given parts stand for."""
    out: dict = {}
    if rounds is not None:
        out["fed.strategy"] = fed_strategy.name_of(type(rounds))
    if scorer is not None:
        out["selection.method"] = method_name(scorer)
    if threshold is not None:
        out["selection.threshold"] = rule_name(threshold)
    if aggregator is not None:
        out["retrain.mode"] = "rounds" if aggregator == "rounds" else "merge"
        if aggregator != "rounds":
            out["merge.rule"] = merging.rule_name(aggregator)
    return out


class CluesStrategy(Strategy):
    """The CLUES protocol as a Flower strategy (see the module docstring)."""

    def __init__(self, cfg: RunConfig | None = None, *, rounds: Strategy | None = None,
                 scorer: Scorer | type | str | None = None, threshold: ThresholdRule | str | None = None,
                 aggregator=None):
        cfg = cfg if cfg is not None else parse_config({})
        overrides = _config_overrides(rounds, scorer, threshold, aggregator)
        self.cfg = parse_config({**cfg.values, **overrides}) if overrides else cfg
        self.rounds: Strategy = rounds if rounds is not None else fed_strategy.build(self.cfg.values)
        if isinstance(scorer, Scorer):
            self.scorer = scorer
        else:
            self.scorer = make_scorer(self.cfg.selection.method, score_settings(self.cfg))
        if isinstance(threshold, ThresholdRule):
            self.threshold_rule = threshold
        else:
            self.threshold_rule = threshold_rule(self.cfg.selection.threshold)
        self.current: Strategy | None = None  # the running round phase's SiteRounds (or its DP wrapper)
        self.last_run: ProtocolRun | None = None

    # -- the protocol -------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config=None, evaluate_config=None, evaluate_fn=None) -> Result:
        """Run the protocol over `grid` and write outputs/<run-name>/ (resuming the run's
        saved state, federation/resume.py). `initial_arrays`: the adapter the round phases
        start from (default: the run's seeded LoRA adapter; with a scoring.model the trace
        starts from the scoring model's own); `num_rounds`: the rounds of tracing and of the
        aggregate step (default: trace.rounds, retrain.rounds); `timeout`: fed.timeout;
        `evaluate_fn(round, arrays)`: called after every round of every round phase whose
        arrays are the trained model's (not the trace's on a scoring.model). The sites' training config comes from the run-config, so
        `train_config` and `evaluate_config` are not taken. Returns the final adapter
        (`Result.arrays`) and `evaluate_fn`'s records; `self.last_run` holds the run."""
        from clues_fl.federation.resume import RunState

        if train_config is not None or evaluate_config is not None:
            raise ValueError("CluesStrategy.start: the sites' training comes from the run-config (train.*); "
                             "train_config and evaluate_config are not taken")
        changes = {k: v for k, v in (("trace.rounds", num_rounds), ("retrain.rounds", num_rounds),
                                     ("fed.timeout", timeout)) if v is not None}
        if changes:
            self.cfg = parse_config({**self.cfg.values, **changes})
        if initial_arrays is not None and self.cfg.run.mode != "federated":
            raise ValueError("CluesStrategy.start: initial_arrays need mode='federated' (in merging mode each "
                             "site trains from its own start)")
        started = time.time()
        with run_lock(self.cfg):  # shared with the launcher that started this app; else its own
            journal = RunState(self.cfg)
            console.setup(journal.out / "run.log")
            if journal.finished:
                log.info("run '%s' has already finished (outputs in %s): nothing to resume; choose another "
                         "run-name or set resume=false to run it again", self.cfg.run.run_name, journal.out)
                return Result()
            if journal.done("score") and not journal.done("aggregate") and not holds_exact_scores(self.cfg):
                log.warning("resuming run '%s' in a privacy mode: the server holds no exact scores to hand back "
                            "to the sites for selection, so they score again (with privacy.epsilon > 0 that "
                            "releases noised scores a second time)", self.cfg.run.run_name)
                journal.redo("score")
            talks_to_sites = not journal.done("aggregate")  # every phase before the report does
            # before the model loads: fed.wait-for-nodes is the time the sites have to connect
            nodes = wait_for_nodes(grid, self.cfg.fed.min_nodes, self.cfg.fed.wait_for_nodes) if talks_to_sites else []
            run = self.new_run(grid, journal, started=started, evaluate_fn=evaluate_fn,
                               initial_state=initial_arrays.to_torch_state_dict() if initial_arrays is not None else None)
            journal.restore(run, saved_phases(run))
            if talks_to_sites:
                with run.metered(CONNECT):
                    run.nodes = run.sites.rebind(run.grid, sorted(set(nodes) | set(grid.get_node_ids())))
                    run.sites.name_sites(run.grid, run.nodes)
            run_phases(run)
        self.last_run = run
        return self.result(run)

    def new_run(self, grid: Grid, journal: Journal | None = None, **kwargs) -> ProtocolRun:
        """A run of the protocol over `grid` with a fresh state: the server's model and data
        loaded (`kwargs`: ProtocolRun's fields, e.g. nodes, reference)."""
        bench, selection = workbench(self.cfg), selection_workbench(self.cfg)
        anchor, val, test, skipped = server_sets(self.cfg)
        state = ProtocolState()
        sites = SiteRegistry(state, min_nodes=self.cfg.fed.min_nodes, timeout=self.cfg.fed.timeout,
                             wait=self.cfg.fed.wait_for_nodes)
        data = ServerData.build(self.cfg, bench, anchor, val, test, selection_bench=selection)
        return ProtocolRun(self.cfg, self, state, data, bench, sites, grid,
                           journal if journal is not None else MemoryJournal(), skipped=skipped,
                           selection_bench=selection, **kwargs)

    def result(self, run: ProtocolRun) -> Result:
        """Flower's Result of a run: the final adapter (one state; a merged adapter is built
        from the sites' states when it is used, so it has none here)."""
        final = run.state.final
        arrays = ArrayRecord(torch_state_dict=final.state) if final is not None and final.state is not None else ArrayRecord()
        return Result(arrays=arrays, evaluate_metrics_serverapp=dict(run.evaluations))

    def run_rounds(self, strategy: Strategy, grid: Grid, arrays: ArrayRecord, num_rounds: int, timeout: float,
                   train_config, evaluate_fn) -> Result:
        """The rounds of one phase through Flower's own round loop, with `strategy` (the
        phase's SiteRounds) answering for this strategy meanwhile."""
        self.current = strategy
        try:
            return Strategy.start(self, grid=grid, initial_arrays=arrays, num_rounds=num_rounds, timeout=timeout,
                                  train_config=train_config, evaluate_fn=evaluate_fn)
        finally:
            self.current = None

    # -- Flower's strategy interface: the running round phase answers ---------------------------
    def _phase(self) -> Strategy:
        if self.current is None:
            raise RuntimeError("CluesStrategy: rounds are asked for only while a round phase runs (start())")
        return self.current

    def configure_train(self, server_round, arrays, config, grid):
        return self._phase().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self._phase().aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self._phase().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self._phase().aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        cfg = self.cfg
        aggregate = ("rounds of the rounds strategy" if cfg.retrain.mode == "rounds"
                     else f"one-shot {cfg['merge.rule']} merge")
        flwr_log(INFO, "\t├──> CLUES: selection %s, threshold %s, aggregate step: %s", cfg.selection.method,
                 cfg.selection.threshold, aggregate)
        flwr_log(INFO, "\t└──> rounds strategy: %s", type(self.rounds).__name__)
        if self.current is not None:
            self.current.summary()
