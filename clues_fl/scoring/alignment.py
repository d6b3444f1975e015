"""Batched, exact per-sample gradient inner products for LoRA layers.

For a linear layer y = W x applied to the tokens t of one sample, the weight gradient
is sum_t g_t x_t^T (g_t: gradient at the layer output). lora_A and lora_B are plain
linear layers, so one batched forward+backward with hooks that keep x_t and g_t gives
every sample's

* dot product with a reference gradient R:  sum_t g_t^T R x_t
  (no per-sample gradient is formed: (x R^T) . g per token);
* squared gradient norm, exact, from the per-sample gradient einsum('bto,bti->boi'),
  formed one layer at a time for one batch only (LoRA layers are small);
* Adam-preconditioned dot product with R (LESS): Gamma = m' / sqrt(v' + eps),
  m' = b1 m + (1-b1) G, v' = b2 v + (1-b2) G^2, which needs that per-sample G.

Samples in a batch never interact (per-sample losses are summed and each is the
mean over its own answer tokens), so g_t of sample b is d loss_b / d y_t exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from clues_fl.federation.console import progress as tqdm

from clues_fl.model.device import device_of, free_memory, to_device, to_host
from clues_fl.model.forward import Batch, collate, length_buckets, sample_losses
from clues_fl.model.loading import load_lora_state

if TYPE_CHECKING:
    from clues_fl.config import ScoringSection


@dataclass
class AdamMoments:
    m: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass
class Checkpoint:
    """One point of the training trajectory: adapter, its learning rate, Adam moments."""

    state: dict[str, torch.Tensor]
    lr: float
    adam: AdamMoments | None = None


def lora_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """(weight parameter name, module) of every trainable lora_A / lora_B linear."""
    out = []
    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.Linear)
            and (".lora_A." in name or ".lora_B." in name)
            and module.weight.requires_grad
        ):
            out.append((f"{name}.weight", module))
    return out


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class TokenCapture:
    """Keeps each LoRA linear's input x (B,T,in) and output gradient g (B,T,out)."""

    def __init__(self, model):
        self.linears = lora_linears(model)
        self.inputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        for name, module in self.linears:
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward_hook(self, name):
        def hook(module, inputs, output):
            self.inputs[name] = inputs[0].detach()

            def keep_grad(grad):
                self.grads[name] = grad.detach()

            if output.requires_grad:
                output.register_hook(keep_grad)

        return hook


def _backward(model, batch: Batch, first_layer: int) -> torch.Tensor:
    losses = sample_losses(model, batch, first_layer)
    if not torch.isfinite(losses).all():
        bad = [batch.ids[i] for i in (~torch.isfinite(losses)).nonzero().flatten().tolist()]
        raise FloatingPointError(f"non-finite loss for samples {bad[:5]}")
    params = list(lora_parameters(model).values())
    torch.autograd.grad(losses.sum(), params)  # fires the output-gradient hooks
    return losses.detach()


def precondition(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, adam: AdamMoments):
    """LESS's Adam direction for a gradient g given the checkpoint's moments."""
    m_new = adam.beta1 * m + (1 - adam.beta1) * g
    v_new = adam.beta2 * v + (1 - adam.beta2) * g * g
    return m_new / torch.sqrt(v_new + adam.eps)


@dataclass
class BatchScores:
    loss: torch.Tensor
    dot: torch.Tensor
    sq_norm: torch.Tensor | None = None
    adam_dot: torch.Tensor | None = None
    adam_sq_norm: torch.Tensor | None = None


