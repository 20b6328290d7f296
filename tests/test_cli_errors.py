"""Command-line mistakes: each is refused in one `Invalid value` line with exit code 2, before any model is
built or loaded, and the command line starts without torch (--help and option errors answer at once)."""

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
import typer
from typer.testing import CliRunner

import tokensieve
from tokensieve.cli import app
from tokensieve.mini import SAMPLE_IMAGE, build, evaluate
from tokensieve.mini import answer_question

runner = CliRunner()

MISTAKES = {
    "run keep 0": (["run", "--method", "fastervlm", "--keep", "0"], "--keep", "keep=0 keeps no token"),
    "run keep -1": (["run", "--method", "fastervlm", "--keep", "-1"], "--keep", "keep=-1 keeps no token"),
    "run keep 1.5": (["run", "--method", "fastervlm", "--keep", "1.5"], "--keep", "keep=1.5 is not a ratio in (0, 1]"),
    "run keep word": (["run", "--method", "fastervlm", "--keep", "lots"], "--keep", "not 'lots'"),
    "run keep alone": (["run", "--keep", "64"], "--keep", "needs --method"),
    "run unknown method": (["run", "--method", "nope"], "--method", "unknown method 'nope': choose one of"),
    "run image size": (["run", "--image-size", "300"], "--image-size", "300 is not a positive multiple of 14"),
    "run show folder": (["run", "--show", "{tmp}/missing/kept.png"], "--show", "there is no folder {tmp}/missing"),
    "run show suffix": (["run", "--show", "{tmp}/kept.txt"], "--show", "PIL writes no .txt file"),
    "run missing image": (["run", "--image", "{tmp}/cat.png", "--question", "What?"], "--image", "cat.png: no such file"),
    "run not an image": (["run", "--image", __file__, "--question", "What?"], "--image", "not an image PIL can read"),
    "run empty question": (["run", "--question", ""], "--question", "is empty"),
    "run blank question": (["run", "--question", "  "], "--question", "is empty"),
    "run image alone": (["run", "--image", str(SAMPLE_IMAGE)], "--question", "needs a question"),
    "demo keep 0": (["demo", "--keep", "0"], "--keep", "keep=0 keeps no token"),
    "demo keep 1.5": (["demo", "--keep", "1.5"], "--keep", "keep=1.5 is not a ratio in (0, 1]"),
    "demo unknown method": (["demo", "--method", "nope"], "--method", "unknown method 'nope'"),
    "demo chain budget": (["demo", "--method", "fastervlm:0+fastv"], "--method", "keep=0 keeps no token"),
    "bench keep 0": (["bench", "--keep", "64,0", "--out", "{tmp}"], "--keep", "keep=0 keeps no token"),
}


@pytest.fixture
def models_refuse_to_load(monkeypatch):
    """Every way a command builds or loads a model fails loudly, so a mistake refused later shows."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built or loaded before the options were checked")

    monkeypatch.setattr(build, "load_sieve_mini", refuse)
    monkeypatch.setattr(build, "model_dir", refuse)
    monkeypatch.setattr(evaluate, "load_sieve_mini", refuse)
    monkeypatch.setattr("tokensieve.demo_model.demo_llava", refuse)
    monkeypatch.setattr(importlib.import_module("tokensieve.bench.sweep"), "sweep", refuse)


def error_line(output: str, option: str) -> str:
    """The one line that names `option`'s invalid value."""
    [line] = [line for line in output.splitlines() if "Invalid value" in line]
    assert re.search(rf"Invalid value for '?{option}'?: ", line), line
    return line


@pytest.mark.parametrize("args, option, message", MISTAKES.values(), ids=MISTAKES.keys())
def test_a_mistake_is_one_line_and_exit_2_before_any_model_loads(args, option, message, tmp_path,
                                                                  models_refuse_to_load):
    result = runner.invoke(app, [arg.format(tmp=tmp_path) for arg in args], env={"COLUMNS": "250"})
    assert result.exit_code == 2, result.output
    assert message.format(tmp=tmp_path) in error_line(result.output, option)
    assert "Traceback" not in result.output


EVALUATE_MISTAKES = {
    "split": (["--split", "tests"], "--split", "unknown split 'tests'"),
    "keep 1.5": (["--method", "random", "--keep", "1.5"], "--keep", "keep=1.5 is not a ratio in (0, 1]"),
    "keep alone": (["--keep", "0.1"], "--keep", "needs --method"),
    "unknown method": (["--method", "nope"], "--method", "unknown method 'nope'"),
    "image size": (["--image-size", "300"], "--image-size", "300 is not a positive multiple of 14"),
}


