"""What the protocol has learnt so far, as dataclasses that save themselves.

`ProtocolState` is everything a resumed run needs (federation/resume.py saves it after
every phase and round through federation/state.py `dump`/`load`): which sites failed
where, timings, round losses, the anchor side, the threshold, the shared checkpoints,
one `SiteRecord` per site, the rounds each round phase has done, the aggregate
phase's adapter and what the run has cost so far. A field is saved unless it is `transient()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord

from clues_fl.aggregation.merging import FinalAdapter
from clues_fl.federation.state import state_class, transient
from clues_fl.model.training import AdamMoments, Checkpoint
from clues_fl.server.cost import CostLedger

state_class(Checkpoint)
state_class(AdamMoments)
state_class(FinalAdapter)

Tensors = dict[str, torch.Tensor]


@state_class
@dataclass
class SiteRecord:
    """One site as the server knows it: what it reported (scores or a histogram, counts,
    how many it kept) and, in merging mode, its own checkpoints and adapters."""

    node_id: int
    name: str
    ids: list[str] = field(default_factory=list)  # keyed hashes of its sample ids (site_ids.py)
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    counts: dict = field(default_factory=dict)
    kept: int = 0
    mean_kept_score: float = 0.0
    checkpoints: list[Checkpoint] = field(default_factory=list)  # merging mode: local
    trace_state: Tensors | None = None
    final_state: Tensors | None = None
    anchor_scores: np.ndarray | None = None  # merging mode: against its own checkpoints
    anchor_grads: list | None = transient(default=None)  # only used while scoring
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


@state_class
@dataclass
class PhaseRounds:
    """The rounds a round phase has done: how many, the global arrays after the last
    (with the averaged Adam moments while tracing) and whether any round aggregated."""

    done: int
    arrays: ArrayRecord
    aggregated: bool


ROUND_PHASES = ("trace", "aggregate")  # the phases whose rounds a resumed run continues


@state_class
@dataclass
class ProtocolState:
    missing: list[dict] = field(default_factory=list)  # the sites that failed: where and why
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    gpu_peaks: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> {"server"/"sites": MiB}
    round_losses: dict[str, list[float]] = field(default_factory=dict)  # phase -> mean training loss per round
    anchor: dict = field(default_factory=dict)  # the anchor side: scores and what the scorer shares
    threshold: dict = field(default_factory=dict)  # the threshold rule's decision
    checkpoints: list[Checkpoint] = field(default_factory=list)  # federated mode: shared
    sites: dict[int, SiteRecord] = field(default_factory=dict)
    rounds: dict[str, PhaseRounds] = field(default_factory=dict)  # ROUND_PHASES: where they continue
    final: FinalAdapter | None = None  # the aggregate phase's output: what the report evaluates
    cost: CostLedger = field(default_factory=CostLedger)  # bytes and seconds per phase (server/cost.py)
    all_data_state: Tensors | None = transient(default=None)  # the equal-budget all-data reference

    def reported(self) -> list[SiteRecord]:
        """The sites that reported scores (or a histogram)."""
        return [s for s in self.sites.values() if s.reported]
