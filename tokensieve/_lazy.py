"""torch, loaded on first use: the registry imports every method module to list them, and `tokensieve methods`
or `tokensieve --help` should not pay torch's import (about 2 s) for that.

Method modules and the modules they import (sieve, selection, signals, stats) take ``torch`` and ``F``
(``torch.nn.functional``) from here. ``torch`` is the real module object, put in ``sys.modules`` by
importlib's ``LazyLoader`` so that its first attribute access runs the import, and every later
``import torch`` anywhere gets that same module.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys


def _lazy_module(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class _Functional:
    """``torch.nn.functional``, imported on the first attribute read (its parent packages must load first)."""

    def __getattr__(self, name: str):
        return getattr(importlib.import_module("torch.nn.functional"), name)


torch = _lazy_module("torch")
F = _Functional()
