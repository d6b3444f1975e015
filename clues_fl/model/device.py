"""Where the model runs and in which precision: the one place `model.device` and
`model.dtype` are resolved, plus the few helpers every phase needs on a GPU.

    auto  -> CUDA with bf16 where a GPU is available, else the CPU in float32.

The base model runs in the resolved dtype; LoRA weights, optimiser state, the
engine's accumulators and everything that travels in messages stay float32.
"""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`model.device` / `model.dtype` -> (torch.device, torch.dtype); raises ValueError."""
    device = (device or "auto").strip()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"model.device: '{device}' is not one of {', '.join(DEVICES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"model.device='{device}' but torch sees no CUDA device "
                         f"(torch {torch.__version__}); use model.device='cpu' or 'auto'")
    dev = torch.device(device)
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    if dtype == "auto":
        bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        return dev, torch.bfloat16 if bf16 else torch.float32
    return dev, DTYPES[dtype]


def device_of(model) -> torch.device:
    """The device of the model's (first) parameters: one model, one device."""
    return next(model.parameters()).device


def compute_dtype(model) -> torch.dtype:
    """The dtype hidden states flow in: the input embedding's (not quantised)."""
    return model.get_input_embeddings().weight.dtype


def to_device(tensors: dict[str, torch.Tensor], device, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A {name: tensor} dict (adapter, moments, reference gradient) on `device`."""
    return {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in tensors.items()}


def to_host(tensor: torch.Tensor):
    """A float64 numpy copy of a device tensor (bf16 has no numpy dtype)."""
    return tensor.detach().to("cpu", torch.float64).numpy()


def free_memory() -> None:
    """Return cached blocks to the GPU between phases (no-op on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def peak_memory_mib(reset: bool = True) -> float | None:
    """Peak GPU memory allocated by this process since the last reset, in MiB
    (None when CUDA is not in use); resets the counter when `reset`."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    peak = torch.cuda.max_memory_allocated() / 2**20
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(peak, 1)
