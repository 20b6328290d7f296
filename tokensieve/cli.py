"""The ``tokensieve`` command line."""

from __future__ import annotations

import json
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


@app.command()
def bench(
    model: str = typer.Option("sieve-mini", help="sieve-mini, or a local Hugging Face checkpoint folder"),
    suite: str = typer.Option("builtin", help="builtin (the QA suite's test split) or pope, gqa, textvqa, mme, "
                                              "scienceqa_img, mmbench (with --data)"),
    methods: str = typer.Option("all", help="comma-separated method names, or all; name:keep fixes one's budget"),
    keep: str = typer.Option("256,128,64,32,16", help="comma-separated budgets: counts (64) or ratios (0.25)"),
    limit: int = typer.Option(None, help="the first N samples (builtin: 700 unless given)"),
    out: Path = typer.Option(Path("results"), help="results folder; rerun the same command to resume"),
    workers: int = typer.Option(1, help="configurations run in this many parallel processes"),
    data: Path = typer.Option(None, help="a benchmark's downloaded folder (or one .parquet file)"),
    split: str = typer.Option(None, help="benchmark split (default: the benchmark's scored split)"),
    device: str = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda when available)"),
    dtype: str = typer.Option(None, help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU)"),
    max_new_tokens: int = typer.Option(None, help="longest answer (default: 5 builtin, 16 benchmarks)"),
    show: int = typer.Option(6, help="save the first N images as the model saw them, for the report"),
    report: bool = typer.Option(True, help="write tables, plots and report.html when the sweep ends"),
) -> None:
    """Sweep model x method x budget over a suite; one JSON line per sample in OUT/runs, resumable."""
    from .bench.datasets import BenchmarkDataMissing
    from .bench.sweep import SweepSpecError, sweep

    try:
        sweep(model=model, suite=suite, methods=methods, keeps=keep, limit=limit, out=out, workers=workers,
              data=data, split=split, device=device, dtype=dtype, max_new_tokens=max_new_tokens, show=show)
    except (SweepSpecError, BenchmarkDataMissing) as err:
        raise typer.BadParameter(str(err)) from None
    console.print(f"records: [bold]{out / 'runs'}[/] (one JSONL per configuration)")
    skipped = json.loads((out / "sweep.json").read_text())["skipped"]
    for config_id, reason in skipped.items():
        console.print(f"[yellow]skipped[/] {config_id}: {reason}")
    if report:
        from .bench.outputs import write_outputs

        write_outputs(out)
