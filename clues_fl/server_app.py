"""Flower ServerApp: runs the CLUES protocol and writes the report.

trace -> score -> threshold -> select -> retrain -> evaluate and report. The state
after every step and FedAvg round is saved under outputs/<run-name>/state
(resume.py): re-running the same run-name resumes after the last completed one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clues_fl.federation import console
from clues_fl.config import RunConfig
from clues_fl.federation.preflight import PreflightError, preflight
from clues_fl.reporting.results import evaluate_and_report
from clues_fl.federation.resume import RunState
from clues_fl.data.scenario import server_sets
from clues_fl.strategies.clues import Clues, SitesFailed, wait_for_nodes
from clues_fl.model.runtime import workbench

app = ServerApp()
log = logging.getLogger(__name__)


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        # The launcher checked all of it before starting Flower; `flwr run .` alone gets
        # the same checks here, for what the server reads, before any site is asked.
        cfg = preflight(dict(context.run_config))
        run_protocol(grid, cfg)
    except (PreflightError, SitesFailed, TimeoutError) as err:
        log.error("run stopped: %s", err)  # one line, before Flower's traceback
        raise


def run_protocol(grid: Grid, cfg: RunConfig) -> tuple[Clues | None, dict]:
    """The whole protocol over `grid`, skipping the steps the run's saved state already
    has. Returns the protocol's state (None if the run had finished before) and the
    metrics."""
    started = time.time()
    console.setup()
    run = RunState(cfg)
    if run.finished:
        log.info("run '%s' has already finished (outputs in %s): nothing to resume; choose another "
                 "run-name or set resume=false to run it again", cfg["run-name"], run.out)
        return None, run.metrics()
    bench = workbench(cfg)
    anchor, val, test, skipped = server_sets(cfg)
    clues = Clues(cfg, bench, bench.encode(anchor, cfg), bench.encode(val, cfg), test)
    federated = cfg["mode"] == "federated"
    traced = clues.scorer.needs_trace
    if run.done("score") and not run.done("retrain") and not clues.holds_exact_scores:
        log.warning("resuming run '%s' in a privacy mode: the server holds no exact scores to hand back to "
                    "the sites for selection, so they score again (with privacy.epsilon > 0 that releases "
                    "noised scores a second time)", cfg["run-name"])
        run.redo("score")
    run.restore(clues, (["trace"] if traced else []) + ["score", "threshold", "select", "retrain"])
    nodes: list[int] = []
    if not run.done("retrain"):  # every step before the report talks to the sites
        nodes = clues.rebind_sites(grid, wait_for_nodes(grid, cfg["fed.min-nodes"], cfg["fed.wait-for-nodes"]))
        clues.name_sites(grid, nodes)

    def step(name: str, fn: Callable[[], object]) -> None:
        if run.done(name):
            return
        start = run.begin(name)
        console.status("%s: started (%s)", name, phase_plan(cfg, clues, name, nodes))
        fn()
        clues.record_time(name, start)
        run.complete(name)
        console.status("%s: done in %s (%s)", name, console.seconds(time.time() - start), phase_result(clues, name))

    if traced:
        step("trace", lambda: clues.trace_federated(grid) if federated else clues.trace_local(grid, nodes))
    step("score", lambda: clues.score(grid, nodes, federated))
    step("threshold", lambda: clues.decide_threshold(federated))
    if run.done("select") and not run.done("retrain"):
        clues.select(grid)  # a new run's sites have lost their kept rows: select again
    step("select", lambda: clues.select(grid))
    if cfg["aggregation"] == "fedavg":
        step("retrain", lambda: clues.retrain_federated(grid))
    else:
        step("retrain", lambda: clues.retrain_local(grid))
    if nodes and federated and cfg["aggregation"] == "fedavg" and cfg["eval.validation"] and clues.val:
        equal_budget_reference(clues, grid)
    metrics = evaluate_and_report(cfg, clues, clues.final_adapters(), skipped=skipped, started=started)
    run.complete("report")
    return clues, metrics


def equal_budget_reference(clues: Clues, grid: Grid) -> None:
    """Retrain on all data from the base model with the selection's rounds and steps, so
    that the report's "all-data" validation loss is comparable with "selected". Not saved
    for resuming (a resumed run redoes it); a failure leaves the last trace checkpoint as
    the reference (as before)."""
    hook, clues.on_round = clues.on_round, None
    start = time.time()
    try:
        clues.retrain_all_federated(grid)
    except RuntimeError as err:
        log.warning("no equal-budget all-data reference: %s", err)
    finally:
        clues.on_round = hook
    clues.record_time("retrain-all", start)


def _n(count: int, what: str) -> str:
    return f"{count} {what}{'' if count == 1 else 's'}"


def phase_plan(cfg: RunConfig, clues: Clues, name: str, nodes: list[int]) -> str:
    """What a step is about to do, for its status line."""
    sites = _n(len(nodes), "site")
    if name == "trace":
        return f"{sites}, {_n(cfg['trace.rounds'], _round(cfg) if cfg['mode'] == 'federated' else 'local checkpoint')}"
    if name == "score":
        return f"{sites}, method {cfg['selection.method']}, {len(clues.anchors)} anchors"
    if name == "threshold":
        return f"rule {cfg['selection.threshold'] if clues.scorer.selection == 'anchor' else clues.scorer.selection}"
    if name == "select":
        return _n(sum(1 for s in clues.sites.values() if s.reported), "site")
    if name == "retrain":
        rounds = cfg["retrain.rounds"]
        plan = (_n(rounds, _round(cfg)) if cfg["aggregation"] == "fedavg"
                else f"{_n(rounds, 'local epoch')}, {cfg['aggregation']} merge")
        return f"{_n(sum(1 for s in clues.sites.values() if s.kept > 0), 'site')} with kept samples, {plan}"
    return sites


def _round(cfg: RunConfig) -> str:
    """'FedAvg round', or the round of the fed.strategy chosen ('FedProx round')."""
    from clues_fl.aggregation.strategies import builtin_name

    return f"{builtin_name(cfg['fed.strategy']) or cfg['fed.strategy'].rpartition(':')[2]} round"


def phase_result(clues: Clues, name: str) -> str:
    """What a step did, for its status line."""
    sites = list(clues.sites.values())
    missing = sorted({m["site"] for m in clues.missing if m["phase"].split()[0] == name})
    failed = f"; failed: {', '.join(missing)}" if missing else ""
    if name in ("trace", "retrain"):
        losses = clues.round_losses.get(name, [])
        loss = f"mean training loss {losses[-1]:.4f} in the last round" if losses else "local training"
        return f"{loss}{failed}"
    if name == "score":
        scored = sum(s.scored for s in sites if s.reported)
        return f"{_n(scored, 'sample')} scored on {_n(sum(1 for s in sites if s.reported), 'site')}{failed}"
    if name == "threshold":
        value = clues.threshold.get("threshold", clues.threshold.get("ratio"))
        return f"{clues.threshold.get('rule')} = {value:.4g}" if isinstance(value, float) else f"{clues.threshold.get('rule')}"
    if name == "select":
        kept = ", ".join(f"{s.name} {s.kept}/{s.num_examples}" for s in sorted(sites, key=lambda s: s.name) if s.selected)
        return f"kept {kept}{failed}"
    return failed.lstrip("; ")
