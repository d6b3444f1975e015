"""The rounds of tracing and of the aggregate step, around any Flower strategy.

`SiteRounds` wraps a strategy of `flwr.serverapp.strategy` (or a user's Strategy
subclass), as Flower's DP wrappers do, and adds what the CLUES protocol needs while
the wrapped strategy aggregates the adapter:

- rounds restricted to a set of sites (the aggregate step: the sites that kept samples);
- the sites whose reply was an error (or that did not reply) are reported; fewer good
  replies than fed.min-nodes stop the run (SitesFailed);
- the Adam moments (tracing) travel in their own record (`messages.MOMENTS_KEY`) and
  are averaged here, weighted by num-examples, so a server optimiser (FedAdam, FedYogi)
  steps only the adapter;
- a resumed run continues its round numbers (`offset`).

`SiteDP` is Flower's server-side fixed-clipping DP wrapper around a SiteRounds.
"""

from __future__ import annotations

import copy

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy
from flwr.serverapp.strategy.dp_fixed_clipping import add_gaussian_noise_inplace, compute_stdv

from clues_fl.federation.messages import (
    ARRAYS,
    M_PREFIX,
    MOMENTS_KEY,
    NUM_EXAMPLES,
    V_PREFIX,
    average_moments,
    join_records,
    split_moments,
)
from clues_fl.federation.site_errors import summarise
from clues_fl.federation.replies import SitesFailed, site_gpu_peak, sort_replies

# What the run sets on the wrapped strategy (those of these attributes it has): every
# connected site trains, at least fed.min-nodes of them, and no federated evaluation.
RUN_SETTINGS = ("fraction_evaluate", "min_evaluate_nodes", "min_train_nodes", "min_available_nodes")


def _weight(reply: Message, key: str) -> float:
    metrics = next(iter(reply.content.metric_records.values()))
    return float(metrics[key])


