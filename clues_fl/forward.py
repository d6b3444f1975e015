"""Forward passes split at the lowest LoRA layer, with answer-only logits.

Everything below the first LoRA layer is frozen, so the hidden states entering it
depend only on the base model and the sample. `prefix_hidden` computes them (once,
see prefix_cache.py); `suffix_hidden` runs the LoRA layers on top. The loss of a
sample is the mean cross-entropy over its own answer tokens (not the batch mean),
and the vocabulary projection runs only at positions that predict an answer token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_causal_mask

from .model import backbone, lm_head


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


def _mask_and_rope(stack, hidden: torch.Tensor, attention_mask: torch.Tensor):
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = create_causal_mask(
        config=stack.config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=position_ids,
    )
    rope = stack.rotary_emb(hidden, position_ids=position_ids)
    return mask, rope, position_ids


def _run_layers(model, hidden, attention_mask, start: int, stop: int) -> torch.Tensor:
    stack = backbone(model)
    mask, rope, position_ids = _mask_and_rope(stack, hidden, attention_mask)
    for layer in stack.layers[start:stop]:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=rope,
            position_ids=position_ids,
        )
    return hidden


@torch.no_grad()
def prefix_hidden(model, batch: Batch, first_lora_layer: int) -> torch.Tensor:
    """Hidden states entering `first_lora_layer` (frozen part, no graph)."""
    hidden = backbone(model).embed_tokens(batch.input_ids)
    return _run_layers(model, hidden, batch.attention_mask, 0, first_lora_layer)


def final_hidden(model, batch: Batch, first_lora_layer: int) -> torch.Tensor:
    """Normed last hidden states; starts from the cached prefix when the batch has one."""
    stack = backbone(model)
    if batch.hidden is None:
        hidden = prefix_hidden(model, batch, first_lora_layer)
    else:
        hidden = batch.hidden
    hidden = _run_layers(model, hidden, batch.attention_mask, first_lora_layer, len(stack.layers))
    return stack.norm(hidden)


def answer_losses(model, batch: Batch, hidden: torch.Tensor) -> torch.Tensor:
    """(B,) mean cross-entropy over each sample's own answer tokens."""
    b_idx, t_idx = batch.target_mask.nonzero(as_tuple=True)
    logits = lm_head(model)(hidden[b_idx, t_idx])  # only answer positions
    targets = batch.input_ids[b_idx, t_idx + 1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    token_loss = F.cross_entropy(logits, targets, reduction="none")
    counts = batch.target_mask.sum(dim=1).clamp(min=1).to(token_loss.dtype)
    sums = torch.zeros(batch.size, dtype=token_loss.dtype, device=token_loss.device).index_add(0, b_idx, token_loss)
    return sums / counts


def sample_losses(model, batch: Batch, first_lora_layer: int) -> torch.Tensor:
    return answer_losses(model, batch, final_hidden(model, batch, first_lora_layer))
