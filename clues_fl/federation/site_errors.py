"""A site's error, as the site states it, in the server's log.

Flower turns an exception in a ClientApp into an error reply whose reason is the
exception's repr, wrapped (in simulation) in Ray's traceback text; the server then
knows only the node id. `report_site_errors` is a ClientApp mod: it logs the traceback
at the site and replies with an error whose reason is one line, "[<site>] <Type>:
<message>", the site named by its partition id (or its data file). `summarise` turns
the failed replies of one round into one line for the server's log and its error.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context, Error, Message

log = logging.getLogger(__name__)

CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def site_label(context: Context) -> str:
    config = context.node_config
    if "partition-id" in config:
        return f"client-{int(config['partition-id'])}"
    if config.get("data-file"):
        return Path(str(config["data-file"])).name
    return f"node-{context.node_id}"


def report_site_errors(message: Message, context: Context, call_next) -> Message:
    """ClientApp mod: an exception becomes an error reply with a one-line reason."""
    try:
        return call_next(message, context)
    except Exception as err:  # noqa: BLE001 - every failure goes back to the server
        site = site_label(context)
        log.exception("%s: %s failed", site, message.metadata.message_type)
        text = " ".join(str(err).split())[:2000]
        reason = f"[{site}] {type(err).__name__}: {text}" if text else f"[{site}] {type(err).__name__}"
        return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def split_reason(node: int, reason: str) -> tuple[str, str]:
    """(site, what happened) from a reason (the site names itself, else its node id)."""
    reason = " ".join(str(reason).split())
    if reason.startswith("[") and "] " in reason:
        site, _, rest = reason[1:].partition("] ")
        return site, rest
    return f"node {node}", reason


def summarise(failed: list[tuple[int, str]]) -> str:
    """'client-0, client-1: ConfigError: ...; node 7: no reply before the timeout'."""
    by_reason: dict[str, list[str]] = {}
    for node, reason in failed:
        site, what = split_reason(node, reason)
        by_reason.setdefault(what, []).append(site)
    return "; ".join(f"{', '.join(sorted(sites))}: {what}" for what, sites in by_reason.items())
