"""Flower ServerApp: builds the CLUES strategy from the run-config and starts it.

`CluesStrategy.start` (strategies/clues.py) runs the protocol, trace -> score ->
threshold -> select -> aggregate -> report, and saves its state after every phase and
round under outputs/<run-name>/state (federation/resume.py): re-running the same
run-name resumes after the last completed one.
"""

from __future__ import annotations

import logging

from clues_fl import console

with console.held_warnings():  # the libraries' import-time deprecations go to run.log, not the console
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    from clues_fl.config import ConfigError, RunConfig
    from clues_fl.data.sources import DataError
    from clues_fl.federation.preflight import PreflightError, preflight
    from clues_fl.federation.resume import ResumeError, RunState
    from clues_fl.federation.run_dir import RunInUse
    from clues_fl.model.loading import ModelError
    from clues_fl.selection.rules import NothingKept
    from clues_fl.server.phases import ProtocolRun
    from clues_fl.server.sites import SitesFailed
    from clues_fl.strategies.clues import CluesStrategy

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
        run_protocol(grid, cfg)
    except STOPS as err:
        log.error("run stopped: %s", err)  # one line; Flower's record of it without the traceback
        console.without_traceback(err)
        raise


def run_protocol(grid: Grid, cfg: RunConfig) -> tuple[ProtocolRun | None, dict]:
    """The whole protocol over `grid` (resuming the run's saved state). Returns the run
    (None if it had finished before) and its metrics."""
    strategy = CluesStrategy(cfg)
    strategy.start(grid=grid)
    run = strategy.last_run
    return run, run.metrics if run is not None else RunState(cfg).metrics()
