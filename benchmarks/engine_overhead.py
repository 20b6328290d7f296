"""The engine's own Python per forward: cProfile of tokensieve's functions on a tiny model, where the model's
arithmetic is small and the hooks' bookkeeping shows.

Each configuration runs ``--calls`` plain forwards of a batch of ``--batch`` rows with ``--images`` images
each (the tiny LLaVA of the tests: 64 tokens per image, a 4-layer decoder) under cProfile, in ``--rounds``
alternating rounds, and reports per forward the whole forward's time, the time spent inside tokensieve's own
files (``tottime`` of every function defined under tokensieve/; medians over rounds) and the number of calls
of those functions (which does not depend on the machine's load). Run it on two checkouts to compare engines:

    python benchmarks/engine_overhead.py
    PYTHONPATH=/path/to/other/checkout python benchmarks/engine_overhead.py
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import tokensieve as ts  # noqa: E402
from tiny_models import LLAVA  # noqa: E402

console = Console()
CONFIGS = ["uniform:16", "fastv:16,layer=1", "uniform:32+fastv:16,layer=1", "pyramiddrop:16", "uniform:32+pyramiddrop:16"]


def _own(profile: cProfile.Profile) -> tuple[float, int]:
    """Seconds spent in functions defined in tokensieve's own files (their own time, not their callees'), and
    how many calls of them there were (a count that does not depend on the machine's load)."""
    package = str(Path(ts.__file__).resolve().parent)
    stats = pstats.Stats(profile)
    rows = [row for (filename, _, _), row in stats.stats.items() if str(Path(filename).resolve()).startswith(package)]
    return sum(row[2] for row in rows), sum(row[1] for row in rows)


def main(
    batch: int = typer.Option(8),
    images: int = typer.Option(3, help="images per row"),
    calls: int = typer.Option(10, help="profiled forwards per configuration and round"),
    rounds: int = typer.Option(5, help="rounds, each running every configuration once"),
    methods: str = typer.Option(";".join(CONFIGS), help="';'-separated method specs"),
) -> None:
    torch.set_grad_enabled(False)
    model = LLAVA.build()
    inputs = LLAVA.make_inputs([[5, 6, 7, 8]] * batch, n_images=[images] * batch)
    console.print(f"tokensieve at {Path(ts.__file__).parent}; tiny LLaVA, batch {batch}, {images} images per row, "
                  f"{calls} forwards each, torch {torch.__version__}")
    table = Table(title=f"per forward (medians of {rounds} rounds, configurations alternating)")
    for column in ("method", "forward ms", "tokensieve's own ms", "share", "tokensieve calls"):
        table.add_column(column, justify="right")
    specs = methods.split(";")
    measured = {spec: [] for spec in specs}
    for _ in range(rounds):
        for spec in specs:
            measured[spec].append(_profiled(model, inputs, ts.build(spec), calls))
    for spec, runs in measured.items():
        seconds = statistics.median(r[0] for r in runs)
        own = statistics.median(r[1] for r in runs)
        table.add_row(spec, f"{seconds * 1e3:.1f}", f"{own * 1e3:.2f}", f"{own / seconds:.1%}", str(runs[0][2]))
    console.print(table)


def _profiled(model, inputs: dict, method, calls: int) -> tuple[float, float, int]:
    """Per forward: seconds, tokensieve's own seconds and its function calls, over ``calls`` profiled forwards."""
    with ts.apply(model, method):
        model(**inputs)  # warm-up
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        for _ in range(calls):
            model(**inputs)
        profile.disable()
        seconds = (time.perf_counter() - start) / calls
    own, count = _own(profile)
    return seconds, own / calls, count // calls


if __name__ == "__main__":
    typer.run(main)
