"""The method registry: ``load(name, **kwargs)`` and ``list_methods()``."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from .budget import parse_keep
from .sieve import SIGNALS, Sieve

_METHODS: dict[str, type[Sieve]] = {}


def register(cls: type[Sieve]) -> type[Sieve]:
    """Class decorator that makes a sieve loadable by its ``name``."""
    if cls.name in _METHODS:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    unknown = set(cls.signals) - set(SIGNALS)
    if unknown:
        raise ValueError(f"{cls.__name__} asks for unknown signals {sorted(unknown)}: choose from {sorted(SIGNALS)}")
    _METHODS[cls.name] = cls
    return cls


def load(name: str, **kwargs) -> Sieve:
    """Build the method registered as ``name`` with ``kwargs`` (e.g. ``load("divprune", keep=64)``)."""
    try:
        cls = _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(sorted(_METHODS))}") from None
    return cls(**kwargs)


def build(spec: str, keep: int | float | None = None):
    """A method from its command-line spelling: ``"fastv"``, ``"fastv:0.5"``, or a chain
    ``"fastervlm:128+fastv:0.5"`` (a :class:`~tokensieve.Chain`). ``keep`` is the budget of every method
    whose spelling gives none; None leaves those at their defaults."""
    from .chain import Chain  # chain.py needs the sieve module only; importing it here avoids a cycle

    sieves = []
    for part in spec.split("+"):
        name, _, budget = part.partition(":")
        value = parse_keep(budget) if budget else keep
        sieves.append(load(name.strip()) if value is None else load(name.strip(), keep=value))
    return sieves[0] if len(sieves) == 1 else Chain(*sieves)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    paper: str
    stage: str
    signals: tuple[str, ...]
    defaults: dict


def list_methods() -> list[MethodInfo]:
    """Every registered method with its paper, stage, required signals and default arguments."""
    infos = []
    for name, cls in sorted(_METHODS.items()):
        params = inspect.signature(cls.__init__).parameters.values()
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        infos.append(MethodInfo(name, cls.paper, cls.stage, cls.signals, defaults))
    return infos
