"""Forward passes split at the lowest LoRA layer, with answer-only logits.

Everything below the first LoRA layer is frozen, so the hidden states entering it
depend only on the base model and the sample. `prefix_hidden` computes them (once,
see prefix_cache.py); `final_hidden` runs the LoRA layers on top. The loss of a
sample is the mean cross-entropy over its own answer tokens (not the batch mean),
and the vocabulary projection runs only at positions that predict an answer token.

Each decoder layer is called the way the model's own forward calls it; families.py
has one adapter per model family. A model without an adapter (or whose split does
not reproduce its own forward on a probe batch) runs through its own forward
instead: the same losses, no prefix cache (`splittable(model)` is False), and one
log line says so.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel

from clues_fl.model.families import Family, family_of
from clues_fl.model.loading import backbone, lm_head

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Right-padded token batch; `target_mask[b, t]` is True where position t predicts
    an answer token t+1 of sample b."""

    ids: list[str]
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    target_mask: torch.Tensor  # (B, T) bool
    rows: list[int]  # positions of these samples in the caller's list
    hidden: torch.Tensor | None = None  # (B, T, H) cached prefix hidden states

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def collate(encoded: list, rows: list[int], pad_id: int, device=None) -> Batch:
    """Pad the samples `encoded[r] for r in rows` into one Batch (on `device`, e.g. the
    model's `device.device_of(model)`; default the CPU)."""
    items = [encoded[r] for r in rows]
    width = max(len(e.input_ids) for e in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long, device="cpu")
    attention = torch.zeros((len(items), width), dtype=torch.long, device="cpu")
    target = torch.zeros((len(items), width), dtype=torch.bool, device="cpu")
    for b, e in enumerate(items):
        n = len(e.input_ids)
        input_ids[b, :n] = torch.tensor(e.input_ids, dtype=torch.long, device="cpu")
        attention[b, :n] = 1
        # position t predicts token t+1; answer tokens are prompt_len .. n-1
        target[b, max(e.prompt_len - 1, 0) : n - 1] = True
    return to_device(Batch([e.id for e in items], input_ids, attention, target, list(rows)), device)


def to_device(batch: Batch, device) -> Batch:
    """The one place a batch moves to the model's device (in place; returns it)."""
    if device is None or batch.input_ids.device == torch.device(device):
        return batch
    blocking = torch.device(device).type == "cpu"
    for name in ("input_ids", "attention_mask", "target_mask", "hidden"):
        value = getattr(batch, name)
        if value is not None:
            setattr(batch, name, value.to(device, non_blocking=not blocking))
    return batch


def length_buckets(encoded: list, batch_size: int) -> list[list[int]]:
    """Row groups of similar length (sorted, then chunked) to limit padding."""
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i].input_ids), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# -- which forward a model uses ----------------------------------------------------

_PLANS: "weakref.WeakKeyDictionary[torch.nn.Module, Family | None]" = weakref.WeakKeyDictionary()
_PROBE_LENGTHS = (24, 17)  # two samples of different lengths (the second padded)


def _base(model) -> torch.nn.Module:
    return model.base_model.model if isinstance(model, PeftModel) else model


def use_own_forward(model) -> None:
    """Run `model` through its own forward (no split, no prefix cache) from now on."""
    _PLANS[_base(model)] = None


def splittable(model) -> bool:
    """Whether the forward can start from cached prefix hidden states."""
    return _family(model) is not None


def _family(model) -> Family | None:
    base = _base(model)
    if base not in _PLANS:
        _PLANS[base] = _resolve(model, base)
    return _PLANS[base]


def _resolve(model, base) -> Family | None:
    config = base.config
    family = family_of(config)
    name = getattr(config, "model_type", type(base).__name__)
    reason = None
    if family is None:
        reason = f"no split-forward adapter for model type '{name}' (clues_fl/model/families.py)"
    elif (why := family.unsupported(config)) is not None:
        reason = f"the '{name}' adapter does not cover {why}"
    else:
        try:
            gap = _probe_gap(model, family)
        except Exception as err:  # an adapter written for another transformers version
            gap, reason = None, f"the '{name}' adapter failed on a probe batch ({type(err).__name__}: {err})"
        tol = 1e-4 if _dtype(base) in (torch.float32, torch.float64) else 5e-2
        if gap is not None and not gap <= tol:
            reason = f"the split '{name}' forward differs from the model's own by {gap:.2e} (> {tol:g})"
    if reason is None:
        return family
    log.warning("%s: using the model's own forward (exact, but no prefix cache)", reason)
    return None


def _dtype(base) -> torch.dtype:
    return base.get_input_embeddings().weight.dtype


@torch.no_grad()
def _probe_gap(model, family: Family) -> float:
    """Largest relative difference between the split forward's final hidden states and
    the ones the model's own forward feeds its lm_head, on a two-sample probe batch."""
    base = _base(model)
    device = base.get_input_embeddings().weight.device
    vocab = base.get_input_embeddings().weight.shape[0]
    width = max(_PROBE_LENGTHS)
    ids = (torch.arange(width * len(_PROBE_LENGTHS), device=device) * 7919 % vocab).reshape(len(_PROBE_LENGTHS), width)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(_PROBE_LENGTHS):
        mask[b, :n] = 1
    batch = Batch(["probe"] * len(_PROBE_LENGTHS), ids, mask, mask.bool(), list(range(len(_PROBE_LENGTHS))))
    training = model.training
    model.eval()
    try:
        split = _split_final_hidden(model, family, batch, 0)
        own = _own_final_hidden(model, batch)
    finally:
        model.train(training)
    keep = mask.bool()
    split, own = split[keep].double(), own[keep].double()
    return float((split - own).abs().max() / own.abs().max().clamp(min=1e-30))


