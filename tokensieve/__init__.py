"""tokensieve: visual token reduction for stock Hugging Face vision-language models.

The names below, and the submodules, load on first use (PEP 562), so ``import tokensieve.cli`` or
``tokensieve.budget`` does not pay for torch and transformers; ``import tokensieve as ts; ts.FasterVLM``
and ``ts.engine`` work as usual. Every registered method is exported under its class name.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

# Each public name and the submodule that defines it.
_HOMES = {
    "Adaptive": "budget", "Budget": "budget", "BudgetClampedWarning": "budget", "parse_keep": "budget",
    "Chain": "chain",
    "Run": "engine", "apply": "engine", "attach": "engine", "observe": "engine",
    "ImageRecord": "stats", "RunStats": "stats",
    "MethodInfo": "registry", "build": "registry", "list_methods": "registry", "load": "registry",
    "parse_spec": "registry", "register": "registry", "split_specs": "registry",
    "GridSieve": "sieve", "ScoringSieve": "sieve", "Selection": "sieve", "Sieve": "sieve", "VideoSieve": "sieve",
    "VisualTokens": "sieve",
    "Signal": "signals",
}



def __getattr__(name: str):
    if name == "__all__":  # the methods' class names come from the registry
        return sorted(_HOMES) + [info.class_name for info in _submodule("registry").list_methods()]
    if name in _HOMES:
        value = getattr(_submodule(_HOMES[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name[:1].isupper() and (method := _submodule("registry").method_class(name)) is not None:
        globals()[name] = method
        return method
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return _submodule(name)  # `ts.engine` without `import tokensieve.engine`, as the eager imports allowed
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _submodule(name: str):
    if name == "registry":
        # The registry knows a method once its module has run: load every built-in one before it answers.
        importlib.import_module(".methods", __name__)
    return importlib.import_module(f".{name}", __name__)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__getattr__("__all__")))
