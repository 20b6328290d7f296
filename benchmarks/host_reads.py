"""Host reads per forward: how often the stock model and each method read a tensor's value back to
the host (``.item()``, ``int()``/``bool()`` of a tensor, ``nonzero``) in one prefill. On a GPU each
read waits for the queue to drain, so at small batches they add straight to latency; on a CPU they
cost nothing, which is why this counts them instead of timing them. ``.tolist()`` and ``.cpu()``
are not counted (they bypass the dispatcher): the engine makes a fixed handful of those per call.

    python benchmarks/host_reads.py                  # demo model, batch 8, CPU
    python benchmarks/host_reads.py --device cuda --dtype bfloat16 --model llava-1.5-7b
"""

from __future__ import annotations

import contextlib

import torch
import typer
from rich.console import Console
from rich.table import Table

import tokensieve as ts
from shapes import MODEL_HELP, describe, model_and_inputs
from tokensieve.bench.measure import HostReads

console = Console()
METHODS = "uniform:64,fastervlm:64,visionzip:64,divprune:64,fastv:64,fastervlm:128+fastv:64"


def main(
    methods: str = typer.Option(METHODS, help="comma-separated method:keep, chains as a+b"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    model_name: str = typer.Option("demo", "--model", help=MODEL_HELP),
    batches: str = typer.Option("1,8", help="prompts per forward, each with its image"),
) -> None:
    table = Table(title="host reads in one prefill forward")
    table.add_column("config")
    sizes = [int(b) for b in batches.split(",")]
    for size in sizes:
        table.add_column(f"batch {size}", justify="right")
    counts: dict[str, list[int]] = {}
    for size in sizes:
        model, inputs = model_and_inputs(model_name, device, dtype, size)
        if size == sizes[0]:
            console.print(describe(model, inputs, device, dtype))
        for config in ["stock", *methods.split(",")]:
            sieve = None if config == "stock" else ts.build(config)
            # no_grad, as generate() runs: under inference_mode (torch 2.13) these reads skip the Python mode
            with torch.no_grad(), ts.apply(model, sieve) if sieve else contextlib.nullcontext():
                model(**inputs)  # warm-up: transformers installs hooks on a first forward
                with HostReads() as reads:
                    model(**inputs)
            counts.setdefault(config, []).append(reads.count)
        del model
    for config, row in counts.items():
        table.add_row(config, *map(str, row))
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
