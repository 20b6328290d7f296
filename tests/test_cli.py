"""The command line: `tokensieve methods`, `demo` and `run` (mistakes: tests/test_cli_errors.py)."""

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


def test_demo_shows_its_steps_and_prunes_the_576_token_grid_to_the_budget():
    result = runner.invoke(app, ["demo", "--method", "uniform", "--keep", "32"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "done Building a random LLaVA-1.5-shaped model" in result.output
    assert "done Timing one prefill, stock and with uniform" in result.output
    assert re.search(r"24x24\s+576\s+32\n", result.output)
    assert "Uniform(keep=32)" in result.output


def test_demo_reads_keep_as_python_does_so_1_0_keeps_every_token():
    result = runner.invoke(app, ["demo", "--method", "uniform", "--keep", "1.0"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert re.search(r"24x24\s+576\s+576\n", result.output)
    assert "Uniform(keep=1.0)" in result.output



def test_run_shows_its_steps_and_reads_keep_1_0_as_every_token():
    question = "What colour is the [triangle]?"  # brackets: printed as typed, not read as rich markup
    result = runner.invoke(app, ["run", "--question", question, "--method", "fastervlm", "--keep", "1.0"],
                           env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "done Loading sieve-mini (224x224 images)" in result.output
    assert "done Answering with fastervlm" in result.output
    assert f"question {question}" in result.output
    assert "visual tokens 256 of 256 kept by fastervlm" in result.output