class SiteRounds(Strategy):
    """`strategy` with the CLUES rounds' behaviour (see the module docstring).

    `strategy` is used as it is (pass a copy to keep yours untouched); its run settings
    (RUN_SETTINGS) are set from `min_nodes`. `only`: the sites of these rounds (None:
    all); `on_error(node, round, reason)` is called for each site that failed; `offset`:
    rounds done before this start (a resumed run continues from the saved global arrays;
    Flower numbers the rounds of each start() from 1, the sites are sent the true round
    as "server-round": their Adam step count and seed use it); `moments`: the global Adam
    moments record to send with the first round (tracing), None when none travel."""

    def __init__(self, strategy: Strategy, *, only: set[int] | None = None, on_error=None, offset: int = 0,
                 phase: str = "rounds", min_nodes: int = 1, moments: ArrayRecord | None = None):
        self.strategy = strategy
        for name, value in zip(RUN_SETTINGS, (0.0, 0, min_nodes, min_nodes), strict=True):
            if hasattr(strategy, name):
                setattr(strategy, name, value)
        self.only = only
        self.on_error = on_error
        self.offset = offset
        self.phase = phase
        self.min_nodes = int(getattr(strategy, "min_train_nodes", min_nodes) or min_nodes)
        self.weight_key = getattr(strategy, "weighted_by_key", NUM_EXAMPLES)
        self.losses: dict[int, float] = {}  # true round -> mean client training loss
        self.aggregated: set[int] = set()  # true rounds that produced global arrays
        self.moments = moments  # the current global Adam moments (None: none travel)
        self.round_moments: dict[int, ArrayRecord] = {}  # true round -> averaged moments
        self._sent: list[Message] = []  # this round's messages
        self._noted: set[int] = set()
        self.answered: dict[int, int] = {}  # true round -> sites whose reply was good
        self.gpu_peak: float | None = None  # the largest site GPU peak (MiB) over the rounds

    def note_failures(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Report the sites that answered with an error or not at all (once per round);
        return the good replies."""
        ok, failed = sort_replies(self._sent, replies)
        self.answered[server_round] = len(ok)
        if self.on_error is not None and server_round not in self._noted:
            self._noted.add(server_round)
            for node, reason in failed:
                self.on_error(node, server_round, reason)
        if len(ok) < self.min_nodes:
            raise SitesFailed(
                f"{self.phase} round {server_round}: {len(ok)} of {len(self._sent)} sites replied, fewer than "
                f"fed.min-nodes={self.min_nodes}; stopping the run. {summarise(failed)}"
            )
        return list(ok.values())

    def take_moments(self, server_round: int, replies: list[Message]) -> list[Message]:
        """The replies without their Adam moments (their own record, or prefixed keys in
        the adapter's record, as the DP wrapper clipped them); keeps the moments' weighted
        mean (num-examples) as the round's global moments. The replies themselves are
        left as they came (copies go on to the strategy)."""
        records, weights, out = [], [], []
        for reply in replies:
            content = reply.content
            name = next(iter(content.array_records), None)
            if MOMENTS_KEY in content:
                records.append(content[MOMENTS_KEY])
                kept = {k: v for k, v in content.items() if k != MOMENTS_KEY}
            elif name is not None and any(k.startswith((M_PREFIX, V_PREFIX)) for k in content[name].keys()):
                adapter, moments = split_moments(content[name])
                records.append(moments)
                kept = {**dict(content.items()), name: adapter}
            else:
                out.append(reply)
                continue
            weights.append(_weight(reply, self.weight_key))
            stripped = copy.copy(reply)
            stripped.content = RecordDict(kept)
            out.append(stripped)
        if records:
            if len(records) != len(replies):
                raise ValueError(f"{self.phase} round {server_round}: {len(records)} of {len(replies)} replies "
                                 "carry Adam moments")
            self.round_moments[server_round] = self.moments = average_moments(records, weights)
        return out

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(self.strategy.configure_train(server_round + self.offset, arrays, config, grid))
        if self.only is not None:
            messages = [m for m in messages if m.metadata.dst_node_id in self.only]
        if self.moments is not None:
            for message in messages:  # strategies may share one content between messages
                message.content[MOMENTS_KEY] = self.moments
        self._sent = messages  # Flower sets their ids when it pushes these very objects
        return messages

    def aggregate_train(self, server_round, replies):
        server_round += self.offset
        replies = self.note_failures(server_round, replies)
        self.gpu_peak = site_gpu_peak(replies, self.gpu_peak)
        replies = self.take_moments(server_round, replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.aggregated.add(server_round)
        if metrics is not None:
            self.losses[server_round] = float(metrics.get("train-loss", np.nan))
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def with_moments(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The global adapter after a (true) round with that round's moments in one record
        (a checkpoint; the saved state), or the adapter alone when no moments travel."""
        if self.moments is None:
            return arrays
        return join_records(arrays, self.round_moments.get(server_round, self.moments))


class SiteDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's central-DP wrapper (server-side fixed clipping of each site's update,
    Gaussian noise on the aggregate) around a SiteRounds.

    Flower's wrapper skips a whole round when one site errors; here the failed site is
    recorded and the round goes on with the others, as without DP. The Adam moments
    (tracing) are clipped together with the adapter (one update vector per site, as one
    record) and get the same noise, then averaged by the SiteRounds."""

    def configure_train(self, server_round, arrays, config, grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        if self.strategy.moments is not None:
            self.current_arrays = join_records(arrays, self.strategy.moments)
        return messages

    def aggregate_train(self, server_round, replies):
        inner = self.strategy
        replies = inner.note_failures(server_round + inner.offset, replies)
        joined = []
        for reply in replies:  # one record per site, clipped as one update
            if MOMENTS_KEY in reply.content:
                content = reply.content
                reply = copy.copy(reply)
                reply.content = RecordDict({k: v for k, v in content.items() if k not in (ARRAYS, MOMENTS_KEY)})
                reply.content[ARRAYS] = join_records(content[ARRAYS], content[MOMENTS_KEY])
            joined.append(reply)
        replies = joined
        arrays, metrics = super().aggregate_train(server_round, replies)
        true_round = server_round + inner.offset
        if arrays is not None and true_round in inner.round_moments:
            noisy = inner.round_moments[true_round].to_numpy_ndarrays()
            add_gaussian_noise_inplace(noisy, compute_stdv(self.noise_multiplier, self.clipping_norm,
                                                           self.num_sampled_clients))
            keys = list(inner.round_moments[true_round].keys())
            inner.round_moments[true_round] = inner.moments = ArrayRecord(
                {k: Array(np.asarray(v)) for k, v in zip(keys, noisy, strict=True)})
        return arrays, metrics
