"""Your code in a run-config: `module:attr` names a class or function of your package
(a scorer, a Flower strategy, a merge rule, a threshold rule, a selection signal).

One parser (`is_reference`, `split`), one loader (`load`, errors that name the key) and
one start-up check (federation/preflight.py `check_plugins` loads every reference a
run-config holds before anything starts). Plain Python: importing this loads nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class PluginError(ValueError):
    """A `module:attr` that cannot be loaded or is not what its key takes."""


def is_reference(value: Any) -> bool:
    """Whether `value` has the shape module:attr (nothing is imported)."""
    module, sep, attr = str(value).partition(":")
    return bool(sep and module.strip() and attr.strip())


def split(value: str) -> tuple[str, str]:
    module, _, attr = str(value).partition(":")
    return module.strip(), attr.strip()


def load(value: str, key: str, *, accepts: Callable[[Any], bool], expected: str) -> Any:
    """The object `value` (module:attr) names, checked with `accepts`; errors name `key`,
    what it takes (`expected`) and what went wrong."""
    if not is_reference(value):
        raise PluginError(f"{key}: '{value}' is not module:attr (e.g. 'mypkg.module:{expected.split()[-1]}')")
    module, attr = split(value)
    try:
        found = importlib.import_module(module)
    except ImportError as err:
        raise PluginError(f"{key}: cannot import module '{module}' ({err}); is it on PYTHONPATH?") from err
    try:
        for part in attr.split("."):
            found = getattr(found, part)
    except AttributeError as err:
        raise PluginError(f"{key}: module '{module}' has no '{attr}'") from err
    if not accepts(found):
        raise PluginError(f"{key}: '{value}' is not {expected}")
    return found


def subclass_of(base: type) -> Callable[[Any], bool]:
    return lambda obj: isinstance(obj, type) and issubclass(obj, base)


def reference(obj: Any) -> str:
    """module:attr of a class or function (what a run-config names it by)."""
    if obj.__module__ == "__main__":
        raise PluginError(f"{obj.__qualname__} is defined in __main__: the sites cannot import it; "
                          "put it in a module of your package")
    return f"{obj.__module__}:{obj.__qualname__}"