@pytest.mark.parametrize("args, option, message", EVALUATE_MISTAKES.values(), ids=EVALUATE_MISTAKES.keys())
def test_evaluate_refuses_a_mistake_as_the_cli_does(args, option, message, models_refuse_to_load):
    evaluate_app = typer.Typer()
    evaluate_app.command()(evaluate.main)
    result = runner.invoke(evaluate_app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 2, result.output
    assert message in error_line(result.output, option)


def test_the_library_refuses_an_empty_question_too(models_refuse_to_load):
    with pytest.raises(ValueError, match="the question is empty"):
        answer_question(None, None, Image.new("RGB", (224, 224)), "")


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return done.stdout.strip()


def test_importing_the_command_line_loads_neither_torch_nor_transformers():
    loaded = run_python("import sys, tokensieve.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    assert loaded == "[]"


def test_an_option_error_and_help_load_no_torch():
    code = ("import sys\nfrom tokensieve.cli import app\nanswers = []\n"
            "for args in (['run', '--keep', '0'], ['--help']):\n"
            "    try:\n        app(args)\n    except SystemExit as exit:\n"
            "        answers.append((exit.code, 'torch' in sys.modules))\nprint(answers)")
    assert run_python(code).splitlines()[-1] == "[(2, False), (0, False)]"


def test_methods_loads_no_transformers_and_no_adapter():
    code = ("import sys\nfrom tokensieve.cli import app\ntry:\n    app(['methods'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m == 'transformers' or m.startswith('tokensieve.adapters')))")
    assert run_python(code).splitlines()[-1] == "[]"


def test_listing_and_building_methods_leave_torch_unimported_until_a_method_runs():
    """The method modules take torch from tokensieve._lazy: `tokensieve methods` answers without importing it
    (torch._C is its compiled core), and the first tensor operation imports the one real torch."""
    code = ("import sys\nfrom tokensieve.cli import app\ntry:\n    app(['methods'])\nexcept SystemExit:\n    pass\n"
            "import tokensieve as ts\nsieve = ts.build('fastervlm:64+pyramiddrop:16')\nprint('torch._C' in sys.modules)\n"
            "from tokensieve.selection import top_k_in_order\nimport torch\n"
            "print(top_k_in_order(torch.tensor([0.1, 0.9, 0.5]), 2).tolist(), sys.modules['torch'] is torch)")
    assert run_python(code).splitlines()[-2:] == ["False", "[1, 2] True"]


def test_the_console_script_answers_a_mistake_in_one_line_without_a_traceback():
    script = shutil.which("tokensieve", path=str(Path(sys.executable).parent))
    assert script, f"no tokensieve console script next to {sys.executable}"
    done = subprocess.run([script, "run", "--keep", "1.5", "--method", "fastervlm"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "250"})
    assert done.returncode == 2 and done.stdout == ""
    assert "keep=1.5 is not a ratio in (0, 1]" in error_line(done.stderr, "--keep")
    assert "Traceback" not in done.stderr


def test_the_package_names_load_on_first_use():
    code = ("import sys\nimport tokensieve as ts\nprint('torch' in sys.modules)\n"
            "print(type(ts.load('fastervlm', keep=64)).__name__, sorted(set(ts.__all__) - set(dir(ts))))")
    assert run_python(code).splitlines() == ["False", "FasterVLM []"]
    # A submodule reached as an attribute loads too, and the registry comes with the built-in methods.
    code = "import tokensieve as ts\nprint(len(ts.registry.list_methods()), ts.engine.apply is ts.apply)"
    assert run_python(code) == f"{len(tokensieve.list_methods())} True"
    for name, home in tokensieve._HOMES.items():
        assert getattr(tokensieve, name) is getattr(importlib.import_module(f"tokensieve.{home}"), name)
    # the methods are exported under their class names from the registry (tests/test_registry.py)
    namespace = {}
    exec("from tokensieve import *", namespace)  # noqa: S102 - the star import a user may write
    assert set(tokensieve.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="no attribute 'FasterVlm'"):
        tokensieve.FasterVlm


def test_a_missing_extra_ends_the_command_in_one_line_naming_the_install(monkeypatch, tmp_path):
    """`pip install tokensieve` alone has no onnx/gguf: building sieve-mini says which extra brings them."""
    monkeypatch.setenv("TOKENSIEVE_CACHE", str(tmp_path))  # nothing cached: the build must start
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the package were not installed
    result = runner.invoke(app, ["model", "build"])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: building sieve-mini from its ONNX and GGUF parts needs gguf: pip install "
                                     "'tokensieve[mini]' (from a checkout: pip install -e '.[mini]')")
