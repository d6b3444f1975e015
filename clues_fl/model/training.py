"""LoRA fine-tuning on the response-only loss, through the same split forward as scoring.

Each sample's loss is the mean over its own answer tokens and a batch's loss is the
mean of those, so long answers do not dominate. The frozen prefix comes from the
activation cache when one is given. Checkpoints keep the adapter, the learning rate
and Adam's moments, which is what CLUES and LESS scoring need.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from clues_fl.federation.console import progress as tqdm

from clues_fl.model.device import device_of, free_memory
from clues_fl.scoring.alignment import AdamMoments, Checkpoint, lora_parameters
from clues_fl.model.forward import collate, length_buckets, sample_losses
from clues_fl.model.loading import lora_state

if TYPE_CHECKING:
    from clues_fl.config import TrainSection


@dataclass
class TrainSettings:
    lr: float = 2e-4
    epochs: float = 1.0
    batch_size: int = 8
    seed: int = 0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0

    @classmethod
    def from_section(cls, train: TrainSection, *, seed: int = 0, epochs: float | None = None) -> TrainSettings:
        """The run-config's `train` section as training settings; `epochs`, when given,
        replaces `train.local-epochs` (a phase that sets its own budget)."""
        return cls(lr=train.lr, epochs=train.local_epochs if epochs is None else epochs,
                   batch_size=train.batch_size, seed=seed)


@dataclass
class TrainResult:
    step_losses: list[float]
    checkpoints: list[Checkpoint] = field(default_factory=list)
    moments: AdamMoments | None = None
    num_examples: int = 0

    @property
    def mean_loss(self) -> float:
        return float(np.mean(self.step_losses)) if self.step_losses else float("nan")


def _schedule(encoded, settings: TrainSettings) -> list[list[int]]:
    """Length-bucketed batches, in a seeded random order, for the requested epochs."""
    rng = random.Random(settings.seed)
    buckets = length_buckets(encoded, settings.batch_size)
    full, frac = int(settings.epochs), settings.epochs - int(settings.epochs)
    steps: list[list[int]] = []
    for _ in range(full + (1 if frac > 0 else 0)):
        order = buckets[:]
        rng.shuffle(order)
        steps.extend(order)
    total = max(1, math.ceil(len(buckets) * settings.epochs))
    return steps[:total]


def _optimizer(params, settings: TrainSettings, moments: AdamMoments | None, step: int):
    opt = torch.optim.Adam(
        list(params.values()), lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.eps
    )
    if moments is not None:
        # Continue from the (federated average of the) moments of the previous round.
        for name, p in params.items():
            opt.state[p] = {
                "step": torch.tensor(float(step)),  # on the host, as torch.optim.Adam keeps it
                "exp_avg": moments.m[name].to(device=p.device, dtype=p.dtype, copy=True),
                "exp_avg_sq": moments.v[name].to(device=p.device, dtype=p.dtype, copy=True),
            }
    return opt


def _moments(opt, params, settings: TrainSettings) -> AdamMoments:
    m, v = {}, {}
    for name, p in params.items():
        state = opt.state.get(p, {})
        m[name] = state.get("exp_avg", torch.zeros_like(p)).detach().clone()
        v[name] = state.get("exp_avg_sq", torch.zeros_like(p)).detach().clone()
    return AdamMoments(m, v, settings.beta1, settings.beta2, settings.eps)


def train_lora(
    model,
    encoded: list,
    settings: TrainSettings,
    first_layer: int,
    *,
    pad_id: int,
    cache=None,
    moments: AdamMoments | None = None,
    start_step: int = 0,
    num_checkpoints: int = 0,
    desc: str = "training",
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train the model's LoRA adapter in place; optionally keep `num_checkpoints`
    evenly spaced checkpoints (the last one at the end of training).

    `proximal_mu` > 0 (FedProx, sent by the server as "proximal-mu"): each step's loss
    gets ``mu / 2 * ||w - w_global||^2`` over the LoRA parameters, ``w_global`` the
    adapter training started from. The step losses reported are the task loss alone;
    0 leaves training exactly as without the term."""
    if not encoded:
        raise ValueError("no samples to train on")
    torch.manual_seed(settings.seed)
    model.train()
    params = lora_parameters(model)
    opt = _optimizer(params, settings, moments, start_step)
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
    start = {name: p.detach().clone() for name, p in params.items()} if proximal_mu > 0 else None
    schedule = _schedule(encoded, settings)
    marks = (
        {round((i + 1) * len(schedule) / num_checkpoints) for i in range(num_checkpoints)}
        if num_checkpoints
        else set()
    )
    result = TrainResult([], num_examples=len(encoded))
    device = device_of(model)
    for step, rows in enumerate(tqdm(schedule, desc=desc, leave=False, disable=len(schedule) < 4), 1):
        batch = collate(encoded, rows, pad_id, device)
        if cache is not None:
            cache.attach(batch)
        losses = sample_losses(model, batch, first_layer)
        loss = losses.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {step} (samples {batch.ids[:5]})")
        opt.zero_grad(set_to_none=True)
        if start is not None:
            proximal = sum(((p - start[name]) ** 2).sum() for name, p in params.items())
            (loss + proximal_mu / 2 * proximal).backward()
        else:
            loss.backward()
        if settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(params.values()), settings.max_grad_norm)
        opt.step()
        result.step_losses.append(loss.item())
        if step in marks:
            result.checkpoints.append(
                Checkpoint(lora_state(model), settings.lr, _moments(opt, params, settings))
            )
    model.eval()
    result.moments = _moments(opt, params, settings)
    del opt
    free_memory()
    return result


@torch.no_grad()
def mean_loss(model, encoded: list, first_layer: int, *, pad_id: int, batch_size: int = 8, cache=None) -> float:
    """Mean per-sample answer loss (clean validation loss)."""
    from clues_fl.scoring.alignment import iterate_batches

    model.eval()
    total = 0.0
    for batch in iterate_batches(encoded, batch_size, pad_id, cache, device_of(model)):
        total += float(sample_losses(model, batch, first_layer).sum())
    return total / max(len(encoded), 1)
