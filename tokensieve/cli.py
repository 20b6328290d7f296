"""The ``tokensieve`` command line."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .mini.cli import model_app, run_command
from .registry import list_methods, load

app = typer.Typer(help="Visual token reduction for Hugging Face vision-language models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
console = Console()


@app.command()
def run(
    image: Path = typer.Option(None, help="an image file; none: the bundled sample and its question"),
    question: str = typer.Option(None, help="the question to answer about the image"),
    method: str = typer.Option(None, help="method name (see `tokensieve methods`); none: all tokens"),
    keep: str = typer.Option(None, help="tokens to keep per image: a count (64) or a ratio (0.25)"),
    show: Path = typer.Option(None, help="write the image with dropped patches greyed out to this PNG"),
    image_size: int = typer.Option(224, help="224 (16x16 = 256 tokens) or 448 (32x32 = 1,024 tokens)"),
) -> None:
    """Answer a question about an image with the embedded sieve-mini model, optionally pruned."""
    run_command(image=image, question=question, method=method, keep=keep, show=show, image_size=image_size)


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
    attention = model.config.get_text_config()._attn_implementation
    console.print(f"[bold]{sieve!r}[/] on a random {type(model).__name__} ({attention} attention)")
    console.print(str(run.stats))
    console.print(f"prefill: {stock_seconds * 1e3:.0f} ms stock, {pruned_seconds * 1e3:.0f} ms with {method}")
