"""The work of `tokensieve run`: answer a question about an image with sieve-mini, optionally pruned.

The command's options are declared, and checked without torch, in :mod:`tokensieve.cli`;
:func:`run_command` checks them again for Python callers, who reach it directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.markup import escape

from ..cli import PATCH_SIZE, build_sieve, check_run_options, parse_keep
from . import SAMPLE_IMAGE, SAMPLE_QUESTION

DROPPED_GREY = (128, 128, 128)

console = Console()


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

    No image: the bundled sample and its question. Every option is checked before the model loads;
    progress (building on first use, loading, answering) is shown while it works. Returns the answer.
    """
    from .build import _step, load_sieve_mini, model_dir, progress_display

    keep = parse_keep(keep)
    check_run_options(image, question, method, keep, show, image_size)
    sieve = build_sieve(method, keep)
    if image is None:
        image, question = SAMPLE_IMAGE, question or SAMPLE_QUESTION
    picture = Image.open(image).convert("RGB")

    with progress_display() as progress:
        model_dir(progress)  # shows each build step the first time; cached afterwards
        with _step(progress, f"Loading sieve-mini ({image_size}x{image_size} images)"):
            model, processor = load_sieve_mini(image_size)
        with _step(progress, "Answering" + (f" with {method}" if method else " with all tokens")):
            answer = generate_answer(model, processor, picture, question, sieve, image_size, max_new_tokens)

    console.print(f"[dim]image[/] {escape(str(image))}  [dim]question[/] {escape(question)}")
    console.print(f"[dim]visual tokens[/] {answer.after} of {answer.before} kept"
                  + (f" by {escape(method)}" if method else "") + f"  [dim]time[/] {answer.seconds:.2f} s")
    console.print(f"[bold]answer:[/] {escape(answer.text)}")
    if show is not None:
        grey_out(picture.resize((image_size, image_size)), answer.grid, answer.kept).save(show)
        console.print(f"[dim]kept patches drawn in[/] {escape(str(show))}")
    return answer.text


@dataclass
class Answer:
    """sieve-mini's reply and what it saw: the image's visual tokens before and after pruning, the kept
    ones (raster indices over `grid`), and the seconds `generate` took."""

    text: str
    before: int
    after: int
    kept: Sequence[int]
    grid: tuple[int, int]
    seconds: float


def generate_answer(model, processor, picture: Image.Image, question: str, sieve, image_size: int,
                    max_new_tokens: int) -> Answer:
    """sieve-mini's greedy answer to `question` about `picture`, pruned by `sieve` unless it is None."""
    import torch

    import tokensieve as ts

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=picture, text=prompt, return_tensors="pt")
    grid = (image_size // PATCH_SIZE, image_size // PATCH_SIZE)
    start = time.perf_counter()
    with torch.inference_mode():
        if sieve is None:
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            before = after = grid[0] * grid[1]
            kept = range(before)
        else:
            with ts.apply(model, sieve) as run:
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            record = run.stats.images[0]
            before, after, kept, grid = record.before, record.after, record.kept.tolist(), tuple(record.grid)
    seconds = time.perf_counter() - start
    text = processor.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()
    return Answer(text, before, after, kept, grid, seconds)
