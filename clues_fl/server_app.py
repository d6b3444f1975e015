"""Flower ServerApp: runs the CLUES protocol and writes the report."""

from __future__ import annotations

import logging
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .config import parse_config
from .report import evaluate_and_report
from .scenario import server_sets
from .strategies.clues import Clues, wait_for_nodes
from .workbench import workbench

app = ServerApp()
log = logging.getLogger(__name__)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)
    start = time.time()
    bench = workbench(cfg)
    anchor, val, test, skipped = server_sets(cfg)
    clues = Clues(cfg, bench, bench.encode(anchor, cfg), bench.encode(val, cfg), test)
    nodes = wait_for_nodes(grid, cfg["fed.min-nodes"])
    federated = cfg["mode"] == "federated"

    if clues.scorer.needs_trace:
        t = time.time()
        clues.trace_federated(grid) if federated else clues.trace_local(grid, nodes)
        clues.record_time("trace", t)

    t = time.time()
    clues.score(grid, nodes, federated)
    clues.record_time("score", t)

    clues.decide_threshold(federated)
    t = time.time()
    clues.select(grid)
    clues.record_time("select", t)

    t = time.time()
    if cfg["aggregation"] == "fedavg":
        final = {"state": clues.retrain_federated(grid)}
    else:
        final = {"site-states": clues.retrain_local(grid)}
    clues.record_time("retrain", t)

    evaluate_and_report(cfg, clues, final, skipped=skipped, started=start)
