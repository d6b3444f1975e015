"""What travels between server and sites, as Flower records.

Only adapter tensors (and their Adam moments while tracing), anchor gradients,
per-sample scores with keyed hashes of their ids (site_ids.py), and aggregate counts
ever leave a site.
Adam moments ride in the same ArrayRecord as the adapter under `adam.m/` and
`adam.v/` prefixes, so the built-in FedAvg averages them with the adapter.
"""

from __future__ import annotations

import hashlib
import json

import torch
from flwr.app import ArrayRecord

from .engine import AdamMoments, Checkpoint

M_PREFIX, V_PREFIX = "adam.m/", "adam.v/"


def state_record(state: dict[str, torch.Tensor], moments: AdamMoments | None = None) -> ArrayRecord:
    tensors = {k: v.detach().float() for k, v in state.items()}
    if moments is not None:
        tensors.update({M_PREFIX + k: v.detach().float() for k, v in moments.m.items()})
        tensors.update({V_PREFIX + k: v.detach().float() for k, v in moments.v.items()})
    return ArrayRecord(torch_state_dict=tensors)


def split_record(record: ArrayRecord) -> tuple[dict[str, torch.Tensor], AdamMoments | None]:
    tensors = record.to_torch_state_dict()
    state = {k: v for k, v in tensors.items() if not k.startswith((M_PREFIX, V_PREFIX))}
    m = {k[len(M_PREFIX):]: v for k, v in tensors.items() if k.startswith(M_PREFIX)}
    # clamp: DP noise on the aggregate (privacy.adapter-noise) can push a second moment below 0
    v = {k[len(V_PREFIX):]: t.clamp(min=0) for k, t in tensors.items() if k.startswith(V_PREFIX)}
    return state, (AdamMoments(m, v) if m else None)


def checkpoint_record(ckpt: Checkpoint) -> ArrayRecord:
    return state_record(ckpt.state, ckpt.adam)


def record_checkpoint(record: ArrayRecord, lr: float) -> Checkpoint:
    state, moments = split_record(record)
    return Checkpoint(state, lr, moments)


def gradient_record(grads: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().float() for k, v in grads.items()})


def record_gradient(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def ids_digest(ids) -> str:
    """A short digest of a site's sample ids, in order: how a resumed run recognises a
    site whose node got a new id (the server already holds the ids from scoring)."""
    return hashlib.sha256(json.dumps([str(i) for i in ids]).encode()).hexdigest()[:32]
