"""State dataclasses as data: JSON values plus named tensor dicts.

`dump(obj)` turns a state dataclass (server/state.py's `ProtocolState`, with its
`SiteRecord`s, `Checkpoint`s and `FinalAdapter`) into ``(values, arrays)``: ``values``
JSON-able, ``arrays`` a flat dict of named tensor dicts, each named by where it sits in
the state (``"checkpoints/0/state"``, ``"sites/3/final_state"``). `load(values, arrays)`
gives the object back. Every field of a registered dataclass is saved, except those made
with `transient()`; so adding a field to the state is one edit, its declaration.
resume.py writes the pair to disk and reads it back; the evaluation suite hands a trace
to the next method through it (experiments/suite.py).

Numpy arrays, numpy scalars, tuples and dicts with non-string keys are tagged, so a
value survives ``load(json.loads(json.dumps(values)), arrays)``. Only the classes
registered with `state_class` are rebuilt: a saved file names classes, it does not run code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

Arrays = dict[str, dict[str, torch.Tensor]]

STATE_CLASSES: dict[str, type] = {}


def state_class(cls: type) -> type:
    """Register a dataclass whose instances `load` may rebuild (a class decorator)."""
    STATE_CLASSES[cls.__name__] = cls
    return cls


def transient(**kwargs) -> Any:
    """A dataclass field that `dump` leaves out (it comes back as its default)."""
    return dataclasses.field(metadata={"transient": True}, **kwargs)


def _is_tensor_dict(value) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def _join(path: str, key) -> str:
    return f"{path}/{key}" if path else str(key)


def dump(obj) -> tuple[Any, Arrays]:
    """(JSON-able values, named tensor dicts) of a state object (see the module docstring)."""
    arrays: Arrays = {}

    def encode(value, path: str):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            name = type(value).__name__
            if STATE_CLASSES.get(name) is not type(value):
                raise TypeError(f"{name} is not a registered state class (federation/state.py state_class)")
            return {"__class__": name, **{f.name: encode(getattr(value, f.name), _join(path, f.name))
                                          for f in dataclasses.fields(value) if not f.metadata.get("transient")}}
        if _is_tensor_dict(value):
            arrays[path] = {k: v.detach() for k, v in value.items()}
            return {"__tensors__": path}
        if isinstance(value, ArrayRecord):
            arrays[path] = value.to_torch_state_dict()
            return {"__record__": path}
        if isinstance(value, np.ndarray):
            return {"__array__": value.tolist(), "dtype": str(value.dtype)}
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v, _join(path, i)) for i, v in enumerate(value)]}
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: encode(v, _join(path, k)) for k, v in value.items()}
            return {"__items__": [[encode(k, ""), encode(v, _join(path, k))] for k, v in value.items()]}
        if isinstance(value, list):
            return [encode(v, _join(path, i)) for i, v in enumerate(value)]
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{path}: a lone tensor; state tensors travel in dicts of named tensors")
        return value

    return encode(obj, ""), arrays


def load(values, arrays: Mapping[str, dict[str, torch.Tensor]]):
    """The object `dump` gave (arrays may load lazily: only the named ones are read).
    A field the saved values lack gets its default; one the class no longer has is left out."""

    def decode(value):
        if isinstance(value, dict):
            if "__class__" in value:
                cls = STATE_CLASSES[value["__class__"]]
                known = {f.name for f in dataclasses.fields(cls) if f.init}
                return cls(**{k: decode(v) for k, v in value.items() if k in known})
            if "__tensors__" in value:
                return dict(arrays[value["__tensors__"]])
            if "__record__" in value:
                return ArrayRecord(torch_state_dict=arrays[value["__record__"]])
            if "__array__" in value:
                return np.asarray(value["__array__"], dtype=value["dtype"])
            if "__tuple__" in value:
                return tuple(decode(v) for v in value["__tuple__"])
            if "__items__" in value:
                return {decode(k): decode(v) for k, v in value["__items__"]}
            return {k: decode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    return decode(values)


def array_names(values) -> set[str]:
    """The names of the tensor dicts `values` refers to (what `load` will read)."""
    out: set[str] = set()

    def walk(value) -> None:
        if isinstance(value, dict):
            for tag in ("__tensors__", "__record__"):
                if tag in value:
                    out.add(value[tag])
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(values)
    return out
