"""Model resolution, LoRA placement and adapter state round-trips."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_lora_model

from clues_fl.model.loading import (
    ModelError,
    default_model_dir,
    first_lora_layer,
    load_base_model,
    load_lora_state,
    lora_state,
    parse_layers,
)


def test_parse_layers():
    assert parse_layers("22-29", 30) == tuple(range(22, 30))
    assert parse_layers("top8", 30) == tuple(range(22, 30))
    assert parse_layers("3,1,2", 30) == (1, 2, 3)
    assert parse_layers("all", 30) is None
    with pytest.raises(ModelError, match="lora.layers"):
        parse_layers("28-31", 30)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_base_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="model.quantization"):
        load_base_model("smollm2-135m", "3bit")


def test_lora_only_on_requested_layers_and_state_roundtrip():
    model = tiny_lora_model(layers=(2, 3))
    assert first_lora_layer(model) == 2
    state = lora_state(model)
    assert state and all(".layers.2." in k or ".layers.3." in k for k in state)
    assert all(p.requires_grad == (n in state) for n, p in model.named_parameters())
    changed = {k: v + 1 for k, v in state.items()}
    load_lora_state(model, changed)
    assert all(torch.equal(lora_state(model)[k], changed[k]) for k in state)
    with pytest.raises(ModelError, match="do not match"):
        load_lora_state(model, {"nope": torch.zeros(1)})


@pytest.mark.slow
def test_bundled_smollm2_is_cached_as_plain_safetensors():
    import json

    path = default_model_dir()
    assert (path / "config.json").exists() and list(path.glob("*.safetensors"))
    # the cached copy must not ask the next load to dequantise the GGUF again
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    model = load_base_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not any(p.requires_grad for p in model.parameters())