# -- the split forward --------------------------------------------------------------


# Batches are right-padded, so causal attention alone keeps every real token from
# seeing padding, and no padding mask is passed (here or to the model's own forward):
# with one, a padded row of a sliding-window layer has nothing left to attend to,
# which can give NaN (measured: float64 weights, eager attention) that the next layer
# spreads into real rows as 0 x NaN. Padded rows' outputs are never used.
_NO_PADDING_MASK = None


def _run_layers(model, family: Family, hidden, start: int, stop: int) -> torch.Tensor:
    stack = backbone(model)
    inputs = family.layer_inputs(stack, hidden, _NO_PADDING_MASK)
    for layer, kwargs in zip(stack.layers[start:stop], inputs[start:stop]):
        out = layer(hidden, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _prefix(model, family: Family, batch: Batch, first_lora_layer: int) -> torch.Tensor:
    hidden = family.embed(backbone(model), batch.input_ids)
    return _run_layers(model, family, hidden, 0, first_lora_layer)


def _split_final_hidden(model, family: Family, batch: Batch, first_lora_layer: int) -> torch.Tensor:
    stack = backbone(model)
    if batch.hidden is None:
        with torch.no_grad():
            hidden = _prefix(model, family, batch, first_lora_layer)
    else:
        hidden = batch.hidden
    hidden = _run_layers(model, family, hidden, first_lora_layer, len(stack.layers))
    return stack.norm(hidden)


@torch.no_grad()
def prefix_hidden(model, batch: Batch, first_lora_layer: int) -> torch.Tensor:
    """Hidden states entering `first_lora_layer` (frozen part, no graph)."""
    family = _family(model)
    if family is None:
        raise ValueError("this model runs through its own forward: it has no prefix hidden states to cache")
    return _prefix(model, family, batch, first_lora_layer)


def final_hidden(model, batch: Batch, first_lora_layer: int) -> torch.Tensor:
    """Normed last hidden states (what the lm_head sees); starts from the cached prefix
    when the batch has one."""
    family = _family(model)
    if family is None:
        return _own_final_hidden(model, batch)
    return _split_final_hidden(model, family, batch, first_lora_layer)


# -- the model's own forward --------------------------------------------------------


class _HeadInput(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def _own_final_hidden(model, batch: Batch) -> torch.Tensor:
    """The model's own forward up to its lm_head, whose input a hook takes (and stops
    the forward there, so no logits are computed)."""

    def stop(module, args):
        raise _HeadInput(args[0])

    handle = lm_head(model).register_forward_pre_hook(stop)
    try:
        model(input_ids=batch.input_ids, attention_mask=_NO_PADDING_MASK, use_cache=False)
    except _HeadInput as got:
        return got.hidden
    finally:
        handle.remove()
    raise RuntimeError("the model's forward never reached its lm_head")


def _own_losses(model, batch: Batch) -> torch.Tensor:
    """(B,) answer losses from the model's own logits (every output transform included),
    computed only at the positions where some sample of the batch predicts an answer."""
    b_idx, t_idx = batch.target_mask.nonzero(as_tuple=True)
    keep = batch.target_mask.any(0).nonzero().flatten()
    column = torch.full((batch.input_ids.shape[1],), -1, dtype=torch.long, device=keep.device)
    column[keep] = torch.arange(len(keep), device=keep.device)
    sliced = "logits_to_keep" in inspect.signature(_base(model).forward).parameters
    logits = model(
        input_ids=batch.input_ids, attention_mask=_NO_PADDING_MASK, use_cache=False,
        **({"logits_to_keep": keep} if sliced else {}),
    ).logits
    if not sliced:
        logits = logits[:, keep]
    return _mean_per_sample(batch, logits[b_idx, column[t_idx]], b_idx, t_idx)


# -- losses -------------------------------------------------------------------------


def _mean_per_sample(batch: Batch, logits, b_idx, t_idx) -> torch.Tensor:
    targets = batch.input_ids[b_idx, t_idx + 1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    token_loss = F.cross_entropy(logits, targets, reduction="none")
    counts = batch.target_mask.sum(dim=1).clamp(min=1).to(token_loss.dtype)
    sums = torch.zeros(batch.size, dtype=token_loss.dtype, device=token_loss.device).index_add(
        0, b_idx, token_loss
    )
    return sums / counts


def answer_losses(model, batch: Batch, hidden: torch.Tensor) -> torch.Tensor:
    """(B,) mean cross-entropy over each sample's own answer tokens, from the final
    hidden states; lm_head (and Gemma's final logit soft-capping) only at answer
    positions."""
    b_idx, t_idx = batch.target_mask.nonzero(as_tuple=True)
    logits = lm_head(model)(hidden[b_idx, t_idx])
    cap = getattr(_base(model).config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return _mean_per_sample(batch, logits, b_idx, t_idx)


def sample_losses(model, batch: Batch, first_lora_layer: int) -> torch.Tensor:
    if _family(model) is None:
        return _own_losses(model, batch)
    return answer_losses(model, batch, final_hidden(model, batch, first_lora_layer))
