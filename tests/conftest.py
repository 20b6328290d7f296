import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from cases import METHOD_CASES  # noqa: E402
from families import FAMILIES  # noqa: E402

import tokensieve as ts  # noqa: E402
from tokensieve.adapters import adapter_for  # noqa: E402


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


_MODELS = {}


def build_model(family):
    """One tiny model per family per session (tests must leave it as they found it)."""
    if family.name not in _MODELS:
        _MODELS[family.name] = family.build()
    return _MODELS[family.name]


def supported(family, method_name) -> bool:
    sieve = ts.load(method_name)
    return not adapter_for(build_model(family)).missing_signals(sieve.signals)


def family_method_params(want_supported: bool = True):
    """(family, method, kwargs) for every pair the family supports (or, with False, refuses)."""
    return [
        pytest.param(family, name, kwargs, id=f"{family.name}-{name}")
        for family in FAMILIES
        for name, kwargs in METHOD_CASES
        if supported(family, name) == want_supported
    ]
