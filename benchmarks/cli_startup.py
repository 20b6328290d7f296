"""How long the ``tokensieve`` command takes to answer when it loads no model: ``--help``, ``methods`` and
an option error. Each runs as a fresh subprocess (what a user waits for, interpreter start included);
the figure is the median wall time of a few runs.

    python benchmarks/cli_startup.py
    python benchmarks/cli_startup.py --repeats 7
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import typer

COMMANDS = {
    "tokensieve --help": ["--help"],
    "tokensieve methods": ["methods"],
    "tokensieve run --keep 0": ["run", "--keep", "0"],
}


def wall_seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main(repeats: int = typer.Option(5, help="runs per command; the median is printed")) -> None:
    # The console script installed next to this Python: what a user runs, its own start-up included.
    script = shutil.which("tokensieve", path=str(Path(sys.executable).parent))
    if script is None:
        raise typer.BadParameter(f"no tokensieve console script next to {sys.executable}: pip install -e .")
    print(f"{script}: median wall time of {repeats} runs")
    for label, args in COMMANDS.items():
        times = [wall_seconds([script, *args]) for _ in range(repeats)]
        print(f"  {label:<26} {statistics.median(times):6.2f} s  (min {min(times):.2f}, max {max(times):.2f})")


if __name__ == "__main__":
    typer.run(main)
