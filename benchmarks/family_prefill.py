"""Prefill of each newer family at a quarter of its image tokens against its ideal, on tiny-but-wide models: the real
token layout (Qwen3-VL-8B's 1,024 tokens of a 1024-px image, InternVL3-8B's 5 tiles of 256, Gemma3-12B's 256) with an
8x512 decoder and a 2x128 tower (benchmarks/shapes.py, ``wide=True``), random weights, batch 1.

The ideal is the stock model whose decoder is fed only the kept tokens: a pre-hook on the language model gathers, at
the fixed positions a run of the method kept, the input embeddings, the attention mask (each of Gemma3's prebuilt
masks, rows and columns), the position ids (all mrope rows) and Qwen3-VL's DeepStack inputs. Tower, projector and
embeddings run in full in both, as the method needs them. Runs alternate (ideal, method, ...) and each pair gives
one ratio, so drift on a shared machine cancels within the pair; the figure is the median paired ratio with a
distribution-free 95% interval (within 3% of the ideal when the interval's upper end is). Prefill computes the last
position's logits only, as ``generate()`` does.

    python benchmarks/family_prefill.py
    python benchmarks/family_prefill.py --families gemma3 --methods uniform,divprune
"""

from __future__ import annotations

import statistics

import torch
import typer
from rich.console import Console
from rich.table import Table

import tokensieve as ts
from shapes import (
    QWEN3_IMAGE_SIDE,
    QWEN3_PATCH,
    decoder_fed_only,
    describe,
    gemma3_12b,
    gemma3_inputs,
    internvl3_8b,
    internvl_inputs,
    paired_ratios,
    qwen3_5_wide,
    qwen3_vl_8b,
    qwen_inputs,
    timed,
)

console = Console()
FAMILIES = {
    "qwen3-vl": (lambda: qwen3_vl_8b(wide=True), lambda: qwen_inputs(1, side=QWEN3_IMAGE_SIDE, patch=QWEN3_PATCH)),
    "qwen3.5": (qwen3_5_wide, lambda: qwen_inputs(1, side=QWEN3_IMAGE_SIDE, patch=QWEN3_PATCH)),
    "internvl": (lambda: internvl3_8b(wide=True), lambda: internvl_inputs(1)),
    "gemma3": (lambda: gemma3_12b(wide=True), lambda: gemma3_inputs(1)),
}


def main(
    families: str = typer.Option(",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}"),
    methods: str = typer.Option("uniform,divprune,visionzip", help="comma-separated pre-LLM methods"),
    fraction: float = typer.Option(0.25, help="share of the image tokens kept"),
    repeats: int = typer.Option(9, help="timed (ideal, method) pairs per configuration"),
) -> None:
    torch.set_grad_enabled(False)
    for family in families.split(","):
        if family not in FAMILIES:
            raise typer.BadParameter(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
        build, make_inputs = FAMILIES[family]
        model, inputs = build(), make_inputs()
        model.set_attn_implementation("sdpa")
        console.print(f"{family}: {describe(model, inputs, 'cpu', 'float32')}")
        prefill = dict(inputs, logits_to_keep=1)
        stock = statistics.median(timed(lambda: model(**prefill), "cpu") for _ in range(3))
        table = Table(title=f"{family}: prefill at {fraction:.0%} of the image tokens vs the ideal (stock: {stock * 1e3:.0f} ms)")
        for column in ("method", "kept", "ideal ms", "method ms", "vs ideal (95% interval)", "selection ms", "vs stock"):
            table.add_column(column, justify="right")
        for name in methods.split(","):
            sieve = ts.load(name, keep=fraction)
            try:
                with ts.apply(model, sieve) as warm_up:
                    model(**prefill)
            except ValueError as refusal:  # a method this family cannot serve: say why, time the others
                table.add_row(name, "-", "-", "-", f"refused: {str(refusal)[:60]}", "-", "-")
                continue
            kept = warm_up.stats.images[0].kept
            ideal_times, method_times, selection_times = [], [], []
            for _ in range(repeats):
                handle = model.model.language_model.register_forward_pre_hook(
                    decoder_fed_only(model, inputs, kept), with_kwargs=True)
                try:
                    ideal_times.append(timed(lambda: model(**prefill), "cpu"))
                finally:
                    handle.remove()
                with ts.apply(model, sieve) as run:  # hooks go on and off outside the timed call
                    method_times.append(timed(lambda: model(**prefill), "cpu"))
                selection_times.append(run.stats.selection_seconds)
            ratio, low, high = paired_ratios(method_times, ideal_times)
            method_ms = statistics.median(method_times) * 1e3
            table.add_row(name, f"{len(kept)}/{warm_up.stats.images[0].before}", f"{statistics.median(ideal_times) * 1e3:.0f}",
                          f"{method_ms:.0f}", f"{ratio - 1:+.1%} ({low - 1:+.1%} to {high - 1:+.1%})",
                          f"{statistics.median(selection_times) * 1e3:.1f}", f"{stock * 1e3 / method_ms:.2f}x")
        console.print(table)


if __name__ == "__main__":
    typer.run(main)
