"""A site's error, as the site states it, in the server's log, with nothing private in it.

Flower turns an exception in a ClientApp into an error reply whose reason is the
exception's repr, wrapped (in simulation) in Ray's traceback text; the server then
knows only the node id. `report_site_errors` is a ClientApp mod: it logs the full
traceback at the site (and appends it to the site's own `errors.log` beside its report),
and replies with an error whose reason is one line, "[<site>] <Type>: <message>", the
site named by its partition id (or its data file), the message `scrub`bed of what
could be private: quoted values (a sample id, a field's text) other than the run-config's
own values and field names, and file paths (their file name stays). `summarise` turns
the failed replies of one round into one line for the server's log and its error.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
from pathlib import Path

from flwr.app import Context, Error, Message

log = logging.getLogger(__name__)

CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION
MAX_REASON = 300  # characters of a scrubbed message that travel
HIDDEN = "…"
# Field names a data error may quote (data/sources.py's layouts, id and options).
FIELD_NAMES = ("question", "answer", "instruction", "input", "output", "prompt", "response", "id", "options",
               "data")
# A quoted value: its quotes are not inside a word (the apostrophe of "site's" is no quote).
_QUOTED = re.compile(r"(?<!\w)'((?:[^'\n]|'(?=\w))*)'(?!\w)|(?<!\w)\"([^\"\n]*)\"(?!\w)")
_HASHED_ID = re.compile(r"^<id [0-9a-f]+>$")  # client_app: a sample named by its wire id
_PATH = re.compile(r"(?:[A-Za-z]:\\|~|\.{1,2}(?=[/\\])|(?<![\w.:-])(?=/))?[^\s'\",;()\[\]{}<>]*[/\\][^\s'\",;()\[\]{}<>]*")


def site_label(context: Context) -> str:
    config = context.node_config
    if "partition-id" in config:
        return f"client-{int(config['partition-id'])}"
    if config.get("data-file"):
        return Path(str(config["data-file"])).name
    return f"node-{context.node_id}"


def allowed_words(run_config: dict) -> set[str]:
    """What a scrubbed message may quote: the run-config's keys and values (the server
    has them), their comma-separated items, and the data layouts' field names."""
    words = set(FIELD_NAMES)
    for key, value in dict(run_config).items():
        words.add(str(key))
        words.add(str(value))
        words.update(part.strip() for part in str(value).split(",") if part.strip())
    return words


def _base_name(match: re.Match) -> str:
    path = match.group(0)
    name = re.split(r"[/\\]", path.rstrip("/\\"))[-1]
    return name if re.search(r"[A-Za-z]", name) else path  # '3/8' is a count, not a path


def scrub(text: str, allowed=frozenset(), limit: int = MAX_REASON) -> str:
    """`text` as it may leave a site: on one line, quoted values that are not `allowed`
    (allowed_words) replaced by '…', a path by its file name, cut at `limit` characters."""
    def quoted(match: re.Match) -> str:
        inner = match.group(1) if match.group(1) is not None else match.group(2)
        quote = "'" if match.group(1) is not None else '"'
        keep = inner in allowed or _HASHED_ID.match(inner) or not inner.strip()
        return f"{quote}{inner if keep else HIDDEN}{quote}"

    text = _QUOTED.sub(quoted, " ".join(str(text).split()))
    text = _PATH.sub(_base_name, text)
    return text if len(text) <= limit else text[: limit - 1] + HIDDEN


def _keep_at_site(context: Context, message: Message, site: str) -> None:
    """The full traceback in the site's own errors.log (beside its report), best effort."""
    try:
        from clues_fl.config import parse_config
        from clues_fl.federation.site import site_report_dir

        folder = site_report_dir(parse_config(dict(context.run_config)), context.node_config)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "errors.log", "a") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {site} {message.metadata.message_type}\n")
            fh.write(traceback.format_exc())
    except Exception:  # noqa: BLE001 - the site's log has it anyway
        log.debug("could not write the site's errors.log", exc_info=True)


def report_site_errors(message: Message, context: Context, call_next) -> Message:
    """ClientApp mod: an exception becomes an error reply with a one-line, scrubbed reason."""
    try:
        return call_next(message, context)
    except Exception as err:  # noqa: BLE001 - every failure goes back to the server
        site = site_label(context)
        log.exception("%s: %s failed", site, message.metadata.message_type)
        _keep_at_site(context, message, site)
        text = scrub(str(err), allowed_words(context.run_config))
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
