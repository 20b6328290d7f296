"""The method registry: ``register`` (all a method needs), ``load``, ``build`` and ``list_methods``.

A registered method is loadable by name, spelt on the command line (``build``), listed with its
paper, stage, signals and defaults, exported as ``ts.<ClassName>``, and run by the contract tests,
whose case list is read from here.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass

from .budget import parse_keep, split_top_level
from .sieve import SIGNALS, STAGES, Sieve

_METHODS: dict[str, type[Sieve]] = {}

#: methods users ask for that are deliberately not served, each with why and what to use instead
NOT_SERVED = {
    "visionselector": "VisionSelector ranks tokens by a trained scorer and has no training-free variant (docs/methods.md, "
                      "'Methods not included'); idpruner runs its pipeline with [CLS] attention in the scorer's place",
    "pvc": "PVC's progressive compression is its trained tower and projector, with no part that works without its "
           "weights (docs/video.md, 'Not served'); pool with ts.Budget(k, per_crop=True) is what is left of it",
}


def register(cls: type[Sieve]) -> type[Sieve]:
    """Class decorator that makes a sieve loadable by its ``name`` (put it above ``@dataclass``)."""
    if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} must be a dataclass: decorate it @register above @dataclass")
    if cls.name in _METHODS:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    if cls.stage not in STAGES:
        raise ValueError(f"{cls.__name__}.stage={cls.stage!r}: choose from {', '.join(STAGES)}")
    unknown = set(cls.signals) - set(SIGNALS)
    if unknown:
        raise ValueError(f"{cls.__name__} asks for unknown signals {sorted(unknown)}: choose from {sorted(SIGNALS)}")
    _METHODS[cls.name] = cls
    return cls


def method_class(class_name: str) -> type[Sieve] | None:
    """The registered method whose class is called ``class_name`` (``"VisionZip"``), if any."""
    return next((cls for cls in _METHODS.values() if cls.__name__ == class_name), None)


def load(name: str, **kwargs) -> Sieve:
    """Build the method registered as ``name`` with ``kwargs`` (e.g. ``load("divprune", keep=64)``)."""
    try:
        cls = _METHODS[name]
    except KeyError:
        if name in NOT_SERVED:
            raise ValueError(f"{name} is not served: {NOT_SERVED[name]}") from None
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(sorted(_METHODS))}") from None
    arguments = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in kwargs if key not in arguments]
    if unknown:
        raise ValueError(f"{name} takes {', '.join(arguments)}; not {', '.join(unknown)}")
    return cls(**kwargs)


def build(spec: str, keep: int | float | None = None, **arguments):
    """A method from its command-line spelling: ``"fastv"``, ``"fastv:0.5"``, ``"fastv:keep=0.5,layer=3"``
    (a bare first value is the budget: ``"fastv:0.5,layer=3"``), or a chain of them joined by ``+``,
    ``"fastervlm:128+fastv:0.5"`` (a :class:`~tokensieve.Chain`). Values read as Python literals
    (``64``, ``0.25``, ``None``, ``True``), anything else as text. ``keep`` is the budget of every
    method whose spelling gives none; None leaves those at their defaults. ``arguments`` go to a single
    method (``build("random", seed=7)``), over what its spelling says. A spec ending in ``.json`` is a calibration
    record (``tokensieve calibrate --out``): the spec it holds is built."""
    from .chain import Chain  # chain.py needs the sieve module only; importing it here avoids a cycle

    if spec.strip().endswith(".json"):  # a calibration record (`tokensieve calibrate --out`): the spec it holds
        spec = spec_from_record(spec.strip())
    parts = parse_spec(spec)
    if arguments and len(parts) > 1:
        raise ValueError(f"{spec} is a chain: give its methods' arguments in the spelling, e.g. fastv:0.5,layer=3")
    sieves = []
    for name, kwargs in parts:
        if keep is not None:
            kwargs.setdefault("keep", keep)
        sieves.append(load(name, **kwargs, **arguments))
    return sieves[0] if len(sieves) == 1 else Chain(*sieves)


def spec_from_record(path: str) -> str:
    """The ``"spec"`` of a JSON calibration record (``tokensieve calibrate --out FILE``), refused clearly."""
    import json
    from pathlib import Path

    if not Path(path).is_file():
        raise ValueError(f"{path}: no such calibration file (write one with `tokensieve calibrate --out {path}`)")
    try:
        spec = json.loads(Path(path).read_text()).get("spec")
    except (ValueError, AttributeError):  # not JSON, or not an object
        spec = None
    if not isinstance(spec, str) or spec.strip().endswith(".json"):
        raise ValueError(f'{path} is not a calibration record: it has no "spec" (tokensieve calibrate writes one)')
    return spec


def parse_spec(spec: str) -> list[tuple[str, dict]]:
    """``"fastervlm:128+fastv:0.5,layer=3"`` -> ``[("fastervlm", {"keep": 128}), ("fastv", {"keep": 0.5, "layer": 3})]``."""
    parsed = []
    for part in spec.split("+"):
        name, _, arguments = part.partition(":")
        parsed.append((name.strip(), _arguments(name.strip(), arguments)))
    return parsed


def split_specs(text: str) -> list[str]:
    """A comma-separated list of specs, where a ``key=value`` item belongs to the spec before it:
    ``"divprune,fastv:0.5,layer=3"`` -> ``["divprune", "fastv:0.5,layer=3"]``."""
    specs: list[str] = []
    for item in split_top_level(text):
        if "=" in item.split(":")[0] and specs:
            specs[-1] += f",{item}"
        else:
            specs.append(item)
    return specs


def _arguments(name: str, text: str) -> dict:
    """``"0.5,layer=3"`` -> ``{"keep": 0.5, "layer": 3}``."""
    kwargs = {}
    for position, item in enumerate(split_top_level(text)):
        key, equals, value = item.partition("=")
        if not equals or not key.strip().isidentifier():  # `adaptive(0.9,min=8)` is a budget, not an argument
            if position > 0:
                raise ValueError(f"{name}:{text}: only the first value may stand alone (the budget); name the others, e.g. layer=3")
            kwargs["keep"] = parse_keep(item)
        else:
            kwargs[key.strip()] = _literal(value.strip())
    return kwargs


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


@dataclass(frozen=True)
class MethodInfo:
    name: str
    class_name: str
    paper: str
    stage: str
    signals: tuple[str, ...]
    defaults: dict
    needs_video: bool  # a method for videos only: a still image is refused


def servable_methods(adapter, stage: str = "pre_llm", videos: bool | None = None) -> list[str]:
    """Names of the registered methods of ``stage`` whose default signal requests ``adapter`` can give, e.g.
    to suggest them when a method is refused; video methods where the run takes videos (``videos``; default: where
    the family does, not counting ``video_frames=``)."""
    videos = adapter.takes_video if videos is None else videos
    from .signals import requests_of  # signals.py imports the sieve module at call time only

    servable = []
    for name, cls in sorted(_METHODS.items()):
        if cls.stage != stage or (cls.needs_video and not videos):
            continue
        try:
            requests = requests_of(cls(), adapter)
        except (TypeError, ValueError):  # a method without defaults for every argument
            continue
        if not adapter.missing_signals(requests):
            servable.append(name)
    return servable


def list_methods(stage: str | None = None, needs: str | tuple[str, ...] = ()) -> list[MethodInfo]:
    """Every registered method with its paper, stage, required signals and default arguments; ``stage``
    keeps those of one stage, ``needs`` those that need every signal named (``needs="cls_attention"``)."""
    if stage is not None and stage not in STAGES:
        raise ValueError(f"stage={stage!r}: choose from {', '.join(STAGES)}")
    wanted = {needs} if isinstance(needs, str) else set(needs)
    return [
        MethodInfo(name, cls.__name__, cls.paper, cls.stage, cls.signals,
                   {f.name: f.default for f in dataclasses.fields(cls)}, cls.needs_video)
        for name, cls in sorted(_METHODS.items())
        if (stage is None or cls.stage == stage) and wanted <= set(cls.signals)
    ]
