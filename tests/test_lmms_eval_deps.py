"""The lmms-eval bridge's import path: it works with what a fresh install resolves, and when a dependency
breaks it, the error names the package, its installed version and the pip command that fixes it."""

import sys

import pytest

from tokensieve.bench import lmms_eval_deps
from tokensieve.bench.lmms_eval_deps import check_lmms_eval_path, out_of_range


def test_the_resolved_packages_run_the_whole_bridge_path():
    assert out_of_range() == [], f"installed outside tokensieve[lmms]'s ranges: {out_of_range()}"
    check_lmms_eval_path()  # raises, naming the fix, if any module on the run path fails to import


def test_a_broken_dependency_is_named_with_its_version_and_fix(monkeypatch):
    # what filelock 4 did to lmms-eval 0.7.3: the module its evaluator imports at run time is gone
    monkeypatch.setitem(sys.modules, "filelock._api", None)
    real_version = lmms_eval_deps.installed_version
    monkeypatch.setattr(lmms_eval_deps, "installed_version",
                        lambda package: "4.3.2" if package == "filelock" else real_version(package))

    with pytest.raises(ImportError) as raised:
        check_lmms_eval_path()
    message = str(raised.value)
    assert "importing filelock._api fails" in message
    assert "filelock 4.3.2 (tokensieve[lmms] wants <4,>=3.16)" in message
    assert message.endswith("fix: pip install 'filelock<4,>=3.16'")


def test_a_broken_import_with_packages_in_range_points_at_the_install_commands(monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval.filters.transformation", None)
    with pytest.raises(ImportError, match=r"transformation fails .*fix: pip install -e '\.\[lmms\]' && "
                                          r"pip install --no-deps lmms-eval==0\.7\.3$"):
        check_lmms_eval_path()
