"""Whether the quantisation a run-config asks for can load here (bitsandbytes installed),
checked before anything starts (preflight) and before the model loads."""

from __future__ import annotations

import importlib.util
import sys

from clues_fl.config import ConfigError, ModelSection

QUANT_INSTALL = "pip install 'clues-fl[quant]'  (or: pip install bitsandbytes==0.50.2)"


def check_quantization_available(cfg_or_quantization) -> None:
    """Raise ConfigError, naming the install command, when `model.quantization` asks for
    bitsandbytes and it is not installed. Takes a RunConfig, its model section, a dict or
    the value itself; plain Python and no import of bitsandbytes, so preflight calls it
    before anything starts (the workbench calls it before loading)."""
    quantization = cfg_or_quantization
    if isinstance(cfg_or_quantization, ModelSection):
        quantization = cfg_or_quantization.quantization
    elif not isinstance(cfg_or_quantization, str):
        quantization = cfg_or_quantization["model.quantization"]
    if quantization in ("", "none"):
        return
    if quantization not in ("4bit", "8bit"):
        raise ConfigError(f"model.quantization: '{quantization}' is not one of none, 4bit, 8bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.quantization: '{quantization}' needs bitsandbytes, which is not installed "
                          f"in {sys.prefix}: {QUANT_INSTALL}")
