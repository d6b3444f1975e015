"""Flower ServerApp: runs the CLUES protocol and writes the report.

trace -> score -> threshold -> select -> retrain (aggregate) -> report, the phases of
strategies/protocol.py. The state after every phase and round is saved under
outputs/<run-name>/state (federation/resume.py): re-running the same run-name resumes
after the last completed one.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clues_fl import console
from clues_fl.config import ConfigError, RunConfig
from clues_fl.data.sources import DataError
from clues_fl.federation.preflight import PreflightError, preflight
from clues_fl.federation.resume import ResumeError, RunState
from clues_fl.federation.run_dir import RunInUse, run_lock
from clues_fl.model.loading import ModelError
from clues_fl.selection.rules import NothingKept
from clues_fl.data.scenario import server_sets
from clues_fl.strategies.clues import Clues, SitesFailed, wait_for_nodes
from clues_fl.strategies.protocol import ProtocolRun, run_phases, saved_phases
from clues_fl.runtime import workbench

app = ServerApp()
# Errors that end a run with their one line: a value to fix, a site that failed, nothing kept.
STOPS = (PreflightError, ConfigError, DataError, ModelError, ResumeError, RunInUse, SitesFailed, NothingKept,
         TimeoutError)
log = logging.getLogger(__name__)


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        # The launcher checked all of it before starting Flower; `flwr run .` alone gets
        # the same checks here, for what the server reads, before any site is asked.
        cfg = preflight(dict(context.run_config))
        with run_lock(cfg):  # shared with the launcher that started this app; else its own
            run_protocol(grid, cfg)
    except STOPS as err:
        log.error("run stopped: %s", err)  # one line; Flower's record of it without the traceback
        console.without_traceback(err)
        raise


def run_protocol(grid: Grid, cfg: RunConfig) -> tuple[Clues | None, dict]:
    """The whole protocol over `grid` (strategies/protocol.py runs its phases), skipping
    the phases the run's saved state already has. Returns the protocol's state (None if
    the run had finished before) and the metrics."""
    started = time.time()
    console.setup()
    state = RunState(cfg)
    if state.finished:
        log.info("run '%s' has already finished (outputs in %s): nothing to resume; choose another "
                 "run-name or set resume=false to run it again", cfg["run-name"], state.out)
        return None, state.metrics()
    talks_to_sites = not state.done("retrain")  # every phase before the report does
    if talks_to_sites:  # before the model loads: fed.wait-for-nodes is the time the sites have
        nodes = wait_for_nodes(grid, cfg["fed.min-nodes"], cfg["fed.wait-for-nodes"])
    bench = workbench(cfg)
    anchor, val, test, skipped = server_sets(cfg)
    clues = Clues(cfg, bench, anchor, val, test)
    run = ProtocolRun(cfg, clues, grid, state, skipped=skipped, started=started)
    if state.done("score") and not state.done("retrain") and not clues.holds_exact_scores:
        log.warning("resuming run '%s' in a privacy mode: the server holds no exact scores to hand back to "
                    "the sites for selection, so they score again (with privacy.epsilon > 0 that releases "
                    "noised scores a second time)", cfg["run-name"])
        state.redo("score")
    run.resumed_from = state.restore(clues, [p for p in saved_phases(run) if p != "report"])
    if talks_to_sites:
        run.nodes = clues.rebind_sites(grid, sorted(set(nodes) | set(grid.get_node_ids())))
        clues.name_sites(grid, run.nodes)
    run_phases(run)
    return clues, run.metrics
