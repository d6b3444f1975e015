"""Model resolution, LoRA placement and adapter state round-trips."""

from __future__ import annotations

from pathlib import Path

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


def test_a_final_adapter_must_be_a_whole_adapter():
    """An empty or partial state used to load nothing and leave the adapter loaded last
    (a trace checkpoint) in place, which was then saved as the run's result."""
    from clues_fl.aggregation.merging import FinalAdapter

    model = tiny_lora_model(layers=(2, 3))
    state = lora_state(model)
    with pytest.raises(ModelError, match="not a whole adapter"):
        load_lora_state(model, {}, complete=True)
    with pytest.raises(ModelError, match="not a whole adapter"):
        with FinalAdapter(state=dict(list(state.items())[:1])).active(model, state):
            pass
    with FinalAdapter(state={k: v + 1 for k, v in state.items()}).active(model, state) as active:
        assert all(torch.equal(lora_state(active)[k], state[k] + 1) for k in state)


def test_every_target_module_must_exist():
    """peft goes on when one of several targets matches: a misspelt one trained nothing."""
    from conftest import tiny_llama

    from clues_fl.model.loading import LoraSettings, add_lora

    with pytest.raises(ModelError, match=r"none of \['nonexistent_proj'\] is a linear layer"):
        add_lora(tiny_llama(0), LoraSettings(target_modules=("q_proj", "nonexistent_proj"), layers=(2, 3)))


def test_the_gguf_conversion_bar_is_lines_off_a_terminal(tmp_path, monkeypatch, capsys):
    """transformers' GGUF tensor bar ended up in non-terminal logs as carriage-return
    fragments; off a terminal it is now the console's progress lines."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from clues_fl.model import loading

    class Converted:
        hf_quantizer, config = None, type("Config", (), {})()

        def save_pretrained(self, folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "config.json").write_text("{}")

    def from_pretrained(*args, **kwargs):  # what transformers does with a GGUF: a tqdm bar over its tensors
        for _ in gguf_utils.tqdm(range(50), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        return Converted()

    monkeypatch.setenv("CLUES_FL_PROGRESS_SECONDS", "0")
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", lambda *a, **k: Converted())
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    loading.convert_gguf(gguf, tmp_path / "converted")
    err = capsys.readouterr().err
    assert "\r" not in err and "Converting and de-quantizing GGUF tensors...: 50/50" in err
    assert (tmp_path / "converted" / "config.json").exists()


def test_the_adapters_base_model_is_a_folder_transformers_loads(tmp_path):
    """`base_model_name_or_path` was 'smollm2-135m', which transformers cannot load."""
    from clues_fl.export import base_model_path

    base = base_model_path("smollm2-135m")
    assert base == str(default_model_dir().resolve()) and (default_model_dir() / "config.json").is_file()
    assert base_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub id
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert base_model_path("./model") == str(folder.resolve())  # absolute: loads from any folder
    finally:
        os.chdir(cwd)