def score_batch(
    model,
    batch: Batch,
    reference: dict[str, torch.Tensor],
    first_layer: int,
    *,
    norms: bool = False,
    adam: AdamMoments | None = None,
) -> BatchScores:
    """Per-sample <grad, reference> (and norms / Adam terms) from one backward."""
    with TokenCapture(model) as cap:
        loss = _backward(model, batch, first_layer)
    mask = batch.attention_mask.unsqueeze(-1)
    size = batch.size
    dtype = loss.dtype  # float32 or float64: the losses of a bf16 model are float32
    dot = torch.zeros(size, dtype=dtype, device=loss.device)
    sq = torch.zeros(size, dtype=dtype, device=loss.device) if norms else None
    adot = torch.zeros(size, dtype=dtype, device=loss.device) if adam else None
    asq = torch.zeros(size, dtype=dtype, device=loss.device) if adam else None
    for name, _ in cap.linears:
        x, g = cap.inputs[name], cap.grads[name] * mask
        ref = reference[name].to(device=x.device, dtype=x.dtype)
        dot += torch.einsum("bto,bto->b", g, x @ ref.T).to(dtype)
        if norms or adam:
            per_sample = torch.einsum("bto,bti->boi", g, x)
            if norms:
                sq += per_sample.pow(2).sum((1, 2)).to(dtype)
            if adam:
                gamma = precondition(per_sample, adam.m[name], adam.v[name], adam)
                adot += (gamma * ref).sum((1, 2)).to(dtype)
                asq += gamma.pow(2).sum((1, 2)).to(dtype)
    return BatchScores(loss, dot, sq, adot, asq)


def per_sample_gradients(model, batch: Batch, first_layer: int) -> dict[str, torch.Tensor]:
    """{param name: (B, out, in)} per-sample gradients of the LoRA weights."""
    with TokenCapture(model) as cap:
        _backward(model, batch, first_layer)
    mask = batch.attention_mask.unsqueeze(-1)
    return {
        name: torch.einsum("bto,bti->boi", cap.grads[name] * mask, cap.inputs[name])
        for name, _ in cap.linears
    }


def iterate_batches(encoded, batch_size: int, pad_id: int, cache=None, device=None):
    """Length-bucketed batches on `device` (the model's: `device_of(model)`), with the
    cached prefix hidden states attached when `cache` is given."""
    for rows in length_buckets(encoded, batch_size):
        batch = collate(encoded, rows, pad_id, device)
        yield cache.attach(batch) if cache is not None else batch


def mean_gradient(model, encoded, first_layer, *, pad_id, batch_size=8, cache=None):
    """Gradient of the mean per-sample loss (each sample normalised by its answer length)."""
    params = lora_parameters(model)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for batch in iterate_batches(encoded, batch_size, pad_id, cache, device_of(model)):
        losses = sample_losses(model, batch, first_layer)
        grads = torch.autograd.grad(losses.sum(), list(params.values()))
        for name, grad in zip(params, grads):
            total[name] += grad
    return {n: t / len(encoded) for n, t in total.items()}


SIMILARITIES = ("dot", "cosine")
PRECONDITIONERS = ("sgd", "adam")


@dataclass
class ScoreSettings:
    similarity: str = "cosine"
    preconditioner: str = "sgd"
    batch_size: int = 8

    def __post_init__(self):
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"scoring.similarity: '{self.similarity}' not in {SIMILARITIES}")
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(
                f"scoring.preconditioner: '{self.preconditioner}' not in {PRECONDITIONERS}"
            )

    @classmethod
    def from_section(cls, scoring: ScoringSection) -> ScoreSettings:
        """The run-config's `scoring` section as scoring settings."""
        return cls(similarity=scoring.similarity, preconditioner=scoring.preconditioner,
                   batch_size=scoring.batch_size)


@dataclass
class ScoreResult:
    ids: list[str]
    scores: np.ndarray  # (N,) sum_k eta_k * similarity_k
    per_checkpoint: np.ndarray  # (K, N) similarity_k before eta weighting
    losses: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (K, N)


def _adam_on(adam: AdamMoments, device) -> AdamMoments:
    return AdamMoments(to_device(adam.m, device), to_device(adam.v, device), adam.beta1, adam.beta2, adam.eps)


def _flat_norm(grads: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))


