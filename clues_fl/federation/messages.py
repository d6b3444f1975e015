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

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from clues_fl.scoring.alignment import AdamMoments, Checkpoint

M_PREFIX, V_PREFIX = "adam.m/", "adam.v/"
MOMENTS_KEY = "adam"  # the record of a round's Adam moments, next to "arrays"


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


def moments_record(moments: AdamMoments) -> ArrayRecord:
    """Adam moments as their own record (no adapter tensors)."""
    tensors = {M_PREFIX + k: v.detach().float() for k, v in moments.m.items()}
    tensors.update({V_PREFIX + k: v.detach().float() for k, v in moments.v.items()})
    return ArrayRecord(torch_state_dict=tensors)


def record_moments(record: ArrayRecord | None) -> AdamMoments | None:
    if record is None:
        return None
    return split_record(record)[1]


def average_moments(records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
    """The weighted mean of the sites' moment records, computed as Flower's FedAvg
    averages arrays (float32 numpy, weights normalised to sum 1, sites in reply order),
    so that the numbers equal those of the moments riding in the adapter's record."""
    total = float(sum(weights))
    if not records or total <= 0:
        raise ValueError(f"average_moments: {len(records)} records with total weight {total}")
    out: dict = {}
    for record, weight in zip(records, weights, strict=True):
        factor = weight / total
        for key, value in record.items():
            if key not in out:
                out[key] = value.numpy() * factor
            else:
                out[key] += value.numpy() * factor
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in out.items()})


def split_moments(record: ArrayRecord) -> tuple[ArrayRecord, ArrayRecord | None]:
    """A joined record as (the adapter's record, the moments' record or None)."""
    moment_keys = [k for k in record.keys() if k.startswith((M_PREFIX, V_PREFIX))]
    if not moment_keys:
        return record, None
    return (ArrayRecord({k: record[k] for k in record.keys() if k not in moment_keys}),
            ArrayRecord({k: record[k] for k in moment_keys}))


def join_records(arrays: ArrayRecord, moments: ArrayRecord | None) -> ArrayRecord:
    """The adapter and its moments in one record (checkpoints, saved rounds)."""
    if moments is None:
        return arrays
    joined = {k: arrays[k] for k in arrays.keys()}
    joined.update({k: moments[k] for k in moments.keys()})
    return ArrayRecord({k: Array(v.numpy()) for k, v in joined.items()})


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
