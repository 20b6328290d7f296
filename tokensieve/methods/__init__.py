"""One file per method; importing this package imports every module in it, which registers them all.

The classes are exported as ``ts.<ClassName>`` from the registry (tokensieve/__init__.py), so a new
method needs only its own file here (and its row in docs/methods.md).
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
