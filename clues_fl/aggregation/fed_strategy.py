"""fed.strategy to a Flower strategy: the strategy whose rounds aggregate the sites'
adapters in the round phases (tracing, and the aggregate step with retrain.mode = rounds).

- `fed.strategy`: a strategy of `flwr.serverapp.strategy` by name, case-insensitive
  (`fedavg`, `FedProx`, `fedadam`, ...; names.FLOWER_STRATEGIES), or `module:Class` for
  your own `flwr.serverapp.strategy.Strategy` subclass.
- `fed.strategy-args`: its keyword arguments as comma-separated `name=value` pairs,
  e.g. `"proximal_mu=0.01"` or `"eta=0.001, tau=1e-9"` (config.py parse_strategy_args).
  An unknown parameter stops the run with the strategy's parameters.

The run sets the sampling itself (every connected site trains, at least fed.min-nodes,
no federated evaluation: strategies/site_rounds.py RUN_SETTINGS), so those cannot be
given. Flower is imported only when a strategy is resolved.
"""

from __future__ import annotations

import inspect
from typing import Any

from clues_fl import plugins
from clues_fl.config import STRATEGY_ARGS_KEY, parse_strategy_args
from clues_fl.names import FLOWER_STRATEGIES

# Set by the run, not by fed.strategy-args.
RESERVED = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes", "min_available_nodes")


class StrategyError(ValueError):
    """A bad fed.strategy or fed.strategy-args: the message names the key."""


def builtin_name(value: str) -> str | None:
    """The Flower class name of a built-in strategy (case-insensitive), else None."""
    by_lower = {n.lower(): n for n in FLOWER_STRATEGIES}
    return by_lower.get(str(value).strip().lower())


def strategy_class(value: str) -> type:
    """The strategy class that fed.strategy names."""
    from flwr.serverapp.strategy import Strategy

    name = builtin_name(value)
    if name is not None:
        import flwr.serverapp.strategy as flower

        return getattr(flower, name)
    try:
        return plugins.load(value, "fed.strategy", accepts=plugins.subclass_of(Strategy),
                            expected="a subclass of flwr.serverapp.strategy.Strategy")
    except plugins.PluginError as err:
        raise StrategyError(str(err)) from err


def name_of(cls: type) -> str:
    """The fed.strategy value of a strategy class: its built-in name, or module:Class."""
    import flwr.serverapp.strategy as flower

    if cls.__name__ in FLOWER_STRATEGIES and getattr(flower, cls.__name__) is cls:
        return cls.__name__
    return plugins.reference(cls)


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
        raise StrategyError(f"{STRATEGY_ARGS_KEY}: '{reserved[0]}' is set by the run (fed.min-nodes; no federated "
                            "evaluation), not by fed.strategy-args")
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise StrategyError(f"{STRATEGY_ARGS_KEY}: '{unknown[0]}' is not a parameter of {name}; its parameters: "
                            f"{', '.join(allowed) or 'none'}")
    missing = [n for n, p in params.items() if p.default is p.empty and n not in args and n not in RESERVED]
    if missing:
        raise StrategyError(f"fed.strategy: {name} needs {', '.join(missing)} in {STRATEGY_ARGS_KEY} "
                            f"(e.g. \"{missing[0]}=...\")")


def resolve(values: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """(strategy class, its keyword arguments) of a run-config, checked."""
    value = values.get("fed.strategy", "fedavg")
    cls = strategy_class(value)
    args = parse_strategy_args(values.get(STRATEGY_ARGS_KEY, ""))
    check_args(cls, args, "" if builtin_name(value) else value)
    return cls, args


def build(values: dict[str, Any]):
    """The strategy a run-config names, built with its fed.strategy-args."""
    cls, args = resolve(values)
    return cls(**args)
