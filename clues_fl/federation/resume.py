"""Resumption: the server's state after every step and FedAvg round, on disk.

outputs/<run-name>/state/
  run.json        the index: the run-config and its fingerprint, the completed steps,
                  the FedAvg rounds each phase has done, and the protocol's small state
                  (each site's ids, scores, counts and anchor scores; the anchor scores;
                  the threshold; missing sites; timings; round losses)
  trace/round-<r>.safetensors       federated: the global adapter and Adam moments
                                    after trace round r (checkpoint r)
  trace/site-<k>-ckpt-<i>.safetensors, trace/site-<k>-state.safetensors
                                    merging: a site's local checkpoints and traced adapter
  retrain/round-<r>.safetensors     federated: the global adapter after retrain round r
  retrain/site-<k>.safetensors      merging: a site's retrained adapter

Every file is written under a temporary name and renamed into place, the index last,
so an interrupted write leaves the previous consistent state. Re-running a run-name
with the same run-config resumes after its last completed step or round; a different
run-config is refused; `resume = false` clears the state and starts over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord
from safetensors.torch import load_file, save_file

from clues_fl.config import DEFAULTS, RunConfig
from clues_fl.federation.messages import checkpoint_record, record_checkpoint, split_record, state_record
from clues_fl.reporting.results import output_dir
from clues_fl.strategies.clues import SiteReport

log = logging.getLogger(__name__)

VERSION = 2  # 2: sample ids are keyed hashes (site_ids.py); a version-1 state holds raw ids
INDEX = "run.json"
# Keys that do not change what a run computes: a resumed run may differ in them.
IGNORED_KEYS = ("run-name", "output-dir", "resume", "fed.timeout", "fed.wait-for-nodes")
# The protocol state that is saved as JSON (tensors go to their own files).
CLUES_FIELDS = ("missing", "timings", "round_losses", "anchor", "threshold")
SITE_TENSORS = ("checkpoints", "trace_state", "final_state", "anchor_grads")  # anchor_grads: only used while scoring
ROUNDS = {"trace": "trace.rounds", "retrain": "retrain.rounds"}
STEPS = ("trace", "score", "threshold", "select", "retrain", "report")


class ResumeError(RuntimeError):
    pass


def fingerprint(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def _results_config(cfg: RunConfig) -> dict:
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


# -- values and tensors on disk -------------------------------------------------------
def _encode(value):
    """JSON for the protocol's state: numpy arrays and tuples are tagged to come back
    as what they were."""
    if isinstance(value, np.ndarray):
        return {"__array__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(value):
    if isinstance(value, dict):
        if "__array__" in value:
            return np.asarray(value["__array__"], dtype=value["dtype"])
        if "__tuple__" in value:
            return tuple(_decode(v) for v in value["__tuple__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


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


def _save_arrays(path: Path, record: ArrayRecord) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in record.to_torch_state_dict().items()}
    _replace(path, lambda tmp: save_file(tensors, str(tmp)))


def _load_arrays(path: Path) -> ArrayRecord:
    return ArrayRecord(torch_state_dict=load_file(str(path)))


# -- the run's state ------------------------------------------------------------------------
class RunState:
    """The saved state of one run (outputs/<run-name>/state). Opening it checks that
    the run-config is the one the state was saved with (or clears it: resume=false)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.name = cfg["run-name"]
        self.out = output_dir(cfg)
        self.dir = self.out / "state"
        self.config = _results_config(cfg)
        if not cfg["resume"] and self.dir.exists():
            log.info("run '%s': resume=false, starting over (clearing %s)", self.name, self.dir)
            shutil.rmtree(self.dir)
        self.index = self._read()
        self.clues = None
        self._site_files: dict[int, dict] = {}  # id(SiteReport) -> its saved tensor files
        self._site_objects: list = []  # keeps those SiteReports alive (their ids stay unique)
        self._begun: dict[str, float] = {}

    def _read(self) -> dict:
        path = self.dir / INDEX
        if not path.exists():
            return {"version": VERSION, "run-name": self.name, "config": self.config,
                    "fingerprint": fingerprint(self.config), "completed": [], "rounds": {}, "clues": None}
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
    def restore(self, clues, steps: list[str]) -> None:
        """Load the completed steps and rounds into `clues` and save its FedAvg rounds
        from now on (its on_round hook)."""
        self.clues = clues
        clues.on_round = self.save_round
        where = self.position(steps)
        if where is None:
            log.info("run '%s': starting; its state is saved in %s", self.name, self.dir)
            return
        saved = self.index["clues"] or {}
        for name in CLUES_FIELDS:
            if name in saved:
                setattr(clues, name, _decode(saved[name]))
        known = {f.name for f in dataclasses.fields(SiteReport)}
        # Federated sites are what scoring learnt: nothing to keep when it is redone.
        sites = saved.get("sites", []) if self.done("score") or self.cfg["mode"] == "merging" else []
        for entry in sites:
            site = SiteReport(**{k: _decode(v) for k, v in entry["fields"].items() if k in known})
            files = entry["files"]
            site.checkpoints = [record_checkpoint(_load_arrays(self.dir / p), lr)
                                for p, lr in zip(files.get("checkpoints", []), files.get("lrs", []))]
            if "trace_state" in files:
                site.trace_state, _ = split_record(_load_arrays(self.dir / files["trace_state"]))
            if "final_state" in files:
                site.final_state, _ = split_record(_load_arrays(self.dir / files["final_state"]))
            clues.sites[site.node_id] = site
            self._site_files[id(site)] = dict(files)
            self._site_objects.append(site)
        for phase, rounds in self.index["rounds"].items():
            last = _load_arrays(self.dir / self._round_file(phase, rounds["done"]))
            if phase == "trace":  # the checkpoints are the global adapters after each round
                clues.checkpoints = [record_checkpoint(_load_arrays(self.dir / self._round_file(phase, r)),
                                                       rounds["lr"]) for r in range(1, rounds["done"] + 1)]
            if not self.done(phase):
                clues.resumed_rounds[phase] = (rounds["done"], last, rounds["aggregated"])
            elif phase == "retrain":
                clues.global_state, _ = split_record(last)
        clues.resumed_from = where
        log.info("resuming run '%s' from step %s (done: %s; state in %s)", self.name, where,
                 ", ".join(self.index["completed"]) or "nothing", self.dir)

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

    def save_round(self, phase: str, server_round: int, arrays: ArrayRecord, aggregated: bool) -> None:
        """After FedAvg round `server_round` of `phase`: the global arrays, then the index."""
        _save_arrays(self.dir / self._round_file(phase, server_round), arrays)
        begun = self._begun.get(phase, time.time())
        self.index["rounds"][phase] = {"done": server_round, "aggregated": aggregated,
                                       "lr": self.cfg["train.lr"], "seconds": round(time.time() - begun, 2)}
        self._save()

    @staticmethod
    def _round_file(phase: str, server_round: int) -> str:
        return f"{phase}/round-{server_round}.safetensors"

    def _save(self) -> None:
        clues = self.clues
        state = {name: _encode(getattr(clues, name)) for name in CLUES_FIELDS}
        state["sites"] = [self._site_entry(node, site) for node, site in clues.sites.items()]
        self.index["clues"] = state
        _write_json(self.dir / INDEX, self.index)

    def _site_entry(self, node: int, site) -> dict:
        """A site's fields as JSON; its tensors are written once, the first time it has them."""
        if id(site) not in self._site_files:
            used = {f["slot"] for f in self._site_files.values()}
            slot = str(node)
            while slot in used:
                slot += "x"
            self._site_files[id(site)] = {"slot": slot}
            self._site_objects.append(site)
        files = self._site_files[id(site)]
        slot = files["slot"]
        if site.checkpoints and "checkpoints" not in files:
            files["checkpoints"] = [f"trace/site-{slot}-ckpt-{k}.safetensors" for k in range(len(site.checkpoints))]
            files["lrs"] = [c.lr for c in site.checkpoints]
            for path, ckpt in zip(files["checkpoints"], site.checkpoints):
                _save_arrays(self.dir / path, checkpoint_record(ckpt))
        for name, path in (("trace_state", f"trace/site-{slot}-state.safetensors"),
                           ("final_state", f"retrain/site-{slot}.safetensors")):
            if getattr(site, name) is not None and name not in files:
                _save_arrays(self.dir / path, state_record(getattr(site, name)))
                files[name] = path
        fields = {f.name: _encode(getattr(site, f.name)) for f in dataclasses.fields(site) if f.name not in SITE_TENSORS}
        return {"fields": fields, "files": files}
