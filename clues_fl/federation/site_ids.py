"""Sample ids on the wire: a site never sends its samples' own ids (a record id can be
a patient or account number), only a keyed hash of each.

    wire id = HMAC-SHA256(key, id), 32 hex digits
    key     = HMAC-SHA256(salt, run-name + the site's node config)

The salt is 32 random bytes the site draws once and keeps in its own folder
(`<site-dir>/id-salt`); the key is never sent, so the server (or anyone on the wire)
cannot test a guessed id against the hashes. The same salt, run-name and node config
give the same wire ids, so a resumed run's sites recognise their scores. The site keeps
the map back to its ids in `<site-dir>/ids.csv` (`id-hash,id`): the server's manifests
hold the hashes, the site's file the ids.

`<site-dir>`: the node config's `site-dir` when given, else
`<output-dir>/<run-name>/sites/client-<partition-id>` as the site's process resolves it
(in a simulation the same machine as the server's outputs; in a deployment the site's
own disk).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from clues_fl.config import RunConfig
from clues_fl.outputs import output_dir

SALT_FILE = "id-salt"
MAP_FILE = "ids.csv"
HASH_HEX = 32


def site_name(node_config: dict) -> str:
    """client-<partition-id>; a site without one: its data file's stem (or "site")."""
    pid = int(node_config.get("partition-id", -1))
    if pid >= 0:
        return f"client-{pid}"
    return Path(str(node_config["data-file"])).stem if node_config.get("data-file") else "site"


def site_dir(cfg: RunConfig, node_config: dict) -> Path:
    """This site's own folder (created): salt and id map live here."""
    if node_config.get("site-dir"):
        path = Path(str(node_config["site-dir"])).expanduser()
    else:
        path = output_dir(cfg) / "sites" / site_name(node_config)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _salt(folder: Path) -> bytes:
    """The site's random salt, drawn once; concurrent processes of one site agree on it
    (the first to link its file into place wins, the others read that one)."""
    path = folder / SALT_FILE
    if not path.exists():
        tmp = folder / f".{SALT_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # atomic, fails if another process was first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return bytes.fromhex(path.read_text().strip())


def site_key(cfg: RunConfig, node_config: dict, folder: Path | None = None) -> bytes:
    folder = folder or site_dir(cfg, node_config)
    context = json.dumps({"run-name": cfg.run.run_name,
                          "node-config": {str(k): str(v) for k, v in node_config.items() if k != "site-dir"}},
                         sort_keys=True)
    return hmac.new(_salt(folder), context.encode(), hashlib.sha256).digest()


def hash_ids(ids, key: bytes) -> list[str]:
    return [hmac.new(key, str(i).encode(), hashlib.sha256).hexdigest()[:HASH_HEX] for i in ids]


def write_id_map(folder: Path, ids: list[str], hashed: list[str]) -> Path:
    """`ids.csv` (id-hash,id) in the site's folder, replaced atomically."""
    path = folder / MAP_FILE
    tmp = folder / f".{MAP_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id-hash", "id"])
        writer.writerows(zip(hashed, ids))
    os.replace(tmp, path)
    return path


def wire_ids(cfg: RunConfig, node_config: dict, ids: list[str]) -> list[str]:
    """The hashes this site sends for `ids`; writes its id map as a side effect."""
    folder = site_dir(cfg, node_config)
    hashed = hash_ids(ids, site_key(cfg, node_config, folder))
    write_id_map(folder, ids, hashed)
    return hashed


def read_id_map(folder: Path) -> dict[str, str]:
    """id-hash -> id from a site's `ids.csv` (OSError if it has none)."""
    with open(folder / MAP_FILE, newline="") as fh:
        return {row["id-hash"]: row["id"] for row in csv.DictReader(fh)}
