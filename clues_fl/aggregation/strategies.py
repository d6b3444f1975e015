"""The named aggregation step of the FedAvg-style rounds (tracing and retraining):
which Flower strategy aggregates the sites' adapters, and with which arguments.

- `fed.strategy`: a strategy of `flwr.serverapp.strategy` by name, case-insensitive
  (`fedavg`, `FedProx`, `fedadam`, ...; see `STRATEGIES`), or `module:Class` for your
  own `flwr.serverapp.strategy.Strategy` subclass.
- `fed.strategy-args`: its keyword arguments as comma-separated `name=value` pairs,
  e.g. `"proximal_mu=0.01"` or `"eta=0.001, tau=1e-9"` (run-config values are
  scalars, and Flower accepts only the keys pyproject.toml declares, hence one string;
  values are read as TOML: numbers, true/false, else text). An unknown parameter stops
  the run with the strategy's parameters.

The run sets the sampling itself (`min_train_nodes`, `min_available_nodes` from
fed.min-nodes, no federated evaluation), so those cannot be given. The one-shot merge
rules (`aggregation = linear | weighted | ties | module:function`) are the other kind
of aggregator (`merging.py`).

Plain Python at import: Flower is imported only to resolve a strategy (preflight runs
without it for the default).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

# The strategies of flwr.serverapp.strategy that aggregate adapters (Flower's DP
# wrappers are not in this list: privacy.adapter-noise wraps the chosen strategy in
# one; the XGBoost strategies aggregate trees).
STRATEGIES = ("FedAvg", "FedProx", "FedAdam", "FedYogi", "FedAdagrad", "FedAvgM", "FedMedian",
              "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan", "QFedAvg")
DEFAULT_STRATEGY = "fedavg"
ARGS_KEY = "fed.strategy-args"
# Set by the run (fed.min-nodes, no federated evaluation): not for fed.strategy-args.
RESERVED = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes", "min_available_nodes")


class StrategyError(ValueError):
    """A bad fed.strategy or fed.strategy-args: the message names the key."""


def builtin_name(value: str) -> str | None:
    """The Flower class name of a built-in strategy (case-insensitive), else None."""
    by_lower = {n.lower(): n for n in STRATEGIES}
    return by_lower.get(str(value).strip().lower())


def check_name(value: str) -> None:
    """fed.strategy is a built-in name or has the shape module:Class (no import)."""
    if builtin_name(value) is not None:
        return
    module, sep, attr = str(value).partition(":")
    if not sep or not module or not attr:
        raise StrategyError(f"fed.strategy: '{value}' is not one of {', '.join(STRATEGIES)} "
                            "(case-insensitive) or 'module:Class' (your Strategy subclass)")


def parse_args(text: str) -> dict[str, Any]:
    """'name=value, name=value' as keyword arguments (values read as TOML scalars)."""
    import tomllib

    out: dict[str, Any] = {}
    for part in str(text or "").split(","):
        if not part.strip():
            continue
        name, sep, raw = part.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not name.isidentifier() or not raw:
            raise StrategyError(f"{ARGS_KEY}: '{part.strip()}' is not name=value (e.g. 'proximal_mu=0.01, eta=0.001')")
        if name in out:
            raise StrategyError(f"{ARGS_KEY}: '{name}' given twice")
        try:
            out[name] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[name] = raw.strip("'\"")
    return out


def strategy_args(values: dict[str, Any]) -> dict[str, Any]:
    """fed.strategy-args of a run-config, as keyword arguments."""
    return parse_args(values.get(ARGS_KEY, ""))


def strategy_class(value: str) -> type:
    """The strategy class that fed.strategy names."""
    from flwr.serverapp.strategy import Strategy

    check_name(value)
    name = builtin_name(value)
    if name is not None:
        import flwr.serverapp.strategy as flower

        return getattr(flower, name)
    module, _, attr = str(value).partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except ImportError as err:
        raise StrategyError(f"fed.strategy: cannot import module '{module}' ({err}); is it on PYTHONPATH?") from err
    except AttributeError as err:
        raise StrategyError(f"fed.strategy: module '{module}' has no '{attr}'") from err
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise StrategyError(f"fed.strategy: '{value}' is not a subclass of flwr.serverapp.strategy.Strategy")
    return cls


def parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword parameters of a strategy's constructor (over its base classes when
    it passes **kwargs on)."""
    out: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = inspect.signature(init).parameters
        for name, p in params.items():
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                out.setdefault(name, p)
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return out


def check_args(cls: type, args: dict[str, Any], value: str = "") -> None:
    """Every fed.strategy-args key is a parameter of the strategy, none is set by the
    run, and every parameter without a default is given."""
    params = parameters(cls)
    allowed = [n for n in params if n not in RESERVED and not n.endswith("_fn")]  # callables: not from a run-config
    name = value or cls.__name__
    reserved = sorted(set(args) & set(RESERVED))
    if reserved:
        raise StrategyError(f"{ARGS_KEY}: '{reserved[0]}' is set by the run (fed.min-nodes; no federated "
                            "evaluation), not by fed.strategy-args")
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise StrategyError(f"{ARGS_KEY}: '{unknown[0]}' is not a parameter of {name}; its parameters: "
                            f"{', '.join(allowed) or 'none'}")
    missing = [n for n, p in params.items() if p.default is p.empty and n not in args and n not in RESERVED]
    if missing:
        raise StrategyError(f"fed.strategy: {name} needs {', '.join(missing)} in {ARGS_KEY} "
                            f"(e.g. \"{missing[0]}=...\")")


def resolve(values: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """(strategy class, its keyword arguments) of a run-config, checked."""
    value = values.get("fed.strategy", DEFAULT_STRATEGY)
    cls = strategy_class(value)
    args = strategy_args(values)
    check_args(cls, args, "" if builtin_name(value) else value)
    return cls, args


def run_kwargs(cls: type, min_nodes: int) -> dict[str, Any]:
    """What the run sets on every strategy (those of its parameters it has)."""
    wanted = {"fraction_evaluate": 0.0, "min_train_nodes": min_nodes, "min_available_nodes": min_nodes}
    params = parameters(cls)
    return {k: v for k, v in wanted.items() if k in params}
