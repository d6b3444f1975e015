"""The protocol's state as data: JSON values plus named tensor dicts.

`to_state()` of the protocol (strategies/clues.py: `Clues`, `SiteReport`) returns
``(values, arrays)``: ``values`` a JSON-able dict, ``arrays`` a flat dict of named
tensor dicts (``{"checkpoint-0": {...}, "site-1/final": {...}}``); `from_state(values,
arrays)` takes the same pair back. resume.py writes the pair to disk and reads it back;
the evaluation suite hands a trace to the next method through it (experiments/suite.py).

`encode`/`decode` keep numpy arrays, numpy scalars and tuples what they were through
JSON (tagged), so a value survives ``decode(json.loads(json.dumps(encode(value))))``.
"""

from __future__ import annotations

import numpy as np
import torch

from clues_fl.scoring.alignment import AdamMoments, Checkpoint

Arrays = dict[str, dict[str, torch.Tensor]]


def encode(value):
    """JSON for a state value: numpy arrays and tuples are tagged to come back as what they were."""
    if isinstance(value, np.ndarray):
        return {"__array__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v) for v in value]}
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def decode(value):
    if isinstance(value, dict):
        if "__array__" in value:
            return np.asarray(value["__array__"], dtype=value["dtype"])
        if "__tuple__" in value:
            return tuple(decode(v) for v in value["__tuple__"])
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def checkpoint_arrays(name: str, ckpt: Checkpoint) -> Arrays:
    """A checkpoint as named tensor dicts: `name` (the adapter) and, with Adam moments,
    `name`/adam-m and `name`/adam-v. Its learning rate is a value: keep it beside."""
    out = {name: dict(ckpt.state)}
    if ckpt.adam is not None:
        out[f"{name}/adam-m"], out[f"{name}/adam-v"] = dict(ckpt.adam.m), dict(ckpt.adam.v)
    return out


def arrays_checkpoint(arrays: Arrays, name: str, lr: float) -> Checkpoint:
    """The checkpoint `checkpoint_arrays(name, ...)` gave."""
    adam = None
    if f"{name}/adam-m" in arrays:
        adam = AdamMoments(dict(arrays[f"{name}/adam-m"]), dict(arrays[f"{name}/adam-v"]))
    return Checkpoint(dict(arrays[name]), lr, adam)


def prefixed(prefix: str, arrays: Arrays) -> Arrays:
    return {f"{prefix}/{k}": v for k, v in arrays.items()}


def unprefixed(prefix: str, arrays: Arrays) -> Arrays:
    start = f"{prefix}/"
    return {k[len(start):]: v for k, v in arrays.items() if k.startswith(start)}
