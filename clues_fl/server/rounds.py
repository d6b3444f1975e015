"""The rounds of one round phase (tracing, the aggregate step, the all-data reference):
the run's rounds strategy, copied fresh for the phase and wrapped in SiteRounds (and
Flower's DP wrapper with privacy.adapter-noise), run by `CluesStrategy.run_rounds`
through Flower's own round loop; a resumed run continues from the rounds it saved."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord

from clues_fl.federation.messages import split_moments, state_record, train_config
from clues_fl.model.training import AdamMoments
from clues_fl.server.state import ROUND_PHASES, PhaseRounds
from clues_fl.strategies.site_rounds import SiteDP, SiteRounds

if TYPE_CHECKING:
    from clues_fl.server.phases import ProtocolRun

log = logging.getLogger(__name__)


def initial_record(run: ProtocolRun, phase: str) -> ArrayRecord:
    """The adapter a phase's rounds start from; for tracing with zero Adam moments (= a
    fresh optimiser), on the scoring model's initial adapter where the selection has one."""
    state = run.selection_bench.initial_state if phase == "trace" and run.scoring_model_apart else run.initial_state
    if phase != "trace":
        return state_record(state)
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    return state_record(state, AdamMoments(zeros, dict(zeros)))


def run_rounds(run: ProtocolRun, phase: str, rounds: int, *, only: set[int] | None = None,
               keep: Callable[[int, ArrayRecord], None] | None = None) -> ArrayRecord | None:
    """`rounds` rounds of `phase` from the initial adapter or, in a resumed run, the rounds
    left from the saved global arrays (phases of ROUND_PHASES save theirs). Keeps the
    mean site training loss of each round; after each round calls keep(round, arrays)
    with the global adapter and, while tracing, its averaged Adam moments in one record,
    records the phase's rounds so far and calls the run's on_round hook (resume.py saves
    the state). Returns the last aggregated record (None: none aggregated)."""
    cfg, state = run.cfg, run.state
    resumable = phase in ROUND_PHASES
    saved = state.rounds.get(phase) if resumable else None
    done, arrays, aggregated = ((saved.done, saved.arrays, saved.aggregated) if saved
                                else (0, initial_record(run, phase), False))
    losses = state.round_losses[phase] = list(state.round_losses.get(phase, []))[:done] if done else []
    adapter, moments = split_moments(arrays)
    min_nodes = cfg.fed.min_nodes if only is None else min(cfg.fed.min_nodes, len(only))

    def failed(node: int, server_round: int, reason: str) -> None:
        run.sites.failed(node, f"{phase} round {server_round}", reason, server_round)

    strategy = SiteRounds(copy.deepcopy(run.strategy.rounds), only=only, on_error=failed, offset=done,
                          phase=phase, min_nodes=min_nodes, moments=moments)
    started = [time.time()]

    def after_round(server_round: int, current: ArrayRecord):
        if server_round == 0:  # Flower's call before the first round
            return None
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
        if resumable:
            state.rounds[phase] = PhaseRounds(true_round, current, aggregated or bool(strategy.aggregated))
            run.add_server_seconds()  # saved with the round
            if run.on_round is not None:
                run.on_round(phase, true_round)
        if run.evaluate_fn is None or (phase == "trace" and run.scoring_model_apart):
            return None  # evaluate_fn evaluates the trained model; the trace's arrays are the scoring model's
        record = run.evaluate_fn(true_round, current)
        if record is not None and phase == "aggregate":  # the rounds of the published adapter
            run.evaluations[true_round] = record
        return record

    runner = strategy
    if cfg.privacy.adapter_noise > 0:
        sampled = len(only) if only is not None else len(run.grid.get_node_ids())
        runner = SiteDP(strategy, cfg.privacy.adapter_noise, cfg.privacy.adapter_clip, sampled)
    result = run.strategy.run_rounds(runner, run.grid, adapter, rounds - done, cfg.fed.timeout,
                                     train_config(phase), after_round)
    run.sites.note_gpu_peak(phase, strategy.gpu_peak)
    if result.arrays is not None:
        return strategy.with_moments(max(strategy.aggregated, default=done), result.arrays)
    return arrays if aggregated else None
