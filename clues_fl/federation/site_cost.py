"""What each message costs a site: a ClientApp mod that times the handler (wall and
CPU seconds of this process), reads the process's peak resident memory and, where the
site has one, its prefix cache's size on disk, and adds them to the reply as a
`SiteCost` record (messages.py). Only seconds and sizes travel; a handler that raises
adds nothing (its error reply has no content)."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable

from flwr.app import Context, Message

from clues_fl.federation.messages import SITE_COST, SiteCost


def peak_rss_mib() -> float:
    """This process's peak resident memory since it started, in MiB (ru_maxrss: KiB on
    Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def site_cost_mod(cache_bytes: Callable[[Message, Context], int | None] = lambda m, c: None):
    """The ClientApp mod; `cache_bytes(message, context)`: the site's prefix cache on disk
    (None: none, or not known for this message)."""

    def report_site_cost(message: Message, context: Context, call_next) -> Message:
        wall, cpu = time.perf_counter(), time.process_time()
        reply = call_next(message, context)
        if reply.has_error():
            return reply
        cost = SiteCost(time.perf_counter() - wall, time.process_time() - cpu, peak_rss_mib(),
                        cache_bytes(message, context))
        reply.content[SITE_COST] = cost.to_record()
        return reply

    return report_site_cost
