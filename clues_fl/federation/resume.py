"""Resumption: the server's state after every phase and round, on disk.

outputs/<run-name>/state/
  run.json        the index: the run-config and its fingerprint, the completed phases,
                  the rounds each phase has done, and the protocol's state
                  (server/state.py `ProtocolState` through federation/state.py `dump`:
                  its JSON values, and for each of its named tensor dicts the file
                  that holds it)
  arrays/<sha256>.safetensors   one tensor dict (a checkpoint, a site's adapter, a
                  phase's global arrays after its last round), named by its content:
                  written once, however often the index names it

Every file is written under a temporary name and renamed into place, the index last,
so an interrupted write leaves the previous consistent state. Re-running a run-name
with the same run-config resumes after its last completed phase or round (the run takes
its state back through `load`); a different run-config is refused;
`resume = false` clears the state and starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from clues_fl.config import RunConfig
from clues_fl.outputs import output_dir
from clues_fl.federation.state import array_names, dump, load
from clues_fl.federation.run_dir import (  # noqa: F401 (fingerprint, config_differences: re-exported)
    IGNORED_KEYS,
    INDEX,
    STATE_VERSION,
    config_differences,
    fingerprint,
    results_config,
)

log = logging.getLogger(__name__)

VERSION = STATE_VERSION
ROUNDS = {"trace": "trace.rounds", "aggregate": "retrain.rounds"}
STEPS = ("trace", "score", "threshold", "select", "aggregate", "report")


class ResumeError(RuntimeError):
    pass


# -- files ------------------------------------------------------------------------------
def _replace(path: Path, write) -> None:
    """write(tmp) then rename over `path`: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())

    _replace(path, write)


