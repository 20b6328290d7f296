"""What an optional part of tokensieve needs beyond the core install, and the one-line fix when it is missing."""

from __future__ import annotations

import importlib


class MissingExtra(ImportError):
    """An optional part of tokensieve was used without the extra that installs what it needs."""


def require(extra: str, *modules: str, purpose: str) -> None:
    """Raise MissingExtra naming ``pip install 'tokensieve[extra]'`` if any of ``modules`` cannot be imported."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingExtra(f"{purpose} needs {', '.join(missing)}: pip install 'tokensieve[{extra}]' "
                          f"(from a checkout: pip install -e '.[{extra}]')")
