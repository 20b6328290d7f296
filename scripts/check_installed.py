"""Import every module of an installed tokensieve (scripts/test_wheel.sh runs this in a fresh venv, outside the
source tree) and check the registry.

The core (everything outside tokensieve.bench, .mini and .qa) must import outright. Any other module may fail
only because a package an extra installs is absent (then the extra is named); a missing tokensieve file, a core
dependency pyproject.toml forgot, or any other error fails the check. Every method in the registry builds.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

import tokensieve as ts
from tokensieve.extras import MissingExtra

OPTIONAL = ("tokensieve.bench", "tokensieve.mini", "tokensieve.qa")
# the import name of each package an extra (pyproject.toml) installs, and that extra
EXTRA_PACKAGES = {"onnx": "mini", "gguf": "mini", "safetensors": "mini", "datasets": "bench", "matplotlib": "bench",
                  "skimage": "bench", "pandas": "bench", "pyarrow": "bench", "optuna": "calibrate", "scipy": "calibrate", "ray": "ray", "av": "video",
                  "lmms_eval": "lmms", "loguru": "lmms", "accelerate": "lmms"}


def main() -> int:
    installed = Path(ts.__file__).resolve()
    if not installed.is_relative_to(Path(sys.prefix).resolve()):
        print(f"tokensieve imported from {installed}, not from this environment ({sys.prefix})")
        return 1
    imported, need_extra, broken = [], [], []
    for module in pkgutil.walk_packages(ts.__path__, "tokensieve."):
        try:
            importlib.import_module(module.name)
            imported.append(module.name)
        except MissingExtra as err:  # raised on import by a module that names its extra itself
            need_extra.append(f"{module.name} ({err})")
        except ModuleNotFoundError as err:
            top = (err.name or "").partition(".")[0]
            absent_extra = top in EXTRA_PACKAGES and importlib.util.find_spec(top) is None
            if absent_extra and module.name.startswith(OPTIONAL):
                need_extra.append(f"{module.name} ({top}: tokensieve[{EXTRA_PACKAGES[top]}])")
            else:
                broken.append(f"{module.name}: {type(err).__name__}: {err}")
        except Exception as err:  # noqa: BLE001 - every failure is reported, then the check fails
            broken.append(f"{module.name}: {type(err).__name__}: {err}")
    methods = ts.list_methods()
    for info in methods:
        try:
            ts.build(info.name)
        except Exception as err:  # noqa: BLE001
            broken.append(f"method {info.name}: {type(err).__name__}: {err}")
    print(f"tokensieve {ts.__version__} from {installed.parent}: {len(imported)} modules imported, "
          f"{len(methods)} methods built")
    for line in need_extra:
        print(f"  needs an extra not installed here: {line}")
    for line in broken:
        print(f"  BROKEN: {line}")
    return 1 if broken or not methods else 0


if __name__ == "__main__":
    sys.exit(main())
