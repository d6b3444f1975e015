"""CLUES as a Flower strategy: trace, score, global threshold, select, retrain.

The server holds the public anchor set and a clean validation set. It never sees a
site's samples: it sends adapters and anchor gradients, receives per-sample scores
(with opaque ids) and confusion counts, and aggregates adapters with Flower's FedAvg
or merges them once (linear / weighted / TIES on dW = B A).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..config import RunConfig
from ..engine import Checkpoint
from ..messages import checkpoint_record, gradient_record, record_checkpoint, split_record, state_record
from ..metrics import add_counts, selection_metrics
from ..scorers import make_scorer
from ..selection import global_threshold, standardise
from ..workbench import score_settings

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


class SiteFedAvg(FedAvg):
    """Flower's FedAvg restricted to a set of sites (None: all) that reports the sites
    whose reply was an error (FedAvg itself only logs and drops them)."""

    def __init__(self, only: set[int] | None = None, on_error=None, **kwargs):
        super().__init__(**kwargs)
        self.only = only
        self.on_error = on_error

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        if self.on_error is not None:
            for reply in replies:
                if reply.has_error():
                    self.on_error(reply.metadata.src_node_id, server_round, reply.error.reason)
        return super().aggregate_train(server_round, replies)

    def configure_train(self, server_round, arrays, config, grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        if self.only is None:
            return messages
        return [m for m in messages if m.metadata.dst_node_id in self.only]


def wait_for_nodes(grid: Grid, minimum: int, timeout: float = 300.0) -> list[int]:
    start = time.time()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.time() - start > timeout:
            raise TimeoutError(f"only {len(nodes)} of the {minimum} required sites connected")
        time.sleep(1.0)


class Clues:
    """The CLUES protocol over a Flower Grid. `bench` is the server's Workbench."""

    def __init__(self, cfg: RunConfig, bench, anchor_encoded, val_encoded, test_samples=None):
        self.cfg = cfg
        self.bench = bench
        self.anchors = anchor_encoded
        self.val = val_encoded
        self.test = list(test_samples or [])  # raw samples: answers are generated for them
        self.anchor_cache = bench.cache(anchor_encoded, cfg, desc="anchor prefix cache")
        self.val_cache = bench.cache(val_encoded, cfg, desc="validation prefix cache")
        self.sites: dict[int, SiteReport] = {}
        self.missing: list[dict] = []
        self.timings: dict[str, float] = {}
        self.round_losses: dict[str, list[float]] = {}
        self.checkpoints: list[Checkpoint] = []  # federated mode: shared
        self.anchor: dict = {}
        self.threshold: dict = {}
        self.scorer = make_scorer(cfg["selection.method"], score_settings(cfg))

    # -- helpers ----------------------------------------------------------------
    def _fedavg(self, phase: str, only: set[int] | None = None) -> FedAvg:
        n = self.cfg["fed.min-nodes"]
        if only is not None:
            n = min(n, len(only))

        def failed(node: int, server_round: int, reason: str) -> None:
            self._missing(node, f"{phase} round {server_round}", reason)

        return SiteFedAvg(only, failed, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)

    def _fedavg_rounds(self, grid: Grid, phase: str, rounds: int, *, only=None, evaluate_fn=None):
        """Flower's FedAvg from the initial adapter for `rounds` rounds of `phase`;
        keeps the mean client training loss of each round."""
        result = self._fedavg(phase, only).start(
            grid=grid,
            initial_arrays=state_record(self.bench.initial_state),
            num_rounds=rounds,
            timeout=self.cfg["fed.timeout"],
            train_config=ConfigRecord({"phase": phase}),
            evaluate_fn=evaluate_fn,
        )
        metrics = result.train_metrics_clientapp
        self.round_losses[phase] = [float(metrics[r].get("train-loss", np.nan)) for r in sorted(metrics)]
        return result

    def _exchange(self, grid: Grid, phase: str, contents: dict[int, RecordDict], message_type: str) -> dict[int, Message]:
        """Send one message per node; keep the replies that carry no error."""
        messages = [Message(content=c, message_type=message_type, dst_node_id=node) for node, c in contents.items()]
        replies = grid.send_and_receive(messages, timeout=self.cfg["fed.timeout"])
        ok: dict[int, Message] = {}
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                self._missing(node, phase, reply.error.reason)
            else:
                ok[node] = reply
        for node in set(contents) - answered:
            self._missing(node, phase, "no reply before the timeout")
        if len(ok) < min(self.cfg["fed.min-nodes"], len(contents)):
            raise RuntimeError(
                f"phase '{phase}': only {len(ok)} sites answered, fed.min-nodes={self.cfg['fed.min-nodes']}"
            )
        return ok

    def _missing(self, node: int, phase: str, reason: str) -> None:
        log.warning("site %s failed in phase '%s': %s", node, phase, reason)
        self.missing.append({"node": node, "phase": phase, "reason": str(reason)[:500]})

    def record_time(self, name: str, start: float) -> None:
        self.timings[name] = round(time.time() - start, 2)

    # -- phase 1: trace -------------------------------------------------------------
    def trace_federated(self, grid: Grid) -> None:
        lr = self.cfg["train.lr"]

        def keep(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round > 0:
                self.checkpoints.append(record_checkpoint(arrays, lr))
            return None

        self._fedavg_rounds(grid, "trace", self.cfg["trace.rounds"], evaluate_fn=keep)
        if not self.checkpoints:
            raise RuntimeError("tracing produced no checkpoint: no site finished a round")

    def trace_local(self, grid: Grid, nodes: list[int]) -> None:
        contents = {n: RecordDict({"config": ConfigRecord({"phase": "trace"})}) for n in nodes}
        replies = self._exchange(grid, "trace", contents, "train.local")
        lr = self.cfg["train.lr"]
        for node, reply in replies.items():
            site = self.sites.setdefault(node, SiteReport(node, f"node-{node}"))
            k = 0
            while f"ckpt-{k}" in reply.content:
                site.checkpoints.append(record_checkpoint(reply.content[f"ckpt-{k}"], lr))
                k += 1
            site.trace_state, _ = split_record(reply.content["arrays"])

    # -- phase 2: score ---------------------------------------------------------
    def _anchor_side(self, checkpoints: list[Checkpoint]):
        return self.bench.anchor_scores(
            self.anchors, checkpoints, self.cfg, cache=self.anchor_cache, settings=self.scorer.settings
        )

    def score(self, grid: Grid, nodes: list[int], federated: bool) -> None:
        contents: dict[int, RecordDict] = {}
        shared = None
        if federated and self.scorer.needs_anchor_gradients:
            shared = self._anchor_side(self.checkpoints)
            self.anchor = {"scores": shared.scores.tolist()}
        for node in nodes:
            ckpts, grads = [], []
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
                        anchor = self._anchor_side(site.checkpoints)
                        site.anchor_scores, site.anchor_grads = anchor.scores, anchor.gradients
                        grads = anchor.gradients
            record = RecordDict({"config": ConfigRecord({
                "method": self.cfg["selection.method"], "lrs": [c.lr for c in ckpts],
            })})
            for k, ckpt in enumerate(ckpts):
                record[f"ckpt-{k}"] = checkpoint_record(ckpt)
            for k, grad in enumerate(grads):
                record[f"grad-{k}"] = gradient_record(grad)
            contents[node] = record
        replies = self._exchange(grid, "score", contents, "query.score")
        for node, reply in replies.items():
            site = self.sites.setdefault(node, SiteReport(node, f"node-{node}"))
            scores = reply.content["scores"]
            site.ids = [str(i) for i in scores["ids"]]
            site.scores = np.asarray(scores["scores"], dtype=float)
            metrics = reply.content["metrics"]
            site.num_examples = int(metrics["num-examples"])
            site.skipped_rows = int(metrics.get("skipped-rows", 0))
            site.truncated = int(metrics.get("truncated", 0))
            pid = int(metrics.get("partition-id", -1))
            site.name = f"client-{pid}" if pid >= 0 else f"node-{node}"

    # -- phase 3: threshold -------------------------------------------------------
    def decide_threshold(self, federated: bool) -> dict:
        scored = [s for s in self.sites.values() if s.scores.size]
        if not scored:
            raise RuntimeError("no site returned scores")
        if self.scorer.selection == "fixed":
            info = {"rule": "fixed", "threshold": 0.5, "standardised": False}
        elif self.scorer.selection == "ratio":
            # One global threshold that keeps the top selection.ratio of all pooled scores.
            pooled = np.sort(np.concatenate([s.scores for s in scored]))[::-1]
            count = max(1, int(np.ceil(self.cfg["selection.ratio"] * len(pooled) - 1e-9)))
            info = {"rule": "global-ratio", "ratio": self.cfg["selection.ratio"],
                    "threshold": float(pooled[count - 1]), "standardised": False}
        else:
            info = self._anchor_threshold(scored, federated)
        info["method"] = self.cfg["selection.method"]
        self.threshold = info
        return info

    def _anchor_threshold(self, scored: list[SiteReport], federated: bool) -> dict:
        rule = self.cfg["selection.threshold"]
        if federated:
            anchor_scores = np.asarray(self.anchor["scores"])
            all_scores = np.concatenate([s.scores for s in scored])
        else:
            # Local checkpoints give each site its own score scale: express every score
            # in units of that site's anchor-score spread (z-scores), then pool.
            anchor_scores = np.concatenate([standardise(s.anchor_scores, s.anchor_scores) for s in scored])
            all_scores = np.concatenate([standardise(s.scores, s.anchor_scores) for s in scored])
        info: dict = {"rule": rule, "anchor-scores": anchor_scores.tolist(), "standardised": not federated}
        if rule == "ratio":
            info["ratio"] = self.cfg["selection.ratio"]
        else:
            info["threshold"] = float(
                global_threshold(
                    rule, anchor_scores, all_scores,
                    quantile=self.cfg["selection.quantile"], static=self.cfg["selection.static"],
                )
            )
        return info

    # -- phase 4: select ------------------------------------------------------------
    def select(self, grid: Grid) -> None:
        contents = {}
        for node, site in self.sites.items():
            if not site.scores.size:
                continue
            config = ConfigRecord()
            if self.threshold["rule"] == "ratio":
                config["ratio"] = float(self.threshold["ratio"])
            else:
                config["threshold"] = float(self.threshold["threshold"])
            if self.threshold["standardised"]:
                config["anchor-mean"] = float(np.mean(site.anchor_scores))
                config["anchor-std"] = float(max(np.std(site.anchor_scores, ddof=1), 1e-12))
            contents[node] = RecordDict({"config": config})
        replies = self._exchange(grid, "select", contents, "query.select")
        for node, reply in replies.items():
            metrics = reply.content["metrics"]
            site = self.sites[node]
            site.kept = int(metrics["kept"])
            site.mean_kept_score = float(metrics["mean-kept-score"])
            site.counts = {k: int(metrics[k]) for k in ("tp", "fp", "fn", "tn")}

    # -- phase 5: retrain + aggregate --------------------------------------------------
    def retrain_federated(self, grid: Grid) -> dict:
        # Sites that kept nothing have nothing to train on: leave them out of FedAvg.
        kept = {n for n, s in self.sites.items() if s.kept > 0}
        result = self._fedavg_rounds(grid, "retrain", self.cfg["retrain.rounds"], only=kept)
        if result.arrays is None:
            raise RuntimeError("retraining produced no model: no site finished a round")
        state, _ = split_record(result.arrays)
        return state

    def retrain_local(self, grid: Grid) -> dict[int, dict]:
        contents = {
            n: RecordDict({"config": ConfigRecord({"phase": "retrain"})})
            for n, s in self.sites.items() if s.kept > 0
        }
        replies = self._exchange(grid, "retrain", contents, "train.local")
        states = {}
        for node, reply in replies.items():
            states[node], _ = split_record(reply.content["arrays"])
            self.sites[node].final_state = states[node]
        return states

    # -- report -----------------------------------------------------------------------
    def selection_summary(self) -> dict:
        sites = [s for s in self.sites.values() if s.counts]
        per_site = {}
        for s in sites:
            per_site[s.name] = {**selection_metrics(s.counts), **s.counts, "kept": s.kept,
                                "skipped-rows": s.skipped_rows, "truncated": s.truncated}
        overall = selection_metrics(add_counts([s.counts for s in sites])) if sites else {}
        return {**overall, "per-client": per_site}