def score_samples(
    model,
    encoded: list,
    checkpoints: list[Checkpoint],
    anchor_gradients: list[dict[str, torch.Tensor]],
    first_layer: int,
    settings: ScoreSettings,
    *,
    pad_id: int,
    cache=None,
    desc: str = "scoring",
) -> ScoreResult:
    """CLUES score of every sample: sum_k eta_k * sim(P_k(g_k(z)), G_k)."""
    if len(checkpoints) != len(anchor_gradients):
        raise ValueError("one anchor gradient per checkpoint is needed")
    n, k_total = len(encoded), len(checkpoints)
    per_ckpt = np.zeros((k_total, n))
    losses = np.zeros((k_total, n))
    use_adam = settings.preconditioner == "adam"
    cosine = settings.similarity == "cosine"
    steps = k_total * ((n + settings.batch_size - 1) // settings.batch_size)
    device = device_of(model)
    with tqdm(total=steps, desc=desc, leave=False, disable=steps < 4) as bar:
        for k, (ckpt, ref) in enumerate(zip(checkpoints, anchor_gradients)):
            load_lora_state(model, ckpt.state)
            if use_adam and ckpt.adam is None:
                raise ValueError("scoring.preconditioner='adam' needs Adam moments in the checkpoints")
            ref_norm = _flat_norm(ref)
            ref = to_device(ref, device)
            adam = _adam_on(ckpt.adam, device) if use_adam else None
            for batch in iterate_batches(encoded, settings.batch_size, pad_id, cache, device):
                out = score_batch(model, batch, ref, first_layer, norms=cosine and not use_adam, adam=adam)
                dot = out.adam_dot if use_adam else out.dot
                if cosine:
                    sq = out.adam_sq_norm if use_adam else out.sq_norm
                    dot = dot / (torch.sqrt(sq) * ref_norm).clamp(min=1e-30)
                per_ckpt[k, batch.rows] = to_host(dot)
                losses[k, batch.rows] = to_host(out.loss)
                bar.update(1)
    free_memory()
    lrs = np.array([c.lr for c in checkpoints])[:, None]
    return ScoreResult([e.id for e in encoded], (lrs * per_ckpt).sum(0), per_ckpt, losses)


@dataclass
class AnchorScores:
    scores: np.ndarray  # (n,) leave-one-out CLUES scores of the anchor samples
    gradients: list[dict[str, torch.Tensor]]  # mean anchor gradient per checkpoint


def _flatten(grads: dict[str, torch.Tensor], names: list[str], rows: int) -> torch.Tensor:
    return torch.cat([grads[n].reshape(rows, -1) for n in names], dim=1).double()


def anchor_scores(
    model,
    anchors: list,
    checkpoints: list[Checkpoint],
    first_layer: int,
    settings: ScoreSettings,
    *,
    pad_id: int,
    cache=None,
) -> AnchorScores:
    """Mean anchor gradients, and each anchor's score against the mean of the OTHERS.

    Including a sample in its own reference inflates its score, so anchor a is
    compared with G_-a = (n G - g_a) / (n - 1), exactly as a client sample is
    compared with G.
    """
    n = len(anchors)
    if n < 2:
        raise ValueError(f"the anchor set needs at least 2 samples, got {n}")
    total = np.zeros(n)
    gradients = []
    device = device_of(model)
    for ckpt in checkpoints:
        load_lora_state(model, ckpt.state)
        names = [name for name, _ in lora_linears(model)]
        rows_grads: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        for batch in iterate_batches(anchors, settings.batch_size, pad_id, cache, device):
            grads = per_sample_gradients(model, batch, first_layer)
            flat = _flatten(grads, names, batch.size)
            for b, r in enumerate(batch.rows):
                rows_grads[r] = flat[b]
        per_sample = torch.stack(rows_grads)  # (n, P)
        mean = per_sample.mean(0)
        loo = (n * mean[None, :] - per_sample) / (n - 1)
        if settings.preconditioner == "adam":
            if ckpt.adam is None:
                raise ValueError("scoring.preconditioner='adam' needs Adam moments in the checkpoints")
            m = torch.cat([ckpt.adam.m[nm].reshape(-1) for nm in names]).to(device, torch.float64)
            v = torch.cat([ckpt.adam.v[nm].reshape(-1) for nm in names]).to(device, torch.float64)
            direction = precondition(per_sample, m[None], v[None], ckpt.adam)
        else:
            direction = per_sample
        dots = (direction * loo).sum(1)
        if settings.similarity == "cosine":
            dots = dots / (direction.norm(dim=1) * loo.norm(dim=1)).clamp(min=1e-30)
        total += ckpt.lr * to_host(dots)
        shapes = {nm: ckpt.state[nm].shape for nm in names}
        offset, mean_grad = 0, {}
        for nm in names:  # on the host, in the adapter's dtype: it travels to the sites
            size = int(np.prod(shapes[nm]))
            mean_grad[nm] = mean[offset : offset + size].reshape(shapes[nm]).to("cpu", ckpt.state[nm].dtype)
            offset += size
        gradients.append(mean_grad)
    free_memory()
    return AnchorScores(total, gradients)
