"""The command line: `tokensieve methods` and `tokensieve demo`."""

import re

from typer.testing import CliRunner

import tokensieve as ts
from tokensieve.cli import app

runner = CliRunner()


def test_methods_lists_every_registered_method_with_its_paper():
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for info in ts.list_methods():
        assert info.name in result.output
    assert "arXiv 2503.02175" in result.output and "keep=0.098" in result.output


def test_demo_prunes_the_576_token_grid_to_the_budget():
    result = runner.invoke(app, ["demo", "--method", "uniform", "--keep", "32"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert re.search(r"24x24\s+576\s+32\n", result.output)
    assert "Uniform(keep=32)" in result.output


def test_demo_refuses_an_unknown_method():
    result = runner.invoke(app, ["demo", "--method", "nope"])
    assert result.exit_code != 0
    assert "unknown method 'nope'" in str(result.exception)
