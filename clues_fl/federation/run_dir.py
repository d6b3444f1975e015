"""A run's folder, <output-dir>/<run-name>: who is using it and what it already holds,
checked before anything starts.

- `RunLock`: `.lock` in the run's folder names the process that runs it (pid, its start
  time, host, launch id). A second launch of the same run-name is refused while that
  process lives; a lock whose process is gone (a killed launch) is taken over. The
  ServerApp a launch starts shares its launcher's lock (same launch id); `flwr run .`
  alone takes its own.
- `saved_state_problem`: the run's saved state (federation/resume.py) comes from
  another run-config or format: one line with the choices (another run-name,
  resume=false), instead of an error after the model and the sites have started.
- `finished`: the run has finished with this run-config: nothing to do.

Plain Python (no torch, no Flower): the launcher's preflight reads it in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

from clues_fl.config import DEFAULTS, RunConfig, check_run_name
from clues_fl.outputs import output_dir

LOCK = ".lock"
STATE_VERSION = 4  # resume.py VERSION: 4 ProtocolState through dump/load, the aggregate phase so named
INDEX = "run.json"
# Keys that do not change what a run computes: a resumed run may differ in them.
IGNORED_KEYS = ("run-name", "output-dir", "resume", "fed.timeout", "fed.wait-for-nodes")


class RunInUse(RuntimeError):
    """The run-name is in use by a running launch."""


# -- the run-config a state was saved with ------------------------------------------------
def fingerprint(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def results_config(cfg: RunConfig) -> dict:
    """The run-config keys that decide what a run computes."""
    return {k: v for k, v in cfg.values.items() if k not in IGNORED_KEYS}


def config_differences(saved: dict, current: dict) -> list[str]:
    """'key: saved -> current' for every key that differs; a key one side lacks counts
    as its default (a newer version may add keys), a key this version no longer knows
    is left out."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in IGNORED_KEYS or key not in DEFAULTS:
            continue
        old, new = saved.get(key, DEFAULTS[key]), current.get(key, DEFAULTS[key])
        if old != new:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out


def run_folder(cfg: RunConfig) -> Path:
    """<output-dir>/<run-name> (outputs.output_dir), not created."""
    return output_dir(cfg, create=False)


def choices(cfg: RunConfig) -> str:
    name = cfg.run.run_name
    return (f"choose another run-name (e.g. run-name='{name}-2'; this one's outputs stay) or set resume=false "
            f"to run '{name}' again from the start (its saved state and outputs are replaced)")


def _index(cfg: RunConfig) -> dict | None:
    path = run_folder(cfg) / "state" / INDEX
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def saved_state_problem(cfg: RunConfig) -> str | None:
    """One line when the run's saved state cannot be resumed with this run-config (another
    format version or another run-config), None when it can (or there is none, or
    resume=false clears it)."""
    if not cfg.run.resume:
        return None
    index = _index(cfg)
    if index is None:
        return None
    where = run_folder(cfg) / "state"
    if index.get("version") != STATE_VERSION:
        return (f"run '{cfg['run-name']}': its saved state in {where} has format version {index.get('version')}, "
                f"this version reads {STATE_VERSION}: {choices(cfg)}")
    current = results_config(cfg)
    if index.get("fingerprint") != fingerprint(current):
        differences = config_differences(index.get("config", {}), current)
        if differences:
            finished = " has finished" if "report" in index.get("completed", []) else ""
            return (f"run '{cfg['run-name']}'{finished} with another run-config ({'; '.join(differences)}), "
                    f"saved in {where}: {choices(cfg)}")
    return None


def finished(cfg: RunConfig) -> str | None:
    """One line when the run has already finished with this run-config (nothing to do)."""
    if not cfg.run.resume or saved_state_problem(cfg) is not None:
        return None
    index = _index(cfg)
    folder = run_folder(cfg)
    if index is None or "report" not in index.get("completed", []) or not (folder / "metrics.json").exists():
        return None
    return f"run '{cfg['run-name']}' has already finished with this run-config (outputs in {folder}): nothing to do; " \
           f"to run it again, {choices(cfg)}"


# -- who runs it --------------------------------------------------------------------------
def _start_time(pid: int) -> str | None:
    from clues_fl.federation.processes import start_time

    return start_time(pid)


class RunLock:
    """The lock of one run's folder (see the module docstring). `claim` takes it or
    raises RunInUse; `release` removes it if this process took it."""

    def __init__(self, folder: Path, owner: str | None):
        self.path = Path(folder) / LOCK
        self.owner = owner or ""
        self.held = False  # this object created the lock file (and removes it)

    def _entry(self) -> dict:
        return {"pid": os.getpid(), "start": _start_time(os.getpid()), "host": socket.gethostname(),
                "owner": self.owner, "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _holder(self) -> dict | None:
        """The live holder's entry, or None when the lock is free or stale."""
        try:
            entry = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # a torn write by a process killed mid-way: stale
        if entry.get("host") != socket.gethostname():
            return entry  # another machine's process: cannot tell, so it holds the lock
        start = _start_time(int(entry.get("pid", -1)))
        if start is None or (entry.get("start") is not None and start != entry.get("start")):
            return None  # that process is gone (its pid may be someone else's now)
        return entry

    def claim(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            holder = self._holder()
            if holder is not None:
                if self.owner and holder.get("owner") == self.owner:
                    return self  # our own launch holds it (the ServerApp under its launcher)
                raise RunInUse(
                    f"run-name '{self.path.parent.name}' is in use by a running launch (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {holder.get('since')}; lock {self.path}): wait for it to end, or "
                    "choose another run-name")
            self.path.unlink(missing_ok=True)  # free or stale
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue  # another launch took it meanwhile: look again
            with os.fdopen(fd, "w") as fh:
                json.dump(self._entry(), fh)
            self.held = True
            return self
        raise RunInUse(f"run-name '{self.path.parent.name}': could not take its lock {self.path}")

    def release(self) -> None:
        if not self.held:
            return
        try:
            entry = json.loads(self.path.read_text())
            if entry.get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.held = False

    def __enter__(self) -> RunLock:
        return self.claim()

    def __exit__(self, *exc) -> None:
        self.release()


def run_lock(cfg: RunConfig) -> RunLock:
    """The lock of this run's folder, owned by this launch (its id in the environment,
    processes.MARKER) or, without a launcher, by this process alone."""
    from clues_fl.federation.processes import MARKER

    check_run_name(cfg.run.run_name)
    return RunLock(run_folder(cfg), os.environ.get(MARKER))