def _save_tensors(directory: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write a tensor dict under its content's digest (once); its path relative to `directory`."""
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    path = Path("arrays") / f"{hashlib.sha256(data).hexdigest()}.safetensors"
    if not (directory / path).exists():
        _replace(directory / path, lambda tmp: tmp.write_bytes(data))
    return str(path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# -- the run's state ------------------------------------------------------------------------
class RunState:
    """The saved state of one run (outputs/<run-name>/state). Opening it checks that
    the run-config is the one the state was saved with (or clears it: resume=false)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.name = cfg.run.run_name
        self.out = output_dir(cfg)
        self.dir = self.out / "state"
        self.config = results_config(cfg)
        if not cfg.run.resume and self.dir.exists():
            log.info("run '%s': resume=false, starting over (clearing %s)", self.name, self.dir)
            shutil.rmtree(self.dir)
        self.index = self._read()
        self.run = None  # the ProtocolRun whose state is saved (restore)
        self._begun: dict[str, float] = {}

    def _read(self) -> dict:
        path = self.dir / INDEX
        if not path.exists():
            return {"version": VERSION, "run-name": self.name, "config": self.config,
                    "fingerprint": fingerprint(self.config), "completed": [], "rounds": {}, "state": None}
        index = json.loads(path.read_text())
        advice = (f"choose another run-name (this one's outputs stay), delete {self.dir} (or all of "
                  f"{self.out}), or set resume=false to start this run over")
        if index.get("version") != VERSION:
            raise ResumeError(f"run '{self.name}': the saved state in {self.dir} has format version "
                              f"{index.get('version')}, this version reads {VERSION}: {advice}")
        if index.get("fingerprint") != fingerprint(self.config):
            differences = config_differences(index.get("config", {}), self.config)
            if differences:
                raise ResumeError(
                    f"run '{self.name}' cannot resume: its saved state in {self.dir} comes from a different "
                    f"run-config ({'; '.join(differences)}): {advice}"
                )
            index["config"], index["fingerprint"] = self.config, fingerprint(self.config)
        return index

    # -- what is done ----------------------------------------------------------------------
    def done(self, step: str) -> bool:
        return step in self.index["completed"]

    @property
    def finished(self) -> bool:
        return self.done("report") and (self.out / "metrics.json").exists()

    def metrics(self) -> dict:
        return json.loads((self.out / "metrics.json").read_text())

    def redo(self, step: str) -> None:
        """Forget `step` and every step after it (and their rounds)."""
        later = set(STEPS[STEPS.index(step):])
        self.index["completed"] = [s for s in self.index["completed"] if s not in later]
        self.index["rounds"] = {p: r for p, r in self.index["rounds"].items() if p not in later}

    def position(self, steps: list[str]) -> str | None:
        """Where a resumed run starts: the first step not done (and its rounds done)."""
        if not self.index["completed"] and not self.index["rounds"]:
            return None
        for step in steps:
            if not self.done(step):
                rounds = self.index["rounds"].get(step)
                if rounds and rounds["done"] < self.cfg[ROUNDS[step]]:
                    return f"{step} round {rounds['done'] + 1} of {self.cfg[ROUNDS[step]]}"
                return step
        return "report"

    # -- loading ---------------------------------------------------------------------------
    def restore(self, run, phases: list[str]) -> str | None:
        """Give `run` (a server/phases.py ProtocolRun) the saved state of the completed
        `phases` and their rounds, and save its state from now on, after every round too
        (its on_round hook). Sets and returns where the run resumes (None: it starts)."""
        self.run = run
        run.on_round = self.save_round
        where = self.position([p for p in phases if p != "report"])
        if where is None:
            log.info("run '%s': starting; its state is saved in %s", self.name, self.dir)
            return None
        saved = self.index["state"]
        values = dict(saved["values"]) if saved else {"__class__": "ProtocolState"}
        # Only the rounds of steps not redone; federated sites are what scoring learnt:
        # nothing to keep when it is redone.
        values["rounds"] = {p: r for p, r in values.get("rounds", {}).items() if p in self.index["rounds"]}
        if not (self.done("score") or self.cfg.run.mode == "merging"):
            values["sites"] = {}
        files = saved["arrays"] if saved else {}
        arrays = {name: _load_tensors(self.dir / files[name]) for name in array_names(values)}
        run.state = run.sites.state = load(values, arrays)
        log.info("resuming run '%s' from step %s (done: %s; state in %s)", self.name, where,
                 ", ".join(self.index["completed"]) or "nothing", self.dir)
        run.resumed_from = where
        return where

    # -- saving ----------------------------------------------------------------------------
    def begin(self, step: str) -> float:
        """The step's start time, moved back by the time an interrupted run already
        spent on its saved rounds (so that the step's timing covers both)."""
        start = time.time() - self.index["rounds"].get(step, {}).get("seconds", 0.0)
        self._begun[step] = start
        return start

    def complete(self, step: str) -> None:
        if step not in self.index["completed"]:
            self.index["completed"].append(step)
        self._save()

    def save_round(self, phase: str, server_round: int) -> None:
        """After round `server_round` of `phase` (the protocol's state holds its arrays)."""
        begun = self._begun.get(phase, time.time())
        self.index["rounds"][phase] = {"done": server_round, "seconds": round(time.time() - begun, 2)}
        self._save()

    def _save(self) -> None:
        values, arrays = dump(self.run.state)
        self.index["state"] = {"values": values,
                               "arrays": {name: _save_tensors(self.dir, t) for name, t in arrays.items()}}
        _write_json(self.dir / INDEX, self.index)


def load_state(run_dir: Path):
    """The protocol state a run saved (outputs/<run-name>) and its run-config values."""
    folder = Path(run_dir) / "state"
    index = json.loads((folder / INDEX).read_text())
    if index.get("version") != VERSION or not index.get("state"):
        raise ResumeError(f"{folder}: no saved state of format version {VERSION}")
    saved = index["state"]
    arrays = {name: _load_tensors(folder / path) for name, path in saved["arrays"].items()}
    return load(saved["values"], arrays), index["config"]
