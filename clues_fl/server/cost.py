"""What a run cost, per phase: bytes each way, messages, the sites' seconds and the
server's, counted as the run goes and saved with its state (a resumed run keeps the
cost of the phases and rounds it saved; work lost to an interruption is not counted).

`MeteredGrid` wraps the run's Flower Grid: it counts the content of every message on
its way to a site (`wire_bytes`) and of every reply on its way back, under the phase
the driver has set (`phase`), and takes the `SiteCost` record each site adds to its
reply off before anyone else sees the reply. Everything else is the wrapped grid's.
`cost_section` is the run's cost as metrics.json states it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from clues_fl.federation.messages import SITE_COST, SiteCost, wire_bytes
from clues_fl.federation.state import state_class

CONNECT = "connect"  # the messages before the first phase: who the sites are (query.site, query.identify)
SELECTION_PHASES = ("trace", "score")  # what selecting costs the sites...
TRAINING_PHASE = "aggregate"  # ...against retraining on the kept samples


@state_class
@dataclass
class PhaseCost:
    """One phase's cost. Bytes are message contents as Flower serialises them
    (messages.wire_bytes: without the ~0.2 kB envelope); site seconds are the handlers'
    (each site's, keyed by node id), server seconds the driver's around the phase."""

    messages: int = 0  # sent to sites
    replies: int = 0  # good replies (an error reply carries no content)
    bytes_sent: int = 0  # server -> sites
    bytes_received: int = 0  # sites -> server
    site_wall_seconds: dict[int, float] = field(default_factory=dict)
    site_cpu_seconds: dict[int, float] = field(default_factory=dict)
    server_wall_seconds: float | None = None  # None: not measured (the phase ran before a resume)
    server_cpu_seconds: float | None = None


@state_class
@dataclass
class CostLedger:
    """The run's cost: per phase, and per site its largest peak resident memory (MiB)
    and prefix cache on disk (bytes), as the sites reported them."""

    phases: dict[str, PhaseCost] = field(default_factory=dict)
    site_peak_rss_mib: dict[int, float] = field(default_factory=dict)
    site_cache_bytes: dict[int, int] = field(default_factory=dict)

    def phase(self, name: str) -> PhaseCost:
        return self.phases.setdefault(name, PhaseCost())

    def add_reply(self, phase: str, node: int, cost: SiteCost) -> None:
        entry = self.phase(phase)
        entry.site_wall_seconds[node] = entry.site_wall_seconds.get(node, 0.0) + cost.wall_seconds
        entry.site_cpu_seconds[node] = entry.site_cpu_seconds.get(node, 0.0) + cost.cpu_seconds
        self.site_peak_rss_mib[node] = max(self.site_peak_rss_mib.get(node, 0.0), cost.peak_rss_mib)
        if cost.cache_bytes is not None:
            self.site_cache_bytes[node] = cost.cache_bytes

    def add_server(self, phase: str, wall: float, cpu: float) -> None:
        entry = self.phase(phase)
        entry.server_wall_seconds = (entry.server_wall_seconds or 0.0) + wall
        entry.server_cpu_seconds = (entry.server_cpu_seconds or 0.0) + cpu

    def renumber(self, moved: dict[int, int]) -> None:
        """A resumed run's sites under their new node ids (old -> new; what a node
        already counted under its new id is added to)."""
        def keys(d: dict, join=lambda a, b: a + b) -> dict:
            out: dict = {}
            for k, v in d.items():
                k = moved.get(k, k)
                out[k] = join(out[k], v) if k in out else v
            return out

        for entry in self.phases.values():
            entry.site_wall_seconds, entry.site_cpu_seconds = keys(entry.site_wall_seconds), keys(entry.site_cpu_seconds)
        self.site_peak_rss_mib = keys(self.site_peak_rss_mib, max)
        self.site_cache_bytes = keys(self.site_cache_bytes, max)


class MeteredGrid(Grid):
    """`grid` counting what travels into `ledger()` (a callable: a resumed run's state,
    and with it its ledger, is replaced after the grid is made) under `self.phase`."""

    def __init__(self, grid: Grid, ledger: Callable[[], CostLedger]):
        self.grid = grid
        self.ledger = ledger
        self.phase = CONNECT

    def __getattr__(self, name):  # everything this class does not count is the wrapped grid's
        if name == "grid":
            raise AttributeError(name)
        return getattr(self.grid, name)

    def count_sent(self, messages: list[Message]) -> None:
        entry = self.ledger().phase(self.phase)
        entry.messages += len(messages)
        sizes: dict[int, int] = {}  # a strategy sends one content to every site: serialised once here
        for m in messages:
            if id(m.content) not in sizes:
                sizes[id(m.content)] = wire_bytes(m.content)
            entry.bytes_sent += sizes[id(m.content)]

    def count_replies(self, replies: Iterable[Message]) -> list[Message]:
        """Count each reply and hand it on without its SiteCost record."""
        ledger, out = self.ledger(), []
        entry = ledger.phase(self.phase)
        for reply in replies:
            if reply.has_error():
                out.append(reply)
                continue
            entry.replies += 1
            entry.bytes_received += wire_bytes(reply.content)
            if SITE_COST in reply.content:
                ledger.add_reply(self.phase, reply.metadata.src_node_id, SiteCost.from_record(reply.content[SITE_COST]))
                reply = copy.copy(reply)  # the wrapped grid's record of it stays as it came
                reply.content = RecordDict({k: v for k, v in reply.content.items() if k != SITE_COST})
            out.append(reply)
        return out

    # -- Grid ----------------------------------------------------------------------------
    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.count_sent(messages)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.count_replies(self.grid.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.count_sent(messages)
        return self.count_replies(self.grid.send_and_receive(messages, timeout=timeout))


def cost_section(ledger: CostLedger, name_of: Callable[[int], str], kept: int, total: int,
                 phases_run: Iterable[str]) -> dict:
    """metrics.json "cost": per phase its bytes, messages and seconds (sites by name),
    the sites' peaks, and the selection's cost against retraining on the kept samples.
    `phases_run`: the phases of this run that apply (those the selection share needs)."""
    def by_site(d: dict[int, float]) -> dict[str, float]:
        return {name_of(node): round(v, 3) for node, v in sorted(d.items(), key=lambda kv: name_of(kv[0]))}

    phases = {}
    for name, entry in ledger.phases.items():
        phases[name] = {
            "messages": entry.messages, "replies": entry.replies,
            "bytes-sent": entry.bytes_sent, "bytes-received": entry.bytes_received,
            "site-seconds": by_site(entry.site_wall_seconds), "site-cpu-seconds": by_site(entry.site_cpu_seconds),
            "server-wall-seconds": _round(entry.server_wall_seconds),
            "server-cpu-seconds": _round(entry.server_cpu_seconds),
        }
    return {"phases": phases,
            "total": {"bytes-sent": sum(e.bytes_sent for e in ledger.phases.values()),
                      "bytes-received": sum(e.bytes_received for e in ledger.phases.values()),
                      "messages": sum(e.messages for e in ledger.phases.values())},
            "site-peak-rss-mib": by_site(ledger.site_peak_rss_mib),
            "site-prefix-cache-bytes": {name_of(n): b for n, b in sorted(ledger.site_cache_bytes.items())},
            "selection": selection_share(ledger, kept, total, phases_run)}


def selection_share(ledger: CostLedger, kept: int, total: int, phases_run: Iterable[str]) -> dict:
    """The sites' seconds of selecting (trace + score, the ones that ran) against those
    of retraining on the kept samples (aggregate): each the sum over sites of the
    handlers' wall seconds. `ratio` is None, with `why`, when a part was not counted."""
    phases_run = list(phases_run)
    selecting = [p for p in SELECTION_PHASES if p in phases_run]
    out: dict = {"phases": selecting, "training-phase": TRAINING_PHASE, "kept": kept, "samples": total,
                 "kept-share": round(kept / total, 4) if total else None}
    missing = [p for p in [*selecting, TRAINING_PHASE]
               if p not in ledger.phases or not ledger.phases[p].site_wall_seconds]
    if missing:
        return {**out, "selection-site-seconds": None, "training-site-seconds": None, "ratio": None,
                "why": f"no site seconds counted for {', '.join(missing)} (ran before this run counted cost, "
                       "or no site answered)"}
    selection = sum(sum(ledger.phases[p].site_wall_seconds.values()) for p in selecting)
    training = sum(ledger.phases[TRAINING_PHASE].site_wall_seconds.values())
    return {**out, "selection-site-seconds": round(selection, 3), "training-site-seconds": round(training, 3),
            "ratio": round(selection / training, 3) if training > 0 else None}


def selection_line(share: dict) -> str:
    """The console's and report's one line on the selection's cost."""
    what = " + ".join(share["phases"]) or "no phase"
    kept = (f"kept {share['kept']} of {share['samples']} ({share['kept-share']:.0%})"
            if share.get("kept-share") is not None else f"kept {share['kept']} of {share['samples']}")
    if share.get("ratio") is None:
        why = share.get("why", "retraining took no measurable time")
        return f"selection cost: not stated ({why}); {kept}"
    return (f"selection cost: {share['selection-site-seconds']:.1f} site-seconds ({what}) = {share['ratio']:.2f} x "
            f"the retraining on the kept samples ({share['training-site-seconds']:.1f} site-seconds); {kept}")


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None
