"""The engine's own Python per forward: cProfile of tokensieve's functions on a tiny model, where the model's
arithmetic is small and the hooks' bookkeeping shows.

Each configuration runs ``--calls`` plain forwards of a batch of ``--batch`` rows with ``--images`` images
each (the tiny LLaVA of the tests: 64 tokens per image, a 4-layer decoder) under cProfile, and reports per
forward the whole forward's time and the time spent inside tokensieve's own files (``tottime`` of every
function defined under tokensieve/). Run it on two checkouts to compare engines:

    python benchmarks/engine_overhead.py
    PYTHONPATH=/path/to/other/checkout python benchmarks/engine_overhead.py
"""

from __future__ import annotations

import cProfile
import pstats
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


def _own_seconds(profile: cProfile.Profile) -> float:
    """Seconds spent in functions defined in tokensieve's own files (their own time, not their callees')."""
    package = str(Path(ts.__file__).resolve().parent)
    stats = pstats.Stats(profile)
    return sum(row[2] for (filename, _, _), row in stats.stats.items() if str(Path(filename).resolve()).startswith(package))


def main(
    batch: int = typer.Option(8),
    images: int = typer.Option(3, help="images per row"),
    calls: int = typer.Option(20, help="profiled forwards per configuration"),
    methods: str = typer.Option(";".join(CONFIGS), help="';'-separated method specs"),
) -> None:
    torch.set_grad_enabled(False)
    model = LLAVA.build()
    inputs = LLAVA.make_inputs([[5, 6, 7, 8]] * batch, n_images=[images] * batch)
    console.print(f"tokensieve at {Path(ts.__file__).parent}; tiny LLaVA, batch {batch}, {images} images per row, "
                  f"{calls} forwards each, torch {torch.__version__}")
    table = Table(title="per forward")
    for column in ("method", "forward ms", "tokensieve's own ms", "share"):
        table.add_column(column, justify="right")
    for spec in methods.split(";"):
        method = ts.build(spec)
        with ts.apply(model, method):
            model(**inputs)  # warm-up
            profile = cProfile.Profile()
            start = time.perf_counter()
            profile.enable()
            for _ in range(calls):
                model(**inputs)
            profile.disable()
            seconds = (time.perf_counter() - start) / calls
        own = _own_seconds(profile) / calls
        table.add_row(spec, f"{seconds * 1e3:.1f}", f"{own * 1e3:.2f}", f"{own / seconds:.1%}")
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
