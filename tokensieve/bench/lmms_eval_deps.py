"""Is the installed lmms-eval runnable? A check of the bridge's import path, with the fix named.

lmms-eval is installed with ``--no-deps`` (its own requirements pull torchvision and a CUDA torch), so
nothing resolves its dependencies but tokensieve's ``lmms`` extra. Some of its imports happen only
once a run starts (lmms-eval 0.7.3's evaluator imports ``filelock._api``, which filelock 4 removed,
inside ``simple_evaluate``): a broken one would crash a user's run after the model loaded. This module
imports that whole path up front and, when an import fails, names every installed package that lies
outside the versions the ``lmms`` extra declares, with the pip command that fixes it.

It imports nothing from lmms-eval at module level, so that it can report on an lmms-eval that fails
to import at all.
"""

from __future__ import annotations

import importlib
from importlib import metadata

from packaging.requirements import Requirement

#: every module a ``--model tokensieve`` run imports, the late imports of the evaluator included
RUN_PATH = (
    "lmms_eval.api.model",
    "lmms_eval.models.registry_v2",
    "lmms_eval.evaluator",
    "lmms_eval.models.simple.llava_hf",
    "lmms_eval.models.chat.llava_hf",
    "lmms_eval.models.model_utils.gen_metrics",
    "lmms_eval.filters.transformation",
    "filelock._api",  # imported by evaluator._enable_reentrant_filelocks at the start of simple_evaluate
    "datasets.utils._filelock",  # likewise
)


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def lmms_requirements() -> list[Requirement]:
    """The requirements of tokensieve's ``lmms`` extra, as installed."""
    declared = [Requirement(line) for line in metadata.requires("tokensieve") or ()]
    return [req for req in declared if req.marker is not None and req.marker.evaluate({"extra": "lmms"})
            and not req.marker.evaluate({"extra": ""})]


def out_of_range() -> list[tuple[Requirement, str]]:
    """Each requirement of the lmms extra that the installed version of its package does not meet."""
    return [(req, version) for req in lmms_requirements()
            if (version := installed_version(req.name)) is not None
            and not req.specifier.contains(version, prereleases=True)]


def check_lmms_eval_path() -> None:
    """Import the bridge's whole run path; raise ImportError naming the package to change if it breaks."""
    for module in RUN_PATH:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ImportError(f"lmms-eval {installed_version('lmms-eval') or '(not installed)'} cannot run: "
                              f"importing {module} fails with {type(error).__name__}: {error}; {_fix()}") from error


def _fix() -> str:
    problems = out_of_range()
    if not problems:
        return "fix: pip install -e '.[lmms]' && pip install --no-deps lmms-eval==0.7.3"
    found = ", ".join(f"{req.name} {version} (tokensieve[lmms] wants {req.specifier})" for req, version in problems)
    wanted = " ".join(f"'{req.name}{req.specifier}'" for req, _ in problems)
    return f"installed outside the tested range: {found}; fix: pip install {wanted}"
