"""Per-family adapters: how each model family's own forward calls its decoder layers.

forward.py runs a decoder stack in two pieces (frozen prefix, LoRA suffix), so it has
to hand every layer exactly what the model's own forward hands it: the rotary
embedding of the layer's type (Gemma 3 uses a local and a global rope), the
attention mask of the layer's type (sliding window or full causal), embeddings
scaled the family's way. One small function per family builds the keyword arguments
of every layer; `register` files it under the `config.model_type` values it covers.
A model whose family is not registered (or whose config uses a feature its adapter
does not reproduce) runs through its own forward instead (forward.py), exact too
but without the prefix cache.

Each adapter mirrors the `*Model.forward` of transformers' `modeling_<family>.py`;
forward.py also checks the split against the model's own forward once per model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

LayerInputs = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], list[dict]]


@dataclass(frozen=True)
class Family:
    """`layer_inputs(stack, hidden, attention_mask)`: keyword arguments of each layer;
    `embed(stack, input_ids)`: the hidden states entering layer 0; `unsupported(config)`:
    why this config cannot be split (None when it can)."""

    name: str
    layer_inputs: LayerInputs
    embed: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    unsupported: Callable[[object], str | None]


FAMILIES: dict[str, Family] = {}


def _embed(stack, input_ids: torch.Tensor) -> torch.Tensor:
    return stack.embed_tokens(input_ids)


def _always_supported(config) -> str | None:
    return None


def register(*model_types: str, embed=_embed, unsupported=_always_supported):
    """Decorator: file a layer-inputs function under these `config.model_type`s."""

    def deco(fn: LayerInputs) -> LayerInputs:
        for model_type in model_types:
            FAMILIES[model_type] = Family(model_type, fn, embed, unsupported)
        return fn

    return deco


def family_of(config) -> Family | None:
    return FAMILIES.get(getattr(config, "model_type", None))


# -- shared pieces ------------------------------------------------------------------


def _mask(fn, stack, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
    """fn (create_causal_mask or the sliding-window one) called with no KV cache; the
    keyword names follow the installed transformers (`cache` was `past_key_values`)."""
    params = inspect.signature(fn).parameters
    kwargs = {"config": stack.config, "attention_mask": attention_mask, "position_ids": position_ids}
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = hidden
    for name in ("cache", "past_key_values"):
        if name in params:
            kwargs[name] = None
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
    return fn(**kwargs)


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def _per_type_masks(stack, hidden, attention_mask, position_ids) -> list:
    """One mask per layer from `config.layer_types` (full or sliding window)."""
    types = stack.config.layer_types[: len(stack.layers)]
    makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    masks = {t: _mask(makers[t], stack, hidden, attention_mask, position_ids) for t in set(types)}
    return [masks[t] for t in types]


def _same_for_every_layer(stack, **kwargs) -> list[dict]:
    return [dict(kwargs) for _ in stack.layers]


def _unknown_layer_types(config) -> str | None:
    types = set(getattr(config, "layer_types", None) or ())
    other = types - {"full_attention", "sliding_attention"}
    return f"layer types {sorted(other)}" if other else None


# -- families -----------------------------------------------------------------------


def _gemma_embed(stack, input_ids):
    """Gemma scales embeddings by sqrt(hidden): in its embedding module (transformers 5)
    or, in older versions, in the model's forward by a normaliser cast to the dtype."""
    hidden = stack.embed_tokens(input_ids)
    if not hasattr(stack.embed_tokens, "embed_scale"):
        hidden = hidden * torch.tensor(stack.config.hidden_size**0.5, dtype=hidden.dtype, device=hidden.device)
    return hidden


@register("gemma", embed=_gemma_embed)
@register("llama")
def one_rope_full_mask(stack, hidden, attention_mask):
    """Llama, Gemma (1): one causal mask and one rope for every layer."""
    position_ids = _positions(hidden)
    mask = _mask(create_causal_mask, stack, hidden, attention_mask, position_ids)
    rope = stack.rotary_emb(hidden, position_ids=position_ids)
    return _same_for_every_layer(stack, attention_mask=mask, position_embeddings=rope, position_ids=position_ids)


@register("mistral", "phi3")
def one_rope_window_mask(stack, hidden, attention_mask):
    """Mistral, Phi-3: one rope; a sliding-window mask on every layer when
    `config.sliding_window` is set, else the full causal mask."""
    position_ids = _positions(hidden)
    maker = create_causal_mask if stack.config.sliding_window is None else create_sliding_window_causal_mask
    mask = _mask(maker, stack, hidden, attention_mask, position_ids)
    rope = stack.rotary_emb(hidden, position_ids=position_ids)
    return _same_for_every_layer(stack, attention_mask=mask, position_embeddings=rope, position_ids=position_ids)


@register("gemma2", embed=_gemma_embed, unsupported=_unknown_layer_types)
@register("qwen2", "qwen3", unsupported=_unknown_layer_types)
def one_rope_typed_masks(stack, hidden, attention_mask):
    """Qwen2, Qwen3, Gemma 2: one rope; full or sliding mask per `config.layer_types`."""
    position_ids = _positions(hidden)
    masks = _per_type_masks(stack, hidden, attention_mask, position_ids)
    rope = stack.rotary_emb(hidden, position_ids)
    return [
        {"attention_mask": m, "position_embeddings": rope, "position_ids": position_ids} for m in masks
    ]


def _gemma3_unsupported(config) -> str | None:
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    return _unknown_layer_types(config)


@register("gemma3_text", embed=_gemma_embed, unsupported=_gemma3_unsupported)
def typed_ropes_typed_masks(stack, hidden, attention_mask):
    """Gemma 3: per layer type both the mask (sliding / full) and the rope (local base
    10k / global base 1M: `rotary_emb(x, position_ids, layer_type)`)."""
    position_ids = _positions(hidden)
    types = stack.config.layer_types[: len(stack.layers)]
    masks = _per_type_masks(stack, hidden, attention_mask, position_ids)
    ropes = {t: stack.rotary_emb(hidden, position_ids, t) for t in set(types)}
    return [
        {"attention_mask": m, "position_embeddings": ropes[t], "position_ids": position_ids}
        for m, t in zip(masks, types)
    ]
