"""The extras split (pyproject.toml): `tokensieve bench` without the bench extra, and `--ray` without the ray
extra, end in one line naming the pip command, before any work. scripts/test_wheel.sh checks the same on a
wheel installed with no extra, and that the core imports without any extra."""

import sys

import pytest
from typer.testing import CliRunner

from tokensieve.cli import app

runner = CliRunner()


@pytest.mark.parametrize("absent", ["matplotlib", "skimage", "pyarrow"])
def test_bench_without_the_bench_extra_is_one_line_naming_it(monkeypatch, tmp_path, absent):
    monkeypatch.setitem(sys.modules, absent, None)  # as if the package were not installed
    result = runner.invoke(app, ["bench", "--limit", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: tokensieve bench needs {absent}: pip install 'tokensieve[bench]' "
                                     "(from a checkout: pip install -e '.[bench]')")
    assert not (tmp_path / "out").exists()


def test_bench_ray_without_the_ray_extra_is_one_line_naming_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "tokensieve.bench.ray_sweep", raising=False)  # imported again, without ray
    result = runner.invoke(app, ["bench", "--ray", "local", "--limit", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: tokensieve bench --ray (configurations as Ray tasks) needs ray: pip "
                                     "install 'tokensieve[ray]' (from a checkout: pip install -e '.[ray]')")
    assert not (tmp_path / "out").exists()
