"""The sites as the server knows them, and the one way to ask them something.

`SiteRegistry` keeps who each node is (its name, partition id and data file, asked with
query.site before any data is read), the record of what each site reported
(`ProtocolState.sites`), which site failed where and why (`ProtocolState.missing`), the
largest GPU peak the sites report per phase, and `exchange`: one message per site, the
good replies kept, the others recorded; fewer good replies than fed.min-nodes stop the
run (`SitesFailed`). A resumed run finds its sites again under new node ids (`rebind`).
"""

from __future__ import annotations

import logging
import time

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from clues_fl.federation.messages import (
    DescribeRequest,
    IdentifyReply,
    IdentifyRequest,
    SiteDescription,
    ids_digest,
)
from clues_fl.federation.replies import SitesFailed, site_gpu_peak, sort_replies
from clues_fl.federation.site_errors import summarise
from clues_fl.server.state import ProtocolState, SiteRecord

__all__ = ["SiteRegistry", "SitesFailed", "wait_for_nodes"]

log = logging.getLogger(__name__)


def wait_for_nodes(grid: Grid, minimum: int, timeout: float = 180.0, every: float = 30.0,
                   poll: float = 1.0) -> list[int]:
    """The connected nodes once at least `minimum` are; logs every `every` seconds how
    many are still missing and which have connected; gives up after `timeout` seconds
    (fed.wait-for-nodes) with TimeoutError."""
    start = time.time()
    said = start
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        waited = time.time() - start
        if waited > timeout:
            raise TimeoutError(
                f"fed.min-nodes={minimum}: only {len(nodes)} site(s) connected in fed.wait-for-nodes={timeout:g} s "
                f"(node ids {nodes or 'none'}); start the missing SuperNodes, or lower fed.min-nodes"
            )
        if time.time() - said >= every:
            said = time.time()
            log.warning("waiting for sites: %d of fed.min-nodes=%d connected (node ids %s), %d missing; "
                        "giving up in %.0f s (fed.wait-for-nodes)", len(nodes), minimum, nodes or "none",
                        minimum - len(nodes), timeout - waited)
        time.sleep(poll)


class SiteRegistry:
    """The run's sites (see the module docstring). `min_nodes`, `timeout` and `wait` are
    fed.min-nodes, fed.timeout and fed.wait-for-nodes."""

    def __init__(self, state: ProtocolState, *, min_nodes: int, timeout: float, wait: float):
        self.state = state
        self.min_nodes = min_nodes
        self.timeout = timeout
        self.wait = wait
        self.info: dict[int, dict] = {}  # node -> its name, partition id, data file (query.site)

    def record(self, node: int, name: str | None = None) -> SiteRecord:
        """The site's record, made on first use (named as far as the server knows it)."""
        if node not in self.state.sites:
            self.state.sites[node] = SiteRecord(node, name or self.describe(node)["site"])
        return self.state.sites[node]

    def exchange(self, grid: Grid, phase: str, contents: dict[int, RecordDict], message_type: str) -> dict[int, Message]:
        """Send one message per node; keep the replies that carry no error."""
        messages = [Message(content=c, message_type=message_type, dst_node_id=node) for node, c in contents.items()]
        ok, failed = sort_replies(messages, grid.send_and_receive(messages, timeout=self.timeout))
        self.note_gpu_peak(phase, site_gpu_peak(ok.values()))
        for node, reason in failed:
            self.failed(node, phase, reason)
        if len(ok) < min(self.min_nodes, len(contents)):
            raise SitesFailed(
                f"phase '{phase}': only {len(ok)} of {len(contents)} sites answered, fewer than "
                f"fed.min-nodes={self.min_nodes}; stopping the run. {summarise(failed)}"
            )
        return ok

    def failed(self, node: int, phase: str, reason: str, server_round: int | None = None) -> None:
        """Record a site that failed: which site (name, partition id, data file when it
        has one), where (phase and round) and why."""
        who = self.describe(node)
        log.warning("site %s (node %s) failed in phase '%s': %s", who["site"], node, phase, reason)
        self.state.missing.append({"node": node, **who, "phase": phase, "round": server_round,
                                   "reason": str(reason)[:500]})

    def failed_in(self, phase: str) -> list[str]:
        """The names of the sites that failed in `phase` (any of its rounds)."""
        return sorted({m["site"] for m in self.state.missing if m["phase"].split()[0] == phase})

    def note_gpu_peak(self, phase: str, peak: float | None) -> None:
        if peak is not None:
            entry = self.state.gpu_peaks.setdefault(phase, {})
            entry["sites"] = max(entry.get("sites", 0.0), peak)

    def describe(self, node: int) -> dict:
        """{"site", "partition-id"[, "data-file"]} of a node, as far as the server knows it."""
        info = dict(self.info.get(node, {}))
        site = self.state.sites.get(node)
        if site is not None and not site.name.startswith("node-"):
            info.setdefault("site", site.name)
        info.setdefault("site", f"node-{node}")
        info.setdefault("partition-id", int(info["site"].removeprefix("client-")) if info["site"].startswith("client-") else -1)
        return info

    def name_sites(self, grid: Grid, nodes: list[int]) -> None:
        """Ask each site who it is (query.site: from its node config, no data read), so that
        a site failing before it ever replied is still named in `missing-sites`. A site
        that does not answer stays known by its node id."""
        messages = [Message(content=DescribeRequest().to_record(), message_type=DescribeRequest.message_type,
                            dst_node_id=n) for n in nodes]
        ok, _ = sort_replies(messages, grid.send_and_receive(messages, timeout=self.timeout))
        for node, reply in ok.items():
            site = SiteDescription.from_record(reply.content)
            pid = site.partition_id
            info = {"site": site.name if pid >= 0 else f"node-{node}", "partition-id": pid}
            if site.data_file is not None:
                info["data-file"] = site.data_file
            self.info[node] = info

    def rebind(self, grid: Grid, nodes: list[int]) -> list[int]:
        """A restarted run can see its sites under new node ids (simulation draws them at
        random; a restarted SuperNode registers anew). Find each site of the saved state
        among the connected nodes by the digest of its sample ids (query.identify).
        Returns the connected nodes."""
        sites = self.state.sites
        if set(sites) <= set(nodes):
            return nodes
        nodes = wait_for_nodes(grid, max(len(nodes), len(sites)), self.wait)
        request = IdentifyRequest()
        replies = self.exchange(grid, "identify", {n: request.to_record() for n in nodes}, request.message_type)
        found: dict[str, list[int]] = {}
        for node, reply in replies.items():
            found.setdefault(IdentifyReply.from_record(reply.content).ids_digest, []).append(node)
        moved: dict[int, SiteRecord] = {}
        for old, site in sites.items():
            matches = found.get(ids_digest(site.ids) if site.ids else site.digest, [])
            if len(matches) != 1:
                raise RuntimeError(
                    f"resuming: site {site.name} (node {old} before) is "
                    f"{'not among' if not matches else 'ambiguous among'} the connected sites {nodes}: "
                    "a resumed run needs the same sites with the same data (or start over: resume=false)"
                )
            log.info("resuming: site %s was node %s, is now node %s", site.name, old, matches[0])
            site.node_id = matches[0]
            moved[matches[0]] = site
        self.state.sites = moved
        self.state.cost.renumber({old: site.node_id for old, site in sites.items()})
        return nodes
