"""Two checks of the shared contract at real size, on a GPU: keeping every token gives the stock
logits bit for bit, and a pruned forward gives the same logits twice. The tests check the same
things on tiny models on the CPU; this script checks them where kernels, dtype and sizes are real.

    python benchmarks/contract_at_size.py --device cuda --dtype bfloat16 --model llava-1.5-7b
    python benchmarks/contract_at_size.py --device cuda --dtype bfloat16 --model qwen2.5-vl-7b
"""

from __future__ import annotations

import torch
import typer
from rich.console import Console
from rich.table import Table

import tokensieve as ts
from shapes import MODEL_HELP, describe, image_token_count, model_and_inputs

console = Console()


def main(
    model_name: str = typer.Option("demo", "--model", help=MODEL_HELP),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    batch: int = typer.Option(2),
    keep: int = typer.Option(64, help="image tokens kept per image in the determinism check"),
) -> None:
    model, inputs = model_and_inputs(model_name, device, dtype, batch)
    console.print(describe(model, inputs, device, dtype))
    stock = model(**inputs).logits
    table = Table(title=f"stock twice equal: {torch.equal(stock, model(**inputs).logits)}")
    for column in ("method", "keep all = stock", f"keep {keep} twice equal"):
        table.add_column(column)
    for info in ts.registry.list_methods():
        try:
            with ts.apply(model, ts.load(info.name, keep=1.0)):
                kept_all = model(**inputs).logits
            runs = []
            for _ in range(2):
                with ts.apply(model, ts.load(info.name, keep=keep)):
                    runs.append(model(**inputs).logits)
        except ValueError as error:  # e.g. a [CLS] method on a tower without [CLS]: refused, as it should be
            table.add_row(info.name, f"refused: {str(error).split(' (')[0]}", "")
            continue
        difference = (kept_all.float() - stock.float()).abs().max().item()
        table.add_row(info.name, f"{torch.equal(kept_all, stock)} (max diff {difference:.3g})",
                      str(torch.equal(*runs)))
    console.print(table)
    console.print(f"{image_token_count(model, inputs)} image tokens per image")


if __name__ == "__main__":
    typer.run(main)
