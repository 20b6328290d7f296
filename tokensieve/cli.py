"""The ``tokensieve`` command line."""

from __future__ import annotations

import time

import typer
from rich.console import Console
from rich.table import Table

from .registry import list_methods, load

app = typer.Typer(help="Visual token reduction for Hugging Face vision-language models.", no_args_is_help=True)
console = Console()


@app.command()
def methods() -> None:
    """List every method with its paper, stage, the signals it needs and its defaults."""
    table = Table(title="tokensieve methods")
    for column in ("name", "paper", "stage", "signals", "defaults"):
        table.add_column(column)
    for info in list_methods():
        defaults = ", ".join(f"{k}={v}" for k, v in info.defaults.items())
        table.add_row(info.name, info.paper, info.stage, ", ".join(info.signals) or "-", defaults)
    console.print(table)


@app.command()
def demo(
    method: str = typer.Option("fastervlm", help="method name (see `tokensieve methods`)"),
    keep: float = typer.Option(64, help="tokens to keep per image: a count (64) or a ratio (0.25)"),
) -> None:
    """Prune a random LLaVA-1.5-shaped model (CLIP-336 grid, 576 tokens per image) and report what changed."""
    import torch

    from . import engine
    from .demo_model import demo_inputs, demo_llava

    budget = int(keep) if keep >= 1 else keep
    model = demo_llava()
    inputs = demo_inputs()
    sieve = load(method, keep=budget)
    with torch.no_grad():
        model(**inputs)  # warm-up, so neither timing pays first-call costs
        start = time.perf_counter()
        model(**inputs)
        stock_seconds = time.perf_counter() - start
        with engine.apply(model, sieve) as run:
            start = time.perf_counter()
            model(**inputs)
            pruned_seconds = time.perf_counter() - start
    console.print(f"[bold]{sieve!r}[/] on a random {type(model).__name__} (SDPA attention)")
    console.print(str(run.stats))
    console.print(f"prefill: {stock_seconds * 1e3:.0f} ms stock, {pruned_seconds * 1e3:.0f} ms with {method}")
