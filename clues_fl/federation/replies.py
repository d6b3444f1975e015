"""The sites' replies to a batch of messages: which answered, which failed and why."""

from __future__ import annotations

from flwr.app import Message

from clues_fl.federation.messages import GPU_PEAK_KEY, METRICS


class SitesFailed(RuntimeError):
    """Fewer sites than fed.min-nodes answered: the run stops, with the sites' errors."""


def sort_replies(sent: list[Message], replies) -> tuple[dict[int, Message], list[tuple[int, str]]]:
    """The good replies by site, and (site, reason) for every site whose reply was an
    error or that did not reply. A reply is matched to the message it answers, not to
    its source: Flower's SuperLink answers for a site that went offline with an error
    whose source is the SuperLink itself. `sent` must have been pushed (message ids set)."""
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    ok: dict[int, Message] = {}
    failed: list[tuple[int, str]] = []
    for reply in replies:
        node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():
            failed.append((node, reply.error.reason))
        else:
            ok[node] = reply
    answered = {node for node, _ in failed} | set(ok)
    failed += [(node, "no reply before the timeout") for node in sorted(set(destination.values()) - answered)]
    return ok, failed


def site_gpu_peak(replies, current: float | None = None) -> float | None:
    """The largest GPU peak the replies report (sites on the CPU report none)."""
    for reply in replies:
        metrics = reply.content.get(METRICS) if not reply.has_error() else None
        if metrics is not None and GPU_PEAK_KEY in metrics:
            current = max(current or 0.0, float(metrics[GPU_PEAK_KEY]))
    return current
